package controller

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// STRICT mTLS as a step of the migration (issue 13). With
// spec.security.mtls: Strict, meshkeeper keeps ONE mesh-wide
// PeerAuthentication (security.istio.io/v1, spec.mtls.mode STRICT) in the
// root namespace, which is the control plane's namespace (the istiod
// chart sets meshConfig.rootNamespace to its release namespace):
//   - it is written only while no rollout runs: on a fresh install once the
//     Mesh has converged (what makes it Ready), after a rollout once every
//     namespace wave has passed and the old revision is retired
//     (status.rollout gone), and after a rollback once everything is back;
//   - a rollout, a rollback and the Mesh's deletion remove it FIRST: the
//     relax phase runs before the namespaces phase, and while its removal
//     fails no namespace label changes (observation.mtls.holdNamespaces), so
//     workloads that move back to sidecars or to plaintext keep reaching
//     each other;
//   - it is labelled meshkeeper.dev/component=mtls and
//     app.kubernetes.io/managed-by=meshkeeper, written with server-side
//     apply (drift is forced back) and deleted on Permissive;
//   - a mesh-wide PeerAuthentication meshkeeper did not write (of its name,
//     or any other without a workload selector in the root namespace) is
//     never touched: it is listed in status.security.conflicts and the Mesh
//     is Degraded (MTLSConflict). meshkeeper then writes none of its own
//     (istiod applies one mesh-wide policy, the oldest, so a second one
//     would only seem to be in effect); one it wrote before is kept;
//   - PeerAuthentications of other namespaces, or for selected workloads,
//     are users' opt-outs: left alone and listed in status.security.optOuts.
//
// PeerAuthentications are read uncached as unstructured objects: their CRD
// comes with the crds bundle (a permissive schema) and may not exist when
// the manager starts, so they are not watched; obs.mtls.recheck brings the
// Mesh back for drift.

const (
	// mtlsPeerAuthenticationName is the name of meshkeeper's mesh-wide
	// PeerAuthentication. Not "default", the name Istio's docs and earlier
	// installs give theirs: such a one is then never mistaken for
	// meshkeeper's, nor a docs example applied over it.
	mtlsPeerAuthenticationName = "meshkeeper-mesh-mtls"
	// componentMTLS is the meshkeeper.dev/component value of that object.
	componentMTLS = "mtls"
	// maxMTLSConflicts and maxMTLSOptOuts cap status.security.conflicts and
	// .optOuts (see mesh_bounds.go).
	maxMTLSConflicts = 64
	maxMTLSOptOuts   = 64
	// peerAuthenticationPage bounds each list of PeerAuthentications.
	peerAuthenticationPage = 500
)

// peerAuthenticationGVK is the Istio API version meshkeeper writes.
var peerAuthenticationGVK = schema.GroupVersionKind{Group: "security.istio.io", Version: "v1", Kind: "PeerAuthentication"}

// +kubebuilder:rbac:groups=security.istio.io,resources=peerauthentications,verbs=get;list;create;patch;delete

// mtlsObservation is what the mTLS phases saw and did.
type mtlsObservation struct {
	observed bool
	strict   bool // spec.security.mtls is Strict
	status   meshv1.SecurityStatus
	// holdNamespaces: a rollout or rollback needs meshkeeper's STRICT
	// policy gone and removing it failed, so no namespace moves yet.
	holdNamespaces bool
	// relaxed: the relax phase removed it in this reconcile.
	relaxed bool
}

// recheck is when to look at the PeerAuthentications again though nothing
// watched changed: now and then while Strict is wanted (drift, conflicts,
// opt-outs), never otherwise.
func (m *mtlsObservation) recheck() time.Duration {
	if m.observed && m.strict {
		return jitter(10 * time.Second)
	}
	return 0
}

// MeshWidePeerAuthentication is the PeerAuthentication meshkeeper applies in
// the root namespace: every workload of the mesh accepts mTLS only.
func MeshWidePeerAuthentication(rootNamespace string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": peerAuthenticationGVK.GroupVersion().String(),
		"kind":       peerAuthenticationGVK.Kind,
		"metadata": map[string]any{
			"name":      mtlsPeerAuthenticationName,
			"namespace": rootNamespace,
			"labels": map[string]any{
				meshv1.LabelComponent: componentMTLS,
				labelManagedBy:        meshv1.FieldManager,
			},
		},
		"spec": map[string]any{
			"mtls": map[string]any{"mode": "STRICT"},
		},
	}}
	return u
}

// ownPeerAuthentication is whether pa is the one meshkeeper wrote.
func ownPeerAuthentication(pa *unstructured.Unstructured) bool {
	return pa.GetName() == mtlsPeerAuthenticationName && pa.GetLabels()[meshv1.LabelComponent] == componentMTLS
}

// meshWide is whether pa, in the root namespace, applies to the whole mesh:
// it has no workload selector (istiod ignores root-namespace policies with
// one).
func meshWide(pa *unstructured.Unstructured) bool {
	labels, _, _ := unstructured.NestedMap(pa.Object, "spec", "selector", "matchLabels")
	return len(labels) == 0
}

// peerAuthenticationMode is pa's spec.mtls.mode as Istio reads it (UNSET
// when absent: inherited from the namespace or the mesh).
func peerAuthenticationMode(pa *unstructured.Unstructured) string {
	mode, _, _ := unstructured.NestedString(pa.Object, "spec", "mtls", "mode")
	if mode == "" {
		mode = "UNSET"
	}
	return mode
}

// describeOptOut is how status.security.optOuts names pa, e.g.
// "shop/legacy: PERMISSIVE (workload selector; port-level modes)".
func describeOptOut(pa *unstructured.Unstructured) string {
	s := fmt.Sprintf("%s/%s: %s", pa.GetNamespace(), pa.GetName(), peerAuthenticationMode(pa))
	var notes []string
	if !meshWide(pa) {
		notes = append(notes, "workload selector")
	}
	if ports, _, _ := unstructured.NestedMap(pa.Object, "spec", "portLevelMtls"); len(ports) > 0 {
		notes = append(notes, "port-level modes")
	}
	if len(notes) > 0 {
		s += " (" + strings.Join(notes, "; ") + ")"
	}
	return s
}

// mtlsFacts is what the decision about meshkeeper's STRICT policy needs.
type mtlsFacts struct {
	want meshv1.MTLSMode
	// rollout is status.rollout as this reconcile leaves it; nil when
	// no rollout runs.
	rollout *meshv1.RolloutStatus
	// converged: the mesh runs as the spec says (what makes it Ready).
	converged bool
	// own: meshkeeper's PeerAuthentication exists.
	own bool
	// nameTaken: an object of its name exists that meshkeeper did not write.
	nameTaken bool
	// foreign are the other mesh-wide PeerAuthentications.
	foreign []string
}

// mtlsAction is what happens to meshkeeper's STRICT policy.
type mtlsAction int

const (
	mtlsLeave  mtlsAction = iota // as it is (absent stays absent)
	mtlsApply                    // write it, or force it back
	mtlsRemove                   // delete it
)

// relaxReason says why meshkeeper's STRICT policy must go before any
// namespace moves, "" when it may stay.
func relaxReason(want meshv1.MTLSMode, ro *meshv1.RolloutStatus) string {
	switch {
	case want != meshv1.MTLSStrict:
		return "spec.security.mtls is Permissive"
	case ro == nil:
		return ""
	case ro.Step == meshv1.RolloutStepRollingBack:
		return fmt.Sprintf("rolling %s back to %s", ro.To, ro.From)
	default:
		return fmt.Sprintf("the rollout to %s runs", ro.To)
	}
}

// decideMTLS is the one decision about meshkeeper's STRICT policy, and the
// status message that explains it ("" when Strict is in effect or not
// wanted).
func decideMTLS(f mtlsFacts) (mtlsAction, string) {
	if why := relaxReason(f.want, f.rollout); why != "" {
		if f.want != meshv1.MTLSStrict {
			return mtlsRemove, ""
		}
		return mtlsRemove, fmt.Sprintf("STRICT is held back while %s, so workloads that move between revisions or dataplanes keep reaching each other; it is applied again once the rollout has ended", why)
	}
	switch {
	case f.nameTaken:
		return mtlsLeave, fmt.Sprintf("a PeerAuthentication named %s that meshkeeper did not write is in the way; it is left as it is: delete it, or set spec.security.mtls: Permissive", mtlsPeerAuthenticationName)
	case f.own:
		// Once written it stays, also while the mesh is not converged (a
		// component recovering): only a rollout relaxes it.
		return mtlsApply, ""
	case !f.converged:
		return mtlsLeave, "STRICT is applied once the mesh is Ready"
	case len(f.foreign) > 0:
		return mtlsLeave, fmt.Sprintf("not written: %s is a mesh-wide PeerAuthentication meshkeeper did not write, and istiod applies only one (the oldest); delete it to let meshkeeper keep STRICT, or set spec.security.mtls: Permissive", someOf(f.foreign, ", "))
	}
	return mtlsApply, ""
}

// relaxMTLS runs before the namespaces phase: when a rollout or a rollback
// runs (or Strict is not wanted), meshkeeper's STRICT policy goes first,
// and while that fails no namespace moves.
func (r *MeshReconciler) relaxMTLS(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	why := relaxReason(mesh.Spec.Security.EffectiveMTLS(), obs.rollout.status)
	if why == "" {
		return nil
	}
	removed, err := r.deletePeerAuthentication(ctx, mesh, why)
	if err != nil {
		obs.mtls.holdNamespaces = true
		return err
	}
	obs.mtls.relaxed = removed
	return nil
}

// releaseMTLS removes meshkeeper's STRICT policy (the Mesh is deleted),
// before any namespace leaves the mesh.
func (r *MeshReconciler) releaseMTLS(ctx context.Context, mesh *meshv1.Mesh) error {
	_, err := r.deletePeerAuthentication(ctx, mesh, "the Mesh is deleted")
	return err
}

// deletePeerAuthentication deletes meshkeeper's STRICT policy if it exists;
// removed says whether it did.
func (r *MeshReconciler) deletePeerAuthentication(ctx context.Context, mesh *meshv1.Mesh, why string) (removed bool, err error) {
	pa := &unstructured.Unstructured{}
	pa.SetGroupVersionKind(peerAuthenticationGVK)
	key := client.ObjectKey{Namespace: r.ComponentsNamespace, Name: mtlsPeerAuthenticationName}
	switch err := r.reader().Get(ctx, key, pa); {
	case apierrors.IsNotFound(err), meta.IsNoMatchError(err):
		return false, nil // none, or no PeerAuthentication CRD: nothing to remove
	case err != nil:
		return false, fmt.Errorf("read PeerAuthentication %s: %w", key, err)
	}
	if !ownPeerAuthentication(pa) {
		return false, nil // someone else's: never touched
	}
	uid := pa.GetUID()
	if err := r.Delete(ctx, pa, client.Preconditions{UID: &uid}); err != nil && !apierrors.IsNotFound(err) {
		return false, fmt.Errorf("delete PeerAuthentication %s (%s first): %w", key, why, err)
	}
	log.FromContext(ctx).Info("Deleted mesh-wide STRICT PeerAuthentication", "peerAuthentication", key.String(), "why", why)
	r.event(mesh, corev1.EventTypeNormal, "MTLSRelaxed", "Mesh-wide mTLS relaxed to PERMISSIVE: PeerAuthentication %s deleted (%s)", key, why)
	return true, nil
}

// reconcileMTLS runs last, once the rollout phases decided: it writes
// meshkeeper's STRICT policy when nothing moves any more, and reports what
// it found.
func (r *MeshReconciler) reconcileMTLS(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	if !obs.componentsReady {
		return nil // the PeerAuthentication CRD comes with the components
	}
	mo := &obs.mtls
	want := mesh.Spec.Security.EffectiveMTLS()
	mo.observed, mo.strict = true, want == meshv1.MTLSStrict
	mo.status = meshv1.SecurityStatus{MTLS: meshv1.MTLSPermissive}
	if want != meshv1.MTLSStrict {
		return nil // relaxMTLS removed meshkeeper's policy
	}
	root := r.ComponentsNamespace
	facts := mtlsFacts{want: want, rollout: obs.rollout.status, converged: obs.converged()}
	var optOuts []string
	err := r.listPeerAuthentications(ctx, func(pa *unstructured.Unstructured) {
		switch {
		case pa.GetNamespace() == root && pa.GetName() == mtlsPeerAuthenticationName:
			if ownPeerAuthentication(pa) {
				facts.own = true
				return
			}
			facts.nameTaken = true
			mo.status.Conflicts = append(mo.status.Conflicts, fmt.Sprintf("%s/%s: %s, not written by meshkeeper (it has meshkeeper's name), left as it is", root, pa.GetName(), peerAuthenticationMode(pa)))
		case pa.GetNamespace() == root && meshWide(pa):
			facts.foreign = append(facts.foreign, root+"/"+pa.GetName())
			mo.status.Conflicts = append(mo.status.Conflicts, fmt.Sprintf("%s/%s: mesh-wide %s, not written by meshkeeper, left as it is", root, pa.GetName(), peerAuthenticationMode(pa)))
		default:
			optOuts = append(optOuts, describeOptOut(pa))
		}
	})
	if err != nil {
		mo.status.Message = "PeerAuthentications could not be read; retrying"
		return err
	}
	slices.Sort(mo.status.Conflicts)
	slices.Sort(optOuts)
	mo.status.Conflicts, mo.status.ConflictsOmitted = capped(mo.status.Conflicts, maxMTLSConflicts)
	mo.status.OptOuts, mo.status.OptOutsOmitted = capped(optOuts, maxMTLSOptOuts)
	r.reportMTLSConflicts(mesh, mo.status.Conflicts)

	action, msg := decideMTLS(facts)
	mo.status.Message = msg
	switch action {
	case mtlsRemove:
		if !facts.own {
			return nil // relaxMTLS removed it
		}
		// Not expected (the rollout is resolved before every phase, and
		// relaxMTLS ran), but never leave STRICT in place during one.
		_, err := r.deletePeerAuthentication(ctx, mesh, relaxReason(want, obs.rollout.status))
		return err
	case mtlsLeave:
		return nil
	}
	key := root + "/" + mtlsPeerAuthenticationName
	if err := r.Apply(ctx, client.ApplyConfigurationFromUnstructured(MeshWidePeerAuthentication(root)),
		client.FieldOwner(meshv1.FieldManager), client.ForceOwnership); err != nil {
		if meta.IsNoMatchError(err) {
			mo.status.Message = "the PeerAuthentication CRD (security.istio.io/v1) is not served yet; waiting for the crds component"
			return errWaiting
		}
		mo.status.Message = "writing the mesh-wide PeerAuthentication failed; retrying"
		return fmt.Errorf("apply PeerAuthentication %s: %w", key, err)
	}
	mo.status.MTLS, mo.status.PeerAuthentication = meshv1.MTLSStrict, key
	if !facts.own {
		log.FromContext(ctx).Info("Wrote mesh-wide STRICT PeerAuthentication", "peerAuthentication", key)
		r.event(mesh, corev1.EventTypeNormal, "MTLSStrict", "Mesh-wide mTLS is STRICT: PeerAuthentication %s written (%d opt-outs left as they are)",
			key, len(optOuts))
	}
	return nil
}

// reportMTLSConflicts sends a warning when conflicts appear or change.
func (r *MeshReconciler) reportMTLSConflicts(mesh *meshv1.Mesh, conflicts []string) {
	var before []string
	if s := mesh.Status.Security; s != nil {
		before = s.Conflicts
	}
	if len(conflicts) > 0 && !slices.Equal(before, conflicts) {
		r.event(mesh, corev1.EventTypeWarning, meshv1.ReasonMTLSConflict, "Left as they are: %s", someOf(conflicts, "; "))
	}
}

// listPeerAuthentications calls each for every PeerAuthentication in the
// cluster, page by page; no CRD is no PeerAuthentication.
func (r *MeshReconciler) listPeerAuthentications(ctx context.Context, each func(*unstructured.Unstructured)) error {
	cont := ""
	for {
		list := &unstructured.UnstructuredList{}
		list.SetGroupVersionKind(peerAuthenticationGVK.GroupVersion().WithKind(peerAuthenticationGVK.Kind + "List"))
		err := r.reader().List(ctx, list, client.Limit(peerAuthenticationPage), client.Continue(cont))
		if meta.IsNoMatchError(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("list PeerAuthentications: %w", err)
		}
		for i := range list.Items {
			each(&list.Items[i])
		}
		if cont = list.GetContinue(); cont == "" {
			return nil
		}
	}
}
