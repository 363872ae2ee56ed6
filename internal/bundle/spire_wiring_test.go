package bundle_test

import (
	"strings"
	"testing"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
)

func render(g Gomega, b *bundle.Bundle, c bundle.Component, in bundle.Inputs) map[string]*unstructured.Unstructured {
	chart, err := b.Chart(c)
	g.Expect(err).NotTo(HaveOccurred())
	objs, err := helm.Render(chart, string(c), "istio-system", b.Values(c, in), nil)
	g.Expect(err).NotTo(HaveOccurred())
	out := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		out[o.GetKind()+"/"+o.GetName()] = o
	}
	return out
}

// injectorConfig is the injection config istiod reads from the chart's
// istio-sidecar-injector-<revision> ConfigMap.
func injectorConfig(g Gomega, objs map[string]*unstructured.Unstructured, rev string) (defaults []string, templates map[string]string) {
	cm := objs["ConfigMap/istio-sidecar-injector-"+rev]
	g.Expect(cm).NotTo(BeNil())
	raw, _, _ := unstructured.NestedString(cm.Object, "data", "config")
	var cfg struct {
		DefaultTemplates []string          `json:"defaultTemplates"`
		Templates        map[string]string `json:"templates"`
	}
	g.Expect(yaml.Unmarshal([]byte(raw), &cfg)).To(Succeed())
	return cfg.DefaultTemplates, cfg.Templates
}

// TestSidecarProxiesTakeSVIDsFromSPIRE: in Sidecar mode with SPIRE, every
// injected pod gets the "spire" template, which mounts the SPIRE agent's
// socket directory where istio-agent looks for the Workload API
// (workload-socket → /var/run/secrets/workload-spiffe-uds/socket), and the
// agent's socket is named "socket" in that directory.
func TestSidecarProxiesTakeSVIDsFromSPIRE(t *testing.T) {
	g := NewWithT(t)
	b, err := bundle.Default().Resolve("1.28")
	g.Expect(err).NotTo(HaveOccurred())
	in := bundle.Inputs{Mode: "Sidecar", Spire: true, TrustDomain: "example.org", Namespace: "istio-system"}

	defaults, templates := injectorConfig(g, render(g, b, bundle.Istiod, in), b.Revision())
	g.Expect(defaults).To(Equal([]string{"sidecar", "spire"}))
	var spireTpl struct {
		Spec struct {
			Volumes []map[string]any `json:"volumes"`
		} `json:"spec"`
	}
	g.Expect(yaml.Unmarshal([]byte(templates["spire"]), &spireTpl)).To(Succeed())
	g.Expect(spireTpl.Spec.Volumes).To(ConsistOf(And(
		HaveKeyWithValue("name", "workload-socket"),
		HaveKeyWithValue("emptyDir", BeNil()),
		HaveKeyWithValue("hostPath", HaveKeyWithValue("path", "/run/spire/agent-sockets")))))
	g.Expect(templates["sidecar"]).To(ContainSubstring("mountPath: /var/run/secrets/workload-spiffe-uds\n      name: workload-socket"))

	agent := render(g, b, bundle.SpireAgent, in)
	conf, _, _ := unstructured.NestedString(agent["ConfigMap/spire-agent"].Object, "data", "agent.conf")
	g.Expect(conf).To(ContainSubstring(`socket_path = "/run/spire/agent-sockets/socket"`))
	ds := agent["DaemonSet/spire-agent"]
	vols, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
	g.Expect(vols).To(ContainElement(And(HaveKeyWithValue("name", "sockets"),
		HaveKeyWithValue("hostPath", HaveKeyWithValue("path", "/run/spire/agent-sockets")))))
	g.Expect(strings.Contains(conf, `trust_domain = "example.org"`)).To(BeTrue())

	// Ambient (ztunnel cannot take SPIRE identities) and Sidecar without
	// SPIRE inject no spire template.
	for _, other := range []bundle.Inputs{{Mode: "Ambient", Spire: true}, {Mode: "Sidecar"}} {
		defaults, templates := injectorConfig(g, render(g, b, bundle.Istiod, other), b.Revision())
		g.Expect(defaults).To(Equal([]string{"sidecar"}))
		g.Expect(templates).NotTo(HaveKey("spire"))
	}
}
