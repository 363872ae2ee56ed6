package analysis_test

import (
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/internal/analysis"
)

func TestNamespacesRegexQuotesDedupesAndKeepsOrder(t *testing.T) {
	g := NewWithT(t)
	g.Expect(analysis.NamespacesRegex([]string{"shop", "shop-staging"})).To(Equal("shop|shop-staging"))
	g.Expect(analysis.NamespacesRegex([]string{"shop-staging", "shop", "shop", ""})).To(Equal("shop-staging|shop"))
	g.Expect(analysis.NamespacesRegex([]string{"a.b", "c+d"})).To(Equal(`a\.b|c\+d`))
	g.Expect(analysis.NamespacesRegex(nil)).To(BeEmpty())
}

func TestPromDuration(t *testing.T) {
	g := NewWithT(t)
	g.Expect(analysis.PromDuration(30 * time.Second)).To(Equal("30s"))
	g.Expect(analysis.PromDuration(90 * time.Second)).To(Equal("1m30s"))
	g.Expect(analysis.PromDuration(5 * time.Minute)).To(Equal("5m"))
	g.Expect(analysis.PromDuration(250 * time.Millisecond)).To(Equal("250ms"))
}

func TestExpandQueryWithAWavesData(t *testing.T) {
	g := NewWithT(t)
	data := analysis.NewQueryData([]string{"shop", "shop-staging"}, "1-28-2", 30*time.Second)
	q, err := analysis.ExpandQuery(`sum(rate(x{namespace=~"{{ .Namespaces }}",rev="{{ .Revision }}"}[{{ .Interval }}]))`, data)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(q).To(Equal(`sum(rate(x{namespace=~"shop|shop-staging",rev="1-28-2"}[30s]))`))

	q, err = analysis.ExpandQuery(`up{ {{- if eq .Revision "" }}job="x"{{ else }}rev="{{ .Revision }}"{{ end -}} }`, analysis.QueryData{Namespaces: "a"})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(q).To(Equal(`up{job="x"}`))

	// The default SLO: a namespace wave selects the new revision's pods,
	// a node wave the wave's nodes; neither lists namespaces.
	q, err = analysis.ExpandQuery(analysis.DefaultL4SuccessQuery, data)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(q).NotTo(ContainSubstring("{{"))
	g.Expect(strings.Count(q, `{workload_revision="1-28-2"`)).To(Equal(3))
	g.Expect(strings.Count(q, `sum by (workload_namespace) (`)).To(Equal(3))
	g.Expect(q).NotTo(ContainSubstring("shop"))
	nodes := analysis.NodeWaveScope([]string{"node-a", "node-b"}, []string{"node-c"}, []string{"shop"}, "1-28-2", "1-27-3", 30*time.Second)
	q, err = analysis.ExpandQuery(analysis.DefaultL4SuccessQuery, nodes.Canary)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(strings.Count(q, `{workload_node=~"node-a|node-b"`)).To(Equal(3))
	g.Expect(strings.Count(q, `sum by (workload_namespace, workload_node) (`)).To(Equal(3))
	q, err = analysis.ExpandQuery(analysis.DefaultL4SuccessQuery, *nodes.Baseline)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(strings.Count(q, `{workload_node=~"node-c"`)).To(Equal(3), "the baseline of a node wave is the other nodes")
}

func TestScopes(t *testing.T) {
	g := NewWithT(t)
	ns := analysis.NamespaceWaveScope([]string{"shop"}, "1-28-2", "1-27-3", true, time.Minute)
	g.Expect(ns.Canary).To(Equal(analysis.QueryData{Namespaces: "shop", Revision: "1-28-2", Baseline: "1-27-3", Interval: "1m"}))
	g.Expect(ns.Baseline).To(Equal(&analysis.QueryData{Revision: "1-27-3", Baseline: "1-27-3", Interval: "1m"}))
	g.Expect(analysis.NamespaceWaveScope([]string{"shop"}, "1-28-2", "1-27-3", false, time.Minute).Baseline).To(BeNil(),
		"the last wave has nothing left on the old revision")
	g.Expect(analysis.NodeWaveScope([]string{"a"}, nil, []string{"shop"}, "1-28-2", "1-27-3", time.Minute).Baseline).To(BeNil(),
		"a node wave of every node has no other nodes")
}

func TestTemplateErrors(t *testing.T) {
	for _, tc := range []struct {
		name, query, want string
	}{
		{"unknown field", `up{ns="{{ .Namespace }}"}`, `map has no entry for key "Namespace"`},
		{"not a template", `up{ns="{{ .Namespaces }"}`, "not a valid Go template"},
		{"printf", `{{ printf "%999999d" 1 }}`, `"printf" is not allowed`},
		{"range", `{{ range 100000000000 }}{{ end }}up`, "{{range}}"},
		{"define", `{{ define "a" }}up{{ end }}{{ template "a" }}`, "define"},
		{"too long", strings.Repeat(`{{ .Namespaces }}`, analysis.MaxExpandedQuery/len("shop|shop-staging")+1), "expands to more than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := analysis.ExpandQuery(tc.query, analysis.SampleQueryData)
			NewWithT(t).Expect(err).To(MatchError(ContainSubstring(tc.want)))
		})
	}
	_, err := analysis.ExpandQuery(strings.Repeat(`{{ .Namespaces }}`, 5000), analysis.SampleQueryData)
	NewWithT(t).Expect(err).To(MatchError(analysis.ErrQueryTooLong))
}
