package controller

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestNodeWaves: a version change moves the node components node by node
// before any namespace moves: the canary node pool first (it bakes), then one
// node at a time (maxUnavailable 1). An SLO breach while the canary node
// bakes puts that node, and only it, back on the old version; a healthy
// rollout then moves every node, wave by wave, and the namespaces after.
// The cluster's nodes: node-new (pool: canary), node-mid, node-old.
func TestNodeWaves(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()

	namespaces := []string{"nw-a", "nw-b"}
	workload := prom.NewWorkload(t)
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"nw-mesh": "on"})
		workload.SetRatio(ns, 1)
	}
	srv, err := prom.Start(ctx, t, workload.Addr)
	g.Expect(err).NotTo(HaveOccurred())

	one := intstr.FromInt32(1)
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"nw-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes: meshv1.NodeRolloutSpec{
					Canary:         &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}},
					MaxUnavailable: &one,
					Bake:           &metav1.Duration{Duration: 20 * time.Second}, // long enough to see the breach
				},
				Namespaces:  meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}},
				RetireAfter: &metav1.Duration{},
			},
			Analysis: sloGate(srv.URL, 5*time.Second, "0.99"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	allOn := func(rev string) map[string]string {
		return map[string]string{"node-new": rev, "node-mid": rev, "node-old": rev}
	}
	g.Expect(podRevisions(g, "ztunnel")).To(Equal(allOn("1-26-4")))

	t.Run("an SLO breach while the canary node bakes puts that node back", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })

		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(And(Not(BeNil()),
			HaveField("Step", meshv1.RolloutStepNodes), HaveField("Wave", int32(1)), HaveField("Waves", int32(3)),
			HaveField("WaveNodes", []string{"node-new"})), "the canary node pool is node wave 1 of 3")
		g.Eventually(podRevisions).WithArguments("ztunnel").Should(Equal(map[string]string{
			"node-new": "1-27-3", "node-mid": "1-26-4", "node-old": "1-26-4"}), "only the canary node moves")
		g.Eventually(podRevisions).WithArguments("node-agent").Should(Equal(map[string]string{
			"node-new": "1-27-3", "node-mid": "1-26-4"}), "the node agent too (it runs on the eBPF nodes only)")
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), "namespaces move after the nodes")
		}
		g.Expect(daemonSetStrategy(g, "ztunnel")).To(Equal(appsv1.OnDeleteDaemonSetStrategyType), "meshkeeper moves the pods itself")
		step := planStep(getMesh(), "UpgradeNodeComponents")
		g.Expect(step.State).To(Equal(meshv1.StepRunning))
		g.Expect(step.Message).To(ContainSubstring("node wave 1/3 (node-new)"))

		for _, ns := range namespaces {
			workload.SetRatio(ns, 0.9)
		}
		g.Eventually(lastHistory).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack),
			HaveField("Reason", And(ContainSubstring("< 0.99"), ContainSubstring("in node wave 1")))))
		g.Eventually(podRevisions).WithArguments("ztunnel").Should(Equal(allOn("1-26-4")), "the canary node is back on 1.26")
		g.Eventually(podRevisions).WithArguments("node-agent").Should(Equal(map[string]string{"node-new": "1-26-4", "node-mid": "1-26-4"}))
		g.Expect(daemonSetStrategy(g, "ztunnel")).To(Equal(appsv1.RollingUpdateDaemonSetStrategyType))
		g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
		g.Expect(eventReasons(g)).To(ContainElements("NodeWaveStarted", "RollingBack", "RolledBack"))
	})

	t.Run("a healthy rollout moves the canary node, then one node at a time, then the namespaces", func(t *testing.T) {
		g := NewWithT(t)
		for _, ns := range namespaces {
			workload.SetRatio(ns, 1)
		}
		time.Sleep(6 * time.Second) // let the 5s rate window forget the breach
		rec := recordMesh(t)
		updateMesh(g, func(m *meshv1.Mesh) {
			m.Spec.Version = "1.27.3" // a spec change: try again
			m.Spec.Rollout.Nodes.Bake = &metav1.Duration{Duration: time.Second}
		})
		// Pods, then the status: a node of a later wave than the status
		// shows (read after the pods) must still run 1.26.
		waveOf := map[string]int32{"node-new": 1, "node-mid": 2, "node-old": 3}
		surged := map[string]bool{}
		g.Eventually(func() error {
			// ztunnel moves make-before-break: every node has a ready
			// ztunnel that is not stopping at every moment, and the new one
			// starts beside the old one (a surge pod).
			zt := ztunnelPods(g)
			for node := range waveOf {
				if !slices.ContainsFunc(zt[node], func(p corev1.Pod) bool { return p.DeletionTimestamp == nil && podIsReady(&p) }) {
					return StopTrying(fmt.Sprintf("node %s has no ready ztunnel: %s", node, podNames(zt[node])))
				}
				for _, p := range zt[node] {
					if p.Labels["meshkeeper.dev/surge-of"] == "ztunnel" {
						surged[node] = true
					}
				}
			}
			pods := podRevisions(g, "ztunnel")
			nsRevs := map[string]string{}
			for _, ns := range namespaces {
				nsRevs[ns] = labelsOf(ns)[meshv1.LabelRevision]
			}
			m := getMesh()
			if ro := m.Status.Rollout; ro != nil && ro.Step == meshv1.RolloutStepNodes {
				for node, rev := range pods {
					if waveOf[node] > ro.Wave && rev != "1-26-4" {
						return StopTrying(fmt.Sprintf("%s runs %s during node wave %d", node, rev, ro.Wave))
					}
				}
				for ns, rev := range nsRevs {
					if rev != "1-26-4" {
						return StopTrying(fmt.Sprintf("namespace %s moved to %s during the node waves", ns, rev))
					}
				}
			}
			if h := lastHistory(); h.Version != "1.27.3" || h.Outcome != meshv1.OutcomeSucceeded {
				return fmt.Errorf("last history %s %s", h.Version, h.Outcome)
			}
			return nil
		}).WithTimeout(slow).WithPolling(100 * time.Millisecond).Should(Succeed())

		var waves [][]string
		for _, s := range rec.stop() {
			if ro := s.Status.Rollout; ro != nil && ro.Step == meshv1.RolloutStepNodes && len(ro.WaveNodes) > 0 &&
				(len(waves) == 0 || !slices.Equal(waves[len(waves)-1], ro.WaveNodes)) {
				waves = append(waves, ro.WaveNodes)
			}
		}
		g.Expect(waves).To(Equal([][]string{{"node-new"}, {"node-mid"}, {"node-old"}}), "the canary pool first, then one node at a time")
		g.Expect(podRevisions(g, "ztunnel")).To(Equal(allOn("1-27-3")))
		g.Expect(surged).To(Equal(map[string]bool{"node-new": true, "node-mid": true, "node-old": true}), "a new ztunnel started beside the old one on every node")
		g.Eventually(func() map[string][]string {
			left := map[string][]string{}
			for node, pods := range ztunnelPods(g) {
				for _, p := range pods {
					if p.Labels["meshkeeper.dev/surge-of"] != "" {
						left[node] = append(left[node], p.Name)
					}
				}
			}
			return left
		}).Should(BeEmpty(), "no surge pod is left once the nodes have moved")
		g.Expect(daemonSetStrategy(g, "ztunnel")).To(Equal(appsv1.RollingUpdateDaemonSetStrategyType), "back to a native rolling update")
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"), ns)
		}
		g.Expect(eventReasons(g)).To(ContainElements("NodeWavePromoted", "NodesMoved", "WaveStarted", "RolloutSucceeded"))
		g.Eventually(meshReady).ShouldNot(BeNil())
	})
}

// podRevisions maps each node to the bundle revision (meshkeeper.dev/revision)
// of the component's pod there, for pods not being deleted.
func podRevisions(g Gomega, component string) map[string]string {
	var pods corev1.PodList
	g.Expect(k8s.List(context.Background(), &pods, client.InNamespace(componentsNamespace),
		client.MatchingLabels{meshv1.LabelComponent: component})).To(Succeed())
	out := map[string]string{}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && p.Spec.NodeName != "" {
			out[p.Spec.NodeName] = p.Labels[meshv1.LabelControlPlaneRevision]
		}
	}
	return out
}

// ztunnelPods maps each node to the ztunnel pods on it: the DaemonSet's and
// surge pods, stopping or not.
func ztunnelPods(g Gomega) map[string][]corev1.Pod {
	var pods corev1.PodList
	g.Expect(k8s.List(context.Background(), &pods, client.InNamespace(componentsNamespace),
		client.MatchingLabels{meshv1.LabelComponent: "ztunnel"})).To(Succeed())
	out := map[string][]corev1.Pod{}
	for _, p := range pods.Items {
		out[p.Spec.NodeName] = append(out[p.Spec.NodeName], p)
	}
	return out
}

func podIsReady(p *corev1.Pod) bool {
	return slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool {
		return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
	})
}

func podNames(pods []corev1.Pod) string {
	var names []string
	for _, p := range pods {
		state := "not ready"
		if podIsReady(&p) {
			state = "ready"
		}
		if p.DeletionTimestamp != nil {
			state += ", stopping"
		}
		names = append(names, fmt.Sprintf("%s (%s)", p.Name, state))
	}
	if len(names) == 0 {
		return "no pod"
	}
	return strings.Join(names, ", ")
}

func daemonSetStrategy(g Gomega, component string) appsv1.DaemonSetUpdateStrategyType {
	var sets appsv1.DaemonSetList
	g.Expect(k8s.List(context.Background(), &sets, client.InNamespace(componentsNamespace),
		client.MatchingLabels{meshv1.LabelComponent: component})).To(Succeed())
	g.Expect(sets.Items).To(HaveLen(1))
	return sets.Items[0].Spec.UpdateStrategy.Type
}

func planStep(m *meshv1.Mesh, action string) meshv1.PlanStep {
	for _, s := range m.Status.Plan {
		if s.Action == action {
			return s
		}
	}
	return meshv1.PlanStep{}
}
