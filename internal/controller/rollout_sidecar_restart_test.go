package controller

import (
	"context"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestSidecarVersionRolloutRestarts: in Sidecar mode a version rollout
// moves a namespace to the new istiod revision with its istio.io/rev label,
// and then restarts its workloads, because a running pod keeps the sidecar
// it was injected with, talking to the old istiod until that is retired.
// The wave bakes and is judged only once the restarted pods are rolled out
// and ready (status.rollout.workloadsRestartedAt); no later wave's workloads
// restart ahead of it. A breach in wave 2 puts the moved namespaces back on
// the old revision and restarts their workloads again; the namespaces that
// never moved are never restarted. Retried, every namespace ends on the new
// revision with its workloads restarted once more.
func TestSidecarVersionRolloutRestarts(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(2 * slow)
	dumpMeshOnFailure(t)
	withoutIstiodWebhooks(t, g)

	namespaces := []string{"sr-canary", "sr-a", "sr-b", "sr-c"}
	workload := prom.NewWorkload(t)
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"sr-mesh": "on"})
		workload.SetRatio(ns, 1)
		mkDeployment(g, ns, "app")
	}
	srv, err := prom.Start(ctx, t, workload.Addr)
	g.Expect(err).NotTo(HaveOccurred())

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.27",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"sr-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"sr-canary"}, Waves: []string{"50%", "100%"}, Bake: &metav1.Duration{Duration: time.Second},
			}, RetireAfter: &metav1.Duration{}},
			Analysis: sloGate(srv.URL, 5*time.Second, "0.95"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	g.Eventually(meshReady).ShouldNot(BeNil())
	for _, ns := range namespaces {
		g.Expect(placementOfNS(ns)).To(Equal("1-27-3 Sidecar"), ns)
		g.Expect(restartedAt(ns, "app")).To(BeEmpty(), "installing restarts nothing: %s", ns)
	}

	t.Run("a breach in wave 2 restarts the moved namespaces back onto the old revision", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("sr-a", 0.8)
		rec := recordMesh(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28" })

		// Wave 1: the canary alone moves and its workloads restart.
		g.Eventually(placementOfNS).WithArguments("sr-canary").Should(Equal("1-28-2 Sidecar"))
		g.Eventually(restartedAt).WithArguments("sr-canary", "app").Should(And(Not(BeEmpty()), Not(HavePrefix("rollback-"))))
		forward := restartedAt("sr-canary", "app")
		g.Expect(restartedAt("sr-a", "app")).To(BeEmpty(), "no restart ahead of the wave")

		g.Eventually(lastHistory).WithTimeout(2 * time.Minute).Should(And(HaveField("Version", "1.28.2"), HaveField("Outcome", meshv1.OutcomeRolledBack)))
		h := lastHistory()
		t.Logf("rolled back: %s", h.Reason)
		g.Expect(h.Reason).To(And(ContainSubstring("l4-success 0.9"), ContainSubstring("wave 2")))
		g.Expect(h.Reason).NotTo(ContainSubstring("restarting"), "history records the reason, not the restart progress")
		for _, ns := range namespaces {
			g.Expect(placementOfNS(ns)).To(Equal("1-27-3 Sidecar"), "%s is back on the old revision", ns)
		}
		for _, ns := range []string{"sr-canary", "sr-a", "sr-b"} {
			g.Expect(restartedAt(ns, "app")).To(Equal("rollback-"+forward), "%s's workloads restarted back onto 1-27-3", ns)
		}
		g.Expect(restartedAt("sr-c", "app")).To(BeEmpty(), "sr-c never moved, so it never restarted")
		g.Expect(eventReasons(g)).To(ContainElements("WorkloadsRestarted", "RollingBack", "RolledBack"))

		// What status said along the way: each wave waited for its
		// restarts, and was judged only on checks after they were done.
		var waited, restartedSeen bool
		for _, s := range rec.stop() {
			ro := s.Status.Rollout
			if ro == nil || ro.Step != meshv1.RolloutStepNamespaces {
				continue
			}
			if strings.Contains(ro.Message, "restarting workloads onto 1-28-2") {
				waited = true
				g.Expect(ro.WorkloadsRestartedAt).To(BeNil(), "restarts in flight: %s", ro.Message)
				g.Expect(ro.Analysis).To(BeEmpty(), "no check while the wave's workloads restart: %s", ro.Message)
			}
			if ro.WorkloadsRestartedAt != nil {
				restartedSeen = true
				g.Expect(ro.WaveStartedAt.Time).To(BeTemporally(">=", ro.WorkloadsRestartedAt.Time), "the bake counts from the restart")
				if ro.LastCheckAt != nil {
					g.Expect(ro.LastCheckAt.Time).To(BeTemporally(">=", ro.WorkloadsRestartedAt.Time), "checks come after the restart")
				}
			}
		}
		g.Expect(waited).To(BeTrue(), "status.rollout.message said the wave was restarting its workloads")
		g.Expect(restartedSeen).To(BeTrue(), "status.rollout.workloadsRestartedAt was recorded")
	})

	t.Run("retried, every namespace ends on the new revision, its workloads restarted", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("sr-a", 1)
		time.Sleep(6 * time.Second) // let the 5s rate window forget the breach
		before := restartedAt("sr-canary", "app")
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28.2" }) // a spec change: try again
		g.Eventually(lastHistory).WithTimeout(3 * time.Minute).Should(And(HaveField("Version", "1.28.2"), HaveField("Outcome", meshv1.OutcomeSucceeded)))
		g.Eventually(meshReady).ShouldNot(BeNil())
		token := restartedAt("sr-canary", "app")
		g.Expect(token).NotTo(Or(Equal(before), HavePrefix("rollback-")), "a retried rollout restarts again")
		for _, ns := range namespaces {
			g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Sidecar"), ns)
			g.Expect(restartedAt(ns, "app")).To(Equal(token), "%s's workloads restarted onto 1-28-2", ns)
		}
	})
}
