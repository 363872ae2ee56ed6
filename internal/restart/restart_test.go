package restart

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// The tests run on a real cluster: kube-apiserver and etcd, with
// kube-controller-manager (the Deployment, ReplicaSet, StatefulSet,
// DaemonSet and disruption controllers), kube-scheduler and three kwok
// nodes, which make the pods they are given Running and Ready.
var kc *cluster.Cluster

func TestMain(m *testing.M) {
	if _, err := cluster.Available(); err != nil {
		fmt.Println(err)
		os.Exit(cluster.ExitCodeUnavailable())
	}
	SetDefaultEventuallyTimeout(2 * time.Minute)
	SetDefaultEventuallyPollingInterval(200 * time.Millisecond)
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx := context.Background()
	var err error
	kc, err = cluster.Start(ctx, cluster.Options{Nodes: []cluster.Node{
		{Name: "restart-a", KernelVersion: "6.1.0-28-amd64"},
		{Name: "restart-b", KernelVersion: "6.1.0-28-amd64"},
		{Name: "restart-c", KernelVersion: "6.1.0-28-amd64"},
	}, Volumes: -1})
	if err != nil {
		fmt.Println("start cluster:", err)
		return 1
	}
	defer func() { _ = kc.Stop() }()
	return m.Run()
}

// writes counts the write requests made through a client (n) and those
// the API server accepted (ok): Restart's only way to change the cluster.
type writes struct{ n, ok atomic.Int64 }

func (w *writes) count(err error) error {
	w.n.Add(1)
	if err == nil {
		w.ok.Add(1)
	}
	return err
}

func (w *writes) client(t *testing.T) client.Client {
	t.Helper()
	ww, err := client.NewWithWatch(kc.Config, client.Options{Scheme: kc.Scheme})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return interceptor.NewClient(ww, interceptor.Funcs{
		Apply: func(ctx context.Context, c client.WithWatch, obj runtime.ApplyConfiguration, opts ...client.ApplyOption) error {
			return w.count(c.Apply(ctx, obj, opts...))
		},
		Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, p client.Patch, opts ...client.PatchOption) error {
			return w.count(c.Patch(ctx, obj, p, opts...))
		},
		Update: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
			return w.count(c.Update(ctx, obj, opts...))
		},
		Create: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			return w.count(c.Create(ctx, obj, opts...))
		},
		Delete: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.DeleteOption) error {
			return w.count(c.Delete(ctx, obj, opts...))
		},
	})
}

func namespace(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	if err := kc.CreateNamespace(ctx, name, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = kc.Client.Delete(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
	})
}

func podTemplate(app string) corev1.PodTemplateSpec {
	return corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "shop/" + app + ":1.0"}}},
	}
}

func deployment(ns, name string, n int32) *appsv1.Deployment {
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: appsv1.DeploymentSpec{Replicas: ptr.To(n), Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": name}},
			Template: podTemplate(name)},
	}
}

func statefulSet(ns, name string, n int32) *appsv1.StatefulSet {
	return &appsv1.StatefulSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: appsv1.StatefulSetSpec{Replicas: ptr.To(n), ServiceName: name, Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": name}},
			Template: podTemplate(name)},
	}
}

func daemonSet(ns, name string) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": name}}, Template: podTemplate(name)},
	}
}

// settled waits until every workload of ns is rolled out (before any restart).
func settled(g Gomega, ctx context.Context, ns string) {
	g.Eventually(func(g Gomega) {
		ws, _, err := survey(ctx, kc.Client, ns)
		g.Expect(err).NotTo(HaveOccurred())
		for _, w := range ws {
			ok, why := w.rolledOut()
			g.Expect(ok).To(BeTrue(), w.id()+" "+why)
		}
	}).Should(Succeed())
}

// drive calls Restart and then Observe, as the controller does each
// reconcile, until Observe says ns rolled out at token. each, if set, sees
// every Restart result.
func drive(g Gomega, ctx context.Context, c client.Client, ns, token string, budget int, each func(Result)) {
	g.Eventually(func(g Gomega) {
		res, err := Restart(ctx, c, ns, token, budget)
		g.Expect(err).NotTo(HaveOccurred())
		if each != nil {
			each(res)
		}
		ok, waiting, err := Observe(ctx, c, ns, token)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(ok).To(BeTrue(), "waiting: "+waiting)
		g.Expect(waiting).To(BeEmpty())
	}).Should(Succeed())
}

// podsOf lists the pods of app in ns: uid -> the token on the pod.
func podsOf(g Gomega, ctx context.Context, ns, app string) map[string]string {
	var pods corev1.PodList
	g.Expect(kc.Client.List(ctx, &pods, client.InNamespace(ns), client.MatchingLabels{"app": app})).To(Succeed())
	out := map[string]string{}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			out[string(p.UID)] = p.Annotations[Annotation]
		}
	}
	return out
}

// inFlight counts the workloads of ns stamped with token and not rolled out.
func inFlight(g Gomega, ctx context.Context, ns, token string) int {
	ws, _, err := survey(ctx, kc.Client, ns)
	g.Expect(err).NotTo(HaveOccurred())
	n := 0
	for _, w := range ws {
		if ok, _ := w.rolledOut(); w.stamp() == token && !ok {
			n++
		}
	}
	return n
}

// TestRestartEveryKind: a Deployment, a StatefulSet and a DaemonSet are
// restarted and roll out to the token (every pod replaced, each new pod
// carrying it); an ignored and a paused Deployment are skipped and said to
// be; a second call with the same token writes nothing.
func TestRestartEveryKind(t *testing.T) {
	cluster.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	const ns, token = "restart-kinds", "2026-12-02T07:00:00Z"
	namespace(t, ctx, ns)
	legacy := deployment(ns, "legacy", 1)
	legacy.Annotations = map[string]string{AnnotationIgnore: "true"}
	frozen := deployment(ns, "frozen", 1)
	for _, o := range []client.Object{deployment(ns, "cart", 3), statefulSet(ns, "db", 2), daemonSet(ns, "node-log"), legacy, frozen} {
		g.Expect(kc.Client.Create(ctx, o)).To(Succeed())
	}
	settled(g, ctx, ns)
	// Paused once rolled out, as a user holding it would.
	g.Expect(kc.Client.Patch(ctx, frozen, client.RawPatch("application/merge-patch+json", []byte(`{"spec":{"paused":true}}`)))).To(Succeed())
	before := map[string]map[string]string{}
	for _, app := range []string{"cart", "db", "node-log", "legacy", "frozen"} {
		before[app] = podsOf(g, ctx, ns, app)
	}
	g.Expect(before["cart"]).To(HaveLen(3))
	g.Expect(before["db"]).To(HaveLen(2))
	g.Expect(before["node-log"]).To(HaveLen(3), "one pod per kwok node")

	ok, waiting, err := Observe(ctx, kc.Client, ns, token)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(ok).To(BeFalse())
	g.Expect(waiting).To(Equal("deployment/cart not restarted yet, statefulset/db not restarted yet, daemonset/node-log not restarted yet"))

	var w writes
	c := w.client(t)
	res, err := Restart(ctx, c, ns, token, 3)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(Equal([]string{"deployment/cart", "statefulset/db", "daemonset/node-log"}))
	g.Expect(res.Waiting).To(BeEmpty())
	g.Expect(res.Skipped).To(ConsistOf(
		Item{"deployment/frozen", "skipped: paused (resume it with kubectl rollout resume to have it restarted)"},
		Item{"deployment/legacy", `skipped: annotated meshkeeper.dev/ignore: "true"`}))
	// One accepted write per restarted workload (a status update racing a
	// stamp makes the server refuse it, and Restart reads and tries again).
	g.Expect(w.ok.Load()).To(BeEquivalentTo(3), "one write per restarted workload")

	drive(g, ctx, c, ns, token, 3, nil)
	for _, app := range []string{"cart", "db", "node-log"} {
		now := podsOf(g, ctx, ns, app)
		g.Expect(now).To(HaveLen(len(before[app])), app)
		for uid, tok := range now {
			g.Expect(before[app]).NotTo(HaveKey(uid), app+": every pod replaced")
			g.Expect(tok).To(Equal(token), app+": the new pods carry the token")
		}
	}
	for _, app := range []string{"legacy", "frozen"} {
		g.Expect(podsOf(g, ctx, ns, app)).To(Equal(before[app]), app+" left alone")
	}

	// Same token again: every workload is at it, nothing is written.
	versions := func() map[string]string {
		ws, _, err := survey(ctx, kc.Client, ns)
		g.Expect(err).NotTo(HaveOccurred())
		out := map[string]string{}
		for _, w := range ws {
			out[w.id()] = w.obj.GetResourceVersion()
		}
		return out
	}
	rvs := versions()
	n := w.n.Load()
	res, err = Restart(ctx, c, ns, token, 3)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(BeEmpty())
	g.Expect(res.AtToken).To(Equal([]string{"deployment/cart", "statefulset/db", "daemonset/node-log"}))
	g.Expect(w.n.Load()).To(Equal(n), "no write request")
	g.Expect(versions()).To(Equal(rvs), "no object changed")
}

// TestRestartHeldByPodDisruptionBudget: a workload whose pods a PDB
// allowing 0 disruptions covers is not restarted, and both Restart and
// Observe say why; once the PDB allows a disruption it restarts.
func TestRestartHeldByPodDisruptionBudget(t *testing.T) {
	cluster.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	const ns, token = "restart-pdb", "2026-12-02T07:10:00Z"
	namespace(t, ctx, ns)
	pdb := &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "cart-pdb"},
		Spec: policyv1.PodDisruptionBudgetSpec{MinAvailable: ptr.To(intstr.FromInt32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "cart"}}},
	}
	for _, o := range []client.Object{deployment(ns, "cart", 2), deployment(ns, "web", 2), pdb} {
		g.Expect(kc.Client.Create(ctx, o)).To(Succeed())
	}
	settled(g, ctx, ns)
	g.Eventually(func(g Gomega) {
		g.Expect(kc.Client.Get(ctx, client.ObjectKeyFromObject(pdb), pdb)).To(Succeed())
		g.Expect(pdb.Status.ObservedGeneration).To(Equal(pdb.Generation))
		g.Expect(pdb.Status.CurrentHealthy).To(BeEquivalentTo(2))
	}).Should(Succeed())
	g.Expect(pdb.Status.DisruptionsAllowed).To(BeEquivalentTo(0))
	cartPods := podsOf(g, ctx, ns, "cart")

	const held = "deployment/cart not restarted: PodDisruptionBudget cart-pdb allows 0 disruptions"
	res, err := Restart(ctx, kc.Client, ns, token, 2)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(Equal([]string{"deployment/web"}))
	g.Expect(res.Message()).To(Equal(held))
	// web rolls out; cart stays held however often Restart is called.
	g.Eventually(func(g Gomega) {
		res, err := Restart(ctx, kc.Client, ns, token, 2)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(res.Restarted).To(BeEmpty())
		g.Expect(res.Message()).To(Equal(held))
		ok, waiting, err := Observe(ctx, kc.Client, ns, token)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(ok).To(BeFalse())
		g.Expect(waiting).To(Equal(held))
	}).Should(Succeed())
	var cart appsv1.Deployment
	g.Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: "cart"}, &cart)).To(Succeed())
	g.Expect(cart.Spec.Template.Annotations).NotTo(HaveKey(Annotation))
	g.Expect(podsOf(g, ctx, ns, "cart")).To(Equal(cartPods), "no pod of cart replaced")

	// The owner of the PDB allows one disruption: cart restarts.
	g.Expect(kc.Client.Patch(ctx, pdb, client.RawPatch("application/merge-patch+json", []byte(`{"spec":{"minAvailable":1}}`)))).To(Succeed())
	drive(g, ctx, kc.Client, ns, token, 2, nil)
	for uid, tok := range podsOf(g, ctx, ns, "cart") {
		g.Expect(cartPods).NotTo(HaveKey(uid))
		g.Expect(tok).To(Equal(token))
	}
}

// TestRestartBudget: with a budget of 2, no more than two workloads of the
// namespace are ever restarting at once, the rest wait for a slot and say
// so, and all of them end at the token.
func TestRestartBudget(t *testing.T) {
	cluster.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	const ns, token, budget = "restart-budget", "2026-12-02T07:20:00Z", 2
	namespace(t, ctx, ns)
	names := []string{"a", "b", "c", "d", "e"}
	for _, n := range names {
		g.Expect(kc.Client.Create(ctx, deployment(ns, n, 2))).To(Succeed())
	}
	settled(g, ctx, ns)

	res, err := Restart(ctx, kc.Client, ns, token, budget)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(Equal([]string{"deployment/a", "deployment/b"}))
	slot := "not restarted: waiting for a restart slot (2 at a time)"
	g.Expect(res.Waiting).To(Equal([]Item{{"deployment/c", slot}, {"deployment/d", slot}, {"deployment/e", slot}}))
	g.Expect(res.Message()).To(Equal("deployment/c " + slot + ", deployment/d " + slot + ", deployment/e " + slot))

	maxInFlight, calls := inFlight(g, ctx, ns, token), 1
	order := slices.Clone(res.Restarted)
	drive(g, ctx, kc.Client, ns, token, budget, func(r Result) {
		calls++
		order = append(order, r.Restarted...)
		maxInFlight = max(maxInFlight, inFlight(g, ctx, ns, token))
	})
	g.Expect(maxInFlight).To(BeNumerically("<=", budget))
	g.Expect(order).To(Equal([]string{"deployment/a", "deployment/b", "deployment/c", "deployment/d", "deployment/e"}))
	t.Logf("5 deployments of 2 replicas restarted 2 at a time in %d Restart calls", calls)
}

// TestRestartKeepsGitOpsFields: workloads applied by Argo CD's appliers,
// server-side (field manager argocd-controller) and client-side (kubectl
// apply), keep every field of theirs through a restart; re-applying the
// unchanged manifests neither conflicts nor removes the stamp (no second
// restart, no diff), and a changed manifest applies cleanly on top, the
// stamp staying. meshkeeper's field manager owns the one annotation only.
func TestRestartKeepsGitOpsFields(t *testing.T) {
	cluster.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	const ns, token = "restart-gitops", "2026-12-02T07:30:00Z"
	namespace(t, ctx, ns)
	dir := t.TempDir()
	manifest := func(name, image, team, owner string) string {
		p := filepath.Join(dir, name+".yaml")
		ann := ""
		if team != "" {
			ann += "\n        team: " + team
		}
		if owner != "" {
			ann += "\n        owner: " + owner
		}
		if ann != "" {
			ann = "\n      annotations:" + ann
		}
		y := fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: %[1]s
  namespace: %[2]s
  labels: {app.kubernetes.io/instance: shop}
  annotations: {argocd.argoproj.io/tracking-id: "shop:apps/Deployment:%[2]s/%[1]s"}
spec:
  replicas: 2
  revisionHistoryLimit: 3
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata:
      labels: {app: %[1]s}%[4]s
    spec:
      containers:
      - name: app
        image: %[3]s
        env: [{name: MODE, value: shop}]
        resources: {requests: {cpu: 10m}}
`, name, ns, image, ann)
		g.Expect(os.WriteFile(p, []byte(y), 0o644)).To(Succeed())
		return p
	}
	ssa := func(p string) []string {
		return []string{"apply", "--server-side", "--field-manager=argocd-controller", "-f", p}
	}
	csa := func(p string) []string { return []string{"apply", "-f", p} }
	kubectl := func(args ...string) {
		out, errOut, err := kc.Kubectl(ctx, args...)
		g.Expect(err).NotTo(HaveOccurred(), out+errOut)
	}
	apps := map[string]func(string) []string{"cart": ssa, "web": csa}
	for name, apply := range apps {
		kubectl(apply(manifest(name, "shop/"+name+":1.0", "shop", ""))...)
	}
	settled(g, ctx, ns)
	get := func(name string) *appsv1.Deployment {
		var d appsv1.Deployment
		g.Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &d)).To(Succeed())
		return &d
	}
	beforeSpec := map[string]appsv1.DeploymentSpec{}
	beforeMeta := map[string]metav1.ObjectMeta{}
	for name := range apps {
		d := get(name)
		beforeSpec[name], beforeMeta[name] = d.Spec, d.ObjectMeta
	}

	res, err := Restart(ctx, kc.Client, ns, token, 2)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(ConsistOf("deployment/cart", "deployment/web"))
	drive(g, ctx, kc.Client, ns, token, 2, nil)

	for name, apply := range apps {
		d := get(name)
		// Every field of the user's is as it was; only the stamp is added.
		spec := beforeSpec[name]
		want := *spec.DeepCopy()
		want.Template.Annotations[Annotation] = token
		g.Expect(d.Spec).To(Equal(want), name)
		g.Expect(d.Labels).To(Equal(beforeMeta[name].Labels), name)
		// The Deployment controller counts the revision up; every other
		// annotation (Argo CD's tracking id, kubectl's last-applied) is kept.
		ann, was := maps.Clone(d.Annotations), maps.Clone(beforeMeta[name].Annotations)
		g.Expect(ann).To(HaveKeyWithValue("deployment.kubernetes.io/revision", "2"))
		delete(ann, "deployment.kubernetes.io/revision")
		delete(was, "deployment.kubernetes.io/revision")
		g.Expect(ann).To(Equal(was), name)
		// meshkeeper's field manager holds that one annotation and nothing else.
		var mine []string
		for _, mf := range d.ManagedFields {
			if mf.Manager == FieldManager {
				mine = append(mine, string(mf.FieldsV1.Raw))
			}
		}
		g.Expect(mine).To(HaveLen(1), name)
		var owned map[string]any
		g.Expect(json.Unmarshal([]byte(mine[0]), &owned)).To(Succeed())
		g.Expect(owned).To(Equal(map[string]any{"f:spec": map[string]any{"f:template": map[string]any{"f:metadata": map[string]any{
			"f:annotations": map[string]any{"f:" + Annotation: map[string]any{}}}}}}), name)

		// Argo CD syncs the unchanged manifest: no conflict, no diff, the stamp stays.
		p := manifest(name, "shop/"+name+":1.0", "shop", "")
		kubectl(apply(p)...)
		diff := []string{"diff", "-f", p}
		if name == "cart" {
			diff = []string{"diff", "--server-side", "--field-manager=argocd-controller", "-f", p}
		}
		out, errOut, err := kc.Kubectl(ctx, diff...)
		g.Expect(err).NotTo(HaveOccurred(), "kubectl diff shows a difference: "+out+errOut)
		g.Expect(get(name).Spec.Template.Annotations).To(HaveKeyWithValue(Annotation, token), name)
	}
	var w writes
	res, err = Restart(ctx, w.client(t), ns, token, 2)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(BeEmpty(), "a sync does not cause a second restart")
	g.Expect(w.n.Load()).To(BeZero())

	// A new commit: a new image, the team annotation replaced by another.
	// It applies without conflict and wins; the stamp stays.
	for name, apply := range apps {
		kubectl(apply(manifest(name, "shop/"+name+":1.1", "", "payments"))...)
		d := get(name)
		g.Expect(d.Spec.Template.Spec.Containers[0].Image).To(Equal("shop/" + name + ":1.1"))
		g.Expect(d.Spec.Template.Annotations).To(Equal(map[string]string{"owner": "payments", Annotation: token}),
			name+": team removed by its owner, the stamp kept")
	}
	settled(g, ctx, ns)
	ok, waiting, err := Observe(ctx, kc.Client, ns, token)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(ok).To(BeTrue(), waiting)
	for name := range apps {
		for _, tok := range podsOf(g, ctx, ns, name) {
			g.Expect(tok).To(Equal(token))
		}
	}

	// A commit that drops the pod template's whole annotations map. Under
	// server-side apply the stamp stays. kubectl's client-side three-way
	// merge sets the map it last applied to null, and the stamp goes with
	// it (kubectl.kubernetes.io/restartedAt would too): Observe sees web as
	// not restarted, and the next Restart stamps it again, once.
	for name, apply := range apps {
		kubectl(apply(manifest(name, "shop/"+name+":1.1", "", ""))...)
	}
	g.Expect(get("cart").Spec.Template.Annotations).To(Equal(map[string]string{Annotation: token}))
	g.Expect(get("web").Spec.Template.Annotations).To(BeEmpty())
	ok, waiting, err = Observe(ctx, kc.Client, ns, token)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(ok).To(BeFalse())
	g.Expect(waiting).To(ContainSubstring("deployment/web not restarted"), "cart rolls out its commit meanwhile")
	settled(g, ctx, ns)
	res, err = Restart(ctx, kc.Client, ns, token, 2)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(res.Restarted).To(Equal([]string{"deployment/web"}))
	drive(g, ctx, kc.Client, ns, token, 2, nil)
}

// TestRestartJudgesAgainWhenChanged: a workload its owner pauses between
// Restart's read and its write is not stamped: the write is conditional on
// what was judged, the API server refuses it, and the workload, read
// again, is skipped as paused.
func TestRestartJudgesAgainWhenChanged(t *testing.T) {
	cluster.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx := context.Background()
	const ns, token = "restart-changed", "2026-12-02T07:40:00Z"
	namespace(t, ctx, ns)
	cart := deployment(ns, "cart", 2)
	g.Expect(kc.Client.Create(ctx, cart)).To(Succeed())
	settled(g, ctx, ns)

	ww, err := client.NewWithWatch(kc.Config, client.Options{Scheme: kc.Scheme})
	g.Expect(err).NotTo(HaveOccurred())
	var applies int
	c := interceptor.NewClient(ww, interceptor.Funcs{
		Apply: func(ctx context.Context, c client.WithWatch, obj runtime.ApplyConfiguration, opts ...client.ApplyOption) error {
			applies++
			if applies == 1 { // the user pauses cart just now
				g.Expect(kc.Client.Patch(ctx, cart, client.RawPatch("application/merge-patch+json", []byte(`{"spec":{"paused":true}}`)))).To(Succeed())
			}
			return c.Apply(ctx, obj, opts...)
		},
	})
	res, err := Restart(ctx, c, ns, token, 1)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(applies).To(Equal(1), "the refused write is not retried once it is judged again")
	g.Expect(res.Restarted).To(BeEmpty())
	g.Expect(res.Skipped).To(Equal([]Item{{"deployment/cart", "skipped: paused (resume it with kubectl rollout resume to have it restarted)"}}))
	g.Expect(kc.Client.Get(ctx, client.ObjectKeyFromObject(cart), cart)).To(Succeed())
	g.Expect(cart.Spec.Template.Annotations).NotTo(HaveKey(Annotation))
}
