package restart

import (
	"context"
	"testing"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func TestDeploymentRolledOut(t *testing.T) {
	dep := func(gen, obs int64, want int32, st appsv1.DeploymentStatus) *appsv1.Deployment {
		st.ObservedGeneration = obs
		return &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Generation: gen}, Spec: appsv1.DeploymentSpec{Replicas: ptr.To(want)}, Status: st}
	}
	for _, tc := range []struct {
		name string
		d    *appsv1.Deployment
		ok   bool
		why  string
	}{
		{"rolled out", dep(2, 2, 3, appsv1.DeploymentStatus{Replicas: 3, UpdatedReplicas: 3, AvailableReplicas: 3}), true, ""},
		{"spec not seen", dep(3, 2, 3, appsv1.DeploymentStatus{Replicas: 3, UpdatedReplicas: 3, AvailableReplicas: 3}), false, "not yet seen by its controller"},
		{"one updated", dep(2, 2, 3, appsv1.DeploymentStatus{Replicas: 4, UpdatedReplicas: 1, AvailableReplicas: 3}), false, "1/3 updated"},
		{"old pods left", dep(2, 2, 3, appsv1.DeploymentStatus{Replicas: 5, UpdatedReplicas: 3, AvailableReplicas: 3}), false, "3/3 updated, 2 old pods left"},
		{"not ready", dep(2, 2, 3, appsv1.DeploymentStatus{Replicas: 3, UpdatedReplicas: 3, AvailableReplicas: 1}), false, "1/3 ready"},
		{"deadline", dep(2, 2, 3, appsv1.DeploymentStatus{Replicas: 3, UpdatedReplicas: 3, AvailableReplicas: 1, Conditions: []appsv1.DeploymentCondition{
			{Type: appsv1.DeploymentProgressing, Status: corev1.ConditionFalse, Reason: "ProgressDeadlineExceeded"}}}), false, "1/3 ready (ProgressDeadlineExceeded)"},
		{"nil replicas means one", &appsv1.Deployment{Status: appsv1.DeploymentStatus{}}, false, "0/1 updated"},
		{"scaled to zero", dep(1, 1, 0, appsv1.DeploymentStatus{}), true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			ok, why := DeploymentRolledOut(tc.d)
			g.Expect(ok).To(Equal(tc.ok))
			g.Expect(why).To(Equal(tc.why))
		})
	}
}

func TestStatefulSetRolledOut(t *testing.T) {
	sts := func(gen, obs int64, want int32, st appsv1.StatefulSetStatus) *appsv1.StatefulSet {
		st.ObservedGeneration = obs
		return &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Generation: gen}, Spec: appsv1.StatefulSetSpec{Replicas: ptr.To(want)}, Status: st}
	}
	onDelete := sts(2, 2, 2, appsv1.StatefulSetStatus{Replicas: 2, CurrentRevision: "a", UpdateRevision: "b", UpdatedReplicas: 0, ReadyReplicas: 2})
	onDelete.Spec.UpdateStrategy.Type = appsv1.OnDeleteStatefulSetStrategyType
	partition := sts(2, 2, 3, appsv1.StatefulSetStatus{Replicas: 3, CurrentRevision: "a", UpdateRevision: "b", UpdatedReplicas: 1, ReadyReplicas: 3})
	partition.Spec.UpdateStrategy.RollingUpdate = &appsv1.RollingUpdateStatefulSetStrategy{Partition: ptr.To[int32](2)}
	for _, tc := range []struct {
		name string
		s    *appsv1.StatefulSet
		ok   bool
		why  string
	}{
		{"rolled out", sts(2, 2, 2, appsv1.StatefulSetStatus{Replicas: 2, CurrentRevision: "b", UpdateRevision: "b", UpdatedReplicas: 2, ReadyReplicas: 2}), true, ""},
		{"spec not seen", sts(3, 2, 2, appsv1.StatefulSetStatus{Replicas: 2, CurrentRevision: "b", UpdateRevision: "b", UpdatedReplicas: 2, ReadyReplicas: 2}), false, "not yet seen by its controller"},
		{"revision behind", sts(2, 2, 2, appsv1.StatefulSetStatus{Replicas: 2, CurrentRevision: "a", UpdateRevision: "b", UpdatedReplicas: 1, ReadyReplicas: 2}), false, "1/2 updated"},
		{"not ready", sts(2, 2, 2, appsv1.StatefulSetStatus{Replicas: 2, CurrentRevision: "b", UpdateRevision: "b", UpdatedReplicas: 2, ReadyReplicas: 1}), false, "1/2 ready"},
		{"scaling down", sts(2, 2, 2, appsv1.StatefulSetStatus{Replicas: 3, CurrentRevision: "b", UpdateRevision: "b", UpdatedReplicas: 3, ReadyReplicas: 3}), false, "3 pods for 2 replicas"},
		{"OnDelete", onDelete, false, "0/2 updated (updateStrategy OnDelete: its pods are replaced only when deleted)"},
		{"partition", partition, false, "1/3 updated (rollingUpdate.partition 2 holds the lower ordinals)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			ok, why := StatefulSetRolledOut(tc.s)
			g.Expect(ok).To(Equal(tc.ok))
			g.Expect(why).To(Equal(tc.why))
		})
	}
}

func TestDaemonSetRolledOut(t *testing.T) {
	ds := func(gen, obs int64, st appsv1.DaemonSetStatus) *appsv1.DaemonSet {
		st.ObservedGeneration = obs
		return &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Generation: gen}, Status: st}
	}
	onDelete := ds(2, 2, appsv1.DaemonSetStatus{DesiredNumberScheduled: 3, UpdatedNumberScheduled: 1, NumberAvailable: 3})
	onDelete.Spec.UpdateStrategy.Type = appsv1.OnDeleteDaemonSetStrategyType
	for _, tc := range []struct {
		name string
		d    *appsv1.DaemonSet
		ok   bool
		why  string
	}{
		{"rolled out", ds(2, 2, appsv1.DaemonSetStatus{DesiredNumberScheduled: 3, UpdatedNumberScheduled: 3, NumberAvailable: 3}), true, ""},
		{"spec not seen", ds(3, 2, appsv1.DaemonSetStatus{DesiredNumberScheduled: 3, UpdatedNumberScheduled: 3, NumberAvailable: 3}), false, "not yet seen by its controller"},
		{"updating", ds(2, 2, appsv1.DaemonSetStatus{DesiredNumberScheduled: 3, UpdatedNumberScheduled: 2, NumberAvailable: 2}), false, "2/3 updated"},
		{"not available", ds(2, 2, appsv1.DaemonSetStatus{DesiredNumberScheduled: 3, UpdatedNumberScheduled: 3, NumberAvailable: 2}), false, "2/3 ready"},
		{"OnDelete", onDelete, false, "1/3 updated (updateStrategy OnDelete: its pods are replaced only when deleted)"},
		{"no nodes", ds(1, 1, appsv1.DaemonSetStatus{}), true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			ok, why := DaemonSetRolledOut(tc.d)
			g.Expect(ok).To(Equal(tc.ok))
			g.Expect(why).To(Equal(tc.why))
		})
	}
}

// TestPacerHold: the reasons a workload waits before its restart, in the
// order they are given.
func TestPacerHold(t *testing.T) {
	ready := func(name string, lbl map[string]string) *workload {
		d := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1},
			Spec:   appsv1.DeploymentSpec{Replicas: ptr.To[int32](2), Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: lbl}}},
			Status: appsv1.DeploymentStatus{ObservedGeneration: 1, Replicas: 2, UpdatedReplicas: 2, AvailableReplicas: 2}}
		return &workload{kind: "deployment", obj: d, tmpl: &d.Spec.Template}
	}
	pdb := func(name string, sel *metav1.LabelSelector, allowed int32, stale bool) policyv1.PodDisruptionBudget {
		b := policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 2}, Spec: policyv1.PodDisruptionBudgetSpec{Selector: sel},
			Status: policyv1.PodDisruptionBudgetStatus{ObservedGeneration: 2, DisruptionsAllowed: allowed}}
		if stale {
			b.Status.ObservedGeneration = 1
		}
		return b
	}
	app := func(v string) *metav1.LabelSelector {
		return &metav1.LabelSelector{MatchLabels: map[string]string{"app": v}}
	}
	g := NewWithT(t)

	p := newPacer([]policyv1.PodDisruptionBudget{
		pdb("cart", app("cart"), 0, false),
		pdb("web", app("web"), 1, false),
		pdb("db", app("db"), 1, true),
		pdb("none", nil, 0, false),                    // nil selector: selects nothing
		pdb("all", &metav1.LabelSelector{}, 5, false), // empty selector: every pod
	})
	g.Expect(p.hold(ready("cart", map[string]string{"app": "cart"}))).To(Equal("PodDisruptionBudget cart allows 0 disruptions"))
	g.Expect(p.hold(ready("db", map[string]string{"app": "db"}))).To(Equal("PodDisruptionBudget db has no status for its current spec yet"))
	web := ready("web", map[string]string{"app": "web"})
	g.Expect(p.hold(web)).To(BeEmpty())
	p.take(web)
	g.Expect(p.hold(ready("web-2", map[string]string{"app": "web"}))).To(Equal("PodDisruptionBudget web covers deployment/web, which is restarting"))

	unready := ready("shop", map[string]string{"app": "shop"})
	unready.obj.(*appsv1.Deployment).Status.AvailableReplicas = 1
	g.Expect(newPacer(nil).hold(unready)).To(Equal("not rolled out before its restart: 1/2 ready"))

	// No pods: nothing to disrupt, whatever the budget says.
	zero := ready("batch", map[string]string{"app": "cart"})
	zero.obj.(*appsv1.Deployment).Spec.Replicas = ptr.To[int32](0)
	g.Expect(p.hold(zero)).To(BeEmpty())
}

func TestSkipReason(t *testing.T) {
	g := NewWithT(t)
	d := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "a"}}
	g.Expect(skipReason(d)).To(BeEmpty())
	d.Annotations = map[string]string{AnnotationIgnore: "false"}
	g.Expect(skipReason(d)).To(BeEmpty(), "only \"true\" opts out")
	d.Annotations[AnnotationIgnore] = "true"
	g.Expect(skipReason(d)).To(Equal(`skipped: annotated meshkeeper.dev/ignore: "true"`))
	p := &appsv1.Deployment{Spec: appsv1.DeploymentSpec{Paused: true}}
	g.Expect(skipReason(p)).To(HavePrefix("skipped: paused"))
	o := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{OwnerReferences: []metav1.OwnerReference{
		{Kind: "Gateway", Name: "waypoint", Controller: ptr.To(true)}}}}
	g.Expect(skipReason(o)).To(Equal("skipped: controlled by Gateway/waypoint, which owns its template"))
	// A plain owner (not the controller) does not rewrite the template.
	o.OwnerReferences[0].Controller = nil
	g.Expect(skipReason(o)).To(BeEmpty())
}

func TestMessageIsShort(t *testing.T) {
	g := NewWithT(t)
	r := Result{Waiting: []Item{{"deployment/a", "x"}, {"deployment/b", "y"}, {"deployment/c", "z"}, {"deployment/d", "w"}, {"deployment/e", "v"}}}
	g.Expect(r.Message()).To(Equal("deployment/a x, deployment/b y, deployment/c z and 2 more"))
	g.Expect(Result{}.Message()).To(BeEmpty())
}

// TestBadArguments: the caller's mistakes are refused before anything is read.
func TestBadArguments(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	_, err := Restart(ctx, nil, "shop", "", 1)
	g.Expect(err).To(MatchError(ContainSubstring("empty token")))
	_, err = Restart(ctx, nil, "shop", "2026-12-02T07:00:00Z", 0)
	g.Expect(err).To(MatchError("restart: budget 0: at least one workload must be allowed to restart at a time"))
	_, _, err = Observe(ctx, nil, "shop", "")
	g.Expect(err).To(MatchError(ContainSubstring("empty token")))
}
