package webhooks

import (
	"context"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/utils/ptr"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
)

const l4Query = `sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}",result="ok"}[1m])) / sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}"}[1m]))`

// exampleSpec is the spec of the ARCHITECTURE.md example: valid by definition.
func exampleSpec() *v1alpha1.MeshSpec {
	return &v1alpha1.MeshSpec{
		Version: "1.28",
		Dataplane: v1alpha1.DataplaneSpec{
			Mode: v1alpha1.ModeAmbient, Redirection: v1alpha1.RedirectionEBPF, KernelFallback: v1alpha1.FallbackIPTables,
		},
		Namespaces: v1alpha1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mesh": "on"}}},
		Waypoints:  []v1alpha1.WaypointSpec{{Namespace: "shop", Name: "waypoint", For: v1alpha1.WaypointForService}},
		Identity: v1alpha1.IdentitySpec{Spire: &v1alpha1.SpireSpec{
			Enabled: true, TrustDomain: "example.org", SVIDTTL: &metav1.Duration{Duration: 12 * time.Hour},
		}},
		Rollout: v1alpha1.RolloutSpec{
			Nodes: v1alpha1.NodeRolloutSpec{
				Canary:         &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}},
				MaxUnavailable: ptr.To(intstr.FromString("10%")),
			},
			Namespaces: v1alpha1.NamespaceRolloutSpec{
				Canary: []string{"shop-staging"},
				Waves:  []string{"10%", "50%", "100%"},
				Bake:   &metav1.Duration{Duration: 5 * time.Minute},
			},
		},
		Analysis: &v1alpha1.AnalysisSpec{
			Prometheus:   &v1alpha1.PrometheusSpec{Address: "http://prometheus.monitoring:9090"},
			Interval:     &metav1.Duration{Duration: 30 * time.Second},
			FailureLimit: ptr.To[int32](2),
			SLOs:         []v1alpha1.SLO{{Name: "l4-success", Query: l4Query, Min: ptr.To("0.99")}},
		},
		Upgrade: v1alpha1.UpgradeSpec{
			Automatic: ptr.To(true),
			Windows:   []v1alpha1.MaintenanceWindow{{Cron: "0 2 * * 6", Duration: metav1.Duration{Duration: 4 * time.Hour}}},
		},
	}
}

func dur(s string) *metav1.Duration {
	d, err := time.ParseDuration(s)
	if err != nil {
		panic(err)
	}
	return &metav1.Duration{Duration: d}
}

func TestValidateSpec(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(s *v1alpha1.MeshSpec)
		// field is the path of the one expected error; "" means valid.
		field string
		// detail are substrings the message must contain.
		detail []string
	}{
		{name: "architecture example", mutate: func(*v1alpha1.MeshSpec) {}},
		{name: "minimal spec", mutate: func(s *v1alpha1.MeshSpec) { *s = v1alpha1.MeshSpec{Version: "1.28.2"} }},

		// version
		{name: "version exact", mutate: func(s *v1alpha1.MeshSpec) { s.Version = "1.28.2" }},
		{name: "version missing", mutate: func(s *v1alpha1.MeshSpec) { s.Version = "" }, field: "spec.version", detail: []string{"Required", `"1.28"`}},
		{name: "version with v prefix", mutate: func(s *v1alpha1.MeshSpec) { s.Version = "v1.28" }, field: "spec.version", detail: []string{`"v1.28"`, `e.g. "1.28" or "1.28.2"`}},
		{name: "version four parts", mutate: func(s *v1alpha1.MeshSpec) { s.Version = "1.28.2.1" }, field: "spec.version", detail: []string{"MAJOR.MINOR"}},
		{name: "version overflow", mutate: func(s *v1alpha1.MeshSpec) { s.Version = "1.99999999999" }, field: "spec.version", detail: []string{"2^32"}},
		{name: "version too long", mutate: func(s *v1alpha1.MeshSpec) { s.Version = "1." + strings.Repeat("1", 40) }, field: "spec.version", detail: []string{"Too long"}},

		// dataplane
		{name: "sidecar without redirection", mutate: func(s *v1alpha1.MeshSpec) { s.Dataplane = v1alpha1.DataplaneSpec{Mode: v1alpha1.ModeSidecar} }},
		{name: "redirection with sidecar", mutate: func(s *v1alpha1.MeshSpec) {
			s.Dataplane = v1alpha1.DataplaneSpec{Mode: v1alpha1.ModeSidecar, Redirection: v1alpha1.RedirectionEBPF}
		}, field: "spec.dataplane.redirection", detail: []string{"only valid with mode Ambient", "set mode: Ambient"}},
		{name: "redirection iptables ambient", mutate: func(s *v1alpha1.MeshSpec) {
			s.Dataplane = v1alpha1.DataplaneSpec{Redirection: v1alpha1.RedirectionIPTables}
		}},
		{name: "kernelFallback with iptables redirection", mutate: func(s *v1alpha1.MeshSpec) {
			s.Dataplane = v1alpha1.DataplaneSpec{Redirection: v1alpha1.RedirectionIPTables, KernelFallback: v1alpha1.FallbackBlock}
		}, field: "spec.dataplane.kernelFallback", detail: []string{"Ambient with redirection EBPF", "remove kernelFallback"}},
		{name: "kernelFallback with default mode and redirection", mutate: func(s *v1alpha1.MeshSpec) {
			s.Dataplane = v1alpha1.DataplaneSpec{KernelFallback: v1alpha1.FallbackBlock}
		}},
		{name: "unknown mode", mutate: func(s *v1alpha1.MeshSpec) { s.Dataplane = v1alpha1.DataplaneSpec{Mode: "Ambiant"} }, field: "spec.dataplane.mode", detail: []string{`"Ambient"`, `"Sidecar"`}},

		// security
		{name: "mtls strict", mutate: func(s *v1alpha1.MeshSpec) { s.Security.MTLS = v1alpha1.MTLSStrict }},
		{name: "mtls strict with sidecars", mutate: func(s *v1alpha1.MeshSpec) {
			s.Dataplane = v1alpha1.DataplaneSpec{Mode: v1alpha1.ModeSidecar}
			s.Security.MTLS = v1alpha1.MTLSStrict
		}},
		{name: "mtls permissive", mutate: func(s *v1alpha1.MeshSpec) { s.Security.MTLS = v1alpha1.MTLSPermissive }},
		{name: "mtls in Istio's spelling", mutate: func(s *v1alpha1.MeshSpec) { s.Security.MTLS = "STRICT" },
			field: "spec.security.mtls", detail: []string{`"STRICT"`, `"Permissive"`, `"Strict"`, "requires mTLS mesh-wide"}},

		// waypoints
		{name: "duplicate waypoint", mutate: func(s *v1alpha1.MeshSpec) { s.Waypoints = append(s.Waypoints, s.Waypoints[0]) }, field: "spec.waypoints[1]", detail: []string{"Duplicate", "shop/waypoint"}},

		// waves
		{name: "single wave", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"100%"} }},
		{name: "waves decreasing", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"50%", "10%", "100%"} }, field: "spec.rollout.namespaces.waves[1]", detail: []string{"strictly increasing", `e.g. ["10%", "50%", "100%"]`}},
		{name: "waves equal", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"50%", "50%", "100%"} }, field: "spec.rollout.namespaces.waves[1]", detail: []string{"strictly increasing"}},
		{name: "waves not ending at 100%", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"10%", "50%"} }, field: "spec.rollout.namespaces.waves[1]", detail: []string{`must be "100%"`}},
		{name: "wave 0%", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"0%", "100%"} }, field: "spec.rollout.namespaces.waves[0]", detail: []string{"1% to 100%"}},
		{name: "wave 101%", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"10%", "101%"} }, field: "spec.rollout.namespaces.waves[1]", detail: []string{"1% to 100%"}},
		{name: "wave without percent", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Waves = []string{"10", "100%"} }, field: "spec.rollout.namespaces.waves[0]", detail: []string{`"25%"`}},

		// canary namespaces
		{name: "canary duplicate", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Canary = []string{"a", "b", "a"} }, field: "spec.rollout.namespaces.canary[2]", detail: []string{"Duplicate", `"a"`}},
		{name: "canary not a namespace name", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Canary = []string{"Shop"} }, field: "spec.rollout.namespaces.canary[0]", detail: []string{"namespace name"}},

		// maxUnavailable
		{name: "maxUnavailable count", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Nodes.MaxUnavailable = ptr.To(intstr.FromInt32(3)) }},
		{name: "maxUnavailable 100%", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Nodes.MaxUnavailable = ptr.To(intstr.FromString("100%")) }},
		{name: "maxUnavailable 0", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Nodes.MaxUnavailable = ptr.To(intstr.FromInt32(0)) }, field: "spec.rollout.nodes.maxUnavailable", detail: []string{"at least 1", "e.g. 10%"}},
		{name: "maxUnavailable 0%", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Nodes.MaxUnavailable = ptr.To(intstr.FromString("0%")) }, field: "spec.rollout.nodes.maxUnavailable", detail: []string{"1% to 100%"}},
		{name: "maxUnavailable quoted count", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Nodes.MaxUnavailable = ptr.To(intstr.FromString("5")) }, field: "spec.rollout.nodes.maxUnavailable", detail: []string{"without quotes"}},

		// bake
		{name: "bake zero", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Bake = dur("0s") }},
		{name: "bake negative", mutate: func(s *v1alpha1.MeshSpec) { s.Rollout.Namespaces.Bake = dur("-1m") }, field: "spec.rollout.namespaces.bake", detail: []string{"negative", "5m"}},

		// analysis
		{name: "interval 5s", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Interval = dur("5s") }},
		{name: "interval 4s", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Interval = dur("4s") }, field: "spec.analysis.interval", detail: []string{"at least 5s", "30s"}},
		{name: "failureLimit 0", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.FailureLimit = ptr.To[int32](0) }},
		{name: "failureLimit 100", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.FailureLimit = ptr.To[int32](100) }},
		{name: "failureLimit 101", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.FailureLimit = ptr.To[int32](101) }, field: "spec.analysis.failureLimit", detail: []string{"from 0 to 100"}},
		{name: "failureLimit -1", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.FailureLimit = ptr.To[int32](-1) }, field: "spec.analysis.failureLimit", detail: []string{"from 0 to 100"}},
		{name: "slos without prometheus", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus = nil }, field: "spec.analysis.prometheus.address", detail: []string{"Required", "http://prometheus.monitoring:9090"}},
		{name: "prometheus https with path", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus.Address = "https://thanos.example.org/prom" }},
		{name: "prometheus no scheme", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus.Address = "prometheus:9090" }, field: "spec.analysis.prometheus.address", detail: []string{"http:// or https://", "http://prometheus.monitoring:9090"}},
		{name: "prometheus ftp", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus.Address = "ftp://prometheus" }, field: "spec.analysis.prometheus.address", detail: []string{"http:// or https://"}},
		{name: "prometheus no host", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus.Address = "http:///api" }, field: "spec.analysis.prometheus.address", detail: []string{"no host"}},
		{name: "prometheus bad port", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus.Address = "http://prometheus:99999" }, field: "spec.analysis.prometheus.address", detail: []string{"port"}},
		{name: "prometheus with space", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.Prometheus.Address = "http://prom etheus" }, field: "spec.analysis.prometheus.address", detail: []string{"spaces"}},

		// SLO bounds
		{name: "slo max only", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Min, s.Analysis.SLOs[0].Max = nil, ptr.To("0.5") }},
		{name: "slo min and max", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Min, s.Analysis.SLOs[0].Max = ptr.To("-1e-3"), ptr.To("0.5")
		}},
		{name: "slo min equals max", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Min, s.Analysis.SLOs[0].Max = ptr.To("1"), ptr.To("1.0")
		}},
		{name: "slo without bounds", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Min = nil }, field: "spec.analysis.slos[0].min", detail: []string{"min, max or both", `"0.99"`}},
		{name: "slo min above max", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Min, s.Analysis.SLOs[0].Max = ptr.To("0.9"), ptr.To("0.5")
		}, field: "spec.analysis.slos[0].min", detail: []string{`above max "0.5"`}},
		{name: "slo min not a number", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Min = ptr.To("99%") }, field: "spec.analysis.slos[0].min", detail: []string{"finite decimal number", `"0.99"`}},
		{name: "slo max NaN", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Max = ptr.To("NaN") }, field: "spec.analysis.slos[0].max", detail: []string{"finite"}},
		{name: "slo max overflows to Inf", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Max = ptr.To("1e999") }, field: "spec.analysis.slos[0].max", detail: []string{"finite"}},
		{name: "slo duplicate name", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs = append(s.Analysis.SLOs, s.Analysis.SLOs[0]) }, field: "spec.analysis.slos[1].name", detail: []string{"Duplicate"}},

		// SLO queries
		{name: "query with all fields", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Query = `sum(rate(x{namespace=~"{{ .Namespaces }}",rev="{{ .Revision }}"}[{{ .Interval }}]))`
		}},
		{name: "query with if", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Query = `sum(up{ {{- if eq .Revision "" }}job="x"{{ else }}rev="{{ .Revision }}"{{ end -}} })`
		}},
		{name: "query scalar", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `scalar(sum(up))` }},
		{name: "query not PromQL", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Query = `sum(rate(x{namespace=~"{{ .Namespaces }}"}[1m]) /`
		}, field: "spec.analysis.slos[0].query", detail: []string{"not valid PromQL", "parse error", "1:", "«here»", `.Namespaces="shop|shop-staging"`}},
		{name: "query unknown field", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `sum(up{ns="{{ .Namespace }}"})` }, field: "spec.analysis.slos[0].query", detail: []string{"Namespace", "only fields are .Nodes, .Revision, .Baseline, .Namespaces and .Interval"}},
		{name: "query with the default SLO's node and revision fields", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Query = analysis.DefaultL4SuccessQuery
		}},
		{name: "query whose node-wave branch is not PromQL", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Query = `sum(up{ {{- if .Nodes }}node=~"{{ .Nodes }}"{{ else }}rev="{{ .Revision }}"{{ end }}}) {{ if .Nodes }}/{{ end }}`
		}, field: "spec.analysis.slos[0].query", detail: []string{"not valid PromQL", `.Nodes="node-a|node-b"`}},
		{name: "query with baseline", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].Query = `sum(up{rev=~"{{ .Revision }}|{{ .Baseline }}"})`
		}},

		// baseline comparison and limits
		{name: "maxDegradation", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].MaxDegradation, s.Analysis.SLOs[0].Better = ptr.To("0.5%"), v1alpha1.BetterHigher
		}},
		{name: "maxDegradation lower is better", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].MaxDegradation, s.Analysis.SLOs[0].Better = ptr.To("10%"), v1alpha1.BetterLower
		}},
		{name: "maxDegradation without percent", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].MaxDegradation = ptr.To("0.01") },
			field: "spec.analysis.slos[0].maxDegradation", detail: []string{"percentage", `"1%"`}},
		{name: "maxDegradation negative", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].MaxDegradation = ptr.To("-1%") },
			field: "spec.analysis.slos[0].maxDegradation", detail: []string{"percentage"}},
		{name: "better without maxDegradation", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Better = v1alpha1.BetterLower },
			field: "spec.analysis.slos[0].better", detail: []string{"only applies with maxDegradation"}},
		{name: "better unknown", mutate: func(s *v1alpha1.MeshSpec) {
			s.Analysis.SLOs[0].MaxDegradation, s.Analysis.SLOs[0].Better = ptr.To("1%"), "Bigger"
		}, field: "spec.analysis.slos[0].better", detail: []string{"Unsupported value", `"Higher"`, `"Lower"`}},
		{name: "inconclusiveLimit 0", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.InconclusiveLimit = ptr.To(int32(0)) }},
		{name: "inconclusiveLimit negative", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.InconclusiveLimit = ptr.To(int32(-1)) },
			field: "spec.analysis.inconclusiveLimit", detail: []string{"from 0 to 1000", "Degraded"}},
		{name: "query bad template", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `sum(up{ns="{{ .Namespaces }"})` }, field: "spec.analysis.slos[0].query", detail: []string{"not a valid Go template"}},
		{name: "query range vector", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `up[5m]` }, field: "spec.analysis.slos[0].query", detail: []string{"range vector", "one number"}},
		{name: "query string", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `"abc"` }, field: "spec.analysis.slos[0].query", detail: []string{"one number"}},
		{name: "query range loop", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `{{ range 100000000000 }}{{ end }}up` }, field: "spec.analysis.slos[0].query", detail: []string{"{{range}}"}},
		{name: "query printf", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `{{ printf "%999999d" 1 }}` }, field: "spec.analysis.slos[0].query", detail: []string{`"printf" is not allowed`}},
		{name: "query define", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = `{{ define "a" }}up{{ end }}{{ template "a" }}` }, field: "spec.analysis.slos[0].query", detail: []string{"define"}},
		{name: "query empty", mutate: func(s *v1alpha1.MeshSpec) { s.Analysis.SLOs[0].Query = " " }, field: "spec.analysis.slos[0].query", detail: []string{"Required"}},

		// windows
		{name: "cron with ranges and names", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "30 1-4/2 * JAN-MAR MON-FRI" }},
		{name: "cron bad hour", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "0 25 * * 6" }, field: "spec.upgrade.windows[0].cron", detail: []string{`hour field "25"`, "0-23", `"0 2 * * 6"`}},
		{name: "cron bad day of week", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "0 2 * * SAT-XYZ" }, field: "spec.upgrade.windows[0].cron", detail: []string{"day-of-week field"}},
		{name: "cron six fields", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "0 0 2 * * 6" }, field: "spec.upgrade.windows[0].cron", detail: []string{"seconds are not supported"}},
		{name: "cron four fields", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "0 2 * *" }, field: "spec.upgrade.windows[0].cron", detail: []string{"has 4 fields"}},
		{name: "cron descriptor", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "@every 1h" }, field: "spec.upgrade.windows[0].cron", detail: []string{"descriptors"}},
		{name: "cron time zone", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "TZ=Europe/Berlin 0 2 * * 6" }, field: "spec.upgrade.windows[0].cron", detail: []string{"UTC"}},
		{name: "cron time zone without space", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "TZ=UTC" }, field: "spec.upgrade.windows[0].cron", detail: []string{"UTC"}},
		{name: "cron never fires", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Cron = "0 2 30 2 *" }, field: "spec.upgrade.windows[0].cron", detail: []string{"never fires"}},
		{name: "window 168h", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Duration = *dur("168h") }},
		{name: "window zero", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Duration = *dur("0s") }, field: "spec.upgrade.windows[0].duration", detail: []string{"more than 0", "4h"}},
		{name: "window over a week", mutate: func(s *v1alpha1.MeshSpec) { s.Upgrade.Windows[0].Duration = *dur("169h") }, field: "spec.upgrade.windows[0].duration", detail: []string{"168h"}},

		// identity
		{name: "spire disabled without trust domain", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire = &v1alpha1.SpireSpec{} }},
		{name: "spire without trust domain", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.TrustDomain = "" }, field: "spec.identity.spire.trustDomain", detail: []string{"Required", "example.org"}},
		{name: "trust domain uppercase", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.TrustDomain = "Example.org" }, field: "spec.identity.spire.trustDomain", detail: []string{"lowercase", "example.org"}},
		{name: "trust domain with scheme", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.TrustDomain = "spiffe://example.org/ns" }, field: "spec.identity.spire.trustDomain", detail: []string{"without the spiffe:// scheme", "trustDomain: example.org"}},
		{name: "trust domain only dots", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.TrustDomain = ".." }, field: "spec.identity.spire.trustDomain", detail: []string{"at least one letter"}},
		{name: "svidTTL 1m", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.SVIDTTL = dur("1m") }},
		{name: "svidTTL 720h", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.SVIDTTL = dur("720h") }},
		{name: "svidTTL 30s", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.SVIDTTL = dur("30s") }, field: "spec.identity.spire.svidTTL", detail: []string{"between 1m and 720h", "1h"}},
		{name: "svidTTL 721h", mutate: func(s *v1alpha1.MeshSpec) { s.Identity.Spire.SVIDTTL = dur("721h") }, field: "spec.identity.spire.svidTTL", detail: []string{"between 1m and 720h"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := NewWithT(t)
			spec := exampleSpec()
			tt.mutate(spec)
			errs := ValidateSpec(spec)
			if tt.field == "" {
				g.Expect(errs).To(BeEmpty(), "want valid, got %v", errs.ToAggregate())
				return
			}
			g.Expect(errs).To(HaveLen(1), "want exactly one error, got %v", errs.ToAggregate())
			g.Expect(errs[0].Field).To(Equal(tt.field))
			msg := errs[0].Error()
			g.Expect(msg).To(HavePrefix(tt.field + ": "))
			for _, d := range tt.detail {
				g.Expect(msg).To(ContainSubstring(d))
			}
		})
	}
}

func TestValidateSpecNil(t *testing.T) {
	g := NewWithT(t)
	errs := ValidateSpec(nil)
	g.Expect(errs).To(HaveLen(1))
	g.Expect(errs[0].Field).To(Equal("spec"))
}

func TestValidateSpecReportsEveryField(t *testing.T) {
	g := NewWithT(t)
	spec := exampleSpec()
	spec.Version = "latest"
	spec.Rollout.Namespaces.Waves = []string{"50%", "10%"}
	spec.Upgrade.Windows[0].Cron = "every night"
	var fields []string
	for _, e := range ValidateSpec(spec) {
		fields = append(fields, e.Field)
	}
	g.Expect(fields).To(ConsistOf(
		"spec.version",
		"spec.rollout.namespaces.waves[1]", // decreasing
		"spec.rollout.namespaces.waves[1]", // does not end at 100%
		"spec.upgrade.windows[0].cron",
	))
}

func TestValidateDowngrade(t *testing.T) {
	tests := []struct {
		version, installed string
		refused            bool
		detail             []string
	}{
		{version: "1.26", installed: "1.27.3"},
		{version: "1.26.9", installed: "1.27.3"},
		{version: "1.27.1", installed: "1.27.3"},
		{version: "1.27", installed: "1.27.3"},
		{version: "1.28", installed: "1.27.3"},
		{version: "2.0", installed: "1.27.3"},
		{version: "1.20", installed: ""},
		{version: "not-a-version", installed: "1.27.3"}, // ValidateSpec reports it
		{version: "1.25", installed: "garbage"},
		{version: "1.25.0", installed: "1.27.3", refused: true, detail: []string{
			`spec.version: Invalid value: "1.25.0": 1.25.0 is 2 minors below installed 1.27.3: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.26 first, then 1.25.0`,
		}},
		{version: "1.25", installed: "1.28.2", refused: true, detail: []string{"set spec.version to 1.27 first, then 1.26, then 1.25"}},
		{version: "1.25", installed: "1.27", refused: true, detail: []string{"set spec.version to 1.26 first, then 1.25"}},
		{version: "0.99", installed: "1.0.1", refused: true, detail: []string{"across a major version", "keep 1.0"}},
	}
	for _, tt := range tests {
		t.Run(tt.version+" over "+tt.installed, func(t *testing.T) {
			g := NewWithT(t)
			err := ValidateDowngrade(tt.version, tt.installed)
			if !tt.refused {
				g.Expect(err).To(BeNil())
				return
			}
			g.Expect(err).NotTo(BeNil())
			g.Expect(err.Field).To(Equal("spec.version"))
			g.Expect(err.Type).To(Equal(field.ErrorTypeInvalid))
			for _, d := range tt.detail {
				g.Expect(err.Error()).To(ContainSubstring(d))
			}
		})
	}
}

// BenchmarkValidateSpec measures what one admission request costs for the
// architecture example (template, PromQL and cron parsing included).
func BenchmarkValidateSpec(b *testing.B) {
	spec := exampleSpec()
	for b.Loop() {
		if errs := ValidateSpec(spec); len(errs) != 0 {
			b.Fatal(errs.ToAggregate())
		}
	}
}

// TestFollowingMinorsIsNoDowngrade: with upgrade.minor: Automatic a mesh
// that moved past spec.version by itself may still have its other fields
// edited; changing spec.version itself to far below is still refused.
func TestFollowingMinorsIsNoDowngrade(t *testing.T) {
	g := NewWithT(t)
	old := &v1alpha1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec:       v1alpha1.MeshSpec{Version: "1.26", Upgrade: v1alpha1.UpgradeSpec{Minor: v1alpha1.UpgradeAutomatic}},
		Status:     v1alpha1.MeshStatus{Version: v1alpha1.VersionStatus{Installed: "1.28.2"}},
	}
	edited := old.DeepCopy()
	edited.Spec.Paused = true
	_, err := (&meshValidator{}).ValidateUpdate(context.Background(), old, edited)
	g.Expect(err).NotTo(HaveOccurred())

	manual := edited.DeepCopy()
	manual.Spec.Upgrade.Minor = v1alpha1.UpgradeManual
	_, err = (&meshValidator{}).ValidateUpdate(context.Background(), old, manual)
	g.Expect(err).To(MatchError(ContainSubstring("1.26 is 2 minors below installed 1.28.2")), "back to Manual pins 1.26: a downgrade")

	lower := edited.DeepCopy()
	lower.Spec.Version = "1.25"
	_, err = (&meshValidator{}).ValidateUpdate(context.Background(), old, lower)
	g.Expect(err).To(MatchError(ContainSubstring("1.25 is 3 minors below installed 1.28.2")))
}
