package webhooks

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// reservedWaypointNamespaces are where no waypoint may run: the system's
// and the mesh's own (the components' namespace and meshkeeper's, by their
// defaults).
var reservedWaypointNamespaces = map[string]string{
	"kube-system":       "the Kubernetes system namespace",
	"istio-system":      "the mesh components' namespace",
	"meshkeeper-system": "meshkeeper's own namespace",
}

// ValidateWaypointNamespaces checks where spec.waypoints put their Gateways,
// as far as admission can see: a waypoint may not run in a reserved
// namespace, and must be in a namespace spec.namespaces.selector selects
// (judged on the namespace's labels now; a namespace that does not exist yet
// is allowed with a warning). Only the entries new in spec are checked
// (all of them when the selector changed), so a namespace relabelled later
// does not block unrelated edits: the reconciler reports those instead
// (status.waypoints, Degraded WaypointConflict) and writes nothing there.
// old is nil on create.
func ValidateWaypointNamespaces(ctx context.Context, r client.Reader, spec, old *v1alpha1.MeshSpec) (admission.Warnings, field.ErrorList) {
	p := field.NewPath("spec", "waypoints")
	var errs field.ErrorList
	var warnings admission.Warnings
	known := map[string]bool{}
	if old != nil && equality.Semantic.DeepEqual(old.Namespaces.Selector, spec.Namespaces.Selector) {
		for _, w := range old.Waypoints {
			known[w.Namespace+"/"+w.Name] = true
		}
	}
	var selector labels.Selector = labels.Nothing()
	if spec.Namespaces.Selector != nil {
		s, err := metav1.LabelSelectorAsSelector(spec.Namespaces.Selector)
		if err != nil {
			return nil, nil // ValidateSpec reports the selector
		}
		selector = s
	}
	for i, w := range spec.Waypoints {
		wp := p.Index(i).Child("namespace")
		if what, ok := reservedWaypointNamespaces[w.Namespace]; ok {
			errs = append(errs, field.Forbidden(wp, fmt.Sprintf("%q is %s: waypoints run in application namespaces of the mesh; move the waypoint to one", w.Namespace, what)))
			continue
		}
		if known[w.Namespace+"/"+w.Name] || w.Namespace == "" {
			continue
		}
		ns := &corev1.Namespace{}
		switch err := r.Get(ctx, client.ObjectKey{Name: w.Namespace}, ns); {
		case apierrors.IsNotFound(err):
			warnings = append(warnings, fmt.Sprintf("spec.waypoints[%d]: namespace %s does not exist yet; meshkeeper writes the waypoint once it exists and spec.namespaces.selector selects it", i, w.Namespace))
		case err != nil:
			errs = append(errs, field.InternalError(wp, fmt.Errorf("read namespace %s to check it is in the mesh: %w; retry", w.Namespace, err)))
		case !selector.Matches(labels.Set(ns.Labels)):
			errs = append(errs, field.Invalid(wp, w.Namespace, fmt.Sprintf("namespace %s is not in the mesh: spec.namespaces.selector (%s) does not select its labels; label the namespace into the mesh or remove the waypoint", w.Namespace, selectorString(spec.Namespaces.Selector))))
		}
	}
	return warnings, errs
}

func selectorString(s *metav1.LabelSelector) string {
	if s == nil {
		return "none: it selects no namespace"
	}
	return metav1.FormatLabelSelector(s)
}
