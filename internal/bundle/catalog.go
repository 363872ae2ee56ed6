package bundle

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"
	"sync"

	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/bundles"
)

// Catalog is every bundle meshkeeper can install, sorted by version.
type Catalog struct {
	bundles []*Bundle
}

// Default returns the catalog embedded in the binary. It panics only if the
// embedded catalog is invalid, which TestDefaultCatalog prevents.
func Default() *Catalog {
	return defaultCatalog()
}

var defaultCatalog = sync.OnceValue(func() *Catalog {
	c, err := LoadFrom(bundles.FS, SourceEmbedded)
	if err != nil {
		panic(fmt.Sprintf("embedded bundle catalog is invalid: %v", err))
	}
	return c
})

// FromDir loads a catalog from a directory laid out like bundles/ (catalog/
// and charts/), for development with --bundles-dir.
func FromDir(dir string) (*Catalog, error) {
	info, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("bundles directory: %w", err)
	}
	if !info.IsDir() {
		return nil, fmt.Errorf("bundles directory %s: not a directory", dir)
	}
	c, err := LoadFrom(os.DirFS(dir), "directory "+dir)
	if err != nil {
		return nil, fmt.Errorf("bundles directory %s: %w", dir, err)
	}
	return c, nil
}

// manifest is the YAML of one catalog/<version>.yaml.
type manifest struct {
	Version     string   `json:"version"`
	MinKernel   string   `json:"minKernel"`
	UpgradeFrom []string `json:"upgradeFrom"`
	Spire       struct {
		Version string `json:"version"`
		// Support says, per dataplane mode, whether this bundle's Istio
		// can take workload identities from SPIRE.
		Support map[string]string `json:"support"`
	} `json:"spire"`
	// DNSCapture: ztunnel's DNS proxy is on, and pods' DNS goes to it.
	// Required: the one place ztunnel, the node agent and istio-cni read.
	DNSCapture *bool                        `json:"dnsCapture"`
	Images     map[string]string            `json:"images"`
	Components map[string]componentManifest `json:"components"`
}

type componentManifest struct {
	// Chart is the chart's directory under charts/.
	Chart string `json:"chart"`
	// Values are merged over the values meshkeeper computes, for what only
	// this release needs (a feature flag, a changed default).
	Values map[string]any `json:"values,omitempty"`
}

// LoadFrom is Load with every bundle's Source set to source.
func LoadFrom(fsys fs.FS, source string) (*Catalog, error) {
	c, err := Load(fsys)
	if err != nil {
		return nil, err
	}
	for _, b := range c.bundles {
		b.Source = source
	}
	return c, nil
}

// Load reads and validates every catalog/*.yaml manifest of fsys and the
// charts they name under charts/. Errors name the file and the field.
func Load(fsys fs.FS) (*Catalog, error) {
	entries, err := fs.ReadDir(fsys, "catalog")
	if err != nil {
		return nil, fmt.Errorf("read catalog: %w", err)
	}
	c := &Catalog{}
	var errs []error
	for _, e := range entries {
		if e.IsDir() || path.Ext(e.Name()) != ".yaml" {
			continue
		}
		b, err := loadBundle(fsys, path.Join("catalog", e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		c.bundles = append(c.bundles, b)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if len(c.bundles) == 0 {
		return nil, errors.New("catalog: no bundles (want catalog/<version>.yaml files)")
	}
	slices.SortFunc(c.bundles, func(a, b *Bundle) int { return a.semver.compare(b.semver) })
	return c, nil
}

func loadBundle(fsys fs.FS, file string) (*Bundle, error) {
	raw, err := fs.ReadFile(fsys, file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var m manifest
	if err := yaml.UnmarshalStrict(raw, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var errs []error
	fail := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s: %s", file, field, fmt.Sprintf(format, args...)))
	}

	b := &Bundle{
		Version:      m.Version,
		MinKernel:    m.MinKernel,
		UpgradeFrom:  m.UpgradeFrom,
		SpireVersion: m.Spire.Version,
		Images:       map[string]string{},
		file:         file,
		charts:       map[Component]string{},
		values:       map[Component]map[string]any{},
		fsys:         fsys,
	}
	b.digest = sync.OnceValues(b.computeDigest)

	if v, err := parseRelease(m.Version); err != nil {
		fail("version", "%q: %v", m.Version, err)
	} else {
		b.semver, b.Minor = v, v.minorString()
		if want := m.Version + ".yaml"; path.Base(file) != want {
			fail("version", "%q does not match the file name; name the file %s", m.Version, want)
		}
	}
	if !kernelRE.MatchString(m.MinKernel) {
		fail("minKernel", "%q: want a kernel release like \"5.10\"", m.MinKernel)
	}
	for i, from := range m.UpgradeFrom {
		v, err := parseMinor(from)
		switch {
		case err != nil:
			fail(fmt.Sprintf("upgradeFrom[%d]", i), "%q: %v", from, err)
		case b.Minor != "" && v.compareMinor(b.semver) > 0:
			fail(fmt.Sprintf("upgradeFrom[%d]", i), "%q is newer than %s: a bundle is only reached from older minors", from, b.Minor)
		case b.Minor != "" && (v.major+1 < b.semver.major || v.major == b.semver.major && v.minor+2 < b.semver.minor):
			fail(fmt.Sprintf("upgradeFrom[%d]", i), "%q is more than two minors older than %s; quote minors in YAML (\"1.30\", not 1.30)", from, b.Minor)
		}
	}
	if _, err := parseRelease(m.Spire.Version); err != nil {
		fail("spire.version", "%q: %v", m.Spire.Version, err)
	}
	b.SpireSupport = map[string]bool{}
	for _, mode := range []string{"Sidecar", "Ambient"} {
		switch v := m.Spire.Support[mode]; v {
		case SpireSupported, SpireUnsupported:
			b.SpireSupport[mode] = v == SpireSupported
		default:
			fail("spire.support."+mode, "%q: want %s or %s (whether this Istio release's %s dataplane can take SPIRE identities)", v, SpireSupported, SpireUnsupported, mode)
		}
	}
	for mode := range m.Spire.Support {
		if mode != "Sidecar" && mode != "Ambient" {
			fail("spire.support."+mode, "unknown dataplane mode; want Sidecar and Ambient")
		}
	}

	if m.DNSCapture == nil {
		fail("dnsCapture", "required: true when this release's ztunnel runs its DNS proxy (port 15053 in each pod's network namespace) and pods' DNS is sent to it, false when not")
	} else {
		b.DNSCapture = *m.DNSCapture
	}

	known := knownImages()
	for _, name := range sortedKeys(m.Images) {
		ref := m.Images[name]
		if !slices.Contains(known, name) {
			fail("images."+name, "unknown image; known images: %s", strings.Join(known, ", "))
			continue
		}
		if err := validImage(ref); err != nil {
			fail("images."+name, "%q: %v", ref, err)
			continue
		}
		b.Images[name] = ref
	}
	for _, name := range known {
		if _, ok := m.Images[name]; !ok {
			fail("images."+name, "required: every bundle pins every component's images")
		}
	}

	for _, name := range sortedKeys(m.Components) {
		if !slices.Contains(AllComponents, Component(name)) {
			fail("components."+name, "unknown component; components: %s", joinComponents(AllComponents))
		}
	}
	for _, comp := range AllComponents {
		field := "components." + string(comp)
		cm, ok := m.Components[string(comp)]
		if !ok {
			fail(field, "required: every bundle ships a chart for every component")
			continue
		}
		if err := checkChart(fsys, comp, cm.Chart); err != nil {
			fail(field+".chart", "%v", err)
			continue
		}
		b.charts[comp] = cm.Chart
		if p := dnsCaptureValue(comp, cm.Values); p != "" {
			fail(field+".values."+p, "set dnsCapture at the top of the manifest instead: ztunnel's DNS proxy and the redirection of pods' DNS to it (node agent, istio-cni) must agree, so they are set from that one field")
		}
		if cm.Values != nil {
			b.values[comp] = cm.Values
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return b, nil
}

// dnsCaptureValue returns the path of a component value that would set
// DNS capture for that component alone ("" when there is none).
func dnsCaptureValue(c Component, values map[string]any) string {
	if _, ok := values["dnsCapture"]; ok {
		return "dnsCapture"
	}
	switch c {
	case Ztunnel:
		if env, ok := values["env"].(map[string]any); ok {
			if _, ok := env[ztunnelDNSCaptureEnv]; ok {
				return "env." + ztunnelDNSCaptureEnv
			}
		}
	case CNI:
		if amb, ok := values["ambient"].(map[string]any); ok {
			if _, ok := amb["dnsCapture"]; ok {
				return "ambient.dnsCapture"
			}
		}
	}
	return ""
}

// checkChart verifies charts/<dir>/Chart.yaml is a Helm v2 chart named after
// the component: the chart name is the meshkeeper.dev/component label.
func checkChart(fsys fs.FS, comp Component, dir string) error {
	if dir == "" {
		return errors.New("required: the chart's directory under charts/")
	}
	if strings.Contains(dir, "/") || !fs.ValidPath(dir) || dir == "." {
		return fmt.Errorf("%q: want a directory name under charts/, e.g. %q", dir, comp)
	}
	file := path.Join("charts", dir, "Chart.yaml")
	raw, err := fs.ReadFile(fsys, file)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%q: no %s; chart directories live under charts/", dir, file)
	}
	if err != nil {
		return fmt.Errorf("%q: %w", dir, err)
	}
	var chart struct {
		APIVersion string `json:"apiVersion"`
		Name       string `json:"name"`
		Version    string `json:"version"`
	}
	if err := yaml.Unmarshal(raw, &chart); err != nil {
		return fmt.Errorf("%q: %s: %w", dir, file, err)
	}
	switch {
	case chart.APIVersion != "v2":
		return fmt.Errorf("%q: %s: apiVersion %q, want v2", dir, file, chart.APIVersion)
	case chart.Name != string(comp):
		return fmt.Errorf("%q: %s: name %q, want %q (the chart name is the component label)", dir, file, chart.Name, comp)
	case chart.Version == "":
		return fmt.Errorf("%q: %s: version is required", dir, file)
	}
	return nil
}

func knownImages() []string {
	var names []string
	for _, c := range AllComponents {
		names = append(names, componentImages[c]...)
	}
	slices.Sort(names)
	return names
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Versions lists every release in the catalog, oldest first.
func (c *Catalog) Versions() []string {
	out := make([]string, len(c.bundles))
	for i, b := range c.bundles {
		out[i] = b.Version
	}
	return out
}

// Minors lists every minor in the catalog, oldest first.
func (c *Catalog) Minors() []string {
	var out []string
	for _, b := range c.bundles {
		if len(out) == 0 || out[len(out)-1] != b.Minor {
			out = append(out, b.Minor)
		}
	}
	return out
}

// Resolve finds the bundle for a Mesh's spec.version: an exact release
// ("1.27.3") or a minor ("1.27", meaning its newest patch in the catalog).
// Anything else is a *VersionError listing what exists.
func (c *Catalog) Resolve(version string) (*Bundle, error) {
	v, err := parseVersion(version)
	if err != nil {
		return nil, &VersionError{Requested: version, Known: c.Versions(), Reason: err.Error()}
	}
	var found *Bundle
	for _, b := range c.bundles {
		if b.semver.compareMinor(v) != 0 {
			continue
		}
		if v.hasPatch && b.semver.patch != v.patch {
			continue
		}
		found = b // bundles are sorted: the last match is the newest patch
	}
	if found == nil {
		return nil, &VersionError{Requested: version, Known: c.Versions(), Reason: "not in the catalog"}
	}
	return found, nil
}

// VersionError is a spec.version the catalog cannot serve. It is a spec
// problem: retrying does not help until the spec changes.
type VersionError struct {
	// Requested is spec.version as written.
	Requested string
	// Known lists the catalog's releases, oldest first.
	Known []string
	// Reason says what is wrong with Requested.
	Reason string
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("spec.version %q: %s; known versions: %s", e.Requested, e.Reason, strings.Join(e.Known, ", "))
}

// WithImages returns a copy of the catalog in which every bundle runs the
// given images instead of its own: image name (ImageNodeAgent, ...) →
// reference. This is how a node agent image built for a cluster (the
// manager's --agent-image) or a test's stand-in for an upstream image
// (--image ztunnel=...) reaches the charts; the manifests stay as they are.
// An unknown name or a malformed reference is an error.
func (c *Catalog) WithImages(images map[string]string) (*Catalog, error) {
	if len(images) == 0 {
		return c, nil
	}
	known := knownImages()
	var errs []error
	for _, name := range sortedKeys(images) {
		if !slices.Contains(known, name) {
			errs = append(errs, fmt.Errorf("image %q: unknown image; known images: %s", name, strings.Join(known, ", ")))
			continue
		}
		if err := validImage(images[name]); err != nil {
			errs = append(errs, fmt.Errorf("image %s=%q: %w", name, images[name], err))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	out := &Catalog{bundles: make([]*Bundle, 0, len(c.bundles))}
	for _, b := range c.bundles {
		nb := *b
		nb.Images = make(map[string]string, len(b.Images))
		for k, v := range b.Images {
			nb.Images[k] = v
		}
		for k, v := range images {
			nb.Images[k] = v
		}
		out.bundles = append(out.bundles, &nb)
	}
	return out, nil
}

// WithValues returns a copy of the catalog in which every bundle's release
// of component c gets values merged over the bundle's own (what the Mesh
// decides still comes first, Inputs.Overrides last). For clusters that need
// a chart setting no Mesh field carries, e.g. node-agent memlockCapability
// false where the runtime cannot grant CAP_SYS_RESOURCE.
func (c *Catalog) WithValues(comp Component, values map[string]any) (*Catalog, error) {
	if !slices.Contains(AllComponents, comp) {
		return nil, fmt.Errorf("component %q: unknown; known components: %v", comp, AllComponents)
	}
	if len(values) == 0 {
		return c, nil
	}
	if p := dnsCaptureValue(comp, values); p != "" {
		return nil, fmt.Errorf("component %s: value %s: DNS capture is the bundle's dnsCapture, for ztunnel, the node agent and istio-cni at once; it cannot be set for one component", comp, p)
	}
	out := &Catalog{bundles: make([]*Bundle, 0, len(c.bundles))}
	for _, b := range c.bundles {
		nb := *b
		nb.values = make(map[Component]map[string]any, len(b.values)+1)
		for k, v := range b.values {
			nb.values[k] = v
		}
		merged := map[string]any{}
		mergeInto(merged, b.values[comp])
		mergeInto(merged, values)
		nb.values[comp] = merged
		out.bundles = append(out.bundles, &nb)
	}
	return out, nil
}
