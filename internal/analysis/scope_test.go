package analysis_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"k8s.io/utils/ptr"

	. "github.com/onsi/gomega"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/analysis/analysistest"
)

// series writes two minutes of one pod's counters (a sample every 15s):
// ok connections per step and failed ones (refused) per step. failed 0
// still writes the refused series at 0, as the agent does.
func series(b *strings.Builder, ns, pod, node, rev string, ok, failed int) {
	for _, r := range []struct {
		result string
		step   int
	}{{"ok", ok}, {"refused", failed}} {
		fmt.Fprintf(b, "  meshkeeper_agent_connections_total{workload_namespace=%q,workload_pod=%q,workload_node=%q,workload_revision=%q,result=%q} 0+%dx8\n",
			ns, pod, node, rev, r.result, r.step)
	}
}

func nodeNames(from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprintf("node-%03d", i))
	}
	return out
}

// TestDefaultSLOSeesOneBadCanaryNode: 200 nodes, each running pods of the
// same 5 namespaces, one node failing every connection. Judged over every
// namespace (what node waves did before) its pods move each namespace's
// success ratio by 0.5%, which passes min 0.99; judged on the wave's nodes,
// the wave fails and the verdict names the node. The same failure on a
// node outside the wave does not fail the wave.
func TestDefaultSLOSeesOneBadCanaryNode(t *testing.T) {
	var b strings.Builder
	b.WriteString("load 15s\n")
	namespaces := []string{"ns-a", "ns-b", "ns-c", "ns-d", "ns-e"}
	bad := map[string]bool{"node-002": true, "node-150": true}
	for _, node := range nodeNames(1, 200) {
		for _, ns := range namespaces {
			if bad[node] {
				series(&b, ns, ns+"-"+node, node, "1-27-3", 0, 100)
			} else {
				series(&b, ns, ns+"-"+node, node, "1-27-3", 100, 0)
			}
		}
	}
	p := analysistest.Load(t, b.String())
	ctx := context.Background()
	all := nodeNames(1, 200)
	judge := func(wave []string) analysis.Result {
		others := make([]string, 0, len(all))
		for _, n := range all {
			if !strings.Contains("|"+strings.Join(wave, "|")+"|", "|"+n+"|") {
				others = append(others, n)
			}
		}
		scope := analysis.NodeWaveScope(wave, others, namespaces, "1-28-2", "1-27-3", 30*time.Second)
		return analysis.EvaluateScope(ctx, p, analysis.DefaultSLOs(), scope, at)[0]
	}

	g := NewWithT(t)
	// The old default: every namespace, no node label. 2 bad nodes of 200.
	const everyNamespace = `min(sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result="ok"}[1m])) / sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m])))`
	old := analysis.Evaluate(ctx, p, []meshv1.SLO{{Name: "l4-success", Query: everyNamespace, Min: ptr.To("0.98")}},
		analysis.NewQueryData(namespaces, "", 30*time.Second), at)[0]
	g.Expect(old.Verdict).To(Equal(meshv1.VerdictPass), "judged over every namespace, two broken nodes of 200 hide: %s", old.Message)

	canary := judge([]string{"node-001", "node-002"})
	g.Expect(canary.Verdict).To(Equal(meshv1.VerdictFail), canary.Message)
	g.Expect(canary.Value).To(Equal("0"))
	g.Expect(canary.Message).To(MatchRegexp(`^l4-success 0 < 0\.99 \(workload_namespace=ns-[a-e], workload_node=node-002\)$`))

	healthy := judge([]string{"node-003", "node-004"})
	g.Expect(healthy.Verdict).To(Equal(meshv1.VerdictPass), "node-150 and node-002 are outside this wave: %s", healthy.Message)
	g.Expect(healthy.Value).To(Equal("1"))
}

// TestBaselineComparisonOnThePromQLEngine: an SLO with maxDegradation runs
// the same query on the wave (pods on 1-28-2) and on the baseline (pods on
// 1-27-3) and compares them.
func TestBaselineComparisonOnThePromQLEngine(t *testing.T) {
	// A success ratio of the revision's pods.
	const ratio = `sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}",result="ok"}[1m])) / sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}"}[1m]))`
	load := func(canaryOK, canaryFailed, baseOK, baseFailed int) *analysistest.Engine {
		var b strings.Builder
		b.WriteString("load 15s\n")
		if canaryOK+canaryFailed > 0 {
			series(&b, "shop", "shop-0", "node-a", "1-28-2", canaryOK, canaryFailed)
		}
		if baseOK+baseFailed > 0 {
			series(&b, "shop-b", "shop-b-0", "node-b", "1-27-3", baseOK, baseFailed)
		}
		return analysistest.Load(t, b.String())
	}
	slo := meshv1.SLO{Name: "l4-success", Query: ratio, Min: ptr.To("0.95"), MaxDegradation: ptr.To("1%")}
	scope := analysis.NamespaceWaveScope([]string{"shop"}, "1-28-2", "1-27-3", true, 30*time.Second)
	judge := func(p analysis.Provider, slo meshv1.SLO, scope analysis.Scope) analysis.Result {
		return analysis.EvaluateScope(context.Background(), p, []meshv1.SLO{slo}, scope, at)[0]
	}

	for _, tc := range []struct {
		name                         string
		p                            *analysistest.Engine
		slo                          meshv1.SLO
		verdict                      meshv1.Verdict
		value, baseline, degradation string
		clusterWide                  bool
		message                      string
	}{
		{name: "worse than the baseline by more than the tolerance fails, above min", p: load(97, 3, 100, 0), slo: slo,
			verdict: meshv1.VerdictFail, value: "0.97", baseline: "1", degradation: "3%",
			message: "l4-success 0.97 is 3% worse than the baseline 1 (maxDegradation 1%)"},
		{name: "within the tolerance passes", p: load(995, 5, 1000, 0), slo: slo,
			verdict: meshv1.VerdictPass, value: "0.995", baseline: "1", degradation: "0.5%",
			message: "l4-success 0.995 >= 0.95 (baseline 1, 0.5% worse, maxDegradation 1%)"},
		{name: "both sides degraded alike pass, with the degradation reported", p: load(80, 20, 80, 20), slo: slo,
			verdict: meshv1.VerdictPass, value: "0.8", baseline: "0.8", degradation: "0%", clusterWide: true,
			message: "l4-success passes on the baseline comparison: cluster-wide drop, l4-success 0.8 < 0.95 and the baseline too (baseline 0.8, 0% worse, maxDegradation 1%)"},
		{name: "both below min but the wave clearly worse fails", p: load(70, 30, 80, 20), slo: slo,
			verdict: meshv1.VerdictFail, value: "0.7", baseline: "0.8", degradation: "12.5%",
			message: "l4-success 0.7 is 12.5% worse than the baseline 0.8 (maxDegradation 1%)"},
		{name: "below min with a healthy baseline fails", p: load(94, 6, 96, 4), slo: meshv1.SLO{Name: "l4-success", Query: ratio, Min: ptr.To("0.95"), MaxDegradation: ptr.To("3%")},
			verdict: meshv1.VerdictFail, value: "0.94", baseline: "0.96", degradation: "2.08%",
			message: "l4-success 0.94 < 0.95 (baseline 0.96, 2.08% worse, maxDegradation 3%)"},
		{name: "lower is better: a slower wave fails", p: load(100, 0, 100, 0),
			slo:     meshv1.SLO{Name: "rate", Query: `sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}"}[1m])) * 1.5 ^ ({{ if eq .Revision "1-28-2" }}1{{ else }}0{{ end }})`, Max: ptr.To("100"), MaxDegradation: ptr.To("10%"), Better: meshv1.BetterLower},
			verdict: meshv1.VerdictFail, value: "10", baseline: "6.67", degradation: "50%",
			message: "rate 10 is 50% worse than the baseline 6.67 (maxDegradation 10%)"},
		{name: "no data on the wave's side is inconclusive", p: load(0, 0, 100, 0), slo: slo,
			verdict: meshv1.VerdictInconclusive, message: "l4-success inconclusive: the query returned an empty vector (no data)"},
		{name: "no data on the baseline's side is inconclusive", p: load(100, 0, 0, 0), slo: slo,
			verdict: meshv1.VerdictInconclusive, value: "1", message: "l4-success inconclusive: no baseline to compare with: the query returned an empty vector (no data)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			r := judge(tc.p, tc.slo, scope)
			g.Expect(r.Verdict).To(Equal(tc.verdict), r.Message)
			g.Expect(r.Value).To(Equal(tc.value))
			g.Expect(r.Baseline).To(Equal(tc.baseline), "the verdict records both values")
			g.Expect(r.Degradation).To(Equal(tc.degradation))
			g.Expect(r.ClusterWide).To(Equal(tc.clusterWide))
			g.Expect(r.Message).To(HavePrefix(tc.message))
		})
	}

	t.Run("the last wave has no baseline: min judges alone", func(t *testing.T) {
		g := NewWithT(t)
		last := analysis.NamespaceWaveScope([]string{"shop"}, "1-28-2", "1-27-3", false, 30*time.Second)
		r := judge(load(97, 3, 0, 0), slo, last)
		g.Expect(r.Verdict).To(Equal(meshv1.VerdictPass), r.Message)
		g.Expect(r.Message).To(Equal("l4-success 0.97 >= 0.95 (no baseline left to compare with)"))
		g.Expect(r.Baseline).To(BeEmpty())
	})

	t.Run("a cluster-wide drop is reported by Decide", func(t *testing.T) {
		g := NewWithT(t)
		r := judge(load(80, 20, 80, 20), slo, scope)
		d := analysis.Decide(analysis.State{}, analysis.Input{Wave: 2, Results: []analysis.Result{r}, BakeElapsed: true}, analysis.SettingsFor(nil).Policy())
		g.Expect(d.Action).To(Equal(analysis.ActionPromote))
		g.Expect(d.ClusterWide).To(ConsistOf(r.Message))
		g.Expect(d.Reason).To(ContainSubstring("cluster-wide drop"))
	})
}

// TestTenThousandNamespaces: the default SLO's expansions for a mesh of
// 10,000 namespaces stay far below the size limit (it selects by revision
// and node, never by namespace name), and the analysis of a wave of 9,000
// of them is conclusive on the PromQL engine.
func TestTenThousandNamespaces(t *testing.T) {
	g := NewWithT(t)
	const n = 10000
	namespaces := make([]string, n)
	for i := range namespaces {
		namespaces[i] = fmt.Sprintf("team-%05d-production", i)
	}
	nodes := nodeNames(1, 200)
	wave := namespaces[1000:]
	scopes := map[string]analysis.Scope{
		"namespace wave of 9,000":         analysis.NamespaceWaveScope(wave, "1-28-2", "1-27-3", true, 30*time.Second),
		"node wave of 2 nodes (of 200)":   analysis.NodeWaveScope(nodes[:2], nodes[2:], namespaces, "1-28-2", "1-27-3", 30*time.Second),
		"node wave of 20 nodes (of 200)":  analysis.NodeWaveScope(nodes[20:40], append(append([]string{}, nodes[:20]...), nodes[40:]...), namespaces, "1-28-2", "1-27-3", 30*time.Second),
		"the last namespace wave (1,000)": analysis.NamespaceWaveScope(namespaces[:1000], "1-28-2", "1-27-3", false, 30*time.Second),
	}
	tpl, err := analysis.ParseTemplate(analysis.DefaultL4SuccessQuery)
	g.Expect(err).NotTo(HaveOccurred())
	for name, s := range scopes {
		sides := map[string]analysis.QueryData{"wave": s.Canary}
		if s.Baseline != nil {
			sides["baseline"] = *s.Baseline
		}
		for side, d := range sides {
			q, err := tpl.Expand(d)
			g.Expect(err).NotTo(HaveOccurred(), name)
			g.Expect(len(q)).To(BeNumerically("<", 8<<10), "%s, %s: %d bytes", name, side, len(q))
			t.Logf("%s, %s: the default SLO expands to %d bytes (limit %d)", name, side, len(q), analysis.MaxExpandedQuery)
		}
	}
	// The same wave through .Namespaces would not even expand.
	_, err = analysis.ExpandQuery(`up{workload_namespace=~"{{ .Namespaces }}"}`, scopes["namespace wave of 9,000"].Canary)
	g.Expect(err).To(MatchError(analysis.ErrQueryTooLong))

	// The analysis itself: 10,000 namespaces, one pod each, the first 1,000
	// still on 1-27-3; one namespace of the wave at 98%.
	var b strings.Builder
	b.WriteString("load 15s\n")
	for i, ns := range namespaces {
		rev, ok, failed := "1-28-2", 100, 0
		if i < 1000 {
			rev = "1-27-3"
		}
		if i == 4321 {
			ok, failed = 98, 2
		}
		series(&b, ns, ns+"-0", nodes[i%len(nodes)], rev, ok, failed)
	}
	began := time.Now()
	p := analysistest.Load(t, b.String())
	t.Logf("loaded %d series in %s", 2*n, time.Since(began).Round(time.Millisecond))
	began = time.Now()
	r := analysis.EvaluateScope(context.Background(), p, analysis.DefaultSLOs(), scopes["namespace wave of 9,000"], at)[0]
	t.Logf("evaluated in %s: %s", time.Since(began).Round(time.Millisecond), r.Message)
	g.Expect(r.Verdict).To(Equal(meshv1.VerdictFail), r.Message)
	g.Expect(r.Message).To(Equal("l4-success 0.98 < 0.99 (workload_namespace=team-04321-production)"))
}
