package controller

import (
	"context"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/restart"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestModeSwitchInWaves: a Mesh switching from Ambient to Sidecar moves
// namespace by namespace, as status.plan says: each wave's namespaces are
// relabelled and their workloads restarted (kubectl rollout restart, the
// meshkeeper.dev/restartedAt annotation), then the wave is judged by a real
// Prometheus. A breach in wave 2 puts every moved namespace back to Ambient,
// restarting its workloads again, and the switch is not retried until the
// spec changes. Retried, it runs to the end: a namespace selected once the
// switch is under way joins the last wave (never moved unjudged), and the
// node components go only after the last wave.
func TestModeSwitchInWaves(t *testing.T) {
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(2 * slow)
	dumpMeshOnFailure(t)
	withoutIstiodWebhooks(t, g)

	namespaces := []string{"ms-canary", "ms-a", "ms-b", "ms-c"}
	workload, srv := judgedNamespaces(t, g, "ms-mesh", true, namespaces...)

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"ms-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"ms-canary"}, Waves: []string{"50%", "100%"}, Bake: &metav1.Duration{Duration: time.Second},
			}},
			Analysis: sloGate(srv.URL, 5*time.Second, "0.95"),
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	g.Eventually(meshReady).ShouldNot(BeNil())
	for _, ns := range namespaces {
		g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Ambient"), ns)
	}

	t.Run("a breach in wave 2 puts every moved namespace back to Ambient", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("ms-a", 0.8)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeSidecar })

		// The dry run and what runs are one: the plan names the waves.
		g.Eventually(func() []meshv1.PlanStep { return getMesh().Status.Plan }).Should(ContainElement(And(
			HaveField("Action", "MoveNamespaces"), HaveField("Target", "1.28.2 Sidecar"))))
		// Wave 1: the canary alone, its workloads restarted.
		g.Eventually(placementOfNS).WithArguments("ms-canary").Should(Equal("1-28-2 Sidecar"))
		g.Expect(placementOfNS("ms-a")).To(Equal("1-28-2 Ambient"), "only the canary moves in wave 1")
		m := getMesh()
		g.Expect(m.Status.Rollout).NotTo(BeNil())
		g.Expect(m.Status.Rollout.Engine).NotTo(BeNil(), "the engine's memory is recorded")
		g.Expect(m.Status.Rollout.Engine.NamespaceWaves).To(Equal([]meshv1.EngineWave{
			{Names: []string{"ms-canary"}}, {Names: []string{"ms-a", "ms-b"}}, {Names: []string{"ms-c"}}}), "the waves are frozen at the start")
		g.Expect(m.Status.Dataplane.Mode).To(Equal(meshv1.ModeAmbient), "status says what runs: Ambient until the switch ends")
		g.Eventually(restartedAt).WithArguments("ms-canary", "app").ShouldNot(BeEmpty())
		g.Expect(restartedAt("ms-a", "app")).To(BeEmpty(), "no restart ahead of the wave")
		g.Expect(releaseNames(g)).To(ContainElements("ztunnel", "node-agent"), "the node components stay while namespaces still use them")

		// Wave 2 moves, breaches (ms-a 0.8 and ms-b 1: 0.9 for the wave) and rolls back.
		g.Eventually(placementOfNS).WithArguments("ms-a").Should(Equal("1-28-2 Sidecar"))
		g.Eventually(lastHistory).WithTimeout(2 * time.Minute).Should(And(HaveField("Outcome", meshv1.OutcomeRolledBack), HaveField("Mode", meshv1.ModeSidecar)))
		h := lastHistory()
		g.Expect(h.Reason).To(And(ContainSubstring("l4-success 0.9"), ContainSubstring("wave 2/3")))
		for _, ns := range namespaces {
			g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Ambient"), "%s is back on Ambient", ns)
		}
		for _, ns := range []string{"ms-canary", "ms-a", "ms-b"} {
			g.Expect(restartedAt(ns, "app")).To(HavePrefix("rollback-"), "%s's workloads were restarted back to Ambient", ns)
		}
		g.Expect(restartedAt("ms-c", "app")).To(BeEmpty(), "ms-c never moved")
		m = getMesh()
		g.Expect(m.Status.Rollout).To(BeNil())
		g.Expect(m.Status.Dataplane.Mode).To(Equal(meshv1.ModeAmbient))
		g.Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)).To(And(
			HaveField("Status", metav1.ConditionFalse), HaveField("Reason", meshv1.ReasonRolledBack),
			HaveField("Message", ContainSubstring("set spec.dataplane.mode back to Ambient"))))
		g.Expect(releaseNames(g)).To(ContainElements("ztunnel", "node-agent"))
		g.Expect(eventReasons(g)).To(ContainElements("RolloutStarted", "WaveStarted", "WavePromoted", "WorkloadsRestarted", "RollingBack", "RolledBack"))
		g.Consistently(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(4*time.Second).
			Should(BeNil(), "the same switch is not retried while the spec stays the same")
	})

	t.Run("retried, the switch runs wave by wave to the end; a namespace selected meanwhile joins the last wave", func(t *testing.T) {
		g := NewWithT(t)
		workload.SetRatio("ms-a", 1)
		workload.SetRatio("ms-late", 1)
		time.Sleep(6 * time.Second) // let the 5s rate window forget the breach
		var waves [][]string
		record := func() {
			if ro := getMesh().Status.Rollout; ro != nil && len(ro.WaveNamespaces) > 0 {
				if len(waves) == 0 || !slices.Equal(waves[len(waves)-1], ro.WaveNamespaces) {
					waves = append(waves, slices.Clone(ro.WaveNamespaces))
				}
			}
		}
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Rollout.Namespaces.Bake = &metav1.Duration{Duration: 2 * time.Second} })
		g.Eventually(func() string { record(); return placementOfNS("ms-canary") }).WithPolling(100 * time.Millisecond).Should(Equal("1-28-2 Sidecar"))
		mkNS(g, "ms-late", map[string]string{"ms-mesh": "on"})
		mkDeployment(g, "ms-late", "app")
		g.Eventually(func() string {
			record()
			return lastHistory().Version + " " + string(lastHistory().Outcome)
		}).WithTimeout(3 * time.Minute).WithPolling(100 * time.Millisecond).Should(Equal("1.28.2 Succeeded"))
		g.Expect(waves).To(Equal([][]string{{"ms-canary"}, {"ms-a", "ms-b"}, {"ms-c", "ms-late"}}), "canary first, then 50%%, then the rest with the newcomer")
		g.Eventually(meshReady).ShouldNot(BeNil())
		m := getMesh()
		g.Expect(m.Status.Dataplane.Mode).To(Equal(meshv1.ModeSidecar))
		for _, ns := range append(namespaces, "ms-late") {
			g.Expect(placementOfNS(ns)).To(Equal("1-28-2 Sidecar"), ns)
			g.Expect(restartedAt(ns, "app")).NotTo(Or(BeEmpty(), HavePrefix("rollback-")), "%s's workloads restarted into Sidecar", ns)
		}
		g.Eventually(releaseNames).ShouldNot(ContainElements("ztunnel", "node-agent", "istio-cni"))
		g.Expect(m.Status.Plan).To(HaveEach(HaveField("State", meshv1.StepDone)))
	})
}

// judgedNamespaces creates namespaces labelled selector=on, each with a
// healthy SLO series served by a test workload (optionally a Deployment
// "app" the kwok nodes run), and a real Prometheus scraping it.
func judgedNamespaces(t *testing.T, g Gomega, selector string, withApp bool, names ...string) (*prom.Workload, *prom.Server) {
	t.Helper()
	workload := prom.NewWorkload(t)
	for _, ns := range names {
		mkNS(g, ns, map[string]string{selector: "on"})
		workload.SetRatio(ns, 1)
		if withApp {
			mkDeployment(g, ns, "app")
		}
	}
	srv, err := prom.Start(context.Background(), t, workload.Addr)
	g.Expect(err).NotTo(HaveOccurred())
	return workload, srv
}

// placementOfNS is "<revision> <mode>" as the labels meshkeeper owns put it.
func placementOfNS(ns string) string {
	obj := &corev1.Namespace{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: ns}, obj); err != nil {
		return err.Error()
	}
	return placementOf(obj).String()
}

// restartedAt is the restart token on a Deployment's pod template.
func restartedAt(ns, name string) string {
	d := &appsv1.Deployment{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, d); err != nil {
		return err.Error()
	}
	return d.Spec.Template.Annotations[restart.Annotation]
}

// mkDeployment makes a one-replica Deployment the kwok nodes run.
func mkDeployment(g Gomega, ns, name string) {
	labels := map[string]string{"app": name}
	g.Expect(k8s.Create(context.Background(), &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: name, Image: "example.org/" + name + ":1"}}},
			},
		},
	})).To(Succeed())
}
