package controller

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql/parser"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/helm"
)

// TestRecordMetrics: the rollout metrics say what the status says, and time
// the steps as they change.
func TestRecordMetrics(t *testing.T) {
	g := NewWithT(t)
	const name = "metrics-unit"
	t.Cleanup(func() { forgetMetrics(name) })
	t0 := time.Date(2026, 3, 7, 2, 0, 0, 0, time.UTC)
	mesh := &meshv1.Mesh{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: meshv1.MeshSpec{Analysis: &meshv1.AnalysisSpec{
		SLOs: []meshv1.SLO{{Name: "l4-success", Min: ptr("0.99")}},
	}}}
	count := func(step string) uint64 {
		var m dto.Metric
		g.Expect(metricStepDuration.WithLabelValues(step).(prometheus.Metric).Write(&m)).To(Succeed())
		return m.GetHistogram().GetSampleCount()
	}
	nodesBefore := count(meshv1.RolloutStepNodes)

	mesh.Status.Rollout = &meshv1.RolloutStatus{Step: meshv1.RolloutStepNodes, Wave: 1, Waves: 3, WaveStartedAt: &metav1.Time{Time: t0},
		Analysis: []meshv1.AnalysisResult{{SLO: "l4-success", Value: "0.997", Verdict: meshv1.VerdictPass}}}
	recordMetrics(mesh, nil, t0)
	g.Expect(testutil.ToFloat64(metricRolloutActive.WithLabelValues(name))).To(Equal(1.0))
	g.Expect(testutil.ToFloat64(metricRolloutStep.WithLabelValues(name, "Nodes"))).To(Equal(1.0))
	g.Expect(testutil.ToFloat64(metricRolloutStep.WithLabelValues(name, "Namespaces"))).To(Equal(0.0))
	g.Expect(testutil.ToFloat64(metricRolloutWave.WithLabelValues(name))).To(Equal(1.0))
	g.Expect(testutil.ToFloat64(metricRolloutWaves.WithLabelValues(name))).To(Equal(3.0))
	g.Expect(testutil.ToFloat64(metricWaveStarted.WithLabelValues(name))).To(Equal(float64(t0.Unix())))
	g.Expect(testutil.ToFloat64(metricAnalysisValue.WithLabelValues(name, "l4-success"))).To(Equal(0.997))
	g.Expect(testutil.ToFloat64(metricAnalysisThreshold.WithLabelValues(name, "l4-success", "min"))).To(Equal(0.99))
	g.Expect(testutil.ToFloat64(metricRollbacks.WithLabelValues(name))).To(Equal(0.0))

	// 90 s later the namespace waves start: the Nodes step took 90 s.
	mesh.Status.Rollout = &meshv1.RolloutStatus{Step: meshv1.RolloutStepNamespaces, Wave: 1, Waves: 2, FailedChecks: 1,
		Analysis: []meshv1.AnalysisResult{{SLO: "l4-success", Value: "", Verdict: meshv1.VerdictInconclusive}}}
	recordMetrics(mesh, nil, t0.Add(90*time.Second))
	g.Expect(count(meshv1.RolloutStepNodes)).To(Equal(nodesBefore + 1))
	g.Expect(testutil.ToFloat64(metricRolloutStep.WithLabelValues(name, "Nodes"))).To(Equal(0.0))
	g.Expect(testutil.ToFloat64(metricRolloutStep.WithLabelValues(name, "Namespaces"))).To(Equal(1.0))
	g.Expect(math.IsNaN(testutil.ToFloat64(metricAnalysisValue.WithLabelValues(name, "l4-success")))).To(BeTrue(), "inconclusive is no value")
	g.Expect(testutil.ToFloat64(metricFailedChecks.WithLabelValues(name))).To(Equal(1.0))

	// Rolled back: the counters move once, the gauges go to rest.
	mesh.Status.Rollout = nil
	recordMetrics(mesh, &meshv1.HistoryEntry{Version: "1.27.3", Outcome: meshv1.OutcomeRolledBack}, t0.Add(2*time.Minute))
	g.Expect(testutil.ToFloat64(metricRollbacks.WithLabelValues(name))).To(Equal(1.0))
	g.Expect(testutil.ToFloat64(metricRollouts.WithLabelValues(name, "RolledBack"))).To(Equal(1.0))
	g.Expect(testutil.ToFloat64(metricRolloutActive.WithLabelValues(name))).To(Equal(0.0))
	g.Expect(testutil.ToFloat64(metricRolloutStep.WithLabelValues(name, "Namespaces"))).To(Equal(0.0))
	recordMetrics(mesh, nil, t0.Add(3*time.Minute))
	g.Expect(testutil.ToFloat64(metricRollbacks.WithLabelValues(name))).To(Equal(1.0), "a status without a new history entry counts nothing")
}

// TestDashboardAndRules: every query of the Grafana dashboard
// (config/grafana), every rule of the PrometheusRule (config/prometheus) and
// of the one charts/meshkeeper renders (prometheusRule.enabled)
// parses as PromQL and names only metrics the manager's real /metrics
// serves, scraped from the suite's manager during a rollout whose SLO
// checks are inconclusive (so every rollout series is present).
func TestDashboardAndRules(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	mkNS(g, "dr-a", map[string]string{"dr-mesh": "on"})
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"dr-mesh": "on"}}},
			Rollout:    meshv1.RolloutSpec{Nodes: meshv1.NodeRolloutSpec{Bake: &metav1.Duration{}}},
			// Nothing listens there: every check is inconclusive and the
			// first node wave holds.
			Analysis: &meshv1.AnalysisSpec{
				Prometheus: &meshv1.PrometheusSpec{Address: "http://127.0.0.1:9"},
				Interval:   &metav1.Duration{Duration: 5 * time.Second},
				SLOs:       []meshv1.SLO{{Name: "l4-success", Query: rolloutSLO, Min: ptr("0.99")}},
			},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })

	var families map[string]bool
	g.Eventually(func() error {
		f, err := scrape()
		families = f
		if err == nil && !families["meshkeeper_rollout_analysis_value"] {
			err = fmt.Errorf("no analysis value yet")
		}
		return err
	}).Should(Succeed())

	exprs := dashboardExprs(g, filepath.Join("..", "..", "config", "grafana", "meshkeeper-rollouts.json"))
	exprs = append(exprs, ruleExprs(g, filepath.Join("..", "..", "config", "prometheus", "meshkeeper-rules.yaml"))...)
	exprs = append(exprs, chartRuleExprs(g)...)
	g.Expect(len(exprs)).To(BeNumerically(">", 15))
	used := map[string]bool{}
	for _, e := range exprs {
		q := grafanaVars.Replace(e)
		ast, err := parser.NewParser(parser.Options{}).ParseExpr(q)
		g.Expect(err).NotTo(HaveOccurred(), "query %q", e)
		names := metricNames(ast)
		g.Expect(names).NotTo(BeEmpty(), "query %q names no metric", e)
		for _, n := range names {
			used[n] = true
			if n == "up" {
				continue // Prometheus's own series of each scrape, not the manager's
			}
			g.Expect(served(families, n)).To(BeTrue(), "query %q: metric %s is not on the manager's /metrics", e, n)
		}
	}
	// And the other way round: every meshkeeper metric is on the dashboard
	// or in a rule.
	for f := range families {
		if strings.HasPrefix(f, "meshkeeper_") {
			g.Expect(slices.ContainsFunc([]string{"", "_bucket", "_sum", "_count"}, func(suffix string) bool { return used[f+suffix] })).
				To(BeTrue(), "metric %s is served but on no panel or rule", f)
		}
	}
}

// grafanaVars are the dashboard's variables with sample values.
var grafanaVars = strings.NewReplacer("$__rate_interval", "1m", "$__range", "6h", "$__interval", "30s")

func scrape() (map[string]bool, error) {
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close() //nolint:errcheck // read-only
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	tp := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := tp.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for name := range fams {
		out[name] = true
	}
	return out, nil
}

// served says whether the scrape has the metric, a histogram's _bucket,
// _sum and _count series included.
func served(families map[string]bool, name string) bool {
	if families[name] {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok && families[base] {
			return true
		}
	}
	return false
}

func metricNames(n parser.Node) []string {
	var names []string
	parser.Inspect(n, func(node parser.Node, _ []parser.Node) error {
		if vs, ok := node.(*parser.VectorSelector); ok && vs.Name != "" {
			names = append(names, vs.Name)
		}
		return nil
	})
	return names
}

// dashboardExprs are every panel's queries and the label_values() metrics
// of the variables, as PromQL.
func dashboardExprs(g Gomega, file string) []string {
	raw, err := os.ReadFile(file)
	g.Expect(err).NotTo(HaveOccurred())
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Type       string `json:"type"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	g.Expect(json.Unmarshal(raw, &d)).To(Succeed())
	var out []string
	for _, p := range d.Panels {
		g.Expect(p.Targets).NotTo(BeEmpty(), "panel %q has no query", p.Title)
		for _, tg := range p.Targets {
			out = append(out, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		inner, ok := strings.CutPrefix(v.Definition, "label_values(")
		g.Expect(ok).To(BeTrue(), "variable query %q", v.Definition)
		metric, _, _ := strings.Cut(inner, ",")
		out = append(out, strings.TrimSpace(metric))
	}
	return out
}

func ruleExprs(g Gomega, file string) []string {
	raw, err := os.ReadFile(file)
	g.Expect(err).NotTo(HaveOccurred())
	// Strict: a misspelt rule field (exp:, label:) fails here, not silently
	// in Prometheus.
	var r struct {
		APIVersion string         `json:"apiVersion"`
		Kind       string         `json:"kind"`
		Metadata   map[string]any `json:"metadata"`
		Spec       struct {
			Groups []struct {
				Name  string `json:"name"`
				Rules []struct {
					Alert       string            `json:"alert"`
					Expr        string            `json:"expr"`
					For         string            `json:"for,omitempty"`
					Labels      map[string]string `json:"labels"`
					Annotations map[string]string `json:"annotations"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"spec"`
	}
	g.Expect(yaml.UnmarshalStrict(raw, &r)).To(Succeed())
	g.Expect(r.Kind).To(Equal("PrometheusRule"))
	var out []string
	for _, gr := range r.Spec.Groups {
		for _, rule := range gr.Rules {
			out = append(out, rule.Expr)
		}
	}
	return out
}

// chartRuleExprs are the expressions of the PrometheusRule charts/meshkeeper
// renders with prometheusRule.enabled: the operator's own alerts and the
// rollout alerts it copies from config/prometheus.
func chartRuleExprs(g Gomega) []string {
	objs, err := helm.Render(os.DirFS(filepath.Join("..", "..", "charts", "meshkeeper")), "meshkeeper", "meshkeeper-system",
		map[string]any{"prometheusRule": map[string]any{"enabled": true}}, nil)
	g.Expect(err).NotTo(HaveOccurred())
	var out []string
	for _, o := range objs {
		if o.GetKind() != "PrometheusRule" {
			continue
		}
		groups, _, err := unstructured.NestedSlice(o.Object, "spec", "groups")
		g.Expect(err).NotTo(HaveOccurred())
		for _, gr := range groups {
			rules, _, _ := unstructured.NestedSlice(gr.(map[string]any), "rules")
			for _, r := range rules {
				expr, _, _ := unstructured.NestedString(r.(map[string]any), "expr")
				out = append(out, expr)
			}
		}
	}
	g.Expect(out).NotTo(BeEmpty(), "charts/meshkeeper renders a PrometheusRule with rules")
	return out
}
