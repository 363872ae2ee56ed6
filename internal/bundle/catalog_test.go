package bundle_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"

	. "github.com/onsi/gomega"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// TestDefaultCatalog keeps the embedded catalog loadable (Default panics
// otherwise) and holds the releases the README's table promises.
func TestDefaultCatalog(t *testing.T) {
	g := NewWithT(t)
	c := bundle.Default()
	g.Expect(c.Versions()).To(Equal([]string{"1.26.4", "1.27.2", "1.27.3", "1.28.2"}))
	g.Expect(c.Minors()).To(Equal([]string{"1.26", "1.27", "1.28"}))

	for _, v := range c.Versions() {
		b, err := c.Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(b.Images).To(HaveLen(len(bundle.KnownImages())), v)
		g.Expect(b.Images[bundle.ImagePilot]).To(Equal("docker.io/istio/pilot:"+v), v)
		g.Expect(b.Images[bundle.ImageZtunnel]).To(Equal("docker.io/istio/ztunnel:"+v), v)
		g.Expect(b.Images[bundle.ImageSpireServer]).To(HaveSuffix(":"+b.SpireVersion), v)
		g.Expect(b.UpgradeFrom).To(ContainElement(b.Minor), v)
		for _, comp := range bundle.AllComponents {
			chart, err := b.Chart(comp)
			g.Expect(err).NotTo(HaveOccurred(), "%s %s", v, comp)
			for _, f := range []string{"Chart.yaml", "values.yaml", "templates/_labels.tpl"} {
				_, err := fs.Stat(chart, f)
				g.Expect(err).NotTo(HaveOccurred(), "%s %s: %s", v, comp, f)
			}
		}
	}
}

// TestFromDirMatchesEmbedded: --bundles-dir pointed at the source tree serves
// what the binary embeds.
func TestFromDirMatchesEmbedded(t *testing.T) {
	g := NewWithT(t)
	c, err := bundle.FromDir(filepath.Join("..", "..", "bundles"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(c.Versions()).To(Equal(bundle.Default().Versions()))
}

func TestFromDirErrors(t *testing.T) {
	g := NewWithT(t)
	_, err := bundle.FromDir(filepath.Join("testdata", "does-not-exist"))
	g.Expect(err).To(MatchError(ContainSubstring("bundles directory")))
	g.Expect(errors.Is(err, fs.ErrNotExist)).To(BeTrue())

	_, err = bundle.FromDir(filepath.Join("testdata", "good", "catalog", "1.0.0.yaml"))
	g.Expect(err).To(MatchError(ContainSubstring("not a directory")))
}

func TestFromDirGood(t *testing.T) {
	g := NewWithT(t)
	c, err := bundle.FromDir(filepath.Join("testdata", "good"))
	g.Expect(err).NotTo(HaveOccurred())
	b, err := c.Resolve("1.0")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(b.Version).To(Equal("1.0.0"))
	g.Expect(b.Images[bundle.ImageNodeAgent]).To(HaveSuffix("@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"))
	g.Expect(b.Images[bundle.ImageSpireServer]).To(Equal("localhost:5000/spire-server:1.13.3"))
}

// TestLoadBrokenFixture: one load reports every mistake of every manifest,
// each naming its file and field.
func TestLoadBrokenFixture(t *testing.T) {
	g := NewWithT(t)
	_, err := bundle.FromDir(filepath.Join("testdata", "broken"))
	g.Expect(err).To(HaveOccurred())
	for _, want := range []string{
		`catalog/1.0.0.yaml: version: "1.0": not a release`,
		`catalog/1.0.0.yaml: minKernel: "five": want a kernel release like "5.10"`,
		`catalog/1.0.0.yaml: images.pilot: "example.com/istio/pilot": no tag or digest`,
		`catalog/1.0.0.yaml: images.pilto: unknown image; known images: installCNI, nodeAgent, pause, pilot, proxy, spireAgent, spireServer, ztunnel`,
		`catalog/1.0.0.yaml: images.pause: required`,
		`catalog/1.0.0.yaml: components.waypoint: unknown component`,
		`catalog/1.0.0.yaml: components.spire-agent: required`,
		`catalog/1.0.0.yaml: components.istiod.chart: "missing": no charts/missing/Chart.yaml`,
		`catalog/1.0.0.yaml: components.istio-cni.chart: "istio-cni": charts/istio-cni/Chart.yaml: name "ztunnel", want "istio-cni"`,
		`catalog/1.1.0.yaml: error unmarshaling JSON: while decoding JSON: json: unknown field "minKernal"`,
		`catalog/1.2.3.yaml: version: "1.2.4" does not match the file name; name the file 1.2.4.yaml`,
		`catalog/1.2.3.yaml: components.istio-cni.chart: "ztunnel"`,
	} {
		g.Expect(err.Error()).To(ContainSubstring(want))
	}
	// A manifest that does not decode reports only that.
	g.Expect(err.Error()).NotTo(ContainSubstring("catalog/1.1.0.yaml: images"))
}

// validManifest is a manifest bundle.Load accepts; the table below breaks it one
// field at a time.
func validManifest() map[string]any {
	images := map[string]any{}
	for _, name := range bundle.KnownImages() {
		images[name] = "example.com/mesh/" + strings.ToLower(name) + ":1.28.2"
	}
	comps := map[string]any{}
	for _, c := range bundle.AllComponents {
		comps[string(c)] = map[string]any{"chart": string(c)}
	}
	return map[string]any{
		"version":     "1.28.2",
		"minKernel":   "5.10",
		"dnsCapture":  true,
		"upgradeFrom": []any{"1.27", "1.28"},
		"spire":       map[string]any{"version": "1.13.3", "support": map[string]any{"Sidecar": "Supported", "Ambient": "Unsupported"}},
		"images":      images,
		"components":  comps,
	}
}

func catalogFS(t *testing.T, file string, m map[string]any) fstest.MapFS {
	t.Helper()
	raw, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	fsys := fstest.MapFS{"catalog/" + file: {Data: raw}}
	for _, c := range bundle.AllComponents {
		fsys["charts/"+string(c)+"/Chart.yaml"] = &fstest.MapFile{Data: []byte("apiVersion: v2\nname: " + string(c) + "\nversion: 0.1.0\n")}
	}
	return fsys
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name   string
		file   string // default 1.28.2.yaml
		mutate func(m map[string]any)
		fsys   func(fs fstest.MapFS)
		want   string // "" = loads
	}{
		{name: "valid", mutate: func(map[string]any) {}},
		{name: "version is a minor", file: "1.28.yaml", mutate: func(m map[string]any) { m["version"] = "1.28" },
			want: `catalog/1.28.yaml: version: "1.28": not a release: want MAJOR.MINOR.PATCH`},
		{name: "version with v prefix", file: "v1.28.2.yaml", mutate: func(m map[string]any) { m["version"] = "v1.28.2" },
			want: `catalog/v1.28.2.yaml: version: "v1.28.2": not a version`},
		{name: "pre-release", file: "1.28.0-beta.1.yaml", mutate: func(m map[string]any) { m["version"] = "1.28.0-beta.1" },
			want: `version: "1.28.0-beta.1": not a version`},
		{name: "version is a number", mutate: func(m map[string]any) { m["version"] = 1.28 },
			want: `catalog/1.28.2.yaml: version: "1.28": not a release`},
		{name: "unquoted minor loses its zero", mutate: func(m map[string]any) { m["upgradeFrom"] = []any{1.20} },
			want: `catalog/1.28.2.yaml: upgradeFrom[0]: "1.2" is more than two minors older than 1.28`},
		{name: "file name differs", file: "1.28.3.yaml", mutate: func(map[string]any) {},
			want: `catalog/1.28.3.yaml: version: "1.28.2" does not match the file name; name the file 1.28.2.yaml`},
		{name: "minKernel missing", mutate: func(m map[string]any) { delete(m, "minKernel") },
			want: `catalog/1.28.2.yaml: minKernel: "": want a kernel release like "5.10"`},
		{name: "dnsCapture missing", mutate: func(m map[string]any) { delete(m, "dnsCapture") },
			want: `catalog/1.28.2.yaml: dnsCapture: required: true when this release's ztunnel runs its DNS proxy`},
		{name: "dnsCapture for the node agent alone", mutate: func(m map[string]any) {
			m["components"].(map[string]any)[string(bundle.NodeAgent)] = map[string]any{"chart": "node-agent", "values": map[string]any{"dnsCapture": false}}
		}, want: `catalog/1.28.2.yaml: components.node-agent.values.dnsCapture: set dnsCapture at the top of the manifest instead`},
		{name: "ztunnel's DNS proxy alone", mutate: func(m map[string]any) {
			m["components"].(map[string]any)[string(bundle.Ztunnel)] = map[string]any{"chart": "ztunnel", "values": map[string]any{"env": map[string]any{"ISTIO_META_DNS_CAPTURE": "false"}}}
		}, want: `components.ztunnel.values.env.ISTIO_META_DNS_CAPTURE: set dnsCapture at the top of the manifest instead`},
		{name: "istio-cni's DNS capture alone", mutate: func(m map[string]any) {
			m["components"].(map[string]any)[string(bundle.CNI)] = map[string]any{"chart": "istio-cni", "values": map[string]any{"ambient": map[string]any{"dnsCapture": false}}}
		}, want: `components.istio-cni.values.ambient.dnsCapture: set dnsCapture at the top of the manifest instead`},
		{name: "upgradeFrom a release", mutate: func(m map[string]any) { m["upgradeFrom"] = []any{"1.27.3"} },
			want: `catalog/1.28.2.yaml: upgradeFrom[0]: "1.27.3": not a minor`},
		{name: "upgradeFrom newer", mutate: func(m map[string]any) { m["upgradeFrom"] = []any{"1.28", "1.29"} },
			want: `catalog/1.28.2.yaml: upgradeFrom[1]: "1.29" is newer than 1.28`},
		{name: "spire version missing", mutate: func(m map[string]any) { delete(m, "spire") },
			want: `catalog/1.28.2.yaml: spire.version: "": not a version`},
		{name: "spire support per mode", mutate: func(m map[string]any) {
			m["spire"] = map[string]any{"version": "1.13.3", "support": map[string]any{"Sidecar": "yes", "Ambeint": "Unsupported"}}
		}, want: `catalog/1.28.2.yaml: spire.support.Sidecar: "yes": want Supported or Unsupported`},
		{name: "image missing", mutate: func(m map[string]any) { delete(m["images"].(map[string]any), bundle.ImageZtunnel) },
			want: `catalog/1.28.2.yaml: images.ztunnel: required`},
		{name: "image unknown", mutate: func(m map[string]any) { m["images"].(map[string]any)["waypoint"] = "example.com/w:1" },
			want: `catalog/1.28.2.yaml: images.waypoint: unknown image`},
		{name: "image untagged", mutate: func(m map[string]any) { m["images"].(map[string]any)[bundle.ImagePilot] = "docker.io/istio/pilot" },
			want: `catalog/1.28.2.yaml: images.pilot: "docker.io/istio/pilot": no tag or digest`},
		{name: "image registry port is no tag", mutate: func(m map[string]any) { m["images"].(map[string]any)[bundle.ImagePilot] = "localhost:5000/pilot" },
			want: `images.pilot: "localhost:5000/pilot": no tag or digest`},
		{name: "image with spaces", mutate: func(m map[string]any) {
			m["images"].(map[string]any)[bundle.ImagePilot] = "docker.io/istio/pilot: 1.28.2"
		},
			want: `images.pilot: "docker.io/istio/pilot: 1.28.2": not an image reference`},
		{name: "component missing", mutate: func(m map[string]any) { delete(m["components"].(map[string]any), string(bundle.NodeAgent)) },
			want: `catalog/1.28.2.yaml: components.node-agent: required`},
		{name: "component unknown", mutate: func(m map[string]any) {
			m["components"].(map[string]any)["waypoint"] = map[string]any{"chart": "crds"}
		}, want: `catalog/1.28.2.yaml: components.waypoint: unknown component`},
		{name: "chart empty", mutate: func(m map[string]any) { m["components"].(map[string]any)[string(bundle.CRDs)] = map[string]any{} },
			want: `catalog/1.28.2.yaml: components.crds.chart: required`},
		{name: "chart path escapes", mutate: func(m map[string]any) {
			m["components"].(map[string]any)[string(bundle.CRDs)] = map[string]any{"chart": "../crds"}
		}, want: `components.crds.chart: "../crds": want a directory name under charts/`},
		{name: "chart missing", fsys: func(f fstest.MapFS) { delete(f, "charts/ztunnel/Chart.yaml") },
			want: `catalog/1.28.2.yaml: components.ztunnel.chart: "ztunnel": no charts/ztunnel/Chart.yaml`},
		{name: "chart v1", fsys: func(f fstest.MapFS) {
			f["charts/ztunnel/Chart.yaml"] = &fstest.MapFile{Data: []byte("apiVersion: v1\nname: ztunnel\nversion: 0.1.0\n")}
		}, want: `components.ztunnel.chart: "ztunnel": charts/ztunnel/Chart.yaml: apiVersion "v1", want v2`},
		{name: "chart without version", fsys: func(f fstest.MapFS) {
			f["charts/ztunnel/Chart.yaml"] = &fstest.MapFile{Data: []byte("apiVersion: v2\nname: ztunnel\n")}
		}, want: `charts/ztunnel/Chart.yaml: version is required`},
		{name: "unknown field", mutate: func(m map[string]any) { m["minKernal"] = "5.10" },
			want: `catalog/1.28.2.yaml: error unmarshaling JSON: while decoding JSON: json: unknown field "minKernal"`},
		{name: "no manifests", fsys: func(f fstest.MapFS) {
			delete(f, "catalog/1.28.2.yaml")
			f["catalog/README.md"] = &fstest.MapFile{Data: []byte("not a manifest")}
		}, want: `catalog: no bundles`},
		{name: "no catalog directory", fsys: func(f fstest.MapFS) { delete(f, "catalog/1.28.2.yaml") },
			want: `read catalog: open catalog: file does not exist`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := NewWithT(t)
			m := validManifest()
			if tt.mutate != nil {
				tt.mutate(m)
			}
			file := tt.file
			if file == "" {
				file = "1.28.2.yaml"
			}
			fsys := catalogFS(t, file, m)
			if tt.fsys != nil {
				tt.fsys(fsys)
			}
			c, err := bundle.Load(fsys)
			if tt.want == "" {
				g.Expect(err).NotTo(HaveOccurred())
				g.Expect(c.Versions()).To(Equal([]string{"1.28.2"}))
				return
			}
			g.Expect(err).To(MatchError(ContainSubstring(tt.want)))
		})
	}
}

func TestResolve(t *testing.T) {
	const known = "known versions: 1.26.4, 1.27.2, 1.27.3, 1.28.2"
	tests := []struct {
		in      string
		want    string // resolved version
		wantErr string
	}{
		{in: "1.27", want: "1.27.3"},
		{in: "1.28", want: "1.28.2"},
		{in: "1.26", want: "1.26.4"},
		{in: "1.27.2", want: "1.27.2"},
		{in: "1.27.3", want: "1.27.3"},
		{in: "1.29", wantErr: `spec.version "1.29": not in the catalog; ` + known},
		{in: "1.27.1", wantErr: `spec.version "1.27.1": not in the catalog; ` + known},
		{in: "2.0.0", wantErr: `spec.version "2.0.0": not in the catalog; ` + known},
		{in: "abc", wantErr: `spec.version "abc": not a version: want a release like "1.28.2" or a minor like "1.28"; ` + known},
		{in: "", wantErr: `spec.version "": not a version`},
		{in: "1", wantErr: `spec.version "1": not a version`},
		{in: "v1.28", wantErr: `spec.version "v1.28": not a version`},
		{in: "1.28.2.1", wantErr: `spec.version "1.28.2.1": not a version`},
		{in: "1.028", wantErr: `spec.version "1.028": not a version`},
		{in: " 1.28", wantErr: `spec.version " 1.28": not a version`},
	}
	c := bundle.Default()
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			g := NewWithT(t)
			b, err := c.Resolve(tt.in)
			if tt.wantErr != "" {
				g.Expect(err).To(MatchError(HavePrefix(tt.wantErr)))
				var verr *bundle.VersionError
				g.Expect(errors.As(err, &verr)).To(BeTrue())
				g.Expect(verr.Requested).To(Equal(tt.in))
				g.Expect(verr.Known).To(Equal(c.Versions()))
				g.Expect(b).To(BeNil())
				return
			}
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(b.Version).To(Equal(tt.want))
			g.Expect(b.Minor).To(Equal(tt.want[:4]))
		})
	}
}

func TestRevision(t *testing.T) {
	g := NewWithT(t)
	b, err := bundle.Default().Resolve("1.28.2")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(b.Revision()).To(Equal("1-28-2"))
	g.Expect(b.MinKernel).To(Equal("5.10"))
	g.Expect(b.SpireVersion).To(Equal("1.13.3"))
}

func TestCanUpgradeFrom(t *testing.T) {
	c := bundle.Default()
	tests := []struct {
		to, from string
		want     bool
	}{
		{to: "1.28.2", from: "1.27.3", want: true},
		{to: "1.28.2", from: "1.27", want: true},
		{to: "1.28.2", from: "1.28.1", want: true}, // patch upgrade
		{to: "1.28.2", from: "1.28.2", want: true}, // nothing to do
		{to: "1.28.2", from: "1.28.3", want: false},
		{to: "1.28.2", from: "1.26.4", want: false}, // two minors: go through 1.27
		{to: "1.27.2", from: "1.28.2", want: false}, // downgrade
		{to: "1.27.3", from: "1.27.2", want: true},
		{to: "1.27.2", from: "1.27.3", want: false},
		{to: "1.26.4", from: "1.25.5", want: true},
		{to: "1.28.2", from: "garbage", want: false},
	}
	for _, tt := range tests {
		t.Run(tt.from+"->"+tt.to, func(t *testing.T) {
			g := NewWithT(t)
			b, err := c.Resolve(tt.to)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(b.CanUpgradeFrom(tt.from)).To(Equal(tt.want))
		})
	}
}

func TestChartUnknownComponent(t *testing.T) {
	g := NewWithT(t)
	b, err := bundle.Default().Resolve("1.28")
	g.Expect(err).NotTo(HaveOccurred())
	_, err = b.Chart("waypoint")
	g.Expect(err).To(MatchError(`bundle 1.28.2: no chart for component "waypoint"; components: crds, spire-server, spire-agent, istiod, ztunnel, node-agent, istio-cni`))
}

// TestChartsAreShared: versions differ by values only; every bundle of the
// embedded catalog points at the same chart directory per component.
func TestChartsAreShared(t *testing.T) {
	g := NewWithT(t)
	entries, err := os.ReadDir(filepath.Join("..", "..", "bundles", "charts"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(entries).To(HaveLen(len(bundle.AllComponents)))
	for _, v := range bundle.Default().Versions() {
		b, _ := bundle.Default().Resolve(v)
		for _, c := range bundle.AllComponents {
			g.Expect(b.ChartDir(c)).To(Equal(string(c)), "%s %s", v, c)
		}
	}
}

// TestWithImages: an override reaches every bundle's chart values and
// leaves the original catalog alone; bad names and references are refused
// with the list of known images.
func TestWithImages(t *testing.T) {
	g := NewWithT(t)
	c := bundle.Default()
	o, err := c.WithImages(map[string]string{
		bundle.ImageNodeAgent: "meshkeeper.test/agent:dev",
		bundle.ImageZtunnel:   "meshkeeper.test/ztunnel-stand-in:dev",
	})
	g.Expect(err).NotTo(HaveOccurred())
	for _, v := range c.Versions() {
		b, err := o.Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(b.Values(bundle.NodeAgent, bundle.Inputs{})["images"]).To(HaveKeyWithValue(bundle.ImageNodeAgent, "meshkeeper.test/agent:dev"), v)
		g.Expect(b.Values(bundle.Ztunnel, bundle.Inputs{})["images"]).To(HaveKeyWithValue(bundle.ImageZtunnel, "meshkeeper.test/ztunnel-stand-in:dev"), v)
		g.Expect(b.Images[bundle.ImagePilot]).To(Equal("docker.io/istio/pilot:"+v), v)
		orig, _ := c.Resolve(v)
		g.Expect(orig.Images[bundle.ImageNodeAgent]).To(Equal("ghcr.io/meshkeeper/agent:0.1.0"), v)
	}

	_, err = c.WithImages(map[string]string{"agent": "meshkeeper.test/agent:dev"})
	g.Expect(err).To(MatchError(ContainSubstring(`image "agent": unknown image; known images: installCNI, nodeAgent`)))
	_, err = c.WithImages(map[string]string{bundle.ImageNodeAgent: "agent"})
	g.Expect(err).To(MatchError(ContainSubstring(`image nodeAgent="agent": not an image reference`)))
}

// TestWithValues: values for one component reach that component's release
// values in every bundle, over the bundle's own, and nowhere else.
func TestWithValues(t *testing.T) {
	g := NewWithT(t)
	c := bundle.Default()
	o, err := c.WithValues(bundle.NodeAgent, map[string]any{"memlockCapability": false})
	g.Expect(err).NotTo(HaveOccurred())
	for _, v := range c.Versions() {
		b, err := o.Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(b.Values(bundle.NodeAgent, bundle.Inputs{})).To(HaveKeyWithValue("memlockCapability", false), v)
		g.Expect(b.Values(bundle.Ztunnel, bundle.Inputs{})).NotTo(HaveKey("memlockCapability"), v)
		orig, _ := c.Resolve(v)
		g.Expect(orig.Values(bundle.NodeAgent, bundle.Inputs{})).NotTo(HaveKey("memlockCapability"), v)
	}
	_, err = c.WithValues(bundle.NodeAgent, map[string]any{"dnsCapture": false})
	g.Expect(err).To(MatchError(ContainSubstring("component node-agent: value dnsCapture: DNS capture is the bundle's dnsCapture")))
	_, err = c.WithValues("node-agnet", map[string]any{"x": 1})
	g.Expect(err).To(MatchError(ContainSubstring(`component "node-agnet": unknown`)))
}

// TestSpireSupportMatrix is the README's support matrix: every shipped
// bundle wires Sidecar proxies to SPIRE, none wires ztunnel (upstream
// ztunnel cannot take SPIRE identities yet).
func TestSpireSupportMatrix(t *testing.T) {
	g := NewWithT(t)
	c := bundle.Default()
	for _, v := range c.Versions() {
		b, err := c.Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(b.SpireSupport).To(Equal(map[string]bool{"Sidecar": true, "Ambient": false}), v)
	}
}
