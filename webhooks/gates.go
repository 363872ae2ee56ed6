package webhooks

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// ValidateGates refuses bakes that would let a wave be judged on traffic
// from before it moved: with SLO gates (spec.analysis.prometheus set), a
// bake written in the spec (rollout.namespaces.bake, rollout.nodes.bake)
// must be more than 0 and at least the longest range window of the SLO
// queries. rollout.nodes.soak defaults to 0 and is not checked: later node
// waves wait for a clean window in the engine (plan.FirstCheckAfter). The rollout engine also waits
// one query window and one scrape interval past the bake before the first
// check (plan.FirstCheckAfter); this makes the spec say what happens.
//
// It runs at admission only (create, and updates that change the spec),
// not in the controller: a Mesh admitted under older rules keeps running
// and is told at its next edit.
func ValidateGates(spec *v1alpha1.MeshSpec) field.ErrorList {
	a := spec.Analysis
	if a == nil || a.Prometheus == nil {
		return nil
	}
	settings := analysis.SettingsFor(a)
	window := plan.QueryWindow(settings.SLOs, settings.Interval)
	var errs field.ErrorList
	check := func(d *metav1.Duration, p *field.Path, what string) {
		if d == nil || d.Duration < 0 {
			return // unset: the default; negative: ValidateSpec says so
		}
		switch {
		case d.Duration == 0:
			errs = append(errs, field.Invalid(p, d.Duration.String(), fmt.Sprintf(
				"must be more than 0 when SLO gates are set (spec.analysis.prometheus): %s; use at least the longest query window, %s", what, shortDuration(max(window, minInterval)))))
		case d.Duration < window:
			errs = append(errs, field.Invalid(p, d.Duration.String(), fmt.Sprintf(
				"is shorter than the longest SLO query window (%s): a check would still see traffic from before the wave moved; use at least %s, or shorten the queries' range", shortDuration(window), shortDuration(window))))
		}
	}
	r := field.NewPath("spec", "rollout")
	check(spec.Rollout.Namespaces.Bake, r.Child("namespaces", "bake"), "a namespace wave would be judged as soon as it moved")
	check(spec.Rollout.Nodes.Bake, r.Child("nodes", "bake"), "the canary node wave would be judged as soon as it moved")
	return errs
}
