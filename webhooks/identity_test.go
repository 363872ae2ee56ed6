package webhooks

import (
	"testing"

	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

func TestSpireWarnings(t *testing.T) {
	spire := v1alpha1.IdentitySpec{Spire: &v1alpha1.SpireSpec{Enabled: true, TrustDomain: "example.org"}}
	cases := []struct {
		name string
		spec v1alpha1.MeshSpec
		want []string // substrings of the one warning; nil: no warning
	}{
		{"Ambient (the default) with SPIRE names the ztunnel limitation and what to do",
			v1alpha1.MeshSpec{Version: "1.28", Identity: spire},
			[]string{"ztunnel cannot take SPIRE identities", "not merged upstream", "Istio 1.28.2", "istiod's CA", "set spec.dataplane.mode: Sidecar"}},
		{"Sidecar with SPIRE is Istio's documented integration",
			v1alpha1.MeshSpec{Version: "1.28", Dataplane: v1alpha1.DataplaneSpec{Mode: v1alpha1.ModeSidecar}, Identity: spire}, nil},
		{"SPIRE off", v1alpha1.MeshSpec{Version: "1.28"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := NewWithT(t)
			w := SpireWarnings(&c.spec, bundle.Default())
			if c.want == nil {
				g.Expect(w).To(BeEmpty())
				return
			}
			g.Expect(w).To(HaveLen(1))
			for _, s := range c.want {
				g.Expect(w[0]).To(ContainSubstring(s))
			}
		})
	}
}

func TestTrustDomainOfARunningMeshIsNeverMoved(t *testing.T) {
	g := NewWithT(t)
	spec := func(td string) *v1alpha1.MeshSpec {
		return &v1alpha1.MeshSpec{Version: "1.28", Identity: v1alpha1.IdentitySpec{Spire: &v1alpha1.SpireSpec{Enabled: true, TrustDomain: td}}}
	}
	running := &v1alpha1.MeshStatus{Identity: &v1alpha1.IdentityStatus{TrustDomain: "example.org"}}
	g.Expect(ValidateTrustDomainChange(spec("example.org"), running)).To(BeNil())
	g.Expect(ValidateTrustDomainChange(spec("other.org"), &v1alpha1.MeshStatus{})).To(BeNil(), "nothing runs yet")
	err := ValidateTrustDomainChange(spec("other.org"), running)
	g.Expect(err).NotTo(BeNil())
	g.Expect(err.Error()).To(And(ContainSubstring(`"other.org"`), ContainSubstring(`set it back to "example.org"`), ContainSubstring("spec.identity.spire.trustDomain")))
}
