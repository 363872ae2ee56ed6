package controller

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestNodeWavesSeeABadCanaryNode: 20 nodes, a canary pool of 2, the
// default SLO, and a real Prometheus finding the node agents through the
// shipped scrape config (pod service discovery against the API server).
// Each of the 17 nodes added here has a loopback address and a stand-in
// agent pod whose metrics a test exporter serves; the suite's 3 nodes have
// none and come last in the node waves, which these rollouts never reach.
//
//   - A node outside the canary pool whose connections all fail does not
//     block node wave 1; its own node wave rolls back, naming it.
//   - A canary node whose connections all fail rolls node wave 1 back,
//     with a reason naming that node.
func TestNodeWavesSeeABadCanaryNode(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	root, err := cluster.RepoRoot()
	g.Expect(err).NotTo(HaveOccurred())
	snippet, err := os.ReadFile(filepath.Join(root, prom.ScrapeConfigPath))
	g.Expect(err).NotTo(HaveOccurred())

	var added []string
	t.Cleanup(func() {
		for _, n := range added {
			if err := k8s.Delete(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}); client.IgnoreNotFound(err) != nil {
				t.Errorf("delete node %s: %v", n, err)
			}
		}
	})
	const agents = "cw-agents"
	g.Expect(kc.CreateNamespace(ctx, agents, nil)).To(Succeed())
	t.Cleanup(func() {
		_ = k8s.Delete(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: agents}})
	})
	namespaces := []string{"cw-a", "cw-b"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"cw-mesh": "on"})
	}
	workloads := map[string]*prom.Workload{}
	for i := 1; i <= 17; i++ {
		name, ip := fmt.Sprintf("cw-node-%02d", i), fmt.Sprintf("127.0.43.%d", i)
		labels := map[string]string{}
		if i <= 2 {
			labels["cw-pool"] = "canary"
		}
		g.Expect(kc.AddNode(ctx, cluster.Node{Name: name, KernelVersion: "6.1.0-28-amd64", Labels: labels, InternalIP: ip})).To(Succeed())
		added = append(added, name)
		w := prom.NewWorkloadOn(t, name, ip+":0")
		for _, ns := range namespaces {
			w.SetRatio(ns, 1)
			w.SetRevision(ns, "1-26-4")
		}
		workloads[name] = w
		pod, err := prom.StandInAgentPod(agents, name, w.Addr)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(k8s.Create(ctx, pod)).To(Succeed())
	}
	srv, err := prom.StartKubernetesSD(ctx, t, snippet, kc.KubeconfigPath)
	g.Expect(err).NotTo(HaveOccurred())
	took, err := srv.WaitForTargets(ctx, "meshkeeper-agent", 17, time.Minute)
	g.Expect(err).NotTo(HaveOccurred(), srv.Logs())
	t.Logf("17 stand-in agents found through pod SD and scraped %s after Prometheus was ready", took)

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"cw-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes: meshv1.NodeRolloutSpec{
					Canary: &metav1.LabelSelector{MatchLabels: map[string]string{"cw-pool": "canary"}},
					Bake:   &metav1.Duration{Duration: 8 * time.Second}, // checks while it bakes show in status
				},
				Namespaces:  meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}},
				RetireAfter: &metav1.Duration{},
			},
			// The default SLOs (none listed): l4-success >= 0.99 on the
			// wave's nodes.
			Analysis: &meshv1.AnalysisSpec{
				Prometheus:   &meshv1.PrometheusSpec{Address: srv.URL},
				Interval:     &metav1.Duration{Duration: 5 * time.Second},
				FailureLimit: ptr(int32(0)),
			},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) }) // before the nodes go
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).WithTimeout(2 * slow).ShouldNot(BeNil())
	g.Expect(podNodes(g, "ztunnel")).To(HaveLen(20))

	t.Run("a failing node outside the canary pool does not block node wave 1", func(t *testing.T) {
		g := NewWithT(t)
		for _, ns := range namespaces {
			workloads["cw-node-09"].SetRatio(ns, 0)
		}
		rec := recordMesh(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
		g.Eventually(lastHistory).WithTimeout(3*time.Minute).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack)),
			"cw-node-09's own wave fails")
		h := lastHistory()
		t.Logf("rolled back: %s", h.Reason)
		g.Expect(h.Reason).To(And(ContainSubstring("workload_node=cw-node-09"), HaveSuffix("in node wave 5")))

		// Node wave 1 (the canary pool) passed and was promoted; so were
		// the waves up to cw-node-09's.
		passed := map[int32]bool{}
		var waveNodes [][]string
		for _, s := range rec.stop() {
			ro := s.Status.Rollout
			if ro == nil || ro.Step != meshv1.RolloutStepNodes {
				continue
			}
			if len(ro.WaveNodes) > 0 && (len(waveNodes) == 0 || !slices.Equal(waveNodes[len(waveNodes)-1], ro.WaveNodes)) {
				waveNodes = append(waveNodes, ro.WaveNodes)
			}
			for _, a := range ro.Analysis {
				if a.Verdict == meshv1.VerdictPass {
					passed[ro.Wave] = true
				}
			}
			g.Expect(ro.FailureLimit).To(HaveValue(BeEquivalentTo(0)), "status shows the failure limit")
			g.Expect(ro.InconclusiveLimit).To(HaveValue(BeEquivalentTo(meshv1.DefaultInconclusiveLimit)), "and the inconclusive limit")
		}
		// Reaching node wave 5 means waves 1 to 4 were promoted, although
		// cw-node-09 failed all along.
		g.Expect(waveNodes).To(HaveLen(5))
		g.Expect(waveNodes[0]).To(Equal([]string{"cw-node-01", "cw-node-02"}), "node wave 1 is the canary pool")
		g.Expect(waveNodes[4]).To(ContainElement("cw-node-09"))
		// A wave is promoted only on a passing check. Status may show the
		// Pass only between two polls of the recorder (under load it saw
		// none), so the promotion event of node wave 1 is the evidence, and
		// a recorded Pass, when seen, must be of a promoted wave.
		var promoted []string
		var events eventsv1.EventList
		g.Expect(k8s.List(ctx, &events)).To(Succeed())
		for _, e := range events.Items {
			if e.Regarding.Kind == "Mesh" && e.Reason == "NodeWavePromoted" {
				promoted = append(promoted, e.Note)
			}
		}
		g.Expect(promoted).To(ContainElement(HavePrefix("Node wave 1/")), "the canary pool's checks passed while it baked")
		for w := range passed {
			g.Expect(promoted).To(ContainElement(HavePrefix(fmt.Sprintf("Node wave %d/", w))), "wave %d passed a check", w)
		}
		g.Eventually(podRevisions).WithArguments("ztunnel").WithTimeout(slow).Should(HaveEach("1-26-4"), "every node back on 1.26")
	})

	t.Run("a canary node whose connections all fail rolls node wave 1 back, naming it", func(t *testing.T) {
		g := NewWithT(t)
		for _, ns := range namespaces {
			workloads["cw-node-02"].SetRatio(ns, 0)
		}
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27.3" }) // a spec change: try again
		g.Eventually(lastHistory).WithTimeout(2 * time.Minute).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack),
			HaveField("Generation", getMesh().Generation)))
		h := lastHistory()
		t.Logf("rolled back: %s", h.Reason)
		g.Expect(h.Reason).To(MatchRegexp(`^l4-success 0(\.[0-9]+)? < 0\.99 \(workload_namespace=cw-[ab], workload_node=cw-node-02\) in node wave 1$`))
		g.Eventually(podRevisions).WithArguments("ztunnel").WithTimeout(slow).Should(HaveEach("1-26-4"))
		g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
	})
}
