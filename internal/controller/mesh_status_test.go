package controller

import (
	"errors"
	"testing"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

func TestApplyStatus(t *testing.T) {
	type want struct {
		ready, reason     string
		reconciling       bool
		stalled, degraded bool
		observed          bool
	}
	cases := []struct {
		name string
		obs  observation
		err  error
		want want
	}{
		{"converged", done(observation{namespaces: 2}), nil,
			want{ready: "True", reason: meshv1.ReasonSucceeded, observed: true}},
		{"invalid spec stalls", observation{invalidSpec: "spec.version: bad"}, errors.New("terminal"),
			want{ready: "False", reason: meshv1.ReasonInvalidSpec, stalled: true, observed: true}},
		{"apply failure keeps reconciling", observation{applyErr: errors.New("boom")}, nil,
			want{ready: "False", reason: meshv1.ReasonApplyFailed, reconciling: true}},
		{"other error keeps reconciling", observation{}, errors.New("conflict"),
			want{ready: "False", reason: meshv1.ReasonProgressing, reconciling: true}},
		{"paused", observation{paused: true}, nil,
			want{ready: "False", reason: meshv1.ReasonPaused, observed: true}},
		{"deleting", observation{deleting: true}, nil,
			want{ready: "False", reason: meshv1.ReasonDeleting, reconciling: true}},
		{"components not ready yet keeps reconciling", observation{componentsReady: false}, nil,
			want{ready: "False", reason: meshv1.ReasonProgressing, reconciling: true}},
		{"failed plan stalls", observation{planFailed: "spec.version 1.26.4 is 2 minors below installed 1.28.2"}, nil,
			want{ready: "False", reason: meshv1.ReasonPlanFailed, stalled: true, observed: true}},
		{"failed plan lets a recorded rollout run", observation{planFailed: "no plan", componentsReady: true,
			rollout: rolloutState{status: &meshv1.RolloutStatus{Step: meshv1.RolloutStepNamespaces, From: "1.27.3", To: "1.28.2"}}}, nil,
			want{ready: "False", reason: meshv1.ReasonRollingOut, reconciling: true}},
		{"failed plan while paused is paused", observation{planFailed: "no plan", paused: true}, nil,
			want{ready: "False", reason: meshv1.ReasonPaused, observed: true}},
		{"label conflict degrades but stays ready", done(observation{namespaces: 1, conflicts: []string{"b: x"}}), nil,
			want{ready: "True", reason: meshv1.ReasonSucceeded, degraded: true, observed: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			mesh := &meshv1.Mesh{ObjectMeta: metav1.ObjectMeta{Generation: 4}, Spec: meshv1.MeshSpec{Version: "1.28.2"}}
			// Leftovers from an earlier reconcile must be cleared when no longer true.
			mesh.Status.Conditions = []metav1.Condition{
				{Type: meshv1.ConditionStalled, Status: metav1.ConditionTrue, Reason: "Old"},
				{Type: meshv1.ConditionReconciling, Status: metav1.ConditionTrue, Reason: "Old"},
			}
			applyStatus(mesh, &tc.obs, tc.err)

			ready := meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionReady)
			g.Expect(ready).NotTo(BeNil())
			g.Expect(string(ready.Status)).To(Equal(tc.want.ready))
			g.Expect(ready.Reason).To(Equal(tc.want.reason))
			g.Expect(ready.ObservedGeneration).To(Equal(int64(4)))
			g.Expect(meta.IsStatusConditionTrue(mesh.Status.Conditions, meshv1.ConditionReconciling)).To(Equal(tc.want.reconciling))
			g.Expect(meta.IsStatusConditionTrue(mesh.Status.Conditions, meshv1.ConditionStalled)).To(Equal(tc.want.stalled))
			g.Expect(meta.IsStatusConditionTrue(mesh.Status.Conditions, meshv1.ConditionDegraded)).To(Equal(tc.want.degraded))
			// kstatus: abnormal-true conditions are absent rather than False.
			for _, c := range mesh.Status.Conditions {
				if c.Type == meshv1.ConditionStalled || c.Type == meshv1.ConditionReconciling {
					g.Expect(c.Status).To(Equal(metav1.ConditionTrue), c.Type)
				}
			}
			if tc.want.observed {
				g.Expect(mesh.Status.ObservedGeneration).To(Equal(int64(4)))
			} else {
				g.Expect(mesh.Status.ObservedGeneration).To(BeZero())
			}
		})
	}
}

// done marks an observation as fully converged: components ready,
// namespaces enrolled, nothing left to retire.
func done(o observation) observation {
	o.componentsReady, o.namespacesObserved, o.retired = true, true, true
	return o
}

func TestApplyStatusDataplane(t *testing.T) {
	g := NewWithT(t)
	b, err := bundle.Default().Resolve("1.28.2")
	g.Expect(err).NotTo(HaveOccurred())
	mesh := &meshv1.Mesh{Spec: meshv1.MeshSpec{Version: "1.28.2", Dataplane: meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar}}}
	applyStatus(mesh, ptr(done(observation{target: "1.28.2", bundle: b, namespaces: 3,
		components: []meshv1.ComponentStatus{{Name: "istiod", Ready: true}}})), nil)
	g.Expect(mesh.Status.Dataplane).To(Equal(meshv1.DataplaneStatus{Mode: meshv1.ModeSidecar, Revision: "1-28-2", Namespaces: 3}))
	g.Expect(mesh.Status.Version.Target).To(Equal("1.28.2"))
	g.Expect(mesh.Status.Version.Installed).To(Equal("1.28.2"))
	g.Expect(readyCondition(mesh).Message).To(Equal("Sidecar 1.28.2: 1 components ready, 3 namespaces enrolled"))

	// Until the namespaces are observed, the dataplane status is not claimed.
	early := &meshv1.Mesh{Spec: meshv1.MeshSpec{Version: "1.28.2"}}
	applyStatus(early, &observation{target: "1.28.2", bundle: b}, nil)
	g.Expect(early.Status.Dataplane).To(Equal(meshv1.DataplaneStatus{}))
	g.Expect(early.Status.Version.Installed).To(BeEmpty())

	ambient := &meshv1.Mesh{Spec: meshv1.MeshSpec{Version: "1.27"}}
	applyStatus(ambient, ptr(done(observation{namespaces: 1})), nil)
	g.Expect(ambient.Status.Dataplane.Mode).To(Equal(meshv1.ModeAmbient))
	g.Expect(ambient.Status.Dataplane.Redirection).To(Equal(meshv1.RedirectionEBPF))
}

func TestNamespaceLabels(t *testing.T) {
	g := NewWithT(t)
	g.Expect(namespaceLabels(&meshv1.Mesh{Spec: meshv1.MeshSpec{Version: "1.28.2"}}, "1-28-2")).
		To(Equal(map[string]string{meshv1.LabelDataplaneMode: "ambient", meshv1.LabelRevision: "1-28-2"}))
	g.Expect(namespaceLabels(&meshv1.Mesh{Spec: meshv1.MeshSpec{Version: "1.27.3", Dataplane: meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar}}}, "1-27-3")).
		To(Equal(map[string]string{meshv1.LabelRevision: "1-27-3"}))
}

func TestFieldSetOf(t *testing.T) {
	g := NewWithT(t)
	keys, err := fieldSetOf(&metav1.FieldsV1{Raw: []byte(`{"f:metadata":{"f:labels":{"f:istio.io/dataplane-mode":{}}}}`)})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(keys).To(HaveKey("istio.io/dataplane-mode"))
	g.Expect(keys).To(HaveLen(1))
	_, err = fieldSetOf(&metav1.FieldsV1{Raw: []byte(`not json`)})
	g.Expect(err).To(HaveOccurred())
}

// TestPlanFailedSaysWhy: the Stalled condition carries the planner's error
// as it is, so it says what is wrong and how to fix it.
func TestPlanFailedSaysWhy(t *testing.T) {
	g := NewWithT(t)
	why := "spec.version 1.26.4 is 2 minors below installed 1.28.2: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.27 first, then 1.26.4"
	mesh := &meshv1.Mesh{ObjectMeta: metav1.ObjectMeta{Generation: 2}}
	applyStatus(mesh, &observation{planFailed: why, rolloutResolved: true}, nil)
	stalled := meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionStalled)
	g.Expect(stalled).NotTo(BeNil())
	g.Expect(stalled.Reason).To(Equal(meshv1.ReasonPlanFailed))
	g.Expect(stalled.Message).To(Equal("No plan, so nothing new starts: " + why))
	g.Expect(mesh.Status.Rollout).To(BeNil())
	g.Expect(mesh.Status.Version.Installed).To(BeEmpty(), "nothing is recorded as installed")
}
