package helm

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v4/pkg/action"
	rcommon "helm.sh/helm/v4/pkg/release/common"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

var demoLabels = ManagedLabels("demo", "1-0-0")

func demo(name, ns string, values map[string]any) Release {
	return Release{Name: name, Namespace: ns, Chart: demoChart, Values: values, Labels: demoLabels}
}

func greeting(g string) map[string]any { return map[string]any{"data": map[string]any{"greeting": g}} }

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mustApply(t *testing.T, c *Client, ctx context.Context, r Release) *Status {
	t.Helper()
	st, err := c.Apply(ctx, r)
	if err != nil {
		t.Fatalf("Apply %s: %v", r.Name, err)
	}
	if st == nil || st.State != StateDeployed {
		t.Fatalf("Apply %s: status %+v, want deployed", r.Name, st)
	}
	return st
}

func states(h []Status) []string {
	var out []string
	for _, s := range h {
		out = append(out, fmt.Sprintf("%d:%s", s.Revision, s.State))
	}
	return out
}

func wantHistory(t *testing.T, c *Client, name string, want ...string) []Status {
	t.Helper()
	h, err := c.History(context.Background(), name)
	if err != nil {
		t.Fatalf("History: %v", err)
	}
	if got := states(h); !slices.Equal(got, want) {
		t.Fatalf("history %v, want %v", got, want)
	}
	return h
}

func settingsGreeting(t *testing.T, ctx context.Context, ns, name string) string {
	t.Helper()
	var cm corev1.ConfigMap
	if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name + "-settings"}, &cm); err != nil {
		t.Fatalf("get settings: %v", err)
	}
	return cm.Data["greeting"]
}

// Install, idempotent re-apply, upgrade on changed values, rollback.
func TestInstallUpgradeRollback(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 30*time.Second)
	const ns, name = "it-lifecycle", "lifecycle"

	st := mustApply(t, c, ctx, demo(name, ns, greeting("hello")))
	if st.Revision != 1 || st.ChartVersion != "0.1.0" || st.AppVersion != "1.0.0" || st.ValuesDigest == "" || st.ChartDigest == "" || st.Namespace != ns {
		t.Errorf("install status %+v", st)
	}

	// Every object carries the managed labels (and Helm's ownership
	// label); workloads' pod templates carry them too.
	objs := []client.Object{
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name + "-settings"}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name + "-tunables"}},
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: name + "-web"}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: name + "-agent"}},
	}
	for _, o := range objs {
		if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: o.GetName()}, o); err != nil {
			t.Fatalf("get %s: %v", o.GetName(), err)
		}
		l := o.GetLabels()
		if l[LabelComponent] != "demo" || l[LabelRevision] != "1-0-0" || l[LabelManagedBy] != "Helm" {
			t.Errorf("%s labels %v", o.GetName(), l)
		}
		var tmpl map[string]string
		switch w := o.(type) {
		case *appsv1.Deployment:
			tmpl = w.Spec.Template.Labels
		case *appsv1.DaemonSet:
			tmpl = w.Spec.Template.Labels
		default:
			continue
		}
		for k, v := range demoLabels {
			if tmpl[k] != v {
				t.Errorf("%s pod template label %s=%q, want %q", o.GetName(), k, tmpl[k], v)
			}
		}
	}

	// Same input: no new revision.
	if st := mustApply(t, c, ctx, demo(name, ns, greeting("hello"))); st.Revision != 1 {
		t.Errorf("re-apply made revision %d", st.Revision)
	}
	wantHistory(t, c, name, "1:deployed")

	// Changed values: upgrade.
	st2 := mustApply(t, c, ctx, demo(name, ns, map[string]any{"replicas": 2, "data": map[string]any{"greeting": "bonjour"}}))
	if st2.Revision != 2 || st2.ValuesDigest == st.ValuesDigest || st2.ChartDigest != st.ChartDigest {
		t.Errorf("upgrade status %+v (install %+v)", st2, st)
	}
	wantHistory(t, c, name, "1:superseded", "2:deployed")
	if g := settingsGreeting(t, ctx, ns, name); g != "bonjour" {
		t.Errorf("greeting %q after upgrade", g)
	}

	// Rollback to the previous revision: its values are live again.
	if err := c.Rollback(ctx, name, 0); err != nil {
		t.Fatalf("Rollback: %v", err)
	}
	h := wantHistory(t, c, name, "1:superseded", "2:superseded", "3:deployed")
	if g := settingsGreeting(t, ctx, ns, name); g != "hello" {
		t.Errorf("greeting %q after rollback, want hello", g)
	}
	var web appsv1.Deployment
	if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name + "-web"}, &web); err != nil {
		t.Fatal(err)
	}
	if *web.Spec.Replicas != 1 {
		t.Errorf("replicas %d after rollback, want 1", *web.Spec.Replicas)
	}
	// The rolled-back revision records the digests of revision 1, so
	// applying revision 1's input again is a no-op...
	if h[2].ValuesDigest != st.ValuesDigest {
		t.Errorf("rollback digest %s, want revision 1's %s", h[2].ValuesDigest, st.ValuesDigest)
	}
	if st := mustApply(t, c, ctx, demo(name, ns, greeting("hello"))); st.Revision != 3 {
		t.Errorf("apply of the rolled-back input made revision %d", st.Revision)
	}
	// ...and empty values are not "reuse the previous ones".
	if st := mustApply(t, c, ctx, demo(name, ns, nil)); st.Revision != 4 {
		t.Errorf("apply with chart defaults made revision %d, want 4", st.Revision)
	}
	if g := settingsGreeting(t, ctx, ns, name); g != "hello" {
		t.Errorf("greeting %q with chart defaults, want hello", g)
	}

	list, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(list, func(s Status) bool { return s.Name == name })
	if i < 0 || list[i].Revision != 4 {
		t.Errorf("List %+v lacks %s at revision 4", list, name)
	}
	if err := c.Rollback(ctx, name, 9); err == nil || !strings.Contains(err.Error(), "no revision 9") {
		t.Errorf("rollback to a missing revision: %v", err)
	}
}

// Wait on the kwok cluster returns once the workloads are ready.
func TestWaitAndReady(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 60*time.Second)
	const ns, name = "it-wait", "wait"

	r := demo(name, ns, map[string]any{"replicas": 2})
	r.Wait, r.Timeout = true, 45*time.Second
	began := time.Now()
	mustApply(t, c, ctx, r)
	t.Logf("install with wait took %v", time.Since(began).Round(time.Millisecond))
	assertReady(t, ctx, c, ns, name, 2)

	r.Values = map[string]any{"replicas": 3, "data": map[string]any{"greeting": "v2"}}
	began = time.Now()
	if st := mustApply(t, c, ctx, r); st.Revision != 2 {
		t.Errorf("upgrade made revision %d", st.Revision)
	}
	t.Logf("upgrade with wait took %v", time.Since(began).Round(time.Millisecond))
	assertReady(t, ctx, c, ns, name, 3)
}

// assertReady checks, right after a waiting Apply, that the workloads are
// ready and that Ready says so.
func assertReady(t *testing.T, ctx context.Context, c *Client, ns, name string, replicas int32) {
	t.Helper()
	var web appsv1.Deployment
	if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name + "-web"}, &web); err != nil {
		t.Fatal(err)
	}
	if web.Status.ReadyReplicas != replicas || web.Status.UpdatedReplicas != replicas {
		t.Errorf("Deployment ready %d updated %d, want %d", web.Status.ReadyReplicas, web.Status.UpdatedReplicas, replicas)
	}
	var agent appsv1.DaemonSet
	if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name + "-agent"}, &agent); err != nil {
		t.Fatal(err)
	}
	if n := int32(len(testNodes)); agent.Status.NumberReady != n || agent.Status.UpdatedNumberScheduled != n {
		t.Errorf("DaemonSet ready %d updated %d, want %d", agent.Status.NumberReady, agent.Status.UpdatedNumberScheduled, n)
	}
	ok, msg, err := c.Ready(ctx, name)
	if err != nil || !ok {
		t.Errorf("Ready = %v, %q, %v; want true", ok, msg, err)
	}
}

var unschedulable = map[string]any{"nodeSelector": map[string]any{"meshkeeper.dev/no-such-node": "x"}}

// A failed install is uninstalled and installed afresh by the next Apply.
func TestFailedInstallIsReinstalled(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 60*time.Second)
	const ns, name = "it-failinst", "failinst"

	r := demo(name, ns, unschedulable)
	r.Wait, r.Timeout = true, 3*time.Second
	st, err := c.Apply(ctx, r)
	if err == nil || st == nil || st.State != StateFailed {
		t.Fatalf("Apply of an unschedulable release: %+v, %v; want a failed revision and an error", st, err)
	}
	ok, msg, err := c.Ready(ctx, name)
	if err != nil || ok || !strings.Contains(msg, "Deployment/"+ns+"/"+name+"-web") {
		t.Errorf("Ready = %v, %q, %v; want false naming the Deployment", ok, msg, err)
	}

	r.Values, r.Timeout = nil, 45*time.Second
	if st := mustApply(t, c, ctx, r); st.Revision != 1 {
		t.Errorf("reinstall is revision %d, want a fresh revision 1", st.Revision)
	}
	wantHistory(t, c, name, "1:deployed")
	if ok, msg, err := c.Ready(ctx, name); !ok || err != nil {
		t.Errorf("Ready after reinstall = %v, %q, %v", ok, msg, err)
	}
}

// A failed upgrade is retried as an upgrade.
func TestFailedUpgradeIsRetried(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 60*time.Second)
	const ns, name = "it-failupg", "failupg"

	mustApply(t, c, ctx, demo(name, ns, nil))
	bad := demo(name, ns, unschedulable)
	bad.Wait, bad.Timeout = true, 3*time.Second
	st, err := c.Apply(ctx, bad)
	if err == nil || st == nil || st.State != StateFailed || st.Revision != 2 {
		t.Fatalf("Apply of an unschedulable upgrade: %+v, %v; want failed revision 2 and an error", st, err)
	}
	if got, _ := c.Get(ctx, name); got == nil || got.State != StateFailed {
		t.Errorf("Get after failed upgrade: %+v", got)
	}
	good := demo(name, ns, greeting("fixed"))
	good.Wait, good.Timeout = true, 45*time.Second
	if st := mustApply(t, c, ctx, good); st.Revision != 3 {
		t.Errorf("retry is revision %d, want 3", st.Revision)
	}
	wantHistory(t, c, name, "1:superseded", "2:failed", "3:deployed")
	if g := settingsGreeting(t, ctx, ns, name); g != "fixed" {
		t.Errorf("greeting %q", g)
	}
}

// An upgrade interrupted by a killed operator leaves a pending-upgrade
// revision next to the deployed one; the next Apply unlocks it and upgrades.
func TestPendingUpgradeIsRecovered(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 30*time.Second)
	const ns, name = "it-pendupg", "pendupg"

	mustApply(t, c, ctx, demo(name, ns, nil))
	cfg := c.config(ns)
	r1, err := last(cfg, name)
	if err != nil {
		t.Fatal(err)
	}
	// What Helm's upgrade stores before applying anything.
	r2 := *r1
	r2.Version = 2
	r2.Info = &releasev1.Info{FirstDeployed: r1.Info.FirstDeployed, LastDeployed: time.Now(), Status: rcommon.StatusPendingUpgrade, Description: "Preparing upgrade"}
	if err := cfg.Releases.Create(&r2); err != nil {
		t.Fatalf("store pending revision: %v", err)
	}
	// Plain Helm refuses to act on it.
	if _, err := action.NewUpgrade(c.config(ns)).RunWithContext(ctx, name, r1.Chart, nil); err == nil || !strings.Contains(err.Error(), "another operation") {
		t.Fatalf("helm upgrade of a pending release: %v, want 'another operation ... in progress'", err)
	}

	if st := mustApply(t, c, ctx, demo(name, ns, greeting("recovered"))); st.Revision != 3 {
		t.Errorf("recovered upgrade is revision %d, want 3", st.Revision)
	}
	h := wantHistory(t, c, name, "1:superseded", "2:failed", "3:deployed")
	if !strings.Contains(h[1].Description, "unlocked") {
		t.Errorf("unlocked revision description %q", h[1].Description)
	}
	if g := settingsGreeting(t, ctx, ns, name); g != "recovered" {
		t.Errorf("greeting %q", g)
	}
}

// An install interrupted by a killed operator leaves revision 1 in
// pending-install; the next Apply removes it and installs afresh.
func TestPendingInstallIsRecovered(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 30*time.Second)
	const ns, name = "it-pendinst", "pendinst"

	mustApply(t, c, ctx, demo(name, ns, nil))
	cfg := c.config(ns)
	r1, err := last(cfg, name)
	if err != nil {
		t.Fatal(err)
	}
	r1.SetStatus(rcommon.StatusPendingInstall, "Initial install underway")
	if err := cfg.Releases.Update(r1); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Get(ctx, name); got.State != StatePendingInstall {
		t.Fatalf("Get: %+v", got)
	}
	if ok, msg, _ := c.Ready(ctx, name); ok || !strings.Contains(msg, "pending-install") {
		t.Errorf("Ready of a pending release = %v, %q", ok, msg)
	}

	if st := mustApply(t, c, ctx, demo(name, ns, nil)); st.Revision != 1 {
		t.Errorf("recovered install is revision %d, want 1", st.Revision)
	}
	wantHistory(t, c, name, "1:deployed")
	var web appsv1.Deployment
	if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name + "-web"}, &web); err != nil {
		t.Errorf("Deployment after recovery: %v", err)
	}
}

// Repair restores a deleted DaemonSet and an edited ConfigMap, leaves an
// ignored object as edited, and later upgrades do not conflict.
func TestRepair(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 30*time.Second)
	const ns, name = "it-repair", "repair"

	mustApply(t, c, ctx, demo(name, ns, nil))
	res, err := c.Repair(ctx, name)
	if err != nil || len(res.Repaired)+len(res.Ignored) != 0 {
		t.Fatalf("Repair right after install = %+v, %v; want nothing to do", res, err)
	}

	// Drift: a deleted DaemonSet, an edited ConfigMap, an edited ConfigMap
	// its owner asked meshkeeper to leave alone. (The Repair above
	// remembered every object as checked at its resourceVersion; an edit
	// changes it, so the edited objects are checked again.)
	agent := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-agent"}}
	if err := kc.Client.Delete(ctx, agent); err != nil {
		t.Fatal(err)
	}
	edit := func(cm string, f func(*corev1.ConfigMap)) {
		var o corev1.ConfigMap
		if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: cm}, &o); err != nil {
			t.Fatal(err)
		}
		f(&o)
		if err := kc.Client.Update(ctx, &o, client.FieldOwner("kubectl-edit")); err != nil {
			t.Fatal(err)
		}
	}
	edit(name+"-settings", func(o *corev1.ConfigMap) { o.Data["greeting"] = "tampered" })
	edit(name+"-tunables", func(o *corev1.ConfigMap) {
		o.Data["level"] = "99"
		o.Annotations = map[string]string{AnnotationIgnore: "true"}
	})

	res, err = c.Repair(ctx, name)
	if err != nil {
		t.Fatalf("Repair: %v", err)
	}
	slices.Sort(res.Repaired)
	if want := []string{"ConfigMap/" + ns + "/" + name + "-settings", "DaemonSet/" + ns + "/" + name + "-agent"}; !slices.Equal(res.Repaired, want) {
		t.Errorf("repaired %v, want %v", res.Repaired, want)
	}
	if want := []string{"ConfigMap/" + ns + "/" + name + "-tunables"}; !slices.Equal(res.Ignored, want) {
		t.Errorf("ignored %v, want %v", res.Ignored, want)
	}
	if g := settingsGreeting(t, ctx, ns, name); g != "hello" {
		t.Errorf("settings greeting %q after repair, want hello", g)
	}
	if res, err := c.Repair(ctx, name); err != nil || len(res.Repaired) != 0 {
		t.Errorf("Repair right after a repair = %+v, %v; want nothing repaired", res, err)
	}
	var tun corev1.ConfigMap
	if err := kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name + "-tunables"}, &tun); err != nil {
		t.Fatal(err)
	}
	if tun.Data["level"] != "99" {
		t.Errorf("ignored ConfigMap was changed: %v", tun.Data)
	}
	if err := kc.Client.Get(ctx, client.ObjectKeyFromObject(agent), agent); err != nil {
		t.Fatalf("DaemonSet not restored: %v", err)
	}
	if agent.Labels[LabelComponent] != "demo" || agent.Labels[LabelManagedBy] != "Helm" ||
		agent.Annotations[helmReleaseNameAnno] != name || agent.Spec.Template.Labels[LabelManagedBy] != ManagedByValue {
		t.Errorf("restored DaemonSet lacks labels or Helm ownership: %v %v %v", agent.Labels, agent.Annotations, agent.Spec.Template.Labels)
	}
	if !managedOnlyBy(agent.ManagedFields, FieldManager) {
		t.Errorf("restored DaemonSet's applied fields are not owned by %s: %+v", FieldManager, agent.ManagedFields)
	}
	if res, err := c.Repair(ctx, name); err != nil || len(res.Repaired) != 0 || len(res.Ignored) != 1 {
		t.Errorf("second Repair = %+v, %v; want only the ignored object", res, err)
	}

	// The next upgrade applies over the repaired objects without conflicts,
	// and Helm still owns them (uninstall deletes them).
	if st := mustApply(t, c, ctx, demo(name, ns, greeting("v2"))); st.Revision != 2 {
		t.Errorf("upgrade after repair is revision %d", st.Revision)
	}
	if g := settingsGreeting(t, ctx, ns, name); g != "v2" {
		t.Errorf("greeting %q after upgrade", g)
	}
	if err := c.Uninstall(ctx, name, false); err != nil {
		t.Fatal(err)
	}
	if err := kc.Client.Get(ctx, client.ObjectKeyFromObject(agent), agent); !apierrors.IsNotFound(err) && agent.DeletionTimestamp.IsZero() {
		t.Errorf("repaired DaemonSet survived uninstall: %v", err)
	}
}

// managedOnlyBy: every Apply entry belongs to manager.
func managedOnlyBy(fields []metav1.ManagedFieldsEntry, manager string) bool {
	found := false
	for _, f := range fields {
		if f.Operation == metav1.ManagedFieldsOperationApply {
			if f.Manager != manager {
				return false
			}
			found = true
		}
	}
	return found
}

// Uninstall removes every object and the release records.
func TestUninstall(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	ctx := ctxFor(t, 60*time.Second)
	const ns, name = "it-uninstall", "uninstall"

	r := demo(name, ns, nil)
	r.Wait, r.Timeout = true, 45*time.Second
	mustApply(t, c, ctx, r)
	mustApply(t, c, ctx, demo(name, ns, greeting("two revisions")))

	began := time.Now()
	if err := c.Uninstall(ctx, name, true); err != nil {
		t.Fatalf("Uninstall: %v", err)
	}
	t.Logf("uninstall with wait took %v", time.Since(began).Round(time.Millisecond))
	for _, o := range []client.Object{
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-settings"}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-tunables"}},
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-web"}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-agent"}},
	} {
		if err := kc.Client.Get(ctx, client.ObjectKeyFromObject(o), o); !apierrors.IsNotFound(err) {
			t.Errorf("%T %s still exists after a waiting uninstall (err %v)", o, o.GetName(), err)
		}
	}
	var pods corev1.PodList
	if err := kc.Client.List(ctx, &pods, client.InNamespace(ns)); err != nil || len(pods.Items) != 0 {
		t.Errorf("%d pods left (err %v)", len(pods.Items), err)
	}
	var secrets corev1.SecretList
	if err := kc.Client.List(ctx, &secrets, client.InNamespace(storageNS), client.MatchingLabels{"owner": "helm", "name": name}); err != nil || len(secrets.Items) != 0 {
		t.Errorf("%d release secrets left (err %v)", len(secrets.Items), err)
	}
	if st, err := c.Get(ctx, name); st != nil || err != nil {
		t.Errorf("Get after uninstall = %+v, %v; want nil, nil", st, err)
	}
	if err := c.Uninstall(ctx, name, true); err != nil {
		t.Errorf("Uninstall of an absent release: %v", err)
	}
	if _, err := c.Repair(ctx, name); !IsNotFound(err) {
		t.Errorf("Repair of an absent release: %v, want not found", err)
	}
}

// MaxHistory bounds the stored revisions.
func TestMaxHistory(t *testing.T) {
	c := newClient(t)
	t.Parallel()
	c.MaxHistory = 3
	ctx := ctxFor(t, 30*time.Second)
	const ns, name = "it-history", "history"

	for i := range 5 {
		mustApply(t, c, ctx, demo(name, ns, greeting(fmt.Sprint("v", i))))
	}
	wantHistory(t, c, name, "3:superseded", "4:superseded", "5:deployed")
	var secrets corev1.SecretList
	if err := kc.Client.List(ctx, &secrets, client.InNamespace(storageNS), client.MatchingLabels{"owner": "helm", "name": name}); err != nil || len(secrets.Items) != 3 {
		t.Errorf("%d release secrets (err %v), want 3", len(secrets.Items), err)
	}
}
