package webhooks

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestValidateGates(t *testing.T) {
	d := func(s string) *metav1.Duration {
		v, err := time.ParseDuration(s)
		if err != nil {
			t.Fatal(err)
		}
		return &metav1.Duration{Duration: v}
	}
	gated := func() *v1alpha1.MeshSpec {
		return &v1alpha1.MeshSpec{Version: "1.28", Analysis: &v1alpha1.AnalysisSpec{
			Prometheus: &v1alpha1.PrometheusSpec{Address: "http://prometheus.monitoring:9090"},
			SLOs:       []v1alpha1.SLO{{Name: "l4", Query: `sum(rate(ok[2m])) / sum(rate(all[2m]))`}},
		}}
	}
	cases := []struct {
		name   string
		spec   func() *v1alpha1.MeshSpec
		field  string
		detail string
	}{
		{name: "defaults pass", spec: gated},
		{name: "bake as long as the window", spec: func() *v1alpha1.MeshSpec {
			s := gated()
			s.Rollout.Namespaces.Bake, s.Rollout.Nodes.Bake, s.Rollout.Nodes.Soak = d("2m"), d("5m"), d("2m")
			return s
		}},
		{name: "no gates, bake 0 is fine", spec: func() *v1alpha1.MeshSpec {
			s := gated()
			s.Analysis = nil
			s.Rollout.Namespaces.Bake = d("0s")
			return s
		}},
		{name: "bake 0 with gates", spec: func() *v1alpha1.MeshSpec {
			s := gated()
			s.Rollout.Namespaces.Bake = d("0s")
			return s
		}, field: "spec.rollout.namespaces.bake", detail: "must be more than 0 when SLO gates are set"},
		{name: "bake shorter than the query window", spec: func() *v1alpha1.MeshSpec {
			s := gated()
			s.Rollout.Nodes.Bake = d("30s")
			return s
		}, field: "spec.rollout.nodes.bake", detail: "shorter than the longest SLO query window (2m)"},
		{name: "bake shorter than the interval window", spec: func() *v1alpha1.MeshSpec {
			s := gated()
			s.Analysis.SLOs[0].Query = `rate(x[{{ .Interval }}])`
			s.Analysis.Interval = d("1m")
			s.Rollout.Namespaces.Bake = d("10s")
			s.Rollout.Nodes.Soak = d("0s") // soak defaults to 0 and is not checked
			return s
		}, field: "spec.rollout.namespaces.bake", detail: "use at least 1m"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			errs := ValidateGates(c.spec())
			if c.field == "" {
				if len(errs) != 0 {
					t.Fatalf("refused: %v", errs)
				}
				return
			}
			if len(errs) != 1 || errs[0].Field != c.field || !strings.Contains(errs[0].Detail, c.detail) {
				t.Fatalf("got %v, want one error on %s saying %q", errs, c.field, c.detail)
			}
		})
	}
}
