package analysis_test

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"k8s.io/utils/ptr"

	. "github.com/onsi/gomega"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/analysis/analysistest"
)

// connections are two minutes of the node agent's counters, one sample every
// 15s, in namespaces that each show one way a ratio can go wrong:
//   - shop: healthy, and the agent exports no error series at all;
//   - shop-staging: 90% ok (6% refused, 4% timeout);
//   - broken: every connection refused, no ok series;
//   - idle: series exist but nothing happens (0/0);
//   - edge: exactly 99 ok for 1 reset.
//
// Every pod runs on node-a; @ns@ is the namespace's revision (see
// connectionsOn).
const connections = `
load 15s
  meshkeeper_agent_connections_total{workload_namespace="shop",workload_pod="shop-0",workload_node="node-a",workload_revision="@shop@",result="ok"}                 0+100x8
  meshkeeper_agent_connections_total{workload_namespace="shop",workload_pod="shop-1",workload_node="node-a",workload_revision="@shop@",result="ok"}                 0+300x8
  meshkeeper_agent_connections_total{workload_namespace="shop-staging",workload_pod="st-0",workload_node="node-a",workload_revision="@shop-staging@",result="ok"}           0+90x8
  meshkeeper_agent_connections_total{workload_namespace="shop-staging",workload_pod="st-0",workload_node="node-a",workload_revision="@shop-staging@",result="refused"}      0+6x8
  meshkeeper_agent_connections_total{workload_namespace="shop-staging",workload_pod="st-0",workload_node="node-a",workload_revision="@shop-staging@",result="timeout"}      0+4x8
  meshkeeper_agent_connections_total{workload_namespace="broken",workload_pod="b-0",workload_node="node-a",workload_revision="@broken@",result="refused"}             0+50x8
  meshkeeper_agent_connections_total{workload_namespace="idle",workload_pod="i-0",workload_node="node-a",workload_revision="@idle@",result="ok"}                    0x8
  meshkeeper_agent_connections_total{workload_namespace="idle",workload_pod="i-0",workload_node="node-a",workload_revision="@idle@",result="refused"}               0x8
  meshkeeper_agent_connections_total{workload_namespace="edge",workload_pod="e-0",workload_node="node-a",workload_revision="@edge@",result="ok"}                    0+99x8
  meshkeeper_agent_connections_total{workload_namespace="edge",workload_pod="e-0",workload_node="node-a",workload_revision="@edge@",result="reset"}                 0+1x8
`

// connectionsOn is connections with the namespaces moved on revision
// 1-28-2, the others on 1-27-3.
func connectionsOn(moved ...string) string {
	s := connections
	for _, ns := range []string{"shop-staging", "shop", "broken", "idle", "edge"} {
		rev := "1-27-3"
		if slices.Contains(moved, ns) {
			rev = "1-28-2"
		}
		s = strings.ReplaceAll(s, "@"+ns+"@", rev)
	}
	return s
}

// at is when the checks run: the 1m window holds five samples of every series.
var at = analysistest.Start.Add(2 * time.Minute)

func check(t *testing.T, p analysis.Provider, slo meshv1.SLO, namespaces ...string) analysis.Result {
	t.Helper()
	data := analysis.NewQueryData(namespaces, "1-28-2", 30*time.Second)
	rs := analysis.Evaluate(context.Background(), p, []meshv1.SLO{slo}, data, at)
	if len(rs) != 1 {
		t.Fatalf("Evaluate returned %d results for one SLO", len(rs))
	}
	NewWithT(t).Expect(rs[0].SLO).To(Equal(slo.Name))
	NewWithT(t).Expect(rs[0].At.Time).To(BeTemporally("==", at))
	return rs[0]
}

func defaultSLO() meshv1.SLO { return analysis.DefaultSLOs()[0] }

// TestDefaultSLOOnThePromQLEngine: a namespace wave is judged on the pods
// of the new revision (the wave's namespaces here), per namespace.
func TestDefaultSLOOnThePromQLEngine(t *testing.T) {
	for _, tc := range []struct {
		name       string
		namespaces []string
		verdict    meshv1.Verdict
		value      string
		message    string
	}{
		{"a namespace without error series passes", []string{"shop"}, meshv1.VerdictPass, "1", "l4-success 1 >= 0.99"},
		{"90% ok fails", []string{"shop-staging"}, meshv1.VerdictFail, "0.9", "l4-success 0.9 < 0.99"},
		{"the worst namespace of the wave counts, not the traffic-weighted sum", []string{"shop", "shop-staging"}, meshv1.VerdictFail, "0.9", "l4-success 0.9 < 0.99"},
		{"a namespace with only error series is 0, not dropped", []string{"shop", "broken"}, meshv1.VerdictFail, "0", "l4-success 0 < 0.99"},
		{"exactly the minimum passes", []string{"edge"}, meshv1.VerdictPass, "0.99", "l4-success 0.99 >= 0.99"},
		{"an idle namespace is left out when others have traffic", []string{"idle", "shop"}, meshv1.VerdictPass, "1", "l4-success 1 >= 0.99"},
		{"a wave without traffic is empty, inconclusive", []string{"idle"}, meshv1.VerdictInconclusive, "", "l4-success inconclusive: the query returned an empty vector (no data)"},
		{"a wave without series is empty, inconclusive", []string{"nowhere"}, meshv1.VerdictInconclusive, "", "l4-success inconclusive: the query returned an empty vector (no data)"},
		{"a wave without namespaces is inconclusive", nil, meshv1.VerdictInconclusive, "", "l4-success inconclusive: the wave has no namespaces"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			p := analysistest.Load(t, connectionsOn(tc.namespaces...))
			r := check(t, p, defaultSLO(), tc.namespaces...)
			g.Expect(r.Verdict).To(Equal(tc.verdict), r.Message)
			g.Expect(r.Value).To(Equal(tc.value))
			g.Expect(r.Message).To(HavePrefix(tc.message))
		})
	}
}

// TestRatioWithoutErrorSeriesDropsTheNamespace shows why the default SLO is
// written with "or 0 * ...": a per-namespace error ratio has no sample for
// a namespace that has no error series, so the namespace vanishes.
func TestRatioWithoutErrorSeriesDropsTheNamespace(t *testing.T) {
	g := NewWithT(t)
	p := analysistest.Load(t, connectionsOn("shop", "broken"))
	ctx := context.Background()
	expand := func(q string, namespaces ...string) string {
		s, err := analysis.ExpandQuery(q, analysis.NewQueryData(namespaces, "", 30*time.Second))
		g.Expect(err).NotTo(HaveOccurred())
		return s
	}
	const naiveErrorRatio = `sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result!="ok"}[1m])) / sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m]))`
	const fixedErrorRatio = `(sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result!="ok"}[1m])) or 0 * sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m]))) / sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m]))`

	naive, err := p.Eval(ctx, expand(naiveErrorRatio, "shop", "shop-staging"), at)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(namespacesOf(naive)).To(Equal(map[string]float64{"shop-staging": 0.1}), "shop has no error series and is dropped")

	fixed, err := p.Eval(ctx, expand(fixedErrorRatio, "shop", "shop-staging"), at)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(namespacesOf(fixed)).To(Equal(map[string]float64{"shop": 0, "shop-staging": 0.1}))

	// As an SLO, the naive ratio leaves a healthy namespace without any
	// answer (held forever), the fixed one passes it.
	naiveSLO := meshv1.SLO{Name: "l4-success", Query: "min(1 - (" + naiveErrorRatio + "))", Min: ptr.To("0.99")}
	r := check(t, p, naiveSLO, "shop")
	g.Expect(r.Verdict).To(Equal(meshv1.VerdictInconclusive))
	g.Expect(r.Message).To(ContainSubstring("empty vector"))
	g.Expect(check(t, analysistest.Load(t, connectionsOn("shop")), defaultSLO(), "shop").Verdict).To(Equal(meshv1.VerdictPass))

	// The same trap with a success ratio: a namespace with no ok series
	// (everything refused) drops out, and the wave passes on the others.
	const naiveSuccess = `min(sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result="ok"}[1m])) / sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m])))`
	r = check(t, p, meshv1.SLO{Name: "l4-success", Query: naiveSuccess, Min: ptr.To("0.99")}, "shop", "broken")
	g.Expect(r.Verdict).To(Equal(meshv1.VerdictPass), "the naive success ratio hides the broken namespace")
	g.Expect(check(t, p, defaultSLO(), "shop", "broken").Verdict).To(Equal(meshv1.VerdictFail))
}

func namespacesOf(v model.Value) map[string]float64 {
	out := map[string]float64{}
	for _, s := range v.(model.Vector) {
		out[string(s.Metric["workload_namespace"])] = math.Round(float64(s.Value)*1e9) / 1e9
	}
	return out
}

func TestCustomSLOsOnThePromQLEngine(t *testing.T) {
	p := analysistest.Load(t, connectionsOn())
	const errorsPerSecond = `sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result!="ok"}[{{ .Interval }}]))`
	for _, tc := range []struct {
		name     string
		slo      meshv1.SLO
		ns       []string
		verdict  meshv1.Verdict
		value    string
		contains string
	}{
		{"max: over it fails", meshv1.SLO{Name: "errors", Query: errorsPerSecond, Max: ptr.To("0.5")}, []string{"shop-staging"},
			meshv1.VerdictFail, "0.667", "errors 0.667 > 0.5"},
		{"max: under it passes", meshv1.SLO{Name: "errors", Query: errorsPerSecond, Max: ptr.To("1")}, []string{"shop-staging"},
			meshv1.VerdictPass, "0.667", "errors 0.667 <= 1"},
		{"min and max: within passes", meshv1.SLO{Name: "errors", Query: errorsPerSecond, Min: ptr.To("0.5"), Max: ptr.To("1")}, []string{"shop-staging"},
			meshv1.VerdictPass, "0.667", "errors 0.667 within [0.5, 1]"},
		{"min and max: below min fails", meshv1.SLO{Name: "errors", Query: errorsPerSecond, Min: ptr.To("0.7"), Max: ptr.To("1")}, []string{"shop-staging"},
			meshv1.VerdictFail, "0.667", "errors 0.667 < 0.7"},
		{"exactly max passes", meshv1.SLO{Name: "p", Query: `vector(0.5)`, Max: ptr.To("0.5")}, []string{"shop"},
			meshv1.VerdictPass, "0.5", "p 0.5 <= 0.5"},
		{"just under min shows enough digits", meshv1.SLO{Name: "p", Query: `vector(0.98999)`, Min: ptr.To("0.99")}, []string{"shop"},
			meshv1.VerdictFail, "0.98999", "p 0.98999 < 0.99"},
		{"a scalar is a number", meshv1.SLO{Name: "p", Query: `scalar(vector(0.9974))`, Min: ptr.To("0.99")}, []string{"shop"},
			meshv1.VerdictPass, "0.997", "p 0.997 >= 0.99"},
		{"several series are inconclusive", meshv1.SLO{Name: "per-ns", Query: `sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m]))`, Min: ptr.To("1")}, []string{"shop", "shop-staging"},
			meshv1.VerdictInconclusive, "", "returned 2 series"},
		{"0/0 is NaN, inconclusive", meshv1.SLO{Name: "nan", Query: `vector(0) / vector(0)`, Min: ptr.To("0.99")}, []string{"shop"},
			meshv1.VerdictInconclusive, "NaN", "NaN"},
		{"a scalar 0/0 too", meshv1.SLO{Name: "nan", Query: `0 / 0`, Max: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "NaN", "NaN"},
		{"+Inf is inconclusive", meshv1.SLO{Name: "inf", Query: `vector(1) / vector(0)`, Max: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "+Inf", "+Inf"},
		{"-Inf is inconclusive", meshv1.SLO{Name: "inf", Query: `vector(-1) / vector(0)`, Min: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "-Inf", "-Inf"},
		{"an empty result is inconclusive, even with only max", meshv1.SLO{Name: "empty", Query: `sum(rate(nothing_total{workload_namespace=~"{{ .Namespaces }}"}[1m]))`, Max: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "", "empty vector (no data)"},
		{"a range vector is inconclusive", meshv1.SLO{Name: "range", Query: `meshkeeper_agent_connections_total{workload_namespace="shop",workload_pod="shop-0"}[1m]`, Min: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "", "range vector"},
		{"a query the engine refuses is inconclusive", meshv1.SLO{Name: "bad", Query: `sum(`, Min: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "", "failed on the PromQL engine"},
		{"a template that does not expand is inconclusive", meshv1.SLO{Name: "tpl", Query: `up{ns="{{ .Nope }}"}`, Min: ptr.To("1")}, []string{"shop"},
			meshv1.VerdictInconclusive, "", "does not expand"},
		{"a bound that is not a number is inconclusive", meshv1.SLO{Name: "bound", Query: `vector(1)`, Min: ptr.To("1e999")}, []string{"shop"},
			meshv1.VerdictInconclusive, "1", "min \"1e999\" is not a finite decimal number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			r := check(t, p, tc.slo, tc.ns...)
			g.Expect(r.Verdict).To(Equal(tc.verdict), r.Message)
			g.Expect(r.Value).To(Equal(tc.value))
			g.Expect(r.Message).To(ContainSubstring(tc.contains))
		})
	}
}

func TestEvaluateKeepsTheOrderOfTheSLOs(t *testing.T) {
	g := NewWithT(t)
	p := analysistest.Load(t, connectionsOn())
	var slos []meshv1.SLO
	for i := range 9 {
		slos = append(slos, meshv1.SLO{Name: string(rune('a' + i)), Query: "vector(" + string(rune('0'+i)) + ")", Max: ptr.To("4")})
	}
	rs := analysis.Evaluate(context.Background(), p, slos, analysis.NewQueryData([]string{"shop"}, "", time.Minute), at)
	g.Expect(rs).To(HaveLen(9))
	for i, r := range rs {
		g.Expect(r.SLO).To(Equal(slos[i].Name))
		g.Expect(r.Value).To(Equal(string(rune('0' + i))))
	}
	g.Expect(analysis.AnalysisResults(rs)[5]).To(Equal(meshv1.AnalysisResult{SLO: "f", Value: "5", Verdict: meshv1.VerdictFail, At: rs[5].At, Message: "f 5 > 4"}))
}

func TestFormatValue(t *testing.T) {
	for _, tc := range []struct {
		v      float64
		bounds []float64
		want   string
	}{
		{0.997, nil, "0.997"},
		{0.99666666, nil, "0.997"},
		{1, nil, "1"},
		{0, nil, "0"},
		{0.9, nil, "0.9"},
		{0.9000000000000001, []float64{0.9}, "0.9000000000000001"},
		{0.98999, []float64{0.99}, "0.98999"},
		{0.989999999, []float64{0.99}, "0.989999999"},
		{0.99, []float64{0.99}, "0.99"},
		{250.4, nil, "250"},
		{12345.6, nil, "12346"},
		{0.0123456, nil, "0.0123"},
		{0.00001234, nil, "1.23e-05"},
		{-0.5, nil, "-0.5"},
		{math.NaN(), nil, "NaN"},
		{math.Inf(1), nil, "+Inf"},
		{math.Inf(-1), nil, "-Inf"},
	} {
		NewWithT(t).Expect(analysis.FormatValue(tc.v, tc.bounds...)).To(Equal(tc.want), "%v with bounds %v", tc.v, tc.bounds)
	}
}

func TestSettingsForAppliesDefaults(t *testing.T) {
	g := NewWithT(t)
	s := analysis.SettingsFor(nil)
	g.Expect(s.Address).To(BeEmpty())
	g.Expect(s.Interval).To(Equal(30 * time.Second))
	g.Expect(s.FailureLimit).To(Equal(int32(2)))
	g.Expect(s.SLOs).To(Equal(analysis.DefaultSLOs()))
	g.Expect(s.Policy()).To(Equal(analysis.Policy{FailureLimit: 2, InconclusiveLimit: analysis.DefaultInconclusiveLimit}))

	custom := []meshv1.SLO{{Name: "x", Query: "vector(1)", Min: ptr.To("1")}}
	s = analysis.SettingsFor(&meshv1.AnalysisSpec{
		Prometheus:   &meshv1.PrometheusSpec{Address: "http://prometheus.monitoring:9090"},
		FailureLimit: ptr.To(int32(0)),
		SLOs:         custom,
	})
	g.Expect(s.Address).To(Equal("http://prometheus.monitoring:9090"))
	g.Expect(s.FailureLimit).To(BeZero())
	g.Expect(s.SLOs).To(Equal(custom))
}
