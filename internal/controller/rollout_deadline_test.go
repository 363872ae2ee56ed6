package controller

import (
	"context"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestNodeWaveProgressDeadline: a node wave that has not moved within
// spec.rollout.progressDeadline is rolled back, and the reason names the
// deadline and the pods it waited for. A deadline of 1ms is one no node
// wave can meet (its pods are deleted and recreated after the wave is
// recorded), so every wave "hangs" as far as the rollout can tell.
func TestNodeWaveProgressDeadline(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	one := intstr.FromInt32(1)
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"pd-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes:            meshv1.NodeRolloutSpec{MaxUnavailable: &one, Bake: &metav1.Duration{}},
				Namespaces:       meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}},
				RetireAfter:      &metav1.Duration{},
				ProgressDeadline: &metav1.Duration{Duration: time.Millisecond},
			},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil(), "a fresh install is not a wave: the deadline does not apply")
	allOn := func(rev string) map[string]string {
		return map[string]string{"node-new": rev, "node-mid": rev, "node-old": rev}
	}
	g.Expect(podRevisions(g, "ztunnel")).To(Equal(allOn("1-26-4")))

	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
	g.Eventually(lastHistory).WithTimeout(slow).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack),
		HaveField("Reason", And(
			ContainSubstring("node wave 1/3 (node-mid)"),
			ContainSubstring("did not move within spec.rollout.progressDeadline 1ms"),
			ContainSubstring(" on node-mid")))))
	g.Eventually(podRevisions).WithArguments("ztunnel").WithTimeout(slow).Should(Equal(allOn("1-26-4")), "every node back on 1.26")
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
	g.Expect(eventReasons(g)).To(ContainElements("NodeWaveStarted", "RollingBack", "RolledBack"))
}

// TestLaterNodeWavesSoak: every node wave after the canary one soaks for
// spec.rollout.nodes.soak before it is promoted (before, they moved on as
// soon as their pods were ready). Without a canary pool every node wave is
// a later wave: with soak 4s, each one starts at least 4s after the one
// before it.
func TestLaterNodeWavesSoak(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	const soak = 4 * time.Second
	one := intstr.FromInt32(1)
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"sk-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes:       meshv1.NodeRolloutSpec{MaxUnavailable: &one, Bake: &metav1.Duration{}, Soak: &metav1.Duration{Duration: soak}},
				Namespaces:  meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}},
				RetireAfter: &metav1.Duration{},
			},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())

	rec := recordMesh(t)
	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
	g.Eventually(lastHistory).WithTimeout(slow).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeSucceeded)))
	var starts []time.Time
	for _, s := range rec.stop() {
		ro := s.Status.Rollout
		if ro == nil || ro.Step != meshv1.RolloutStepNodes || ro.WaveStartedAt == nil {
			continue
		}
		if len(starts) == 0 || !starts[len(starts)-1].Equal(ro.WaveStartedAt.Time) {
			starts = append(starts, ro.WaveStartedAt.Time)
		}
	}
	g.Expect(starts).To(HaveLen(3), "three node waves of one node")
	for i := 1; i < len(starts); i++ {
		g.Expect(starts[i].Sub(starts[i-1])).To(BeNumerically(">=", soak), "node wave %d started before wave %d soaked %s", i+1, i, soak)
	}
}
