package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/gatewayapi"
)

// Waypoints are Gateway API Gateways of class istio-waypoint, one per
// spec.waypoints entry, which istiod's gateway controller turns into a
// waypoint Deployment and Service and marks Programmed. meshkeeper:
//   - writes each Gateway with server-side apply under its field manager,
//     labelled meshkeeper.dev/component=waypoint, app.kubernetes.io/managed-by
//     =meshkeeper, istio.io/waypoint-for (from spec "for") and istio.io/rev
//     (the revision its namespace carries this reconcile, so a waypoint
//     moves with its namespace's wave and rolls back with it);
//   - forces its own fields back (drift) and deletes its Gateways whose
//     entry is gone;
//   - labels the namespace istio.io/use-waypoint=<name> (the first waypoint
//     listed for it) only once istiod has Programmed the Gateway, under a
//     field manager of its own (waypointFieldManager), so that label and the
//     namespace labels of mesh_namespaces.go are released independently;
//   - never writes a Gateway it did not create nor a use-waypoint label it
//     did not set: those are listed in status.waypoints.conflicts and the
//     Mesh is Degraded (WaypointConflict).

const (
	// WaypointGatewayClass is istiod's class for waypoints.
	WaypointGatewayClass = "istio-waypoint"
	// componentWaypoint is the meshkeeper.dev/component value of waypoint Gateways.
	componentWaypoint = "waypoint"
	// waypointFieldManager owns the istio.io/use-waypoint labels meshkeeper sets.
	waypointFieldManager = meshv1.FieldManager + "-waypoints"
	// labelManagedBy marks the Gateways as meshkeeper's for people and tools
	// (Helm is not involved here, so it stays meshkeeper's).
	labelManagedBy = "app.kubernetes.io/managed-by"
	// maxWaypointItems caps status.waypoints.items: spec.waypoints' own cap.
	maxWaypointItems = 256
	// maxWaypointConflicts caps status.waypoints.conflicts (see mesh_bounds.go).
	maxWaypointConflicts = 64
	// maxGatewayAPIKept caps status.waypoints.gatewayAPI.kept.
	maxGatewayAPIKept = 32
)

// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gateways,verbs=get;list;create;patch;delete

// recheck is when to look at the waypoints again though nothing watched
// changed: soon while istiod has yet to program one, now and then for
// drift otherwise (Gateways are read uncached, not watched: the Gateway
// API CRDs may not exist when the manager starts).
func (w *waypointObservation) recheck() time.Duration {
	switch {
	case w.pending:
		return jitter(2 * time.Second)
	case w.observed && w.status.Total > 0:
		return jitter(10 * time.Second)
	}
	return 0
}

// waypointObservation is what the waypoint phase saw and did.
type waypointObservation struct {
	observed bool
	status   meshv1.WaypointsStatus
	// gatewayAPIReady: the Gateway API CRDs are served, so Gateways can be
	// written.
	gatewayAPIReady bool
	pending         bool // a waypoint waits for istiod: look again soon
}

// waypointFor is the istio.io/waypoint-for value of a spec "for".
func waypointFor(f meshv1.WaypointFor) string {
	switch f {
	case meshv1.WaypointForWorkload:
		return "workload"
	case meshv1.WaypointForAll:
		return "all"
	default:
		return "service"
	}
}

// waypointGateway is the Gateway meshkeeper applies for w at revision.
func waypointGateway(w meshv1.WaypointSpec, revision string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": gatewayv1.GroupVersion.String(),
		"kind":       "Gateway",
		"metadata": map[string]any{
			"name":      w.Name,
			"namespace": w.Namespace,
			"labels": map[string]any{
				meshv1.LabelComponent:   componentWaypoint,
				labelManagedBy:          meshv1.FieldManager,
				meshv1.LabelWaypointFor: waypointFor(w.For),
				meshv1.LabelRevision:    revision,
			},
		},
		"spec": map[string]any{
			"gatewayClassName": WaypointGatewayClass,
			"listeners": []any{map[string]any{
				"name":     "mesh",
				"port":     int64(15008),
				"protocol": "HBONE",
			}},
		},
	}}
	return u
}

// ownWaypoint is whether g is a Gateway meshkeeper wrote.
func ownWaypoint(g *gatewayv1.Gateway) bool {
	return g.Labels[meshv1.LabelComponent] == componentWaypoint
}

// programmed is whether istiod set the Gateway Programmed.
func programmed(g *gatewayv1.Gateway) bool {
	return meta.IsStatusConditionTrue(g.Status.Conditions, string(gatewayv1.GatewayConditionProgrammed))
}

// usedWaypoints maps each namespace to the waypoint its use-waypoint label
// names: the first spec.waypoints entry of that namespace.
func usedWaypoints(ws []meshv1.WaypointSpec) map[string]string {
	used := map[string]string{}
	for _, w := range ws {
		if _, ok := used[w.Namespace]; !ok {
			used[w.Namespace] = w.Name
		}
	}
	return used
}

// waypointRefusal says why a waypoint in ns is not written, "" when it may
// be: the webhook refuses the same at admission (webhooks/validation.go),
// but a namespace can change after.
func (r *MeshReconciler) waypointRefusal(mesh *meshv1.Mesh, ns *corev1.Namespace, selector labels.Selector) string {
	switch {
	case ns.Name == "kube-system" || ns.Name == r.ComponentsNamespace || ns.Name == meshkeeperNamespace:
		return fmt.Sprintf("namespace %s is one of the mesh's own or the system's; move the waypoint to an application namespace", ns.Name)
	case !selector.Matches(labels.Set(ns.Labels)):
		return fmt.Sprintf("namespace %s is not selected by spec.namespaces.selector; label it into the mesh or remove the waypoint", ns.Name)
	case mesh.Spec.Dataplane.EffectiveMode() != meshv1.ModeAmbient:
		return "waypoints need spec.dataplane.mode Ambient"
	}
	return ""
}

// meshkeeperNamespace is where meshkeeper itself runs (config/default).
const meshkeeperNamespace = "meshkeeper-system"

// reconcileGatewayAPI installs the Gateway API CRDs waypoints are written
// against (and istiod reads), never over a newer copy (internal/gatewayapi).
func (r *MeshReconciler) reconcileGatewayAPI(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	if obs.bundle == nil || mesh.Spec.Dataplane.EffectiveMode() != meshv1.ModeAmbient && len(mesh.Spec.Waypoints) == 0 {
		return nil
	}
	res, err := gatewayapi.Ensure(ctx, r.Client, meshv1.FieldManager)
	if err != nil {
		return fmt.Errorf("gateway API CRDs: %w", err)
	}
	st := &meshv1.GatewayAPIStatus{BundleVersion: gatewayapi.BundleVersion}
	for _, c := range res {
		switch c.Action {
		case gatewayapi.Kept:
			st.Kept = append(st.Kept, fmt.Sprintf("%s: %s; left as it is", c.Name, c.Reason))
		case gatewayapi.Installed, gatewayapi.Upgraded:
			log.FromContext(ctx).Info("Applied Gateway API CRD", "crd", c.Name, "action", c.Action, "found", c.Found, "version", gatewayapi.BundleVersion)
		}
	}
	st.Kept, _ = capped(st.Kept, maxGatewayAPIKept)
	obs.waypoints.status.GatewayAPI = st
	ok, err := gatewayapi.Established(ctx, r.reader(), res)
	if err != nil {
		return fmt.Errorf("gateway API CRDs: %w", err)
	}
	obs.waypoints.gatewayAPIReady = ok
	return nil
}

// reconcileWaypoints writes each waypoint's Gateway, labels its namespace
// once istiod programmed it, and removes what left the spec.
func (r *MeshReconciler) reconcileWaypoints(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	wo := &obs.waypoints
	if !obs.namespacesObserved || !wo.gatewayAPIReady {
		if len(mesh.Spec.Waypoints) > 0 && obs.namespacesObserved {
			wo.pending = true
		}
		return nil
	}
	wo.observed = true
	selector, err := selectorOf(mesh)
	if err != nil {
		return fmt.Errorf("spec.namespaces.selector: %w", err)
	}
	var errs []error
	wanted := map[string]bool{} // namespace/name of the Gateways to keep
	used := usedWaypoints(mesh.Spec.Waypoints)
	useLabel := map[string]string{} // namespace → the use-waypoint value meshkeeper wants
	st := &wo.status
	st.Total = int32(len(mesh.Spec.Waypoints))
	for _, w := range mesh.Spec.Waypoints {
		item := meshv1.WaypointStatus{Namespace: w.Namespace, Name: w.Name}
		ns := &corev1.Namespace{}
		if err := r.Get(ctx, client.ObjectKey{Name: w.Namespace}, ns); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("read namespace %s: %w", w.Namespace, err))
				continue
			}
			item.Message = fmt.Sprintf("namespace %s does not exist; create it (in the mesh) or remove the waypoint", w.Namespace)
			st.Items = append(st.Items, item)
			continue
		}
		if why := r.waypointRefusal(mesh, ns, selector); why != "" {
			item.Message = "Not written: " + why
			st.Conflicts = append(st.Conflicts, fmt.Sprintf("waypoint %s/%s: %s", w.Namespace, w.Name, why))
			st.Items = append(st.Items, item)
			continue
		}
		key := w.Namespace + "/" + w.Name
		gw := &gatewayv1.Gateway{}
		switch err := r.reader().Get(ctx, client.ObjectKey{Namespace: w.Namespace, Name: w.Name}, gw); {
		case apierrors.IsNotFound(err):
			gw = nil
		case err != nil:
			errs = append(errs, fmt.Errorf("read Gateway %s: %w", key, err))
			continue
		}
		if gw != nil && !ownWaypoint(gw) {
			item.Message = "A Gateway of this name exists that meshkeeper did not create; it is left as it is: rename the waypoint or remove that Gateway"
			st.Conflicts = append(st.Conflicts, fmt.Sprintf("Gateway %s: not created by meshkeeper, left as it is", key))
			st.Items = append(st.Items, item)
			continue
		}
		wanted[key] = true
		item.Revision = obs.namespaceRevision(w.Namespace)
		if err := r.Apply(ctx, client.ApplyConfigurationFromUnstructured(waypointGateway(w, item.Revision)),
			client.FieldOwner(meshv1.FieldManager), client.ForceOwnership); err != nil {
			errs = append(errs, fmt.Errorf("apply waypoint Gateway %s: %w", key, err))
			continue
		}
		if gw == nil {
			log.FromContext(ctx).Info("Created waypoint Gateway", "gateway", key, "revision", item.Revision)
		}
		item.Programmed = gw != nil && programmed(gw) && gw.Labels[meshv1.LabelRevision] == item.Revision
		if used[w.Namespace] == w.Name {
			switch foreign := foreignUseWaypoint(ns); {
			case foreign:
				item.Message = fmt.Sprintf("namespace %s has %s=%s set by someone else; it is left as it is", w.Namespace, meshv1.LabelUseWaypoint, ns.Labels[meshv1.LabelUseWaypoint])
				st.Conflicts = append(st.Conflicts, fmt.Sprintf("namespace %s: %s=%s not set by meshkeeper, left as it is", w.Namespace, meshv1.LabelUseWaypoint, ns.Labels[meshv1.LabelUseWaypoint]))
			case item.Programmed || ownsUseWaypoint(ns, w.Name):
				// Once in use, a waypoint stays in use while istiod
				// reprograms it (a revision move): dropping the label
				// would drop its L7 policy.
				useLabel[w.Namespace] = w.Name
				item.InUse = true
			default:
				item.Message = "Waiting for istiod to program the Gateway before the namespace uses it"
			}
		}
		if item.Programmed {
			st.Ready++
		} else {
			wo.pending = true
			if item.Message == "" {
				item.Message = "Waiting for istiod to program the Gateway (revision " + item.Revision + ")"
			}
		}
		st.Items = append(st.Items, item)
	}
	// Namespaces first, then Gateways: traffic leaves a waypoint before it goes.
	errs = append(errs, r.applyUseWaypointLabels(ctx, useLabel)...)
	errs = append(errs, r.deleteWaypoints(ctx, wanted)...)
	slices.SortFunc(st.Items, func(a, b meshv1.WaypointStatus) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	slices.Sort(st.Conflicts)
	return errors.Join(errs...)
}

// releaseWaypoints removes every use-waypoint label and Gateway meshkeeper
// wrote (the Mesh is deleted).
func (r *MeshReconciler) releaseWaypoints(ctx context.Context, _ *meshv1.Mesh) error {
	errs := r.applyUseWaypointLabels(ctx, nil)
	errs = append(errs, r.deleteWaypoints(ctx, nil)...)
	return errors.Join(errs...)
}

// applyUseWaypointLabels makes want (namespace → waypoint) the exact set of
// use-waypoint labels meshkeeper's waypoint field manager owns.
func (r *MeshReconciler) applyUseWaypointLabels(ctx context.Context, want map[string]string) []error {
	var namespaces corev1.NamespaceList
	if err := r.List(ctx, &namespaces); err != nil {
		return []error{fmt.Errorf("list namespaces: %w", err)}
	}
	var errs []error
	for i := range namespaces.Items {
		ns := &namespaces.Items[i]
		name, wanted := want[ns.Name]
		owned := ownsUseWaypoint(ns, "")
		if ns.DeletionTimestamp != nil || (!wanted && !owned) || (wanted && ownsUseWaypoint(ns, name)) {
			continue
		}
		ac := corev1ac.Namespace(ns.Name)
		if wanted {
			ac = ac.WithLabels(map[string]string{meshv1.LabelUseWaypoint: name})
		}
		switch err := r.Apply(ctx, ac, client.FieldOwner(waypointFieldManager)); {
		case err == nil:
			log.FromContext(ctx).Info("Applied use-waypoint label", "namespace", ns.Name, "waypoint", name)
		case apierrors.IsNotFound(err), apierrors.IsConflict(err):
			// Gone, or someone else took the label: reported next time.
		default:
			errs = append(errs, fmt.Errorf("label namespace %s %s: %w", ns.Name, meshv1.LabelUseWaypoint, err))
		}
	}
	return errs
}

// deleteWaypoints deletes the Gateways meshkeeper wrote that are not in keep.
func (r *MeshReconciler) deleteWaypoints(ctx context.Context, keep map[string]bool) []error {
	var gws gatewayv1.GatewayList
	if err := r.reader().List(ctx, &gws, client.MatchingLabels{meshv1.LabelComponent: componentWaypoint}); err != nil {
		if meta.IsNoMatchError(err) {
			return nil // no Gateway API, no Gateways
		}
		return []error{fmt.Errorf("list waypoint Gateways: %w", err)}
	}
	var errs []error
	for i := range gws.Items {
		g := &gws.Items[i]
		if keep[g.Namespace+"/"+g.Name] || !ownWaypoint(g) {
			continue
		}
		if err := r.Delete(ctx, g, client.Preconditions{UID: &g.UID}); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete waypoint Gateway %s/%s: %w", g.Namespace, g.Name, err))
			continue
		}
		log.FromContext(ctx).Info("Deleted waypoint Gateway", "gateway", g.Namespace+"/"+g.Name)
	}
	return errs
}

// foreignUseWaypoint is whether ns carries a use-waypoint label that
// meshkeeper's waypoint field manager does not own.
func foreignUseWaypoint(ns *corev1.Namespace) bool {
	_, has := ns.Labels[meshv1.LabelUseWaypoint]
	return has && !ownsUseWaypoint(ns, "")
}

// ownsUseWaypoint is whether meshkeeper's waypoint field manager owns ns's
// use-waypoint label (with value name, when name is not empty).
func ownsUseWaypoint(ns *corev1.Namespace, name string) bool {
	for _, mf := range ns.ManagedFields {
		if mf.Manager != waypointFieldManager || mf.Operation != metav1.ManagedFieldsOperationApply || mf.FieldsV1 == nil {
			continue
		}
		set, err := fieldSetOf(mf.FieldsV1)
		if err != nil {
			continue
		}
		if _, ok := set[meshv1.LabelUseWaypoint]; ok {
			return name == "" || ns.Labels[meshv1.LabelUseWaypoint] == name
		}
	}
	return false
}
