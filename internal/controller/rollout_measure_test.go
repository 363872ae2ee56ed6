package controller

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// The TestMeasure tests log how long rollouts take on the local cluster.
// They assert what the rollout must achieve, never how long it took: the
// figures depend on the machine and go to the README's "Measured" table.

// TestMeasureCanaryUpgrade50Namespaces logs the wall time of a canary
// upgrade of 50 namespaces on 20 kwok nodes, without analysis and with no
// bake or grace period: what the rollout machinery itself costs.
func TestMeasureCanaryUpgrade50Namespaces(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()

	// The cluster has 3 nodes; 17 more for this test only.
	var added []string
	t.Cleanup(func() {
		for _, n := range added {
			if err := k8s.Delete(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}); client.IgnoreNotFound(err) != nil {
				t.Errorf("delete node %s: %v", n, err)
			}
		}
	})
	began := time.Now()
	for i := 1; i <= 17; i++ {
		name := fmt.Sprintf("mx-node-%02d", i)
		g.Expect(kc.AddNode(ctx, cluster.Node{Name: name, KernelVersion: "6.1.0-28-amd64"})).To(Succeed())
		added = append(added, name)
	}
	t.Logf("17 kwok nodes added (20 in all) in %s", time.Since(began).Round(time.Millisecond))

	var namespaces []string
	for i := range 50 {
		ns := fmt.Sprintf("mx-%02d", i)
		mkNS(g, ns, map[string]string{"mx-mesh": "on"})
		namespaces = append(namespaces, ns)
	}
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mx-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"mx-00"}, Waves: []string{"10%", "50%", "100%"}, Bake: &metav1.Duration{},
			}, RetireAfter: &metav1.Duration{}},
		},
	}
	began = time.Now()
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) }) // before the nodes go
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).WithTimeout(2 * slow).ShouldNot(BeNil())
	t.Logf("fresh install of 1.26.4 on 20 nodes, 50 namespaces enrolled: Ready in %s", time.Since(began).Round(time.Millisecond))
	g.Expect(podNodes(g, "ztunnel")).To(HaveLen(20))

	onRevision := func(rev string) int {
		var list corev1.NamespaceList
		g.Expect(k8s.List(ctx, &list, client.MatchingLabels{"mx-mesh": "on"})).To(Succeed())
		n := 0
		for _, ns := range list.Items {
			if ns.Labels[meshv1.LabelRevision] == rev {
				n++
			}
		}
		return n
	}
	rec := recordMesh(t)
	began = time.Now()
	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
	var allMoved time.Duration
	g.Eventually(func() string {
		if allMoved == 0 && onRevision("1-27-3") == len(namespaces) {
			allMoved = time.Since(began)
		}
		return lastHistory().Version + " " + string(lastHistory().Outcome)
	}).WithTimeout(3 * time.Minute).WithPolling(100 * time.Millisecond).Should(Equal("1.27.3 Succeeded"))
	succeeded := time.Since(began)

	g.Expect(onRevision("1-27-3")).To(Equal(len(namespaces)), "every namespace moved")
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.27.3"))
	g.Expect(releaseNames(g)).NotTo(ContainElement("istiod-1-26-4"))
	var waves []string
	for _, s := range rec.stop() {
		if ro := s.Status.Rollout; ro != nil && len(ro.WaveNamespaces) > 0 {
			w := fmt.Sprintf("%d:%d", ro.Wave, len(ro.WaveNamespaces))
			if len(waves) == 0 || waves[len(waves)-1] != w {
				waves = append(waves, w)
			}
		}
	}
	g.Expect(waves).To(Equal([]string{"1:1", "2:5", "3:20", "4:24"}), "canary, then 10%%, 50%% and 100%% of the other 49")
	t.Logf("MEASURED canary upgrade 1.26.4 → 1.27.3, 50 namespaces in 4 waves, 20 nodes, bake 0, retireAfter 0, no analysis: "+
		"every namespace moved %s after the version change, history Succeeded after %s",
		allMoved.Round(time.Millisecond), succeeded.Round(time.Millisecond))
}

// TestMeasureSLOBreachToRollback logs how long a rollback takes from the
// moment the breach shows in Prometheus (the first instant query of the
// wave's SLO below its min) until status.history says RolledBack. The
// target is at most two analysis intervals plus 10s.
func TestMeasureSLOBreachToRollback(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()

	namespaces := []string{"mb-canary", "mb-a", "mb-b"}
	workload := prom.NewWorkload(t)
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"mb-mesh": "on"})
		workload.SetRatio(ns, 1)
	}
	srv, err := prom.Start(ctx, t, workload.Addr)
	g.Expect(err).NotTo(HaveOccurred())
	_, err = srv.WaitForScrapes(ctx, 30*time.Second)
	g.Expect(err).NotTo(HaveOccurred())

	const interval = 5 * time.Second
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mb-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				// A long bake: the canary wave is still being judged when
				// the breach comes.
				Canary: []string{"mb-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{Duration: time.Minute},
			}, RetireAfter: &metav1.Duration{}},
			Analysis: sloGate(srv.URL, interval, "0.99"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())

	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
	g.Eventually(labelsOf).WithArguments("mb-canary").Should(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"))
	// The labels are written during the reconcile, its status at the end.
	g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(HaveField("Wave", BeEquivalentTo(1)))

	// The canary's SLO exactly as meshkeeper asks it.
	query := strings.ReplaceAll(rolloutSLO, "{{ .Namespaces }}", "mb-canary")
	value := func() (float64, error) {
		v, _, err := srv.API().Query(ctx, query, time.Now())
		if err != nil {
			return 0, err
		}
		vec, ok := v.(model.Vector)
		if !ok || len(vec) != 1 {
			return 0, fmt.Errorf("query result %s", v)
		}
		return float64(vec[0].Value), nil
	}
	g.Expect(value()).To(BeNumerically(">=", 0.99), "healthy before the breach")

	breached := time.Now()
	workload.SetRatio("mb-canary", 0.9)
	g.Eventually(value).WithTimeout(30 * time.Second).WithPolling(100 * time.Millisecond).Should(BeNumerically("<", 0.99))
	visible := time.Now()
	g.Eventually(lastHistory).WithTimeout(2 * time.Minute).WithPolling(100 * time.Millisecond).
		Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack)))
	done := time.Now()

	h := lastHistory()
	g.Expect(h.Reason).To(And(ContainSubstring("l4-success"), ContainSubstring("< 0.99"), ContainSubstring("wave 1")))
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
	for _, ns := range namespaces {
		g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), ns)
	}
	g.Eventually(releaseNames).ShouldNot(ContainElement("istiod-1-27-3"))
	target := 2*interval + 10*time.Second
	t.Logf("MEASURED SLO breach → rollback complete: %s from the breach showing in Prometheus to history RolledBack "+
		"(target ≤ 2 intervals + 10s = %s; the breach showed %s after the workload's ratio changed; interval %s, failureLimit 0)",
		done.Sub(visible).Round(time.Millisecond), target, visible.Sub(breached).Round(time.Millisecond), interval)
}
