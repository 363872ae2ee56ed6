package webhooks

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// FuzzValidateMesh builds a Mesh spec from fuzzed values and checks that
// validation never panics, never hangs on a hostile template or cron, and
// that every error it returns names a field under spec.
//
// Seeds: the f.Add calls below and testdata/fuzz/FuzzValidateMesh.
func FuzzValidateMesh(f *testing.F) {
	f.Add("1.28", "1.27.3", "10%,50%,100%", "shop-staging", "10%", int32(0), l4Query, "0 2 * * 6", "0.99", "", int64(5*time.Minute), int64(30*time.Second), int64(4*time.Hour), int64(time.Hour), "example.org", "http://prometheus.monitoring:9090", int32(2), "Ambient", "EBPF", "IPTables")
	f.Add("1.25.0", "1.27.3", "50%,10%", "a,a", "", int32(-1), `sum(rate(x{namespace=~"{{ .Namespaces }}"}[1m]) /`, "0 25 * * 6", "0.9", "0.5", int64(-1), int64(time.Second), int64(0), int64(time.Second), "Example.org", "prometheus:9090", int32(101), "Sidecar", "EBPF", "Block")
	f.Add("v1", "", "", "", "0%", int32(3), `{{ range 9999999999 }}{{ end }}`, "TZ=UTC", "NaN", "1e999", int64(0), int64(0), int64(169*time.Hour), int64(721*time.Hour), "spiffe://x", "http:///", int32(0), "", "", "")
	f.Add("1.2.3", "1.0", "100%", "", "5", int32(0), `{{ define "a" }}{{ template "a" }}{{ end }}`, "@every 1h", "-1", "", int64(time.Hour), int64(5*time.Second), int64(time.Hour), int64(0), "", "https://[::1]:9090/prom", int32(5), "Ambient", "IPTables", "")
	f.Add("1.28", "1.27.3", "", "", "", int32(0), `{{ $a := .Namespaces }}{{ if eq $a "x" }}up{{ else }}sum(up{ns=~"{{ $a }}"}){{ end }}`, "*/15 0-4 1,15 * MON-FRI", "0", "1", int64(0), int64(0), int64(time.Minute), int64(0), "td", "http://p", int32(0), "Ambient", "", "")

	f.Fuzz(func(t *testing.T, version, installed, waves, canary, maxUnavailable string, maxUnavailableInt int32,
		query, cron, minV, maxV string, bake, interval, window, svidTTL int64,
		trustDomain, address string, failureLimit int32, mode, redirection, fallback string,
	) {
		spec := &v1alpha1.MeshSpec{
			Version: version,
			Dataplane: v1alpha1.DataplaneSpec{
				Mode:           v1alpha1.DataplaneMode(mode),
				Redirection:    v1alpha1.Redirection(redirection),
				KernelFallback: v1alpha1.KernelFallback(fallback),
			},
			Identity: v1alpha1.IdentitySpec{Spire: &v1alpha1.SpireSpec{
				Enabled: len(trustDomain)%2 == 0, TrustDomain: trustDomain, SVIDTTL: fuzzDuration(svidTTL),
			}},
			Rollout: v1alpha1.RolloutSpec{
				Namespaces: v1alpha1.NamespaceRolloutSpec{
					Canary: splitNonEmpty(canary),
					Waves:  splitNonEmpty(waves),
					Bake:   fuzzDuration(bake),
				},
			},
			Analysis: &v1alpha1.AnalysisSpec{
				Interval:     fuzzDuration(interval),
				FailureLimit: &failureLimit,
				SLOs:         []v1alpha1.SLO{{Name: "fuzz", Query: query, Min: optional(minV), Max: optional(maxV)}},
			},
			Upgrade: v1alpha1.UpgradeSpec{
				Windows: []v1alpha1.MaintenanceWindow{{Cron: cron, Duration: metav1.Duration{Duration: time.Duration(window)}}},
			},
		}
		if address != "" {
			spec.Analysis.Prometheus = &v1alpha1.PrometheusSpec{Address: address}
		}
		if maxUnavailable != "" {
			spec.Rollout.Nodes.MaxUnavailable = ptrTo(intstr.FromString(maxUnavailable))
		} else if maxUnavailableInt != 0 {
			spec.Rollout.Nodes.MaxUnavailable = ptrTo(intstr.FromInt32(maxUnavailableInt))
		}

		for _, e := range ValidateSpec(spec) {
			if !strings.HasPrefix(e.Field, "spec") {
				t.Fatalf("error outside spec: %v", e)
			}
			if e.Error() == "" || (e.Detail == "" && e.Type == "FieldValueInvalid") {
				t.Fatalf("error without a message: %#v", e)
			}
		}
		if e := ValidateDowngrade(version, installed); e != nil && e.Field != "spec.version" {
			t.Fatalf("downgrade error on %s, want spec.version", e.Field)
		}
		if e := ValidateDowngrade(installed, version); e != nil && e.Field != "spec.version" {
			t.Fatalf("downgrade error on %s, want spec.version", e.Field)
		}
	})
}

func splitNonEmpty(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

func optional(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func fuzzDuration(ns int64) *metav1.Duration {
	if ns == 0 {
		return nil
	}
	return &metav1.Duration{Duration: time.Duration(ns)}
}

func ptrTo[T any](v T) *T { return &v }
