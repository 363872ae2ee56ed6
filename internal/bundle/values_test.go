package bundle_test

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"testing"

	. "github.com/onsi/gomega"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

func TestComponents(t *testing.T) {
	tests := []struct {
		mode, redirection string
		spire             bool
		want              []bundle.Component
	}{
		{"Ambient", "EBPF", false, []bundle.Component{bundle.CRDs, bundle.Istiod, bundle.Ztunnel, bundle.NodeAgent, bundle.CNI}},
		{"Ambient", "EBPF", true, []bundle.Component{bundle.CRDs, bundle.SpireServer, bundle.SpireAgent, bundle.Istiod, bundle.Ztunnel, bundle.NodeAgent, bundle.CNI}},
		{"Ambient", "IPTables", false, []bundle.Component{bundle.CRDs, bundle.Istiod, bundle.Ztunnel, bundle.CNI}},
		{"Ambient", "IPTables", true, []bundle.Component{bundle.CRDs, bundle.SpireServer, bundle.SpireAgent, bundle.Istiod, bundle.Ztunnel, bundle.CNI}},
		{"Sidecar", "", false, []bundle.Component{bundle.CRDs, bundle.Istiod}},
		{"Sidecar", "", true, []bundle.Component{bundle.CRDs, bundle.SpireServer, bundle.SpireAgent, bundle.Istiod}},
		// Redirection is ignored in Sidecar mode; empty means the defaults.
		{"Sidecar", "EBPF", false, []bundle.Component{bundle.CRDs, bundle.Istiod}},
		{"", "", false, []bundle.Component{bundle.CRDs, bundle.Istiod, bundle.Ztunnel, bundle.NodeAgent, bundle.CNI}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%s/spire=%v", tt.mode, tt.redirection, tt.spire), func(t *testing.T) {
			NewWithT(t).Expect(bundle.Components(tt.mode, tt.redirection, tt.spire)).To(Equal(tt.want))
		})
	}
}

func TestValues(t *testing.T) {
	b, err := bundle.Default().Resolve("1.28.2")
	if err != nil {
		t.Fatal(err)
	}
	ambient := bundle.Inputs{Mode: "Ambient", Redirection: "EBPF", Namespace: "istio-system"}
	sidecar := bundle.Inputs{Mode: "Sidecar", Namespace: "istio-system"}
	spire := bundle.Inputs{Mode: "Ambient", Namespace: "istio-system", TrustDomain: "example.org", SVIDTTL: "12h0m0s", MaxUnavailable: "2"}
	tests := []struct {
		name string
		c    bundle.Component
		in   bundle.Inputs
		want map[string]any
	}{
		{name: "crds", c: bundle.CRDs, in: ambient, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2", "images": map[string]any{},
		}},
		{name: "istiod ambient", c: bundle.Istiod, in: ambient, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":      map[string]any{"pilot": "docker.io/istio/pilot:1.28.2", "proxy": "docker.io/istio/proxyv2:1.28.2"},
			"namespace":   "istio-system",
			"trustDomain": "cluster.local",
			"ambient":     map[string]any{"enabled": true},
			"injection":   map[string]any{"enabled": false},
		}},
		{name: "istiod sidecar injects", c: bundle.Istiod, in: sidecar, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":      map[string]any{"pilot": "docker.io/istio/pilot:1.28.2", "proxy": "docker.io/istio/proxyv2:1.28.2"},
			"namespace":   "istio-system",
			"trustDomain": "cluster.local",
			"ambient":     map[string]any{"enabled": false},
			"injection":   map[string]any{"enabled": true},
		}},
		{name: "istiod serves both dataplanes during a mode switch", c: bundle.Istiod, in: bundle.Inputs{Mode: "Ambient", Namespace: "istio-system", ServeBoth: true}, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":      map[string]any{"pilot": "docker.io/istio/pilot:1.28.2", "proxy": "docker.io/istio/proxyv2:1.28.2"},
			"namespace":   "istio-system",
			"trustDomain": "cluster.local",
			"ambient":     map[string]any{"enabled": true},
			"injection":   map[string]any{"enabled": true},
		}},
		{name: "istiod spire trust domain", c: bundle.Istiod, in: spire, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":      map[string]any{"pilot": "docker.io/istio/pilot:1.28.2", "proxy": "docker.io/istio/proxyv2:1.28.2"},
			"namespace":   "istio-system",
			"trustDomain": "example.org",
			"ambient":     map[string]any{"enabled": true},
			"injection":   map[string]any{"enabled": false},
		}},
		{name: "ztunnel", c: bundle.Ztunnel, in: ambient, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":         map[string]any{"ztunnel": "docker.io/istio/ztunnel:1.28.2"},
			"namespace":      "istio-system",
			"maxUnavailable": "10%",
			"nodeWaves":      false,
			"dnsCapture":     true,
		}},
		{name: "ztunnel during node waves", c: bundle.Ztunnel, in: bundle.Inputs{Namespace: "istio-system", NodeWaves: true}, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":         map[string]any{"ztunnel": "docker.io/istio/ztunnel:1.28.2"},
			"namespace":      "istio-system",
			"maxUnavailable": "10%",
			"nodeWaves":      true,
			"dnsCapture":     true,
		}},
		{name: "istio-cni only on iptables nodes", c: bundle.CNI, in: ambient, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":         map[string]any{"installCNI": "docker.io/istio/install-cni:1.28.2"},
			"maxUnavailable": "10%",
			"nodeSelector":   map[string]any{"meshkeeper.dev/redirection": "iptables"},
			"nodeWaves":      false,
			"ambient":        map[string]any{"dnsCapture": true},
		}},
		{name: "node-agent only on ebpf nodes, count maxUnavailable", c: bundle.NodeAgent, in: spire, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":         map[string]any{"nodeAgent": "ghcr.io/meshkeeper/agent:0.1.0", "pause": "registry.k8s.io/pause:3.10"},
			"maxUnavailable": 2,
			"nodeSelector":   map[string]any{"meshkeeper.dev/redirection": "ebpf"},
			"cleanup":        false,
			"nodeWaves":      false,
			"dnsCapture":     true,
		}},
		{name: "node-agent cleanup phase", c: bundle.NodeAgent, in: bundle.Inputs{NodeAgentCleanup: true}, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2",
			"images":         map[string]any{"nodeAgent": "ghcr.io/meshkeeper/agent:0.1.0", "pause": "registry.k8s.io/pause:3.10"},
			"maxUnavailable": "10%",
			"nodeSelector":   map[string]any{"kubernetes.io/os": "linux"}, // every node, whatever its label now
			"cleanup":        true,
			"nodeWaves":      false,
			"dnsCapture":     true,
		}},
		{name: "spire-server defaults", c: bundle.SpireServer, in: ambient, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2", "spireVersion": "1.13.3",
			"images":      map[string]any{"spireServer": "ghcr.io/spiffe/spire-server:1.13.3"},
			"trustDomain": "cluster.local",
			"svidTTL":     "1h",
			"caTTL":       "24h0m0s",
		}},
		{name: "spire-server long SVIDs get a longer CA", c: bundle.SpireServer, in: spire, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2", "spireVersion": "1.13.3",
			"images":      map[string]any{"spireServer": "ghcr.io/spiffe/spire-server:1.13.3"},
			"trustDomain": "example.org",
			"svidTTL":     "12h0m0s",
			"caTTL":       "72h0m0s",
		}},
		{name: "spire-server with the admin API relay", c: bundle.SpireServer, in: bundle.Inputs{SpireRelayImage: "ghcr.io/meshkeeper/manager:0.1.0"}, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2", "spireVersion": "1.13.3",
			"images":      map[string]any{"spireServer": "ghcr.io/spiffe/spire-server:1.13.3", "spireRelay": "ghcr.io/meshkeeper/manager:0.1.0"},
			"trustDomain": "cluster.local",
			"svidTTL":     "1h",
			"caTTL":       "24h0m0s",
			"relay":       map[string]any{"enabled": true},
		}},
		{name: "spire-agent", c: bundle.SpireAgent, in: spire, want: map[string]any{
			"revision": "1-28-2", "version": "1.28.2", "spireVersion": "1.13.3",
			"images":         map[string]any{"spireAgent": "ghcr.io/spiffe/spire-agent:1.13.3"},
			"namespace":      "istio-system",
			"trustDomain":    "example.org",
			"maxUnavailable": 2,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			NewWithT(t).Expect(b.Values(tt.c, tt.in)).To(Equal(tt.want))
		})
	}
}

// TestValuesPrecedence: computed values, then the bundle's per-release
// values, then the caller's overrides; nested maps merge.
func TestValuesPrecedence(t *testing.T) {
	g := NewWithT(t)
	c, err := bundle.FromDir(filepath.Join("testdata", "good"))
	g.Expect(err).NotTo(HaveOccurred())
	b, err := c.Resolve("1.0.0")
	g.Expect(err).NotTo(HaveOccurred())

	v := b.Values(bundle.Istiod, bundle.Inputs{Mode: "Ambient", Overrides: map[bundle.Component]map[string]any{
		bundle.Istiod:      {"ambient": map[string]any{"enabled": false}, "replicaCount": 1},
		bundle.SpireServer: {"persistence": map[string]any{"enabled": false}},
	}})
	g.Expect(v["ambient"]).To(Equal(map[string]any{"enabled": false, "ztunnelServiceAccount": "ztunnel-1-0"}))
	g.Expect(v["env"]).To(Equal(map[string]any{"PILOT_EXAMPLE_FLAG": "true"}))
	g.Expect(v["replicaCount"]).To(Equal(1))
	g.Expect(v).NotTo(HaveKey("persistence"))

	// The result is the caller's: changing it changes no later result.
	v["env"].(map[string]any)["PILOT_EXAMPLE_FLAG"] = "false"
	v["images"].(map[string]any)["pilot"] = "changed"
	again := b.Values(bundle.Istiod, bundle.Inputs{Mode: "Ambient"})
	g.Expect(again["env"]).To(Equal(map[string]any{"PILOT_EXAMPLE_FLAG": "true"}))
	g.Expect(again["images"]).To(HaveKeyWithValue("pilot", "example.com/istio/pilot:1.0.0"))
	g.Expect(again["ambient"]).To(Equal(map[string]any{"enabled": true, "ztunnelServiceAccount": "ztunnel-1-0"}))
}

// TestValuesMatchCharts catches a key the Go code sets that no chart reads:
// every key path of Values, for every bundle, component and mode, exists in
// that chart's values.yaml.
func TestValuesMatchCharts(t *testing.T) {
	inputs := []bundle.Inputs{
		{Mode: "Ambient", Redirection: "EBPF", Namespace: "istio-system", TrustDomain: "example.org", SVIDTTL: "2h", MaxUnavailable: "3"},
		{Mode: "Ambient", Redirection: "IPTables"},
		{Mode: "Sidecar", NodeAgentCleanup: true},
	}
	for _, version := range bundle.Default().Versions() {
		b, _ := bundle.Default().Resolve(version)
		for _, c := range bundle.AllComponents {
			t.Run(version+"/"+string(c), func(t *testing.T) {
				g := NewWithT(t)
				chart, err := b.Chart(c)
				g.Expect(err).NotTo(HaveOccurred())
				raw, err := fs.ReadFile(chart, "values.yaml")
				g.Expect(err).NotTo(HaveOccurred())
				var defaults map[string]any
				g.Expect(yaml.Unmarshal(raw, &defaults)).To(Succeed())
				for _, in := range inputs {
					for _, p := range missingKeys(b.Values(c, in), defaults, "") {
						t.Errorf("%s sets %s, which charts/%s/values.yaml does not have", version, p, c)
					}
				}
				// Chart defaults carry the same images as the bundles, so
				// `helm template` without overrides runs real images.
				for name := range b.ImagesOf(c) {
					g.Expect(defaults["images"]).To(HaveKey(name))
				}
			})
		}
	}
}

func missingKeys(v, defaults map[string]any, prefix string) []string {
	var out []string
	keys := make([]string, 0, len(v))
	for k := range v {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		d, ok := defaults[k]
		if !ok {
			out = append(out, prefix+k)
			continue
		}
		if vm, ok := v[k].(map[string]any); ok {
			if dm, ok := d.(map[string]any); ok {
				out = append(out, missingKeys(vm, dm, prefix+k+".")...)
			}
		}
	}
	return out
}
