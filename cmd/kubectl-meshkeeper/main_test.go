package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle/oci"
	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/registry"
)

// The plugin runs against a real local cluster (etcd, kube-apiserver, kwok
// nodes) as a user who may only get, list and watch: any write it tried
// would fail, so the tests also show that status and plan change nothing.

var (
	kc     *cluster.Cluster
	viewer *rest.Config
)

func TestMain(m *testing.M) {
	if _, err := cluster.Available(); err != nil {
		fmt.Println(err)
		os.Exit(cluster.ExitCodeUnavailable())
	}
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	ctx := context.Background()
	var err error
	kc, err = cluster.Start(ctx, cluster.Options{
		CRDDirectoryPaths: []string{filepath.Join("..", "..", "config", "crd", "bases")},
		Nodes: []cluster.Node{
			{Name: "node-a", KernelVersion: "6.1.0-28-amd64", Labels: map[string]string{"pool": "canary"}},
			{Name: "node-b", KernelVersion: "6.1.0-28-amd64"},
			{Name: "node-c", KernelVersion: "5.4.0-216-generic"},
		},
	})
	if err != nil {
		fmt.Println("start cluster:", err)
		return 1
	}
	defer func() { _ = kc.Stop() }()
	if err := setup(ctx); err != nil {
		fmt.Println("setup:", err)
		return 1
	}
	return m.Run()
}

// setup makes a read-only user and a cluster in the middle of a rollout:
// a Mesh whose status is what the operator writes during node wave 2 of
// 1.26.4 → 1.27.3, node labels, node-component pods on two versions.
func setup(ctx context.Context) error {
	c := kc.Client
	user, err := kc.Env.AddUser(envtest.User{Name: "plugin-viewer"}, nil)
	if err != nil {
		return err
	}
	viewer = user.Config()
	objs := []client.Object{
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "plugin-viewer"}, Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{meshv1.GroupVersion.Group}, Resources: []string{"meshes"}, Verbs: []string{"get", "list", "watch"}},
			{APIGroups: []string{""}, Resources: []string{"namespaces", "nodes", "pods"}, Verbs: []string{"get", "list", "watch"}},
		}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "plugin-viewer"},
			RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "plugin-viewer"},
			Subjects: []rbacv1.Subject{{Kind: "User", Name: "plugin-viewer"}}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}},
	}
	for _, ns := range []string{"shop-staging", "shop", "cart", "search"} {
		objs = append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"mesh": "on"}}})
	}
	for _, o := range objs {
		if err := c.Create(ctx, o); err != nil {
			return fmt.Errorf("create %T %s: %w", o, o.GetName(), err)
		}
	}
	for node, rev := range map[string]string{"node-a": "1-27-3", "node-b": "1-26-4"} {
		n := &corev1.Node{}
		if err := c.Get(ctx, client.ObjectKey{Name: node}, n); err != nil {
			return err
		}
		n.Labels[meshv1.LabelRedirection] = "ebpf"
		if err := c.Update(ctx, n); err != nil {
			return err
		}
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-" + node, Namespace: "istio-system", Labels: map[string]string{
				meshv1.LabelComponent: "ztunnel", meshv1.LabelControlPlaneRevision: rev}},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "ztunnel", Image: "docker.io/istio/ztunnel:" + rev}}},
		}
		if err := c.Create(ctx, pod); err != nil {
			return err
		}
	}

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.27",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes:      meshv1.NodeRolloutSpec{Canary: &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}}},
				Namespaces: meshv1.NamespaceRolloutSpec{Canary: []string{"shop-staging"}, Waves: []string{"50%", "100%"}},
			},
			Analysis: &meshv1.AnalysisSpec{Prometheus: &meshv1.PrometheusSpec{Address: "http://prometheus.monitoring:9090"}, SLOs: []meshv1.SLO{{Name: "l4-success", Query: "sum(up)", Min: ptr("0.99")},
				{Name: "p99-latency", Query: "max(up)", Max: ptr("0.25")}}},
		},
	}
	if err := c.Create(ctx, mesh); err != nil {
		return err
	}
	at := metav1.NewTime(time.Date(2026, 3, 7, 2, 10, 0, 0, time.UTC))
	started := metav1.NewTime(at.Add(-5 * time.Minute))
	mesh.Status = meshv1.MeshStatus{
		ObservedGeneration: 1,
		Version:            meshv1.VersionStatus{Installed: "1.26.4", Target: "1.27.3"},
		Conditions: []metav1.Condition{{Type: meshv1.ConditionReady, Status: metav1.ConditionFalse, Reason: meshv1.ReasonRollingOut,
			Message: "Rolling out 1.27.3 (from 1.26.4), nodes 2/3: waiting for ztunnel on node-b", LastTransitionTime: started, ObservedGeneration: 1}},
		Rollout: &meshv1.RolloutStatus{Step: meshv1.RolloutStepNodes, Wave: 2, Waves: 3, From: "1.26.4", To: "1.27.3",
			StartedAt: &started, WaveStartedAt: &at, WaveNodes: []string{"node-b"}, LastCheckAt: &at,
			Message:  "node wave 2/3 (node-b): 0/1 node-component pods on the wave's nodes run 1.27.3",
			Analysis: []meshv1.AnalysisResult{{SLO: "l4-success", Value: "0.997", Verdict: meshv1.VerdictPass, At: at}}},
		Plan: []meshv1.PlanStep{
			{Action: "UpgradeControlPlane", Target: "1.27.3", State: meshv1.StepDone, Message: "Install istiod-1-27-3 side by side"},
			{Action: "UpgradeNodeComponents", Target: "1.27.3", State: meshv1.StepRunning, Message: "node waves"},
		},
		History: []meshv1.HistoryEntry{{Version: "1.27.2", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeRolledBack,
			Reason: "l4-success 0.9 < 0.99 in wave 1", StartedAt: &started, FinishedAt: &at, Generation: 1}},
		Catalog: &meshv1.CatalogStatus{Source: "oci://registry.example.com/meshkeeper/catalog:stable", LastCheckedAt: &at,
			Bundles: []meshv1.CatalogBundle{{Version: "1.26.4", From: "embedded"}, {Version: "1.27.9", From: "registry.example.com/meshkeeper/catalog@sha256:abc"}}},
	}
	return c.Status().Update(ctx, mesh)
}

func ptr[T any](v T) *T { return &v }

func runPlugin(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := run(context.Background(), args, &out, viewer)
	return out.String(), err
}

// TestViewerCannotWrite: the tests' user really is read-only, so a plugin
// that wrote would fail them.
func TestViewerCannotWrite(t *testing.T) {
	g := NewWithT(t)
	o := options{restConfigOverride: viewer}
	c, err := o.client()
	g.Expect(err).NotTo(HaveOccurred())
	err = c.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "written"}})
	g.Expect(apierrors.IsForbidden(err)).To(BeTrue(), "%v", err)
}

func TestStatus(t *testing.T) {
	g := NewWithT(t)
	out, err := runPlugin(t, "status")
	g.Expect(err).NotTo(HaveOccurred())
	t.Log("\n" + out)
	for _, want := range []string{
		`(?m)^Mesh default\s+Ambient, EBPF, spec.version 1.27, installed 1.26.4, target 1.27.3$`,
		`(?m)^Ready\s+False \(RollingOut\): Rolling out 1.27.3`,
		`(?m)^Catalog\s+oci://registry.example.com/meshkeeper/catalog:stable, last checked 2026-03-07T02:10:00Z`,
		`releases from the source: 1.27.9 from registry.example.com/meshkeeper/catalog@sha256:abc`,
		`(?m)^Rollout\s+1.26.4 → 1.27.3, started 2026-03-07T02:05:00Z`,
		`(?m)^Step\s+Nodes, wave 2 of 3, since 2026-03-07T02:10:00Z`,
		`(?m)^Wave nodes\s+node-b$`,
		`(?m)^Checks\s+every 30s, 0 failed \(rollback after 2\), 0 inconclusive`,
		`(?m)^l4-success\s+0.997\s+>= 0.99\s+Pass\s+2026-03-07T02:10:00Z`,
		`(?m)^p99-latency\s+-\s+<= 0.25\s+not checked yet`,
		`(?m)^2.\s+UpgradeNodeComponents\s+1.27.3\s+Running`,
		`(?m)^node-a\s+ebpf\s+ztunnel 1.27.3`,
		`(?m)^node-b\s+ebpf\s+ztunnel 1.26.4`,
		`(?m)^node-c\s+-\s+-$`,
		`(?m)^1.27.2\s+Ambient\s+RolledBack\s+2026-03-07T02:05:00Z\s+2026-03-07T02:10:00Z\s+l4-success 0.9 < 0.99 in wave 1$`,
	} {
		g.Expect(out).To(MatchRegexp(want))
	}

	_, err = runPlugin(t, "status", "--mesh", "nope")
	g.Expect(err).To(MatchError(ContainSubstring(`get mesh/nope`)))
}

func TestPlan(t *testing.T) {
	dir := t.TempDir()
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	before := &meshv1.Mesh{}
	if err := kc.Client.Get(context.Background(), client.ObjectKey{Name: "default"}, before); err != nil {
		t.Fatal(err)
	}

	t.Run("two minors ahead: each hop a canary rollout, with the live nodes and namespaces in their waves", func(t *testing.T) {
		g := NewWithT(t)
		out, err := runPlugin(t, "plan", "-f", file("up.yaml", `apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  version: "1.28"
  namespaces: {selector: {matchLabels: {mesh: "on"}}}
  rollout:
    nodes: {canary: {matchLabels: {pool: canary}}}
    namespaces: {canary: [shop-staging], waves: ["50%", "100%"]}
`))
		g.Expect(err).NotTo(HaveOccurred())
		t.Log("\n" + out)
		for _, want := range []string{
			`against the live cluster \(mesh/default: installed 1.26.4\)`,
			`Target 1.28.2, through 1.27.3 → 1.28.2 \(one minor at a time\); 4 namespaces selected, 3 nodes`,
			`Maintenance window: none configured`,
			`(?m)^ 1. UpgradeControlPlane 1.27.3$`,
			`(?m)^ 2. UpgradeNodeComponents 1.27.3 \[inside a maintenance window\]$`,
			`(?m)^    node wave 1: node-a$`,
			`(?m)^    namespace wave 1: shop-staging$`,
			`(?m)^    namespace wave 2: cart, search$`,
			`(?m)^    namespace wave 3: shop$`,
			`UpgradeControlPlane 1.28.2`,
			`RetireControlPlane 1.27.3`,
			`Note: the operator's catalog also has 1.27.9 \(from oci://registry.example.com/meshkeeper/catalog:stable\); pass --catalog-source`,
			`Nothing was applied.`,
		} {
			g.Expect(out).To(MatchRegexp(want))
		}
	})

	t.Run("a spec the operator would refuse says why and exits non-zero", func(t *testing.T) {
		g := NewWithT(t)
		_, err := runPlugin(t, "plan", "-f", file("bad.yaml", `apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  version: "1.27"
  rollout: {namespaces: {waves: ["50%", "20%"]}}
`))
		var fail *planFailed
		g.Expect(err).To(BeAssignableToTypeOf(fail))
		g.Expect(err).To(MatchError(And(ContainSubstring("would refuse"), ContainSubstring("spec.rollout.namespaces.waves"))))
		_, err = runPlugin(t, "plan", "-f", file("unknown.yaml", `apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {version: "1.31"}
`))
		g.Expect(err).To(MatchError(ContainSubstring(`spec.version "1.31": not in the catalog`)))
	})

	t.Run("a Mesh that does not exist yet is a fresh install", func(t *testing.T) {
		g := NewWithT(t)
		out, err := runPlugin(t, "plan", "-f", file("fresh.yaml", `apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: other}
spec: {version: "1.26", namespaces: {selector: {matchLabels: {mesh: "on"}}}}
`))
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(out).To(And(ContainSubstring("no mesh/other yet: a fresh install"), MatchRegexp(`(?m)^ 1. InstallControlPlane 1.26.4$`)))
	})

	g := NewWithT(t)
	after := &meshv1.Mesh{}
	g.Expect(kc.Client.Get(context.Background(), client.ObjectKey{Name: "default"}, after)).To(Succeed())
	g.Expect(after.ResourceVersion).To(Equal(before.ResourceVersion), "plan applies nothing")
}

// TestCatalogPush: a tree published with the openssl-made key is what an
// operator configured with the public key pulls and verifies.
func TestCatalogPush(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	reg := registry.Start(ctx, t)
	dir := t.TempDir()
	priv := filepath.Join(dir, "key.pem")
	pub := filepath.Join(dir, "key.pub.pem")
	for _, args := range [][]string{{"genpkey", "-algorithm", "ed25519", "-out", priv}, {"pkey", "-in", priv, "-pubout", "-out", pub}} {
		out, err := exec.Command("openssl", args...).CombinedOutput()
		g.Expect(err).NotTo(HaveOccurred(), string(out))
	}
	ref := "oci://" + reg.Addr + "/meshkeeper/catalog:stable"
	var out bytes.Buffer
	g.Expect(run(ctx, []string{"catalog", "push", "-d", filepath.Join("..", "..", "bundles"), "--to", ref, "--key", priv, "--plain-http"}, &out, nil)).To(Succeed())
	g.Expect(out.String()).To(MatchRegexp(`Published .* to oci://.*:stable \(sha256:[0-9a-f]{64}\)`))

	raw, err := os.ReadFile(pub)
	g.Expect(err).NotTo(HaveOccurred())
	key, err := oci.ParsePublicKey(raw)
	g.Expect(err).NotTo(HaveOccurred())
	src, err := oci.NewSource(ref, key, true)
	g.Expect(err).NotTo(HaveOccurred())
	cat, _, err := src.Pull(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(cat.Versions()).To(Equal([]string{"1.26.4", "1.27.2", "1.27.3", "1.28.2"}))
}
