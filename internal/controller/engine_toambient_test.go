package controller

import (
	"context"
	"fmt"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestSidecarToAmbientInWaves: a Mesh switching from Sidecar to Ambient runs
// the steps status.plan lists. The node components come first, node wave by
// node wave: a node joins when meshkeeper labels it for redirection, so the
// canary node is labelled (and gets the node agent) while the others wait.
// Then the namespaces move wave by wave, each wave's workloads restarted
// without their sidecars and judged by a real Prometheus. A breach in
// namespace wave 2 puts every moved namespace back on sidecars (restarted
// again), takes the node components and the nodes' labels away, and the
// switch is not retried until the spec changes; retried, it runs to the end.
func TestSidecarToAmbientInWaves(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(2 * slow)
	dumpMeshOnFailure(t)
	withoutIstiodWebhooks(t, g)

	namespaces := []string{"ta-canary", "ta-a", "ta-b"}
	workload, srv := judgedNamespaces(t, g, "ta-mesh", true, namespaces...)

	one := intstr.FromInt32(1)
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"ta-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes: meshv1.NodeRolloutSpec{
					Canary:         &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}},
					MaxUnavailable: &one,
					Bake:           &metav1.Duration{Duration: 12 * time.Second}, // long enough to look at the canary node alone
					Soak:           &metav1.Duration{},
				},
				Namespaces: meshv1.NamespaceRolloutSpec{
					Canary: []string{"ta-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{Duration: time.Second},
				},
			},
			Analysis: sloGate(srv.URL, 5*time.Second, "0.95"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	g.Eventually(meshReady).ShouldNot(BeNil())
	unlabelled := map[string]string{"node-new": "", "node-mid": "", "node-old": ""}
	g.Expect(nodeLabels(g)).To(Equal(unlabelled), "no redirection label in Sidecar mode")
	for _, ns := range namespaces {
		g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Sidecar"), ns)
	}

	t.Run("a breach in namespace wave 2 puts everything back on sidecars", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeAmbient })

		// The node components first, the canary node alone.
		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(And(Not(BeNil()),
			HaveField("Step", "InstallNodeComponents"), HaveField("Wave", int32(1)), HaveField("WaveNodes", []string{"node-new"})))
		g.Eventually(nodeLabels).Should(Equal(map[string]string{"node-new": "ebpf", "node-mid": "", "node-old": ""}), "only the canary node joins")
		g.Eventually(podNodes).WithArguments("node-agent").Should(ConsistOf("node-new"))
		g.Expect(podNodes(g, "istio-cni")).To(BeEmpty(), "no node of wave 1 falls back to iptables")
		for _, ns := range namespaces {
			g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Sidecar"), "namespaces move after the nodes: %s", ns)
		}
		g.Expect(getMesh().Status.Dataplane.Mode).To(Equal(meshv1.ModeSidecar), "status says what runs: Sidecar until the switch ends")

		// Then every node, then the canary namespace, then wave 2, which breaches.
		g.Eventually(nodeLabels).Should(Equal(map[string]string{"node-new": "ebpf", "node-mid": "ebpf", "node-old": "iptables"}))
		g.Eventually(placementOfNS).WithArguments("ta-canary").Should(Equal("1-28-2 Ambient"))
		g.Eventually(restartedAt).WithArguments("ta-canary", "app").ShouldNot(BeEmpty(), "restarted to drop its sidecar")
		// Node waves judge every namespace; the canary wave its own: break
		// ta-a only now, so that wave 2 is the one that breaches.
		workload.SetRatio("ta-a", 0.8)
		g.Eventually(placementOfNS).WithArguments("ta-a").Should(Equal("1-28-2 Ambient"))
		g.Eventually(lastHistory).WithTimeout(2 * time.Minute).Should(And(HaveField("Outcome", meshv1.OutcomeRolledBack), HaveField("Mode", meshv1.ModeAmbient)))
		g.Expect(lastHistory().Reason).To(And(ContainSubstring("l4-success"), ContainSubstring("wave 2/2")))
		for _, ns := range namespaces {
			g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Sidecar"), "%s is back on sidecars", ns)
			g.Expect(restartedAt(ns, "app")).To(HavePrefix("rollback-"), "%s's workloads were restarted back onto sidecars", ns)
		}
		g.Eventually(releaseNames).ShouldNot(ContainElements("ztunnel", "node-agent", "istio-cni"))
		g.Eventually(nodeLabels).Should(Equal(unlabelled))
		m := getMesh()
		g.Expect(m.Status.Rollout).To(BeNil())
		g.Expect(m.Status.Dataplane.Mode).To(Equal(meshv1.ModeSidecar))
		g.Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)).To(And(
			HaveField("Status", metav1.ConditionFalse), HaveField("Reason", meshv1.ReasonRolledBack),
			HaveField("Message", ContainSubstring("set spec.dataplane.mode back to Sidecar"))))
		g.Consistently(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(4*time.Second).
			Should(BeNil(), "the same switch is not retried while the spec stays the same")
	})

	t.Run("retried, the switch runs to the end", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("ta-a", 1)
		time.Sleep(6 * time.Second) // let the 5s rate window forget the breach
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Rollout.Nodes.Bake = &metav1.Duration{Duration: time.Second} })
		g.Eventually(func() string {
			h := lastHistory()
			return fmt.Sprintf("%s %s %s", h.Version, h.Mode, h.Outcome)
		}).WithTimeout(3 * time.Minute).Should(Equal("1.28.2 Ambient Succeeded"))
		g.Eventually(meshReady).ShouldNot(BeNil())
		m := getMesh()
		g.Expect(m.Status.Dataplane.Mode).To(Equal(meshv1.ModeAmbient))
		g.Expect(m.Status.Plan).To(HaveEach(HaveField("State", meshv1.StepDone)))
		for _, ns := range namespaces {
			g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Ambient"), ns)
			g.Expect(restartedAt(ns, "app")).NotTo(Or(BeEmpty(), HavePrefix("rollback-")), "%s's workloads restarted into Ambient", ns)
		}
		g.Expect(nodeLabels(g)).To(Equal(map[string]string{"node-new": "ebpf", "node-mid": "ebpf", "node-old": "iptables"}))
		g.Eventually(podNodes).WithArguments("ztunnel").Should(ConsistOf("node-new", "node-mid", "node-old"))
		g.Expect(eventReasons(g)).To(ContainElements("WavePromoted", "WorkloadsRestarted", "RolloutSucceeded"))
	})
}
