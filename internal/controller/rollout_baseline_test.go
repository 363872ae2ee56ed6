package controller

import (
	"context"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// baselineSLO is the L4 success ratio of the pods on .Revision over a short
// window: the wave's pods, or the baseline's when expanded for it.
const baselineSLO = `sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}",result="ok"}[5s])) / ` +
	`sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}"}[5s]))`

// followRevisions sets each namespace's workload_revision on w from its
// istio.io/rev label every 200ms, as the node agent does from its
// namespace informer, until the test ends.
func followRevisions(t *testing.T, w *prom.Workload, namespaces []string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			for _, ns := range namespaces {
				var n corev1.Namespace
				if err := k8s.Get(ctx, client.ObjectKey{Name: ns}, &n); err == nil {
					w.SetRevision(ns, n.Labels[meshv1.LabelRevision])
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
}

// TestBaselineComparisonInARollout: an SLO with maxDegradation compares the
// canary wave (the pods on the new revision) with the namespaces still on
// the old one. A drop that hits both sides alike passes the canary wave and
// is reported in status and an event; a canary worse than the baseline by
// more than the tolerance rolls back although it is above min. Sidecar
// mode: no node waves, namespaces only.
func TestBaselineComparisonInARollout(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()

	namespaces := []string{"bl-canary", "bl-a", "bl-b"}
	workload := prom.NewWorkload(t)
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"bl-mesh": "on"})
		workload.SetRatio(ns, 1)
	}
	followRevisions(t, workload, namespaces)
	srv, err := prom.Start(ctx, t, workload.Addr)
	g.Expect(err).NotTo(HaveOccurred())

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"bl-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"bl-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{Duration: 12 * time.Second}, // checks while it bakes show in status
			}, RetireAfter: &metav1.Duration{}},
			Analysis: &meshv1.AnalysisSpec{
				Prometheus:   &meshv1.PrometheusSpec{Address: srv.URL},
				Interval:     &metav1.Duration{Duration: 5 * time.Second},
				FailureLimit: ptr(int32(0)),
				SLOs:         []meshv1.SLO{{Name: "l4-success", Query: baselineSLO, Min: ptr("0.95"), MaxDegradation: ptr("2%")}},
			},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))

	t.Run("a drop on both sides passes the canary wave and is reported", func(t *testing.T) {
		g := NewWithT(t)
		for _, ns := range namespaces {
			workload.SetRatio(ns, 0.9) // below min 0.95 everywhere: an incident, not the new version
		}
		rec := recordMesh(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
		// The canary wave passes on the comparison; the last wave has no
		// baseline left, so min judges alone and rolls back.
		g.Eventually(lastHistory).WithTimeout(2 * time.Minute).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack)))
		h := lastHistory()
		t.Logf("rolled back: %s", h.Reason)
		g.Expect(h.Reason).To(Equal("l4-success 0.9 < 0.95 (no baseline left to compare with) in wave 2"))

		var reported *meshv1.AnalysisResult
		var message string
		seen := map[string]bool{}
		for _, s := range rec.stop() {
			ro := s.Status.Rollout
			if ro == nil {
				continue
			}
			if !seen[ro.Message] {
				seen[ro.Message] = true
				t.Logf("step %s wave %d: %s", ro.Step, ro.Wave, ro.Message)
			}
			if ro.Wave != 1 || ro.Step != meshv1.RolloutStepNamespaces {
				continue
			}
			for i := range ro.Analysis {
				if strings.Contains(ro.Analysis[i].Message, "cluster-wide drop") {
					reported, message = &ro.Analysis[i], ro.Message
				}
			}
		}
		g.Expect(reported).NotTo(BeNil(), "status.rollout.analysis reported the cluster-wide drop in wave 1")
		g.Expect(*reported).To(And(HaveField("Verdict", meshv1.VerdictPass), HaveField("Value", "0.9"), HaveField("Baseline", "0.9"),
			HaveField("Degradation", "0%")), "the verdict records both values")
		g.Expect(message).To(ContainSubstring("cluster-wide drop"), "and status.rollout.message")
		g.Expect(eventReasons(g)).To(ContainElements("ClusterWideDegradation", "WavePromoted"))
	})

	t.Run("a canary worse than the baseline rolls back although it is above min", func(t *testing.T) {
		g := NewWithT(t)
		for _, ns := range namespaces {
			workload.SetRatio(ns, 1)
		}
		workload.SetRatio("bl-canary", 0.97)
		time.Sleep(6 * time.Second)                                       // let the 5s rate window forget the drop
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27.3" }) // a spec change: try again
		g.Eventually(lastHistory).WithTimeout(time.Minute).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack),
			HaveField("Generation", getMesh().Generation)))
		h := lastHistory()
		t.Logf("rolled back: %s", h.Reason)
		g.Expect(h.Reason).To(Equal("l4-success 0.97 is 3% worse than the baseline 1 (maxDegradation 2%) in wave 1"))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), ns)
		}
	})
}
