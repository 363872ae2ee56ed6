package controller

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestRedirectionSwitchInWaves: a Mesh switching from eBPF to iptables
// redirection moves node by node, as status.plan says: the canary node pool
// first (it bakes), then one node at a time. Moving a node is relabelling
// it: the DaemonSet controller (a real kube-controller-manager) then stops
// the node agent there and starts istio-cni. Nodes of later waves keep their
// label and their node agent. A breach while the canary node bakes puts it
// back on eBPF, and the switch is not retried until the spec changes.
// Retried, it runs to the end and the node agent goes. node-old cannot run
// eBPF (kernel 5.4): it stays on the iptables fallback throughout and never
// holds a wave up.
func TestRedirectionSwitchInWaves(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(2 * slow)
	dumpMeshOnFailure(t)

	namespaces := []string{"rs-a", "rs-b"}
	workload, srv := judgedNamespaces(t, g, "rs-mesh", false, namespaces...)

	one := intstr.FromInt32(1)
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"rs-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Nodes: meshv1.NodeRolloutSpec{
				Canary:         &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}},
				MaxUnavailable: &one,
				Bake:           &metav1.Duration{Duration: 20 * time.Second}, // long enough to see the breach
				Soak:           &metav1.Duration{},
			}},
			Analysis: sloGate(srv.URL, 5*time.Second, "0.99"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	g.Eventually(meshReady).ShouldNot(BeNil())
	ebpf := map[string]string{"node-new": "ebpf", "node-mid": "ebpf", "node-old": "iptables"}
	g.Expect(nodeLabels(g)).To(Equal(ebpf))
	g.Eventually(podNodes).WithArguments("node-agent").Should(ConsistOf("node-new", "node-mid"))

	t.Run("a breach while the canary node bakes puts it back on eBPF", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Dataplane.Redirection = meshv1.RedirectionIPTables })

		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(And(Not(BeNil()),
			HaveField("Step", "SwitchRedirection"), HaveField("Wave", int32(1)), HaveField("Waves", int32(3)),
			HaveField("WaveNodes", []string{"node-new"})), "the canary node pool is node wave 1 of 3")
		g.Eventually(nodeLabels).Should(Equal(map[string]string{
			"node-new": "iptables", "node-mid": "ebpf", "node-old": "iptables"}), "only the canary node moves")
		g.Eventually(podNodes).WithArguments("istio-cni").Should(ConsistOf("node-new", "node-old"))
		g.Eventually(podNodes).WithArguments("node-agent").Should(ConsistOf("node-mid"), "the node agent stays on the nodes not moved yet")
		m := getMesh()
		g.Expect(m.Status.Rollout.Engine).NotTo(BeNil(), "the engine's memory is recorded")
		g.Expect(m.Status.Rollout.Engine.NodeWaves[0]).To(Equal(meshv1.EngineWave{Names: []string{"node-new"}}), "the waves are frozen at the start")
		g.Expect(m.Status.Dataplane.Redirection).To(Equal(meshv1.RedirectionEBPF), "status says what runs: eBPF until the switch ends")
		// status.plan is the same decision, written with the reconcile's
		// last status patch (the rollout's memory goes first).
		g.Eventually(func() meshv1.PlanStep { return planStep(getMesh(), "SwitchRedirection") }).Should(And(
			HaveField("State", meshv1.StepRunning), HaveField("Message", ContainSubstring("wave 1/3"))))

		for _, ns := range namespaces {
			workload.SetRatio(ns, 0.9)
		}
		g.Eventually(lastHistory).Should(And(HaveField("Version", "1.28.2"), HaveField("Outcome", meshv1.OutcomeRolledBack),
			HaveField("Reason", And(ContainSubstring("< 0.99"), ContainSubstring("wave 1/3")))))
		g.Eventually(nodeLabels).Should(Equal(ebpf), "the canary node is back on eBPF")
		g.Eventually(podNodes).WithArguments("node-agent").Should(ConsistOf("node-new", "node-mid"))
		g.Eventually(podNodes).WithArguments("istio-cni").Should(ConsistOf("node-old"))
		m = getMesh()
		g.Expect(m.Status.Rollout).To(BeNil())
		g.Expect(m.Status.Dataplane.Redirection).To(Equal(meshv1.RedirectionEBPF))
		g.Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)).To(And(
			HaveField("Status", metav1.ConditionFalse), HaveField("Reason", meshv1.ReasonRolledBack)))
		g.Expect(eventReasons(g)).To(ContainElements("RolloutStarted", "WaveStarted", "RollingBack", "RolledBack"))
		g.Consistently(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(4*time.Second).
			Should(BeNil(), "the same switch is not retried while the spec stays the same")
		g.Expect(nodeLabels(g)).To(Equal(ebpf))
	})

	t.Run("retried, it moves one node at a time to the end and the node agent goes", func(t *testing.T) {
		g := NewWithT(t)
		for _, ns := range namespaces {
			workload.SetRatio(ns, 1)
		}
		time.Sleep(6 * time.Second) // let the 5s rate window forget the breach
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Rollout.Nodes.Bake = &metav1.Duration{Duration: time.Second} })
		var waves [][]string
		g.Eventually(func() error {
			// Labels first, then the status: a node of a later wave than
			// the status shows (read after the labels) must not have moved.
			labels := nodeLabels(g)
			m := getMesh()
			ro := m.Status.Rollout
			if ro != nil && ro.Step == "SwitchRedirection" && len(ro.WaveNodes) > 0 {
				if len(waves) == 0 || !slices.Equal(waves[len(waves)-1], ro.WaveNodes) {
					waves = append(waves, slices.Clone(ro.WaveNodes))
				}
				moved := map[string]bool{}
				for _, w := range waves {
					for _, n := range w {
						moved[n] = true
					}
				}
				for _, n := range []string{"node-new", "node-mid"} {
					if !moved[n] && labels[n] != "ebpf" {
						return StopTrying(fmt.Sprintf("%s is labelled %s before its wave (wave %d moves %v)", n, labels[n], ro.Wave, ro.WaveNodes))
					}
				}
			}
			if labels["node-old"] != "iptables" {
				return StopTrying("the fallback node was relabelled " + labels["node-old"])
			}
			if h := lastHistory(); h.Outcome != meshv1.OutcomeSucceeded {
				return fmt.Errorf("last history %s %s", h.Version, h.Outcome)
			}
			return nil
		}).WithTimeout(3 * time.Minute).WithPolling(100 * time.Millisecond).Should(Succeed())
		g.Expect(waves).To(Equal([][]string{{"node-new"}, {"node-mid"}, {"node-old"}}), "canary first, then one node at a time")
		g.Eventually(meshReady).ShouldNot(BeNil())
		m := getMesh()
		g.Expect(m.Status.Dataplane.Redirection).To(Equal(meshv1.RedirectionIPTables))
		g.Expect(m.Status.Plan).To(HaveEach(HaveField("State", meshv1.StepDone)))
		g.Expect(nodeLabels(g)).To(Equal(map[string]string{"node-new": "iptables", "node-mid": "iptables", "node-old": "iptables"}))
		g.Eventually(podNodes).WithArguments("istio-cni").Should(ConsistOf("node-new", "node-mid", "node-old"))
		g.Eventually(releaseNames).ShouldNot(ContainElement("node-agent"), "the node agent goes after the last wave")
		g.Expect(podNodes(g, "node-agent")).To(BeEmpty())
		g.Expect(eventReasons(g)).To(ContainElements("WavePromoted", "RolloutSucceeded"))
	})
}

// nodeLabels maps every node to its meshkeeper.dev/redirection label.
func nodeLabels(g Gomega) map[string]string {
	out := map[string]string{}
	for _, n := range []string{"node-new", "node-mid", "node-old"} {
		out[n] = nodeLabel(g, n)
	}
	return out
}
