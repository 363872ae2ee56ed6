package restart

import (
	"context"
	"fmt"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// workload is one Deployment, StatefulSet or DaemonSet as read.
type workload struct {
	kind string // "deployment", "statefulset", "daemonset"
	obj  client.Object
	tmpl *corev1.PodTemplateSpec
	// skip says why it is never restarted; "" when it is.
	skip string
}

// newWorkload wraps a Deployment, StatefulSet or DaemonSet.
func newWorkload(kind string, obj client.Object) *workload {
	w := &workload{kind: kind, obj: obj}
	switch o := obj.(type) {
	case *appsv1.Deployment:
		w.tmpl = &o.Spec.Template
	case *appsv1.StatefulSet:
		w.tmpl = &o.Spec.Template
	case *appsv1.DaemonSet:
		w.tmpl = &o.Spec.Template
	}
	w.skip = skipReason(obj)
	return w
}

func (w *workload) id() string { return w.kind + "/" + w.obj.GetName() }

// stamp is the token its pod template carries.
func (w *workload) stamp() string { return w.tmpl.Annotations[Annotation] }

// rolledOut applies the readiness rule of its kind.
func (w *workload) rolledOut() (bool, string) {
	switch o := w.obj.(type) {
	case *appsv1.Deployment:
		return DeploymentRolledOut(o)
	case *appsv1.StatefulSet:
		return StatefulSetRolledOut(o)
	case *appsv1.DaemonSet:
		return DaemonSetRolledOut(o)
	}
	return false, "of an unknown kind"
}

// wantsPods: a workload with no pods disrupts nothing when it restarts.
func (w *workload) wantsPods() bool {
	switch o := w.obj.(type) {
	case *appsv1.Deployment:
		return replicas(o.Spec.Replicas) > 0
	case *appsv1.StatefulSet:
		return replicas(o.Spec.Replicas) > 0
	case *appsv1.DaemonSet:
		return o.Status.DesiredNumberScheduled > 0
	}
	return true
}

func replicas(r *int32) int32 {
	if r == nil {
		return 1
	}
	return *r
}

// DeploymentRolledOut: its controller saw the latest spec, and every
// replica runs the latest template and is available, with no pod of an
// older ReplicaSet left: updatedReplicas == replicas == availableReplicas ==
// spec.replicas. Otherwise it says what is missing.
func DeploymentRolledOut(d *appsv1.Deployment) (bool, string) {
	want, st := replicas(d.Spec.Replicas), d.Status
	switch {
	case st.ObservedGeneration < d.Generation:
		return false, "not yet seen by its controller"
	case st.UpdatedReplicas < want:
		return false, fmt.Sprintf("%d/%d updated%s", st.UpdatedReplicas, want, deadlineExceeded(d))
	case st.Replicas > st.UpdatedReplicas:
		return false, fmt.Sprintf("%d/%d updated, %d old pods left", st.UpdatedReplicas, want, st.Replicas-st.UpdatedReplicas)
	case st.AvailableReplicas < want:
		return false, fmt.Sprintf("%d/%d ready%s", st.AvailableReplicas, want, deadlineExceeded(d))
	}
	return true, ""
}

func deadlineExceeded(d *appsv1.Deployment) string {
	for _, c := range d.Status.Conditions {
		if c.Type == appsv1.DeploymentProgressing && c.Status == corev1.ConditionFalse && c.Reason == "ProgressDeadlineExceeded" {
			return " (ProgressDeadlineExceeded)"
		}
	}
	return ""
}

// StatefulSetRolledOut: its controller saw the latest spec, the current
// revision is the update revision (every pod runs the latest template), and
// every replica is ready.
func StatefulSetRolledOut(s *appsv1.StatefulSet) (bool, string) {
	want, st := replicas(s.Spec.Replicas), s.Status
	switch {
	case st.ObservedGeneration < s.Generation:
		return false, "not yet seen by its controller"
	case st.CurrentRevision != st.UpdateRevision || st.UpdatedReplicas < want:
		return false, fmt.Sprintf("%d/%d updated%s", st.UpdatedReplicas, want, statefulSetHint(s))
	case st.Replicas > want:
		return false, fmt.Sprintf("%d pods for %d replicas", st.Replicas, want)
	case st.ReadyReplicas < want:
		return false, fmt.Sprintf("%d/%d ready", st.ReadyReplicas, want)
	}
	return true, ""
}

func statefulSetHint(s *appsv1.StatefulSet) string {
	u := s.Spec.UpdateStrategy
	switch {
	case u.Type == appsv1.OnDeleteStatefulSetStrategyType:
		return " (updateStrategy OnDelete: its pods are replaced only when deleted)"
	case u.RollingUpdate != nil && u.RollingUpdate.Partition != nil && *u.RollingUpdate.Partition > 0:
		return fmt.Sprintf(" (rollingUpdate.partition %d holds the lower ordinals)", *u.RollingUpdate.Partition)
	}
	return ""
}

// DaemonSetRolledOut: its controller saw the latest spec, and every node
// that should run a pod runs one of the latest template, available:
// updatedNumberScheduled == desiredNumberScheduled == numberAvailable.
func DaemonSetRolledOut(d *appsv1.DaemonSet) (bool, string) {
	st := d.Status
	want := st.DesiredNumberScheduled
	switch {
	case st.ObservedGeneration < d.Generation:
		return false, "not yet seen by its controller"
	case st.UpdatedNumberScheduled < want:
		hint := ""
		if d.Spec.UpdateStrategy.Type == appsv1.OnDeleteDaemonSetStrategyType {
			hint = " (updateStrategy OnDelete: its pods are replaced only when deleted)"
		}
		return false, fmt.Sprintf("%d/%d updated%s", st.UpdatedNumberScheduled, want, hint)
	case st.NumberAvailable < want:
		return false, fmt.Sprintf("%d/%d ready", st.NumberAvailable, want)
	}
	return true, ""
}

// skipReason is why a workload is never restarted, "" if it is not skipped.
func skipReason(obj client.Object) string {
	if obj.GetAnnotations()[AnnotationIgnore] == "true" {
		return "skipped: annotated " + AnnotationIgnore + `: "true"`
	}
	if d, ok := obj.(*appsv1.Deployment); ok && d.Spec.Paused {
		return "skipped: paused (resume it with kubectl rollout resume to have it restarted)"
	}
	if ref := metav1.GetControllerOf(obj); ref != nil {
		return fmt.Sprintf("skipped: controlled by %s/%s, which owns its template", ref.Kind, ref.Name)
	}
	return ""
}

var kindOrder = []string{"deployment", "statefulset", "daemonset"}

// survey reads the workloads of ns (in kind order, then by name) and its
// PodDisruptionBudgets.
func survey(ctx context.Context, c client.Client, ns string) ([]*workload, []policyv1.PodDisruptionBudget, error) {
	var ws []*workload
	var deps appsv1.DeploymentList
	if err := c.List(ctx, &deps, client.InNamespace(ns)); err != nil {
		return nil, nil, fmt.Errorf("list deployments in namespace %s: %w", ns, err)
	}
	for i := range deps.Items {
		o := &deps.Items[i]
		ws = append(ws, newWorkload("deployment", o))
	}
	var stss appsv1.StatefulSetList
	if err := c.List(ctx, &stss, client.InNamespace(ns)); err != nil {
		return nil, nil, fmt.Errorf("list statefulsets in namespace %s: %w", ns, err)
	}
	for i := range stss.Items {
		o := &stss.Items[i]
		ws = append(ws, newWorkload("statefulset", o))
	}
	var dss appsv1.DaemonSetList
	if err := c.List(ctx, &dss, client.InNamespace(ns)); err != nil {
		return nil, nil, fmt.Errorf("list daemonsets in namespace %s: %w", ns, err)
	}
	for i := range dss.Items {
		o := &dss.Items[i]
		ws = append(ws, newWorkload("daemonset", o))
	}
	ws = slices.DeleteFunc(ws, func(w *workload) bool { return w.obj.GetDeletionTimestamp() != nil })
	slices.SortFunc(ws, func(a, b *workload) int {
		if d := slices.Index(kindOrder, a.kind) - slices.Index(kindOrder, b.kind); d != 0 {
			return d
		}
		return strings.Compare(a.obj.GetName(), b.obj.GetName())
	})
	var pdbs policyv1.PodDisruptionBudgetList
	if err := c.List(ctx, &pdbs, client.InNamespace(ns)); err != nil {
		return nil, nil, fmt.Errorf("list poddisruptionbudgets in namespace %s: %w", ns, err)
	}
	return ws, pdbs.Items, nil
}

// pacer decides whether a workload may start restarting now, from the
// PodDisruptionBudgets covering its pods and the restarts in flight.
type pacer struct {
	pdbs []pdbState
}

type pdbState struct {
	name string
	sel  labels.Selector
	// allowed is status.disruptionsAllowed; stale: the disruption
	// controller has not computed the status of the current spec.
	allowed int32
	stale   bool
	// busy: a workload it covers is restarting (stamped, not rolled out).
	busy string
}

func newPacer(pdbs []policyv1.PodDisruptionBudget) *pacer {
	p := &pacer{}
	for _, b := range pdbs {
		if b.Spec.Selector == nil {
			continue // policy/v1: a nil selector selects no pods
		}
		sel, err := metav1.LabelSelectorAsSelector(b.Spec.Selector)
		if err != nil {
			continue // the API server validates selectors; nothing it admits fails here
		}
		p.pdbs = append(p.pdbs, pdbState{name: b.Name, sel: sel, allowed: b.Status.DisruptionsAllowed,
			stale: b.Status.ObservedGeneration < b.Generation})
	}
	return p
}

// covering are the budgets whose selector matches w's pods.
func (p *pacer) covering(w *workload) []*pdbState {
	var out []*pdbState
	set := labels.Set(w.tmpl.Labels)
	for i := range p.pdbs {
		if p.pdbs[i].sel.Matches(set) {
			out = append(out, &p.pdbs[i])
		}
	}
	return out
}

// hold says why w may not start restarting now, "" if it may: a budget
// covering it allows no disruption (or has no current status, or covers
// another workload restarting now), or w itself is not rolled out (a
// restart on top of an unfinished rollout takes more pods down).
func (p *pacer) hold(w *workload) string {
	if !w.wantsPods() {
		return ""
	}
	for _, b := range p.covering(w) {
		switch {
		case b.busy != "":
			return fmt.Sprintf("PodDisruptionBudget %s covers %s, which is restarting", b.name, b.busy)
		case b.stale:
			return fmt.Sprintf("PodDisruptionBudget %s has no status for its current spec yet", b.name)
		case b.allowed <= 0:
			return fmt.Sprintf("PodDisruptionBudget %s allows 0 disruptions", b.name)
		}
	}
	if ok, why := w.rolledOut(); !ok {
		return "not rolled out before its restart: " + why
	}
	return ""
}

// take records that w is restarting.
func (p *pacer) take(w *workload) {
	for _, b := range p.covering(w) {
		b.busy = w.id()
	}
}
