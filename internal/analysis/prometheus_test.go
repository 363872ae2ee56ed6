package analysis_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/utils/ptr"

	. "github.com/onsi/gomega"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestPrometheusAgainstARealServer runs the default SLO through the HTTP
// provider against a real Prometheus scraping a workload whose success
// ratio the test sets.
func TestPrometheusAgainstARealServer(t *testing.T) {
	g := NewWithT(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	w := prom.NewWorkload(t)
	w.SetRatio("shop", 1.0)
	w.SetRatio("shop-staging", 0.9)
	// shop has moved to the new revision, shop-staging not yet.
	w.SetRevision("shop", "1-28-2")
	w.SetRevision("shop-staging", "1-27-3")
	began := time.Now()
	s, err := prom.Start(ctx, t, w.Addr)
	g.Expect(err).NotTo(HaveOccurred())
	t.Logf("Prometheus %s ready after %s", s.URL, s.Ready)

	p, err := analysis.NewPrometheus(s.URL, analysis.PrometheusOptions{Timeout: 5 * time.Second})
	g.Expect(err).NotTo(HaveOccurred())
	slos := analysis.DefaultSLOs()
	// A namespace wave is judged on the pods of its revision.
	evaluate := func(revision string, namespaces ...string) analysis.Result {
		return analysis.Evaluate(ctx, p, slos, analysis.NewQueryData(namespaces, revision, 30*time.Second), time.Now())[0]
	}

	// Before the first scrapes there is nothing to judge: inconclusive.
	first := evaluate("1-28-2", "shop")
	g.Expect(first.Verdict).To(Equal(meshv1.VerdictInconclusive), first.Message)

	// The rate needs two scrapes of the workload; poll until both
	// namespaces have an answer.
	var shop, staging analysis.Result
	g.Eventually(func(g Gomega) {
		shop, staging = evaluate("1-28-2", "shop"), evaluate("1-27-3", "shop-staging")
		g.Expect(shop.Verdict).NotTo(Equal(meshv1.VerdictInconclusive), shop.Message)
		g.Expect(staging.Verdict).NotTo(Equal(meshv1.VerdictInconclusive), staging.Message)
	}).WithContext(ctx).WithTimeout(20 * time.Second).WithPolling(250 * time.Millisecond).Should(Succeed())
	t.Logf("first conclusive check %s after starting Prometheus: shop %s, shop-staging %s", time.Since(began), shop.Value, staging.Value)

	g.Expect(shop.Verdict).To(Equal(meshv1.VerdictPass), shop.Message)
	g.Expect(shop.Value).To(Equal("1"))
	g.Expect(staging.Verdict).To(Equal(meshv1.VerdictFail), staging.Message)
	v, err := strconv.ParseFloat(staging.Value, 64)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(v).To(BeNumerically("~", 0.9, 0.005))
	g.Expect(staging.Message).To(Equal("l4-success " + staging.Value + " < 0.99 (workload_namespace=shop-staging)"))
	// A node wave of the workload's node sees both namespaces there: the
	// worst one decides and is named.
	nodeWave := analysis.EvaluateScope(ctx, p, slos, analysis.NodeWaveScope([]string{prom.DefaultNode}, nil,
		[]string{"shop", "shop-staging"}, "1-28-2", "1-27-3", 30*time.Second), time.Now())[0]
	g.Expect(nodeWave.Verdict).To(Equal(meshv1.VerdictFail), nodeWave.Message)
	g.Expect(nodeWave.Message).To(HaveSuffix("(workload_namespace=shop-staging, workload_node=" + prom.DefaultNode + ")"))

	// A custom SLO with max over the same server.
	errs := analysis.Evaluate(ctx, p, []meshv1.SLO{{
		Name:  "errors-per-second",
		Query: `sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result!="ok"}[1m]))`,
		Max:   ptr.To("1"),
	}}, analysis.NewQueryData([]string{"shop-staging"}, "", 30*time.Second), time.Now())[0]
	g.Expect(errs.Verdict).To(Equal(meshv1.VerdictFail), errs.Message) // ~40/s (10 of 100 every 250ms)

	// Prometheus gone: inconclusive, saying so.
	g.Expect(s.Stop()).To(Succeed())
	gone := evaluate("1-28-2", "shop")
	g.Expect(gone.Verdict).To(Equal(meshv1.VerdictInconclusive))
	g.Expect(gone.Value).To(BeEmpty())
	g.Expect(gone.Message).To(HavePrefix("l4-success inconclusive: cannot reach Prometheus at " + s.URL + ": "))
	g.Expect(gone.Message).To(ContainSubstring("connection refused"))
	t.Log(gone.Message)
}

// TestPrometheusErrorsAreInconclusive covers answers a real server gives
// rarely: HTTP errors, query errors, slowness.
func TestPrometheusErrorsAreInconclusive(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		want    []string
	}{
		{"HTTP 503", func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "service unavailable", http.StatusServiceUnavailable)
		}, []string{"bad answer from Prometheus at", "503"}},
		{"bad_data", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"status":"error","errorType":"bad_data","error":"1:5: parse error: unclosed left parenthesis"}`))
		}, []string{"the query failed on Prometheus at", "parse error"}},
		{"not JSON", func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte(`<html>a proxy login page</html>`))
		}, []string{"bad answer from Prometheus at"}},
		{"empty vector", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"status":"success","data":{"resultType":"vector","result":[]}}`))
		}, []string{"empty vector (no data)"}},
		{"NaN", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}`))
		}, []string{"the value is NaN"}},
		{"slow", func(_ http.ResponseWriter, r *http.Request) {
			_ = r.ParseForm() // read the body, so the server notices the client going away
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		}, []string{"no answer from Prometheus at", "within 200ms"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			srv := httptest.NewServer(tc.handler)
			defer srv.Close()
			p, err := analysis.NewPrometheus(srv.URL, analysis.PrometheusOptions{Timeout: 200 * time.Millisecond})
			g.Expect(err).NotTo(HaveOccurred())
			began := time.Now()
			r := analysis.Evaluate(context.Background(), p, analysis.DefaultSLOs(), analysis.NewQueryData([]string{"shop"}, "", time.Minute), time.Now())[0]
			g.Expect(time.Since(began)).To(BeNumerically("<", 5*time.Second))
			g.Expect(r.Verdict).To(Equal(meshv1.VerdictInconclusive))
			for _, w := range tc.want {
				g.Expect(r.Message).To(ContainSubstring(w))
			}
		})
	}
}

func TestNewPrometheusNeedsAnAddress(t *testing.T) {
	_, err := analysis.NewPrometheus("", analysis.PrometheusOptions{})
	NewWithT(t).Expect(err).To(MatchError(ContainSubstring("address is required")))
}

func TestScrapeIntervalOf(t *testing.T) {
	for _, tc := range []struct {
		config string
		want   time.Duration
	}{
		{"global:\n  scrape_interval: 15s\n  evaluation_interval: 30s\n", 15 * time.Second},
		{"global:\n  scrape_interval: 1m30s\n", 90 * time.Second},
		{"scrape_configs: []\n", time.Minute},
	} {
		got, err := analysis.ScrapeIntervalOf(tc.config)
		if err != nil || got != tc.want {
			t.Errorf("ScrapeIntervalOf(%q) = %s, %v; want %s", tc.config, got, err, tc.want)
		}
	}
	if _, err := analysis.ScrapeIntervalOf("global:\n  scrape_interval: soon\n"); err == nil || !strings.Contains(err.Error(), `"soon"`) {
		t.Errorf("a bad interval: got %v, want an error naming it", err)
	}
}
