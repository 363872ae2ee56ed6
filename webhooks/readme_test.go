package webhooks

import (
	"os"
	"strings"
	"testing"

	. "github.com/onsi/gomega"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestREADMEExampleIsValid: the Mesh of the README's "The Mesh API by
// example" is accepted as written, including its SLO query in both kinds
// of wave and its baseline comparison.
func TestREADMEExampleIsValid(t *testing.T) {
	g := NewWithT(t)
	raw, err := os.ReadFile("../README.md")
	g.Expect(err).NotTo(HaveOccurred())
	readme := string(raw)
	_, section, ok := strings.Cut(readme, "## The Mesh API by example")
	g.Expect(ok).To(BeTrue(), "README has the section")
	_, block, ok := strings.Cut(section, "```yaml\n")
	g.Expect(ok).To(BeTrue())
	block, _, ok = strings.Cut(block, "```")
	g.Expect(ok).To(BeTrue())
	var m v1alpha1.Mesh
	g.Expect(yaml.UnmarshalStrict([]byte(block), &m)).To(Succeed())
	g.Expect(m.Spec.Analysis.SLOs).To(HaveLen(1))
	g.Expect(m.Spec.Analysis.SLOs[0].MaxDegradation).To(HaveValue(Equal("1%")))
	g.Expect(m.Spec.Analysis.InconclusiveLimit).To(HaveValue(BeEquivalentTo(5)))
	g.Expect(ValidateSpec(&m.Spec)).To(BeEmpty())
}
