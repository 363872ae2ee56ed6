package controller

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// Namespace labels are written with server-side apply under meshkeeper's own
// field manager. The API server then records which labels meshkeeper owns:
// applying a smaller set removes exactly the labels meshkeeper set and no
// longer wants, and never a label someone else set. A label someone else set
// to another value is a conflict meshkeeper reports and does not force.

// namespaceLabels is the set of labels a namespace in the mesh gets.
// Both modes point the namespace at its control-plane revision, which is
// how namespaces move between revisions during a rollout.
func namespaceLabels(mesh *meshv1.Mesh, revision string) map[string]string {
	if mesh.Spec.Dataplane.EffectiveMode() == meshv1.ModeSidecar {
		return map[string]string{meshv1.LabelRevision: revision}
	}
	return map[string]string{meshv1.LabelDataplaneMode: "ambient", meshv1.LabelRevision: revision}
}

// reconcileNamespaces labels the selected namespaces and releases the labels
// of namespaces that left the selection. Namespaces are enrolled only once
// every component is ready, so no workload is pointed at a proxy that is not
// there yet; labels already in place stay while components recover.
func (r *MeshReconciler) reconcileNamespaces(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	if !obs.componentsReady || obs.mtls.holdNamespaces {
		// holdNamespaces: meshkeeper's STRICT mTLS policy must go before
		// any namespace moves (mesh_mtls.go).
		return nil
	}
	obs.namespacesObserved = true
	selector, err := selectorOf(mesh)
	if err != nil {
		// ValidateSpec refuses a bad selector before this point.
		return fmt.Errorf("spec.namespaces.selector: %w", err)
	}
	var namespaces corev1.NamespaceList
	if err := r.List(ctx, &namespaces); err != nil {
		return fmt.Errorf("list namespaces: %w", err)
	}
	items := namespaces.Items
	// Moving back, the newest waves go first: one batch per wave, newest
	// first, each batch applied in parallel.
	movingBack := obs.rollout.moved == nil && obs.rollout.waveOf != nil
	if movingBack {
		slices.SortStableFunc(items, func(a, b corev1.Namespace) int {
			return obs.rollout.waveOf[b.Name] - obs.rollout.waveOf[a.Name]
		})
	}
	var jobs []labelJob
	for i := range items {
		ns := &items[i]
		switch {
		case ns.DeletionTimestamp != nil:
			continue
		case selector.Matches(labels.Set(ns.Labels)):
			want := namespaceLabels(mesh, obs.namespaceRevision(ns.Name))
			if obs.engine != nil && obs.engine.placements != nil {
				// The engine's decision: where each namespace must be now.
				if p, ok := obs.engine.placements[ns.Name]; ok {
					want = placementLabels(p)
				}
			}
			jobs = append(jobs, labelJob{ns: ns, want: want, selected: true})
		case ownsLabels(ns):
			jobs = append(jobs, labelJob{ns: ns})
		}
	}
	batchOf := func(labelJob) int { return 0 }
	if movingBack {
		batchOf = func(j labelJob) int { return obs.rollout.waveOf[j.ns.Name] }
	}
	errs := r.applyLabelJobs(ctx, jobs, batchOf)
	for _, j := range jobs {
		if !j.selected || j.err != nil {
			continue
		}
		if j.conflict != "" {
			obs.conflicts = append(obs.conflicts, j.conflict)
			continue
		}
		obs.namespaces++
	}
	return errors.Join(errs...)
}

// labelJob is one namespace's wanted set of meshkeeper labels and, once
// applied, what came of it.
type labelJob struct {
	ns       *corev1.Namespace
	want     map[string]string
	selected bool
	conflict string
	err      error
}

// labelApplyConcurrency bounds the server-side applies in flight. One apply
// after another made enrolling 5,000 namespaces 5,000 round trips in a row
// (the install's longest reconcile at scale); the API server's fairness
// still paces what is sent.
const labelApplyConcurrency = 32

// applyLabelJobs applies jobs in batches (consecutive jobs with the same
// batchOf value, in order), the applies of one batch in parallel. It
// records each job's conflict or error and returns the errors in job order.
func (r *MeshReconciler) applyLabelJobs(ctx context.Context, jobs []labelJob, batchOf func(labelJob) int) []error {
	for start := 0; start < len(jobs); {
		end := start + 1
		for end < len(jobs) && batchOf(jobs[end]) == batchOf(jobs[start]) {
			end++
		}
		var g errgroup.Group
		g.SetLimit(labelApplyConcurrency)
		for i := start; i < end; i++ {
			j := &jobs[i]
			if ownedLabelsEqual(j.ns, j.want) {
				continue // nothing to write: no goroutine
			}
			g.Go(func() error {
				j.conflict, j.err = r.applyNamespaceLabels(ctx, j.ns, j.want)
				return nil
			})
		}
		_ = g.Wait()
		start = end
	}
	var errs []error
	for _, j := range jobs {
		if j.err != nil {
			errs = append(errs, j.err)
		}
	}
	return errs
}

// releaseNamespaces removes every label meshkeeper set, from every namespace.
func (r *MeshReconciler) releaseNamespaces(ctx context.Context, _ *meshv1.Mesh) error {
	var namespaces corev1.NamespaceList
	if err := r.List(ctx, &namespaces); err != nil {
		return fmt.Errorf("list namespaces: %w", err)
	}
	var jobs []labelJob
	for i := range namespaces.Items {
		if ns := &namespaces.Items[i]; ownsLabels(ns) && ns.DeletionTimestamp == nil {
			jobs = append(jobs, labelJob{ns: ns})
		}
	}
	return errors.Join(r.applyLabelJobs(ctx, jobs, func(labelJob) int { return 0 })...)
}

// applyNamespaceLabels makes want the exact set of labels meshkeeper owns on
// ns. It returns a conflict description instead of an error when another
// field manager owns one of the labels with a different value.
func (r *MeshReconciler) applyNamespaceLabels(ctx context.Context, ns *corev1.Namespace, want map[string]string) (string, error) {
	if ownedLabelsEqual(ns, want) {
		return "", nil
	}
	ac := corev1ac.Namespace(ns.Name)
	if len(want) > 0 {
		ac = ac.WithLabels(want)
	}
	err := r.Apply(ctx, ac, client.FieldOwner(meshv1.FieldManager))
	switch {
	case err == nil:
		log.FromContext(ctx).Info("Applied namespace labels", "namespace", ns.Name, "labels", want)
		return "", nil
	case apierrors.IsConflict(err):
		keys := slices.Sorted(maps.Keys(want))
		return fmt.Sprintf("%s: %s set by another manager to %q", ns.Name, strings.Join(keys, ","), conflictingValues(ns, want)), nil
	case apierrors.IsNotFound(err):
		return "", nil
	default:
		return "", fmt.Errorf("label namespace %s: %w", ns.Name, err)
	}
}

func conflictingValues(ns *corev1.Namespace, want map[string]string) string {
	var vals []string
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if v, ok := ns.Labels[k]; ok && v != want[k] {
			vals = append(vals, v)
		}
	}
	return strings.Join(vals, ",")
}

// ownsLabels reports whether meshkeeper's field manager owns anything on ns.
func ownsLabels(ns *corev1.Namespace) bool {
	return len(ownedLabelKeys(ns)) > 0
}

// ownedLabelsEqual reports whether ns already carries exactly want under
// meshkeeper's ownership, so no write is needed.
func ownedLabelsEqual(ns *corev1.Namespace, want map[string]string) bool {
	if len(want) == 0 {
		return !ownsLabels(ns)
	}
	owned := ownedLabelKeys(ns)
	if len(owned) != len(want) {
		return false
	}
	for k, v := range want {
		if !owned[k] || ns.Labels[k] != v {
			return false
		}
	}
	return true
}

// ownedLabelKeys lists the label keys meshkeeper's apply owns on ns.
func ownedLabelKeys(ns *corev1.Namespace) map[string]bool {
	keys := map[string]bool{}
	for _, mf := range ns.ManagedFields {
		if mf.Manager != meshv1.FieldManager || mf.Operation != metav1.ManagedFieldsOperationApply || mf.FieldsV1 == nil {
			continue
		}
		set, err := fieldSetOf(mf.FieldsV1)
		if err != nil {
			return map[string]bool{"<unparsable>": true} // forces a re-apply
		}
		for k := range set {
			keys[k] = true
		}
	}
	return keys
}

func selectorOf(mesh *meshv1.Mesh) (labels.Selector, error) {
	if mesh.Spec.Namespaces.Selector == nil {
		return labels.Nothing(), nil
	}
	return metav1.LabelSelectorAsSelector(mesh.Spec.Namespaces.Selector)
}
