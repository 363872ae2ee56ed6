package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// demoNamespaces are the sample's namespaces in the mesh.
var demoNamespaces = []string{"shop-staging", "shop"}

// slos is the demo's Prometheus (real, on 127.0.0.1) scraping a stand-in
// workload whose success ratio per namespace the demo sets; nil without a
// Prometheus binary.
type slos struct {
	srv      *prom.Server
	workload *prom.Workload
}

func startSLOs(ctx context.Context, tb *demoTB) (*slos, error) {
	if _, err := os.Stat(prom.Binary()); err != nil {
		return nil, nil
	}
	w := prom.NewWorkload(tb)
	for _, ns := range demoNamespaces {
		w.SetRatio(ns, 1)
	}
	srv, err := prom.Start(ctx, tb, w.Addr)
	if err != nil {
		return nil, err
	}
	return &slos{srv: srv, workload: w}, nil
}

// demoMesh is config/samples/mesh.yaml made quick enough to watch: it starts
// two minors back, has no maintenance window, bakes for seconds, checks
// every 5s over 10s windows, and asks the demo's Prometheus.
func demoMesh(root string, s *slos) (*meshv1.Mesh, string, error) {
	raw, err := os.ReadFile(filepath.Join(root, "config", "samples", "mesh.yaml"))
	if err != nil {
		return nil, "", err
	}
	m := &meshv1.Mesh{}
	if err := yaml.UnmarshalStrict(raw, m); err != nil {
		return nil, "", fmt.Errorf("config/samples/mesh.yaml: %w", err)
	}
	short := &metav1.Duration{Duration: 3 * time.Second}
	m.Spec.Version = "1.26"
	m.Spec.Upgrade.Windows = nil
	m.Spec.Rollout.Nodes.Bake = short
	m.Spec.Rollout.Namespaces.Bake = short
	m.Spec.Rollout.RetireAfter = short
	changes := "version 1.26, no maintenance window, bake 3s, retireAfter 3s"
	if s == nil {
		m.Spec.Analysis = nil
		changes += ", no analysis (no Prometheus binary " + prom.Binary() + ": make demo builds it with hack/prometheus.sh); waves only bake"
	} else {
		a := m.Spec.Analysis
		a.Prometheus.Address = s.srv.URL
		a.Interval = &metav1.Duration{Duration: 5 * time.Second}
		one := int32(1)
		a.FailureLimit = &one
		for i := range a.SLOs {
			a.SLOs[i].Query = strings.ReplaceAll(a.SLOs[i].Query, "[1m]", "[10s]")
		}
		// Admission refuses a bake shorter than the queries' window.
		window := &metav1.Duration{Duration: 10 * time.Second}
		m.Spec.Rollout.Nodes.Bake, m.Spec.Rollout.Namespaces.Bake = window, window
		changes += ", analysis every 5s over 10s rate windows (so bakes of 10s), failureLimit 1, Prometheus " + s.srv.URL
	}
	return m, changes, nil
}

// applyMesh writes the Mesh with kubectl apply, as a GitOps tool would.
func applyMesh(ctx context.Context, c *cluster.Cluster, dir string, m *meshv1.Mesh) error {
	m.APIVersion, m.Kind = meshv1.GroupVersion.String(), "Mesh"
	raw, err := yaml.Marshal(m)
	if err != nil {
		return err
	}
	path := filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		return err
	}
	if _, stderr, err := c.Kubectl(ctx, "apply", "-f", path); err != nil {
		return fmt.Errorf("apply %s: %w: %s", path, err, stderr)
	}
	return nil
}

// follow prints `kubectl get mesh` and status.rollout's message whenever they
// change (the AGE column aside), until done says so.
func follow(ctx context.Context, c *cluster.Cluster, timeout time.Duration, done func(*meshv1.Mesh) bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	lastTable, lastMsg := "", ""
	for {
		m := &meshv1.Mesh{}
		if err := c.Client.Get(ctx, client.ObjectKey{Name: "default"}, m); err == nil {
			if out, _, err := c.Kubectl(ctx, "get", "mesh", "--no-headers"); err == nil {
				fields := strings.Fields(out)
				if row := strings.Join(fields[:max(len(fields)-1, 0)], " "); row != lastTable {
					fmt.Print(indent(strings.TrimSpace(out)))
					lastTable = row
				}
			}
			if ro := m.Status.Rollout; ro != nil && ro.Message != lastMsg {
				fmt.Printf("      %s %d/%d: %s\n", ro.Step, ro.Wave, ro.Waves, ro.Message)
				lastMsg = ro.Message
			}
			if done(m) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("gave up after %s; see .tmp/demo/manager.log", timeout)
			}
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func lastOutcome(m *meshv1.Mesh) string {
	if len(m.Status.History) == 0 {
		return ""
	}
	e := m.Status.History[len(m.Status.History)-1]
	return e.Version + " " + string(e.Outcome)
}

func ready(m *meshv1.Mesh) bool {
	c := meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)
	return c != nil && c.Status == metav1.ConditionTrue && c.ObservedGeneration == m.Generation
}

// rollouts is the main job: an upgrade whose canary namespace breaks is
// rolled back by itself, then an upgrade two minors ahead goes through,
// node waves and namespace waves, one minor at a time.
func rollouts(ctx context.Context, c *cluster.Cluster, s *slos, step func(string, ...any)) error {
	patch := func(version string) error {
		_, stderr, err := c.Kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", fmt.Sprintf(`{"spec":{"version":%q}}`, version))
		if err != nil {
			return fmt.Errorf("patch spec.version: %w: %s", err, stderr)
		}
		return nil
	}
	if s != nil {
		step("Upgrading to 1.27: istiod-1-27-3 beside istiod-1-26-4, then node waves (canary node-a first), then namespace waves (shop-staging first)")
		if err := patch("1.27"); err != nil {
			return err
		}
		broken := false
		err := follow(ctx, c, 5*time.Minute, func(m *meshv1.Mesh) bool {
			if ro := m.Status.Rollout; !broken && ro != nil && ro.Step == meshv1.RolloutStepNamespaces && ro.Wave >= 1 {
				s.workload.SetRatio("shop-staging", 0.9)
				broken = true
				step("1.27 breaks shop-staging (the canary namespace): its L4 success ratio drops to 0.9, the SLO wants 0.99")
			}
			return lastOutcome(m) == "1.27.3 RolledBack" && m.Status.Rollout == nil
		})
		if err != nil {
			return err
		}
		step("Rolled back by itself: every node and namespace is on 1.26.4 again, and 1.27.3 is not retried until the spec changes")
		if err := show(ctx, c); err != nil {
			return err
		}
		s.workload.SetRatio("shop-staging", 1)
		step("shop-staging is healthy again; waiting 12s for the 10s rate window to forget the breach")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(12 * time.Second):
		}
	}
	step("Upgrading to 1.28: two minors ahead, so 1.27.3 first, then 1.28.2, each a full canary rollout")
	if err := patch("1.28"); err != nil {
		return err
	}
	if err := follow(ctx, c, 8*time.Minute, func(m *meshv1.Mesh) bool {
		return lastOutcome(m) == "1.28.2 Succeeded" && ready(m)
	}); err != nil {
		return err
	}
	step("1.28.2 runs everywhere")
	if err := show(ctx, c); err != nil {
		return err
	}
	step("Switching to Sidecar: the rollout engine moves the namespaces wave by wave (shop-staging first), restarting their workloads into sidecars, judged like a version rollout; the node components go after the last wave")
	if _, stderr, err := c.Kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", `{"spec":{"dataplane":{"mode":"Sidecar","redirection":null,"kernelFallback":null}}}`); err != nil {
		return fmt.Errorf("patch spec.dataplane.mode: %w: %s", err, stderr)
	}
	if err := follow(ctx, c, 8*time.Minute, func(m *meshv1.Mesh) bool {
		return lastOutcome(m) == "1.28.2 Succeeded" && m.Status.Dataplane.Mode == meshv1.ModeSidecar && ready(m)
	}); err != nil {
		return err
	}
	step("Sidecar at 1.28.2 everywhere: no ztunnel, no node agent")
	return show(ctx, c)
}

// show prints status.history and which revision each node's node components
// and each namespace run.
func show(ctx context.Context, c *cluster.Cluster) error {
	m := &meshv1.Mesh{}
	if err := c.Client.Get(ctx, client.ObjectKey{Name: "default"}, m); err != nil {
		return err
	}
	fmt.Println("--- status.history")
	for _, e := range m.Status.History {
		line := fmt.Sprintf("%s %s", e.Version, e.Outcome)
		if e.Reason != "" {
			line += ": " + e.Reason
		}
		fmt.Print(indent(line))
	}
	var pods corev1.PodList
	if err := c.Client.List(ctx, &pods, client.InNamespace("istio-system")); err != nil {
		return err
	}
	byNode := map[string][]string{}
	for _, p := range pods.Items {
		comp := p.Labels[meshv1.LabelComponent]
		if p.DeletionTimestamp != nil || p.Spec.NodeName == "" || !slices.Contains([]string{"ztunnel", "node-agent", "istio-cni"}, comp) {
			continue
		}
		byNode[p.Spec.NodeName] = append(byNode[p.Spec.NodeName], comp+"="+p.Labels[meshv1.LabelControlPlaneRevision])
	}
	fmt.Println("--- node components per node")
	for _, n := range slices.Sorted(func(yield func(string) bool) {
		for k := range byNode {
			if !yield(k) {
				return
			}
		}
	}) {
		slices.Sort(byNode[n])
		fmt.Print(indent(n + ": " + strings.Join(byNode[n], " ")))
	}
	fmt.Println("--- namespaces")
	for _, ns := range demoNamespaces {
		out, _, _ := c.Kubectl(ctx, "get", "ns", ns, "-o", `jsonpath={.metadata.labels.istio\.io/rev}`)
		fmt.Print(indent(ns + ": istio.io/rev=" + out))
	}
	return nil
}

// demoTB lets the demo use the test Prometheus harness outside a test.
type demoTB struct {
	dir      string
	cleanups []func()
}

func (d *demoTB) Helper()                           {}
func (d *demoTB) Skipf(format string, args ...any)  { panic("demo: " + fmt.Sprintf(format, args...)) }
func (d *demoTB) Fatalf(format string, args ...any) { panic("demo: " + fmt.Sprintf(format, args...)) }
func (d *demoTB) Errorf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "demo: "+format+"\n", args...)
}
func (d *demoTB) Cleanup(f func()) { d.cleanups = append(d.cleanups, f) }
func (d *demoTB) TempDir() string {
	dir, err := os.MkdirTemp(d.dir, "prom-")
	if err != nil {
		panic("demo: " + err.Error())
	}
	return dir
}

// close runs the cleanups, last first.
func (d *demoTB) close() {
	for i := len(d.cleanups) - 1; i >= 0; i-- {
		d.cleanups[i]()
	}
}
