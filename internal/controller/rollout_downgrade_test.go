package controller

import (
	"context"
	"fmt"
	"testing"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestDowngrades runs the one downgrade rule on a running mesh (the webhook
// is not in this suite, so the controller is the last line):
//
//   - two minors back (1.28.2 → 1.26) has no plan: the Mesh is Stalled
//     PlanFailed with the planner's error naming the path, and nothing starts
//     (no rollout, no 1.26 revision, no namespace moves), where it used to
//     roll out straight to 1.26, skipping 1.27;
//   - one minor back (→ 1.27) runs as a canary rollout from 1.28.2 to 1.27.3,
//     canary namespace first, and ends with 1.28.2 retired.
func TestDowngrades(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()

	namespaces := []string{"dg-canary", "dg-a", "dg-b"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"dg-mesh": "on"})
	}
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"dg-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"dg-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{},
			}, RetireAfter: &metav1.Duration{}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.28.2"))
	before := len(getMesh().Status.History)

	t.Run("two minors back is Stalled PlanFailed naming the path, and nothing starts", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.26" })
		gen := getMesh().Generation
		why := "spec.version 1.26.4 is 2 minors below installed 1.28.2: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.27 first, then 1.26.4"
		g.Eventually(func() error {
			m := getMesh()
			c := meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionStalled)
			switch {
			case c == nil || c.Status != metav1.ConditionTrue:
				return fmt.Errorf("not Stalled: %v", m.Status.Conditions)
			case c.Reason != meshv1.ReasonPlanFailed || c.Message != "No plan, so nothing new starts: "+why:
				return fmt.Errorf("Stalled %s: %s", c.Reason, c.Message)
			case m.Status.ObservedGeneration != gen:
				return fmt.Errorf("observedGeneration %d, want %d", m.Status.ObservedGeneration, gen)
			}
			return nil
		}).Should(Succeed())
		m := getMesh()
		g.Expect(m.Status.Plan).To(ConsistOf(HaveField("Message", why)), "status.plan publishes the planner's error")
		g.Expect(readyCondition(m).Status).To(Equal(metav1.ConditionFalse))

		// Nothing starts: no rollout, no 1.26 revision, nothing moves.
		g.Consistently(func(g Gomega) {
			m := getMesh()
			g.Expect(m.Status.Rollout).To(BeNil())
			g.Expect(m.Status.Version.Installed).To(Equal("1.28.2"))
			g.Expect(releaseNames(g)).NotTo(ContainElement("istiod-1-26-4"))
			for _, ns := range namespaces {
				g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), ns)
			}
		}).Should(Succeed())
	})

	t.Run("one minor back is a canary rollout to the older release", func(t *testing.T) {
		g := NewWithT(t)
		rec := recordMesh(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
		g.Eventually(func() []string { return outcomes(getMesh().Status.History[before:]) }).
			Should(Equal([]string{"1.27.3 Succeeded"}))
		g.Eventually(meshReady).ShouldNot(BeNil())

		m := getMesh()
		g.Expect(m.Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.27.3", Target: "1.27.3"}))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"), ns)
		}
		g.Expect(releaseNames(g)).To(And(ContainElement("istiod-1-27-3"), Not(ContainElement("istiod-1-28-2"))),
			"the newer revision is retired")

		// The way there, every version the API server sent: a rollout from
		// 1.28.2 to 1.27.3 whose first namespace wave is the canary alone.
		var firstWave []string
		rollouts := map[string]bool{}
		for _, s := range rec.stop() {
			ro := s.Status.Rollout
			if ro == nil {
				continue
			}
			rollouts[ro.From+" → "+ro.To] = true
			if ro.Step == meshv1.RolloutStepNamespaces && ro.Wave == 1 && firstWave == nil {
				firstWave = ro.WaveNamespaces
			}
		}
		g.Expect(rollouts).To(Equal(map[string]bool{"1.28.2 → 1.27.3": true}))
		g.Expect(firstWave).To(Equal([]string{"dg-canary"}), "the canary namespace moves back first")
	})
}
