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
