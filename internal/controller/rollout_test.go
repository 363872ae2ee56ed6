package controller

import (
	"context"
	"maps"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// rolloutSLO is the L4 success ratio of the wave over a short window, so a
// ratio the test changes shows within seconds.
const rolloutSLO = `sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result="ok"}[5s])) / ` +
	`sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[5s]))`

// sloGate is the tests' analysis: rolloutSLO against the Prometheus at
// address every interval, at least min, rolling back on the first failure.
func sloGate(address string, interval time.Duration, min string) *meshv1.AnalysisSpec {
	return &meshv1.AnalysisSpec{
		Prometheus:   &meshv1.PrometheusSpec{Address: address},
		Interval:     &metav1.Duration{Duration: interval},
		FailureLimit: ptr(int32(0)),
		SLOs:         []meshv1.SLO{{Name: "l4-success", Query: rolloutSLO, Min: ptr(min)}},
	}
}

// TestCanaryRollouts drives one Mesh through the rollouts a platform team
// lives with, judged by a real Prometheus scraping a workload whose success
// ratio per namespace the test sets: an SLO breach in the canary wave rolls
// everything back and is not retried; after a spec change a healthy rollout
// moves canary first, then the waves, and retires the old revision; with
// Prometheus gone the rollout holds and reports Degraded, and carries on
// when Prometheus is back.
func TestCanaryRollouts(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()

	namespaces := []string{"ro-canary", "ro-a", "ro-b", "ro-c", "ro-d"}
	workload := prom.NewWorkload(t)
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"ro-mesh": "on"})
		workload.SetRatio(ns, 1)
	}
	srv, err := prom.Start(ctx, t, workload.Addr)
	g.Expect(err).NotTo(HaveOccurred())

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"ro-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"ro-canary"}, Waves: []string{"50%", "100%"}, Bake: &metav1.Duration{Duration: time.Second},
			}, RetireAfter: &metav1.Duration{Duration: 2 * time.Second}},
			// 0.95: the canary namespace at 0.9 fails its own wave, but the
			// node waves, judged over every namespace (0.98), pass.
			Analysis: sloGate(srv.URL, 5*time.Second, "0.95"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
	g.Expect(getMesh().Status.Rollout).To(BeNil(), "a fresh install is no rollout")
	for _, ns := range namespaces {
		g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), ns)
	}

	t.Run("an SLO breach in the canary wave rolls everything back, and the target is not retried", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("ro-canary", 0.9)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })

		// The canary moves alone first.
		g.Eventually(labelsOf).WithArguments("ro-canary").Should(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"))
		moved := time.Now()
		g.Expect(labelsOf("ro-a")).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), "only the canary moves in wave 1")
		g.Expect(releaseNames(g)).To(ContainElements("istiod-1-26-4", "istiod-1-27-3"), "both revisions run side by side")

		g.Eventually(lastHistory).Should(HaveField("Outcome", meshv1.OutcomeRolledBack))
		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(BeNil())
		t.Logf("rollback complete %s after the canary wave moved (interval 5s, failureLimit 0)", time.Since(moved).Round(time.Millisecond))
		h := lastHistory()
		g.Expect(h.Version).To(Equal("1.27.3"))
		g.Expect(h.Reason).To(And(ContainSubstring("l4-success 0.9"), ContainSubstring("< 0.95"), ContainSubstring(" in wave 1")))
		m := getMesh()
		g.Expect(m.Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.26.4", Target: "1.27.3"}))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), ns)
		}
		g.Eventually(releaseNames).ShouldNot(ContainElement("istiod-1-27-3"))
		for _, c := range []string{meshv1.ConditionRolledBack, meshv1.ConditionDegraded, meshv1.ConditionStalled} {
			g.Expect(meta.IsStatusConditionTrue(m.Status.Conditions, c)).To(BeTrue(), c)
		}
		g.Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)).To(And(
			HaveField("Status", metav1.ConditionFalse), HaveField("Reason", meshv1.ReasonRolledBack),
			HaveField("Message", ContainSubstring("not tried again until the spec changes"))))
		g.Expect(eventReasons(g)).To(ContainElements("RolloutStarted", "WaveStarted", "RollingBack", "RolledBack"))

		g.Consistently(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(6*time.Second).
			Should(BeNil(), "the same target is not retried while the spec stays the same")
	})

	t.Run("a healthy rollout moves the canary, then the waves, and retires the old revision", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("ro-canary", 1)
		time.Sleep(6 * time.Second) // let the 5s rate window forget the breach
		var waves [][]string
		record := func() {
			if ro := getMesh().Status.Rollout; ro != nil && len(ro.WaveNamespaces) > 0 {
				if len(waves) == 0 || !slices.Equal(waves[len(waves)-1], ro.WaveNamespaces) {
					waves = append(waves, slices.Clone(ro.WaveNamespaces))
				}
			}
		}
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27.3" }) // a spec change: try again
		g.Eventually(func() string {
			record()
			return lastHistory().Version + " " + string(lastHistory().Outcome)
		}).WithPolling(100 * time.Millisecond).Should(Equal("1.27.3 Succeeded"))
		g.Expect(waves).To(Equal([][]string{{"ro-canary"}, {"ro-a", "ro-b"}, {"ro-c", "ro-d"}}), "canary first, then 50%%, then the rest")
		g.Eventually(meshReady).ShouldNot(BeNil())
		m := getMesh()
		g.Expect(m.Status.Version.Installed).To(Equal("1.27.3"))
		g.Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionRolledBack)).To(HaveField("Status", metav1.ConditionFalse))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"), ns)
		}
		g.Expect(releaseNames(g)).NotTo(ContainElement("istiod-1-26-4"), "the old revision is retired")
	})

	t.Run("without Prometheus the rollout holds and reports Degraded, then carries on", func(t *testing.T) {
		g := NewWithT(t)
		g.Expect(srv.Stop()).To(Succeed())
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28" })
		// The first node wave moves, then its analysis cannot be judged.
		g.Eventually(func() *metav1.Condition {
			return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionDegraded)
		}).WithTimeout(60 * time.Second).Should(And(Not(BeNil()), HaveField("Reason", meshv1.ReasonAnalysisInconclusive),
			HaveField("Message", ContainSubstring("waiting for a human"))))
		ro := getMesh().Status.Rollout
		g.Expect(ro.Step).To(Equal(meshv1.RolloutStepNodes))
		g.Expect(ro.Wave).To(Equal(int32(1)), "nothing is promoted while the SLOs cannot be judged")
		g.Expect(ro.Analysis).To(ContainElement(HaveField("Verdict", meshv1.VerdictInconclusive)))
		g.Expect(podRevisions(g, "ztunnel")).To(HaveKeyWithValue(ro.WaveNodes[0], "1-28-2"), "the held node wave has moved")
		g.Expect(podRevisions(g, "ztunnel")).To(HaveLen(3))
		g.Expect(slices.Collect(maps.Values(podRevisions(g, "ztunnel")))).To(ContainElement("1-27-3"), "the later node waves have not")
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"), "no namespace moves while a node wave holds")
		}

		back, err := prom.Start(ctx, t, workload.Addr)
		g.Expect(err).NotTo(HaveOccurred())
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Analysis.Prometheus.Address = back.URL })
		g.Eventually(lastHistory).WithTimeout(120 * time.Second).Should(And(HaveField("Version", "1.28.2"), HaveField("Outcome", meshv1.OutcomeSucceeded)))
		g.Eventually(meshReady).ShouldNot(BeNil())
		g.Expect(meta.IsStatusConditionTrue(getMesh().Status.Conditions, meshv1.ConditionDegraded)).To(BeFalse())
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), ns)
		}
	})
}

// lastHistory is the newest status.history entry (zero when there is none).
func lastHistory() meshv1.HistoryEntry {
	m := getMesh()
	if m == nil || len(m.Status.History) == 0 {
		return meshv1.HistoryEntry{}
	}
	return m.Status.History[len(m.Status.History)-1]
}

// TestPausedPublishesThePlan: spec.paused is a dry run a reviewer can read
// in status.plan; nothing is installed or labelled until it is unpaused.
func TestPausedPublishesThePlan(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	mkNS(g, "pp-app", map[string]string{"pp-mesh": "on"})
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.27",
			Paused:     true,
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"pp-mesh": "on"}}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })

	g.Eventually(func() []meshv1.PlanStep { return getMesh().Status.Plan }).Should(ContainElements(
		And(HaveField("Action", "InstallControlPlane"), HaveField("Target", "1.27.3"), HaveField("State", meshv1.StepPending)),
		And(HaveField("Action", "MoveNamespaces"), HaveField("State", meshv1.StepPending), HaveField("Message", ContainSubstring("1 namespace"))),
	))
	g.Expect(meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionReady)).To(HaveField("Reason", meshv1.ReasonPaused))
	g.Consistently(releaseNames).WithTimeout(2*time.Second).Should(BeEmpty(), "paused: nothing is installed")
	g.Expect(labelsOf("pp-app")).NotTo(HaveKey(meshv1.LabelRevision))

	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Paused = false })
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(labelsOf("pp-app")).To(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"))
}
