package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// The manager binary is killed (SIGKILL, as a crash or an evicted pod would
// be) in the middle of the canary node wave, of the canary namespace wave
// and of a rollback, judged by a real Prometheus scraping a workload whose
// success ratio per namespace the spec sets. Everything a rollout knows
// lives in status.rollout, so the restarted manager must carry on where it
// was: the same wave, every node and namespace moved exactly once, the
// rollback finished and not retried.
var _ = Describe("Rollouts when the operator is killed mid-way", Ordered, func() {
	const selector = "rollout-e2e"
	namespaces := []string{"rk-canary", "rk-a", "rk-b", "rk-c", "rk-d"}
	var (
		workload *prom.Workload
		srv      *prom.Server
		meshes   *recorder[meshv1.Mesh]
		revs     *recorder[corev1.Namespace]
		// stopRecording ends the watches behind meshes and revs.
		stopRecording context.CancelFunc = func() {}
	)

	getMesh := func(ctx context.Context) *meshv1.Mesh {
		m := &meshv1.Mesh{}
		if err := kc.Client.Get(ctx, client.ObjectKey{Name: "default"}, m); err != nil {
			return nil
		}
		return m
	}
	rollout := func(ctx context.Context) *meshv1.RolloutStatus {
		if m := getMesh(ctx); m != nil {
			return m.Status.Rollout
		}
		return nil
	}
	lastHistory := func(ctx context.Context) string {
		m := getMesh(ctx)
		if m == nil || len(m.Status.History) == 0 {
			return ""
		}
		e := m.Status.History[len(m.Status.History)-1]
		return e.Version + " " + string(e.Outcome)
	}
	revisionOf := func(ctx context.Context, ns string) string {
		return kubectl(ctx, "get", "ns", ns, "-o", `jsonpath={.metadata.labels.istio\.io/rev}`)
	}
	revisions := func(ctx context.Context) map[string]string {
		out := map[string]string{}
		for _, ns := range namespaces {
			out[ns] = revisionOf(ctx, ns)
		}
		return out
	}
	allOn := func(rev string) map[string]string {
		out := map[string]string{}
		for _, ns := range namespaces {
			out[ns] = rev
		}
		return out
	}
	// restart kills the manager at once and starts it again.
	restart := func(ctx context.Context) time.Duration {
		GinkgoHelper()
		began := time.Now()
		manager.Kill()
		Expect(manager.Start(ctx)).To(Succeed())
		return time.Since(began)
	}

	BeforeAll(func(ctx SpecContext) {
		t := GinkgoTB()
		prom.SkipIfUnavailable(t)
		workload = prom.NewWorkload(t)
		for _, ns := range namespaces {
			kubectl(ctx, "create", "ns", ns)
			kubectl(ctx, "label", "ns", ns, selector+"=on")
			workload.SetRatio(ns, 1)
		}
		var err error
		srv, err = prom.Start(ctx, t, workload.Addr)
		Expect(err).NotTo(HaveOccurred())
		_, err = srv.WaitForScrapes(ctx, 30*time.Second)
		Expect(err).NotTo(HaveOccurred())
	})

	It("installs 1.26 and becomes Ready", func(ctx SpecContext) {
		applyYAML(ctx, fmt.Sprintf(`apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  version: "1.26"
  namespaces: {selector: {matchLabels: {%s: "on"}}}
  rollout:
    nodes: {canary: {matchLabels: {pool: canary}}, maxUnavailable: 1, bake: 10s}
    namespaces: {canary: [rk-canary], waves: ["50%%", "100%%"], bake: 10s}
    retireAfter: 2s
  analysis:
    prometheus: {address: %q}
    interval: 5s
    failureLimit: 0
    slos:
    # min 0.95: a canary namespace at 0.9 fails its own wave, while the node
    # waves, judged over every namespace (0.98), pass.
    - name: l4-success
      query: 'sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result="ok"}[5s])) / sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[5s]))'
      min: "0.95"
`, selector, srv.URL))
		kubectl(ctx, "wait", "--for=condition=Ready", "mesh/default", "--timeout=180s")
		Expect(getMesh(ctx).Status.Version.Installed).To(Equal("1.26.4"))
		Expect(revisions(ctx)).To(Equal(allOn("1-26-4")))

		// From here on, every version of the Mesh and of the namespaces
		// the API server sends is kept, so that a wave started twice or a
		// namespace that flips back and forth cannot go unnoticed.
		var wctx context.Context
		wctx, stopRecording = context.WithCancel(context.Background())
		meshes = record[meshv1.Mesh](wctx, &meshv1.MeshList{}, &client.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("metadata.name", "default")})
		revs = record[corev1.Namespace](wctx, &corev1.NamespaceList{}, &client.ListOptions{
			LabelSelector: labels.SelectorFromSet(labels.Set{selector: "on"})})
	})

	It("resumes the wave it was in after a kill, and moves every node and namespace exactly once", func(ctx SpecContext) {
		kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", `{"spec":{"version":"1.27"}}`)

		// Killed while the canary node bakes.
		Eventually(rollout).WithContext(ctx).WithTimeout(120*time.Second).WithPolling(50*time.Millisecond).Should(And(Not(BeNil()),
			HaveField("Step", meshv1.RolloutStepNodes), HaveField("Wave", BeEquivalentTo(1))), "the canary node wave starts")
		nodeWave := rollout(ctx)
		Expect(nodeWave.WaveNodes).To(Equal([]string{"node-a"}))
		Eventually(func() string { return ztunnelRevisionOn(ctx, "node-a") }).WithTimeout(30 * time.Second).Should(Equal("1-27-3"))
		Expect(ztunnelRevisionOn(ctx, "node-b")).To(Equal("1-26-4"), "only the canary node moves in node wave 1")
		Expect(revisions(ctx)).To(Equal(allOn("1-26-4")), "namespaces move after the nodes")
		took := restart(ctx)
		GinkgoWriter.Printf("manager killed in node wave 1 (started %s), running again after %s\n",
			nodeWave.WaveStartedAt.Format(time.RFC3339), took.Round(time.Millisecond))
		if after := rollout(ctx); after != nil && after.Step == meshv1.RolloutStepNodes && after.Wave == 1 {
			Expect(after.WaveStartedAt.Equal(nodeWave.WaveStartedAt)).To(BeTrue(), "node wave 1 keeps baking from when it moved")
		}

		// Killed while the canary namespace bakes.
		Eventually(rollout).WithContext(ctx).WithTimeout(120*time.Second).WithPolling(50*time.Millisecond).Should(And(Not(BeNil()),
			HaveField("Step", meshv1.RolloutStepNamespaces), HaveField("Wave", BeEquivalentTo(1))), "the canary wave starts")
		for _, n := range []string{"node-a", "node-b", "node-c"} {
			Expect(ztunnelRevisionOn(ctx, n)).To(Equal("1-27-3"), "every node moved before the namespaces")
		}
		Eventually(revisionOf).WithContext(ctx).WithArguments("rk-canary").Should(Equal("1-27-3"))
		before := rollout(ctx)
		Expect(before.WaveNamespaces).To(Equal([]string{"rk-canary"}))
		Expect(revisionOf(ctx, "rk-canary")).To(Equal("1-27-3"))
		Expect(revisionOf(ctx, "rk-a")).To(Equal("1-26-4"), "only the canary moves in wave 1")

		took = restart(ctx)
		GinkgoWriter.Printf("manager killed in wave 1 (started %s), running again after %s\n",
			before.WaveStartedAt.Format(time.RFC3339), took.Round(time.Millisecond))
		after := rollout(ctx)
		Expect(after).NotTo(BeNil(), "the rollout is still under way after the restart")
		Expect(after.StartedAt.Equal(before.StartedAt)).To(BeTrue(), "the same rollout, not a new one")
		if after.Wave == 1 {
			Expect(after.WaveStartedAt.Equal(before.WaveStartedAt)).To(BeTrue(), "wave 1 keeps baking from when it moved")
		}

		Eventually(lastHistory).WithContext(ctx).WithTimeout(180 * time.Second).Should(Equal("1.27.3 Succeeded"))
		m := getMesh(ctx)
		Expect(m.Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.27.3", Target: "1.27.3"}))
		Expect(outcomesOf(m, "1.27.3")).To(Equal([]string{"Succeeded"}), "one rollout, recorded once")
		Expect(revisions(ctx)).To(Equal(allOn("1-27-3")))

		// The waves, in order; wave 1 resumed, not restarted. (That no wave
		// started twice is checked last, so that a failure there does not
		// hide how the rollback below goes.)
		nodeStarts := waveStartsIn(meshes.all(), "1.27.3", meshv1.RolloutStepNodes)
		Expect(slices.Compact(waveNames(nodeStarts))).To(Equal([]string{"1: node-a", "2: node-b", "3: node-c"}),
			"the canary node first, then one node at a time")
		for _, w := range nodeStarts {
			if w.wave == 1 {
				Expect(w.at).To(BeTemporally("==", nodeWave.WaveStartedAt.Time), "node wave 1 resumed where it was: it started once, before the kill")
			}
		}
		starts := waveStarts(meshes.all(), "1.27.3")
		Expect(slices.Compact(waveNames(starts))).To(Equal([]string{"1: rk-canary", "2: rk-a,rk-b", "3: rk-c,rk-d"}),
			"canary first, then 50%%, then the rest")
		for _, w := range starts {
			if w.wave == 1 {
				Expect(w.at).To(BeTemporally("==", before.WaveStartedAt.Time), "wave 1 resumed where it was: it started once, before the kill")
			}
		}
		for _, ns := range namespaces {
			Expect(revisionHistory(revs.all(), ns)).To(Equal([]string{"1-26-4", "1-27-3"}),
				"%s moved to 1-27-3 exactly once and never back", ns)
		}
		Eventually(func() string {
			return kubectl(ctx, "get", "secrets", "-n", "meshkeeper-system", "-l", "owner=helm,name=istiod-1-26-4", "-o", "name")
		}).WithTimeout(30*time.Second).Should(BeEmpty(), "the old revision is retired")
	})

	It("finishes a rollback after a kill while rolling back, and does not retry the target", func(ctx SpecContext) {
		workload.SetRatio("rk-canary", 0.9)
		kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", `{"spec":{"version":"1.28"}}`)
		rollingBack := func() bool {
			return slices.ContainsFunc(meshes.all(), func(m meshv1.Mesh) bool {
				ro := m.Status.Rollout
				return ro != nil && ro.To == "1.28.2" && ro.Step == meshv1.RolloutStepRollingBack
			})
		}
		Eventually(rollingBack).WithContext(ctx).WithTimeout(120*time.Second).WithPolling(5*time.Millisecond).
			Should(BeTrue(), "the SLO breach in the canary wave starts a rollback")
		manager.Kill()
		killed := getMesh(ctx) // what the manager left behind
		Expect(manager.Start(ctx)).To(Succeed())
		Expect(killed.Status.Rollout).NotTo(BeNil(), "the manager was killed before the rollback finished")
		Expect(killed.Status.Rollout.Step).To(Equal(meshv1.RolloutStepRollingBack))
		GinkgoWriter.Printf("manager killed while rolling back (%s); components then: %s\n", killed.Status.Rollout.Message, componentVersions(killed))

		Eventually(lastHistory).WithContext(ctx).WithTimeout(120 * time.Second).Should(Equal("1.28.2 RolledBack"))
		Eventually(rollout).WithContext(ctx).WithTimeout(30 * time.Second).Should(BeNil())
		m := getMesh(ctx)
		Expect(m.Status.Version.Installed).To(Equal("1.27.3"))
		Expect(outcomesOf(m, "1.28.2")).To(Equal([]string{"RolledBack"}), "one rollback, recorded once")
		Expect(m.Status.History[len(m.Status.History)-1].Reason).To(And(ContainSubstring("l4-success 0."), ContainSubstring("< 0.95"), ContainSubstring(" in wave 1")))
		Expect(meta.IsStatusConditionTrue(m.Status.Conditions, meshv1.ConditionRolledBack)).To(BeTrue())
		Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)).To(HaveField("Reason", meshv1.ReasonRolledBack))
		Expect(revisions(ctx)).To(Equal(allOn("1-27-3")))
		Eventually(func() []string {
			return []string{ztunnelRevisionOn(ctx, "node-a"), ztunnelRevisionOn(ctx, "node-b"), ztunnelRevisionOn(ctx, "node-c")}
		}).WithTimeout(60*time.Second).Should(Equal([]string{"1-27-3", "1-27-3", "1-27-3"}), "every node is back on 1.27")
		for _, c := range m.Status.Components {
			Expect(c.Version).To(Equal("1.27.3"), "component %s is back on the old bundle", c.Name)
		}
		Eventually(func() string {
			return kubectl(ctx, "get", "secrets", "-n", "meshkeeper-system", "-l", "owner=helm,name=istiod-1-28-2", "-o", "name")
		}).WithTimeout(30*time.Second).Should(BeEmpty(), "no Helm release istiod-1-28-2 is left")
		Eventually(func() string {
			return kubectl(ctx, "get", "deploy", "-n", "istio-system", "--ignore-not-found", "-o", "name", "istiod-1-28-2")
		}).WithTimeout(30*time.Second).Should(BeEmpty(), "the new revision's istiod is gone")

		Expect(revisionHistory(revs.all(), "rk-canary")).To(Equal([]string{"1-26-4", "1-27-3", "1-28-2", "1-27-3"}),
			"the canary went to 1-28-2 and back, once")
		for _, ns := range namespaces[1:] {
			Expect(revisionHistory(revs.all(), ns)).To(Equal([]string{"1-26-4", "1-27-3"}), "%s never left 1-27-3", ns)
		}
		Consistently(rollout).WithContext(ctx).WithTimeout(8*time.Second).Should(BeNil(),
			"the restarted manager does not roll 1.28.2 out again while the spec stays the same")
	})

	It("starts every wave once: the status it acts on is never stale", func() {
		// A wave that starts twice re-runs the previous wave's analysis,
		// restarts its own bake and says "WaveStarted" twice: a reconcile
		// decided from a Mesh older than the last one written.
		Expect(waveNames(waveStartsIn(meshes.all(), "1.27.3", meshv1.RolloutStepNodes))).To(Equal([]string{"1: node-a", "2: node-b", "3: node-c"}),
			"each node wave of 1.27.3 started exactly once: %v", waveStartsIn(meshes.all(), "1.27.3", meshv1.RolloutStepNodes))
		Expect(waveNames(waveStarts(meshes.all(), "1.27.3"))).To(Equal([]string{"1: rk-canary", "2: rk-a,rk-b", "3: rk-c,rk-d"}),
			"each wave of 1.27.3 started exactly once (one waveStartedAt per wave): %v", waveStarts(meshes.all(), "1.27.3"))
		Expect(waveNames(waveStarts(meshes.all(), "1.28.2"))).To(Equal([]string{"1: rk-canary"}), "1.28.2's canary wave started once")
	})

	AfterAll(func(ctx SpecContext) {
		stopRecording()
		if CurrentSpecReport().Failed() {
			GinkgoWriter.Printf("manager log tail:\n%s\n", manager.LogTail(80))
			if m := getMesh(ctx); m != nil {
				out, _ := yaml.Marshal(m.Status)
				GinkgoWriter.Printf("mesh/default status:\n%s\n", out)
			}
		}
		_, _, _ = kc.Kubectl(ctx, "delete", "mesh", "default", "--wait", "--timeout=180s", "--ignore-not-found")
		for _, ns := range namespaces {
			_, _, _ = kc.Kubectl(ctx, "label", "ns", ns, selector+"-")
		}
	})
})

// outcomesOf lists the outcomes status.history records for version.
func outcomesOf(m *meshv1.Mesh, version string) []string {
	var out []string
	for _, e := range m.Status.History {
		if e.Version == version {
			out = append(out, string(e.Outcome))
		}
	}
	return out
}

func componentVersions(m *meshv1.Mesh) string {
	var parts []string
	for _, c := range m.Status.Components {
		parts = append(parts, fmt.Sprintf("%s=%s(ready=%t)", c.Name, c.Version, c.Ready))
	}
	return strings.Join(parts, " ")
}

// waveStart is one start of a wave as the Mesh's status showed it.
type waveStart struct {
	wave       int32
	namespaces string
	at         time.Time
}

func (w waveStart) String() string {
	return fmt.Sprintf("%d: %s @%s", w.wave, w.namespaces, w.at.Format(time.RFC3339))
}

// waveStarts lists every distinct start (wave, waveStartedAt) of the
// namespace waves of the rollout to version that the Mesh's status showed,
// in order: a wave that started twice shows twice.
func waveStarts(seen []meshv1.Mesh, version string) []waveStart {
	return waveStartsIn(seen, version, meshv1.RolloutStepNamespaces)
}

// waveStartsIn is waveStarts for the waves of a step (Nodes or Namespaces).
func waveStartsIn(seen []meshv1.Mesh, version, step string) []waveStart {
	var out []waveStart
	for _, m := range seen {
		ro := m.Status.Rollout
		if ro == nil || ro.To != version || ro.Step != step || ro.Wave == 0 || ro.WaveStartedAt == nil {
			continue
		}
		members := ro.WaveNamespaces
		if step == meshv1.RolloutStepNodes {
			members = ro.WaveNodes
		}
		w := waveStart{wave: ro.Wave, namespaces: strings.Join(members, ","), at: ro.WaveStartedAt.Time}
		if len(out) == 0 || out[len(out)-1] != w {
			out = append(out, w)
		}
	}
	return out
}

// waveNames renders wave starts as "<wave>: <namespaces>".
func waveNames(starts []waveStart) []string {
	out := make([]string, 0, len(starts))
	for _, w := range starts {
		out = append(out, fmt.Sprintf("%d: %s", w.wave, w.namespaces))
	}
	return out
}

// revisionHistory is the sequence of istio.io/rev values a namespace had,
// consecutive repeats collapsed.
func revisionHistory(seen []corev1.Namespace, name string) []string {
	var out []string
	for _, ns := range seen {
		if ns.Name != name {
			continue
		}
		if rev := ns.Labels[meshv1.LabelRevision]; len(out) == 0 || out[len(out)-1] != rev {
			out = append(out, rev)
		}
	}
	return out
}

// recorder keeps every version of the objects a watch delivers, oldest first.
type recorder[T any] struct {
	mu   sync.Mutex
	seen []T
}

func (r *recorder[T]) all() []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen)
}

// record watches the objects of list's kind that opts select, from their
// current state on, until ctx ends; it watches again after a disconnect.
func record[T any, PT interface {
	*T
	client.Object
}](ctx context.Context, list client.ObjectList, opts *client.ListOptions) *recorder[T] {
	GinkgoHelper()
	wc, err := client.NewWithWatch(kc.Config, client.Options{Scheme: kc.Scheme})
	Expect(err).NotTo(HaveOccurred())
	r := &recorder[T]{}
	first, err := wc.Watch(ctx, list, opts)
	Expect(err).NotTo(HaveOccurred())
	go func() {
		defer GinkgoRecover()
		w, rv := first, ""
		for {
			for ev := range w.ResultChan() {
				if ev.Type == watch.Error {
					rv = "" // too old: start over from the current state
					break
				}
				obj, ok := ev.Object.(PT)
				if !ok {
					continue
				}
				rv = obj.GetResourceVersion()
				if ev.Type == watch.Added || ev.Type == watch.Modified {
					r.mu.Lock()
					r.seen = append(r.seen, *obj)
					r.mu.Unlock()
				}
			}
			w.Stop()
			for {
				if ctx.Err() != nil {
					return
				}
				o := *opts
				o.Raw = &metav1.ListOptions{ResourceVersion: rv}
				if w, err = wc.Watch(ctx, list, &o); err == nil {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}()
	return r
}

// ztunnelRevisionOn is the bundle revision (meshkeeper.dev/revision) of the
// ztunnel pod on a node that is not being deleted; "" when there is none.
func ztunnelRevisionOn(ctx context.Context, node string) string {
	GinkgoHelper()
	var pods corev1.PodList
	Expect(kc.Client.List(ctx, &pods, client.InNamespace("istio-system"),
		client.MatchingLabels{meshv1.LabelComponent: "ztunnel"},
		client.MatchingFieldsSelector{Selector: fields.OneTermEqualSelector("spec.nodeName", node)})).To(Succeed())
	var revs []string
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			revs = append(revs, p.Labels[meshv1.LabelControlPlaneRevision])
		}
	}
	return strings.Join(revs, ",")
}
