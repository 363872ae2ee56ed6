// Package scale measures meshkeeper on a large kwok cluster: install and
// canary upgrade wall times, the manager's CPU and memory, its API requests
// at rest and its reconcile latency, printed as one markdown table
// (make bench-scale). It starts its own cluster rather than using
// internal/controller's suite: that suite's cluster has 3 nodes shared with
// every other test, and its manager shares the test client's rest config,
// so the manager's own requests could not be told apart. Here the manager
// runs in-process with the cache options and rate limits of cmd/manager
// and a rest config of its own whose transport counts every request.
package scale

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	runtimemetrics "runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap/zapcore"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/controller"
	"github.com/meshkeeper/meshkeeper/internal/helm"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// Env turns the scale run on; without it TestScale skips.
const Env = "MESHKEEPER_SCALE"

const (
	operatorNamespace   = "meshkeeper-system"
	componentsNamespace = "istio-system"
	meshLabel           = "scale-mesh"
	fromVersion         = "1.27"
	toVersion           = "1.28"
	replicasPerApp      = 10
)

// sizes of the run; MESHKEEPER_SCALE_NODES, _NAMESPACES and _PODS override.
type sizes struct{ nodes, namespaces, pods int }

func sizesFromEnv(t *testing.T) sizes {
	s := sizes{nodes: 500, namespaces: 5000, pods: 5000}
	for name, p := range map[string]*int{"NODES": &s.nodes, "NAMESPACES": &s.namespaces, "PODS": &s.pods} {
		if v := os.Getenv(Env + "_" + name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				t.Fatalf("%s_%s=%q: want a non-negative integer", Env, name, v)
			}
			*p = n
		}
	}
	if s.nodes < 1 || s.namespaces < 1 {
		t.Fatalf("need at least one node and one namespace, got %+v", s)
	}
	return s
}

func TestScale(t *testing.T) {
	if os.Getenv(Env) != "1" {
		t.Skipf("the scale run starts a cluster of 500 kwok nodes and takes ~10 min: set %s=1 (make bench-scale)", Env)
	}
	cluster.SkipIfUnavailable(t)
	size := sizesFromEnv(t)
	g := NewWithT(t)
	ctrl.SetLogger(zap.New(zap.UseDevMode(true), zap.Level(zapcore.Level(2)))) // errors only
	ctx, cancel := context.WithCancel(context.Background())

	// The cluster, with every node created before Start returns.
	began := time.Now()
	nodes := make([]cluster.Node, size.nodes)
	for i := range nodes {
		nodes[i] = cluster.Node{Name: fmt.Sprintf("sc-node-%03d", i), KernelVersion: "6.1.0-28-amd64"}
	}
	kc, err := cluster.Start(ctx, cluster.Options{
		CRDDirectoryPaths: []string{filepath.Join("..", "..", "config", "crd", "bases")},
		Nodes:             nodes,
		StartTimeout:      15 * time.Minute,
	})
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() {
		cancel() // the manager stops before the cluster under it
		if err := kc.Stop(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
	})
	t.Logf("cluster with %d kwok nodes Ready in %s", size.nodes, time.Since(began).Round(time.Second))

	began = time.Now()
	populate(ctx, t, kc, size)
	t.Logf("%d namespaces, %d pods Ready in %s", size.namespaces, size.pods, time.Since(began).Round(time.Second))

	// The manager, as cmd/manager builds it.
	counts := &requestCounts{}
	cfg := rest.CopyConfig(kc.Config)
	cfg.UserAgent = "meshkeeper-scale-manager"
	cfg.QPS = -1 // what ctrl.GetConfig sets: no client-side limit, the server's fairness decides
	cfg.Wrap(counts.wrap)
	mgrCtx, stopMgr := context.WithCancel(ctx)
	defer stopMgr()
	startManager(mgrCtx, t, kc, cfg)

	k8s := kc.Client
	getMesh := func() *meshv1.Mesh {
		m := &meshv1.Mesh{}
		if err := k8s.Get(ctx, client.ObjectKey{Name: "default"}, m); err != nil {
			return nil
		}
		return m
	}
	ready := func() error {
		m := getMesh()
		if m == nil {
			return fmt.Errorf("mesh/default not found")
		}
		c := meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)
		switch {
		case c == nil:
			return fmt.Errorf("no Ready condition yet")
		case c.Status != metav1.ConditionTrue:
			return fmt.Errorf("ready=%s %s: %s", c.Status, c.Reason, c.Message)
		case m.Status.ObservedGeneration != m.Generation:
			return fmt.Errorf("observedGeneration %d, generation %d", m.Status.ObservedGeneration, m.Generation)
		}
		return nil
	}
	lastHistory := func() string {
		m := getMesh()
		if m == nil || len(m.Status.History) == 0 {
			return ""
		}
		h := m.Status.History[len(m.Status.History)-1]
		return h.Version + " " + string(h.Outcome)
	}

	// Install and upgrade, profiled.
	root, err := cluster.RepoRoot()
	g.Expect(err).NotTo(HaveOccurred())
	profilePath := filepath.Join(root, ".tmp", "scale-cpu.pprof")
	g.Expect(os.MkdirAll(filepath.Dir(profilePath), 0o755)).To(Succeed())
	prof, err := os.Create(profilePath)
	g.Expect(err).NotTo(HaveOccurred())
	defer prof.Close() //nolint:errcheck // closed after StopCPUProfile below
	peak := sampleHeap(ctx)
	cpu0 := cpuTime()
	rec0 := reconcileHistogram(t)
	g.Expect(pprof.StartCPUProfile(prof)).To(Succeed())
	profiling := true
	defer func() {
		if profiling {
			pprof.StopCPUProfile()
		}
	}()

	zero := &metav1.Duration{}
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    fromVersion,
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{meshLabel: "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes:       meshv1.NodeRolloutSpec{Bake: zero, Soak: zero},
				Namespaces:  meshv1.NamespaceRolloutSpec{Bake: zero},
				RetireAfter: zero,
			},
		},
	}
	began = time.Now()
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	g.Eventually(ready).WithTimeout(20 * time.Minute).WithPolling(250 * time.Millisecond).Should(Succeed())
	installed := time.Since(began)
	installedVersion := getMesh().Status.Version.Installed
	t.Logf("fresh install of %s: Ready in %s", installedVersion, installed.Round(time.Millisecond))

	began = time.Now()
	g.Eventually(func() error {
		m := getMesh()
		if m == nil {
			return fmt.Errorf("mesh not found")
		}
		m.Spec.Version = toVersion
		return k8s.Update(ctx, m)
	}).WithTimeout(time.Minute).Should(Succeed())
	g.Eventually(lastHistory).WithTimeout(30*time.Minute).WithPolling(250*time.Millisecond).
		Should(HavePrefix(toVersion+"."), "a rollout to %s recorded", toVersion)
	upgraded := time.Since(began)
	g.Expect(lastHistory()).To(HaveSuffix(" "+string(meshv1.OutcomeSucceeded)), "the upgrade succeeded")
	m := getMesh()
	upgradedVersion := m.Status.Version.Installed
	g.Expect(upgradedVersion).To(HavePrefix(toVersion + "."))
	t.Logf("canary upgrade %s → %s: Succeeded in %s", installedVersion, upgradedVersion, upgraded.Round(time.Millisecond))

	pprof.StopCPUProfile()
	profiling = false
	cpuBusy := cpuTime() - cpu0
	rec := reconcileHistogram(t).minus(rec0)

	// Every meshed namespace is on the new revision.
	var list corev1.NamespaceList
	g.Expect(k8s.List(ctx, &list, client.MatchingLabels{meshLabel: "on"})).To(Succeed())
	g.Expect(list.Items).To(HaveLen(size.namespaces))
	rev := strings.ReplaceAll(upgradedVersion, ".", "-")
	for _, ns := range list.Items {
		g.Expect(ns.Labels).To(HaveKeyWithValue(meshv1.LabelRevision, rev), ns.Name)
	}

	// At rest: Ready on the new version, then 60 s of counting.
	g.Eventually(ready).WithTimeout(5 * time.Minute).Should(Succeed())
	time.Sleep(5 * time.Second) // let the last status write's events arrive
	rest0 := counts.snapshot()
	cpuRest0 := cpuTime()
	const restWindow = 60 * time.Second
	time.Sleep(restWindow)
	atRest := counts.snapshot().minus(rest0)
	cpuRest := cpuTime() - cpuRest0
	g.Expect(ready()).To(Succeed(), "still Ready after the minute at rest")

	heapNow := []runtimemetrics.Sample{{Name: heapObjects}}
	runtimemetrics.Read(heapNow)
	table := []row{
		{"cluster", fmt.Sprintf("%d kwok nodes, %d namespaces (all selected), %d pods in %d Deployments of %d replicas; 2 cores, 24 GiB, shared",
			size.nodes, size.namespaces, size.pods, size.pods/replicasPerApp, replicasPerApp)},
		{"install → Ready (Ambient, " + installedVersion + ", bakes 0, no analysis)", secs(installed)},
		{"canary upgrade " + installedVersion + " → " + upgradedVersion + " until status.history Succeeded (bakes 0, retireAfter 0, no analysis)", secs(upgraded)},
		{"operator CPU, install + upgrade (process user+system time: the in-process manager, plus the test's polling and pprof)", fmt.Sprintf("%.1f s (%.0f%% of one core over %s)", cpuBusy.Seconds(), 100*cpuBusy.Seconds()/(installed+upgraded).Seconds(), secs(installed+upgraded))},
		{"operator CPU at rest, 60 s", fmt.Sprintf("%.2f s", cpuRest.Seconds())},
		{"peak RSS (VmHWM of the test process)", mib(vmHWM(t))},
		{"Go heap in use (objects), peak sampled every 0.5 s / at the end", mib(peak.Load()) + " / " + mib(heapNow[0].Value.Uint64())},
		{"manager API writes at rest, per minute (POST/PUT/PATCH/DELETE)", atRest.describe(true)},
		{"manager API reads at rest, per minute (GET/LIST; watches excluded)", atRest.describe(false)},
		{"reconciles of controller \"mesh\" during install + upgrade", strconv.FormatUint(rec.count, 10)},
		{"reconcile p50 / p99 (controller_runtime_reconcile_time_seconds, bucket-interpolated)", fmt.Sprintf("%s / %s", dur(rec.quantile(0.5)), dur(rec.quantile(0.99)))},
	}
	out := render(table)
	fmt.Println(out)
	g.Expect(os.WriteFile(filepath.Join(root, ".tmp", "bench-scale.md"), []byte(out+"\n"), 0o644)).To(Succeed())
	t.Logf("CPU profile of install + upgrade: %s (go tool pprof -top -cum %s)", profilePath, profilePath)
}

// populate creates the namespaces (all selected by the Mesh) and, in the
// first of them, Deployments of replicasPerApp pods, and waits until every
// pod is ready.
func populate(ctx context.Context, t *testing.T, kc *cluster.Cluster, size sizes) {
	g := NewWithT(t)
	apps := size.pods / replicasPerApp
	work := make(chan int)
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				name := fmt.Sprintf("sc-%04d", i)
				ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{meshLabel: "on"}}}
				if err := kc.Client.Create(ctx, ns); err != nil {
					failed.Store(&err)
					continue
				}
				if i < apps {
					if err := kc.Client.Create(ctx, app(name)); err != nil {
						failed.Store(&err)
					}
				}
			}
		}()
	}
	for i := range size.namespaces {
		work <- i
	}
	close(work)
	wg.Wait()
	if p := failed.Load(); p != nil {
		t.Fatalf("populate: %v", *p)
	}
	g.Eventually(func() (int32, error) {
		var list appsv1.DeploymentList
		if err := kc.Client.List(ctx, &list, client.MatchingLabels{"app": "scale"}); err != nil {
			return 0, err
		}
		var n int32
		for _, d := range list.Items {
			n += d.Status.ReadyReplicas
		}
		return n, nil
	}).WithTimeout(30*time.Minute).WithPolling(2*time.Second).Should(BeEquivalentTo(apps*replicasPerApp), "every pod Ready")
}

func app(namespace string) *appsv1.Deployment {
	lbl := map[string]string{"app": "scale"}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: namespace, Labels: lbl},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr(int32(replicasPerApp)),
			Selector: &metav1.LabelSelector{MatchLabels: lbl},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: lbl},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
				},
			},
		},
	}
}

// startManager runs the mesh controller in-process with cmd/manager's cache
// options (kept in step by hand: cmd/manager/main.go), without the webhook.
func startManager(ctx context.Context, t *testing.T, kc *cluster.Cluster, cfg *rest.Config) {
	g := NewWithT(t)
	g.Expect(kc.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: operatorNamespace}})).To(Succeed())
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:  kc.Scheme,
		Cache:   controller.CacheOptions(componentsNamespace),
		Metrics: metricsserver.Options{BindAddress: "0"},
	})
	g.Expect(err).NotTo(HaveOccurred())
	direct, err := client.New(cfg, client.Options{Scheme: kc.Scheme})
	g.Expect(err).NotTo(HaveOccurred())
	helmClient, err := helm.New(cfg, operatorNamespace, ctrl.Log.WithName("helm"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect((&controller.MeshReconciler{
		Client:              mgr.GetClient(),
		Recorder:            mgr.GetEventRecorder("meshkeeper"),
		Helm:                helmClient,
		Catalog:             bundle.Default(),
		ComponentsNamespace: componentsNamespace,
		Workloads:           direct,
	}).SetupWithManager(mgr)).To(Succeed())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("manager: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("manager did not stop within 30s")
		}
	})
	g.Expect(mgr.GetCache().WaitForCacheSync(ctx)).To(BeTrue())
}

// requestCounts counts the manager's requests by verb and resource, at its
// transport (kube-apiserver's apiserver_request_total has no client label).
type requestCounts struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *requestCounts) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripper(func(req *http.Request) (*http.Response, error) {
		verb := req.Method
		if req.Method == http.MethodGet && req.URL.Query().Get("watch") == "true" {
			verb = "WATCH"
		}
		key := verb + " " + resourceOf(req.URL.Path)
		c.mu.Lock()
		if c.n == nil {
			c.n = map[string]int{}
		}
		c.n[key]++
		c.mu.Unlock()
		return rt.RoundTrip(req)
	})
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// resourceOf: /api/v1/namespaces/x/pods/y → pods; /apis/g/v/nodes → nodes.
func resourceOf(path string) string {
	parts := strings.Split(strings.Trim(path, "/"), "/")
	switch {
	case len(parts) >= 2 && parts[0] == "api":
		parts = parts[2:]
	case len(parts) >= 3 && parts[0] == "apis":
		parts = parts[3:]
	default:
		return path
	}
	if len(parts) >= 3 && parts[0] == "namespaces" {
		parts = parts[2:]
	}
	if len(parts) == 0 {
		return "discovery"
	}
	if len(parts) >= 3 { // a subresource: namespaces/x/status
		return parts[0] + "/" + parts[2]
	}
	return parts[0]
}

type counted map[string]int

func (c *requestCounts) snapshot() counted {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := counted{}
	for k, v := range c.n {
		out[k] = v
	}
	return out
}

func (a counted) minus(b counted) counted {
	out := counted{}
	for k, v := range a {
		if d := v - b[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}

// describe sums writes (or reads) and names them.
func (a counted) describe(writes bool) string {
	total := 0
	var parts []string
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range a {
			if !yield(k) {
				return
			}
		}
	}) {
		verb := strings.SplitN(k, " ", 2)[0]
		isWrite := verb == http.MethodPost || verb == http.MethodPut || verb == http.MethodPatch || verb == http.MethodDelete
		if verb == "WATCH" || isWrite != writes {
			continue
		}
		total += a[k]
		parts = append(parts, fmt.Sprintf("%s %d", k, a[k]))
	}
	if total == 0 {
		return "0"
	}
	return fmt.Sprintf("%d (%s)", total, strings.Join(parts, ", "))
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func vmHWM(t *testing.T) uint64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatalf("read /proc/self/status: %v", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", rest, err)
			}
			return kb * 1024
		}
	}
	t.Fatalf("no VmHWM in /proc/self/status")
	return 0
}

const heapObjects = "/memory/classes/heap/objects:bytes"

// sampleHeap keeps the peak of the Go heap in use until ctx ends.
func sampleHeap(ctx context.Context) *atomic.Uint64 {
	var peak atomic.Uint64
	go func() {
		s := []runtimemetrics.Sample{{Name: heapObjects}}
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			runtimemetrics.Read(s)
			if v := s[0].Value.Uint64(); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return &peak
}

// histogram is controller "mesh"'s reconcile time histogram.
type histogram struct {
	count  uint64
	bounds []float64
	cum    []uint64
}

func reconcileHistogram(t *testing.T) histogram {
	families, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		t.Fatalf("gather controller-runtime metrics: %v", err)
	}
	for _, f := range families {
		if f.GetName() != "controller_runtime_reconcile_time_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			if !hasLabel(m, "controller", "mesh") {
				continue
			}
			h := histogram{count: m.GetHistogram().GetSampleCount()}
			for _, b := range m.GetHistogram().GetBucket() {
				h.bounds = append(h.bounds, b.GetUpperBound())
				h.cum = append(h.cum, b.GetCumulativeCount())
			}
			return h
		}
	}
	return histogram{}
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

func (h histogram) minus(b histogram) histogram {
	out := histogram{count: h.count - b.count, bounds: h.bounds, cum: slices.Clone(h.cum)}
	for i := range out.cum {
		if i < len(b.cum) {
			out.cum[i] -= b.cum[i]
		}
	}
	return out
}

// quantile interpolates within the bucket as histogram_quantile does.
func (h histogram) quantile(q float64) time.Duration {
	if h.count == 0 {
		return 0
	}
	rank := q * float64(h.count)
	lower, below := 0.0, uint64(0)
	for i, c := range h.cum {
		if float64(c) >= rank {
			upper := h.bounds[i]
			if math.IsInf(upper, 1) {
				return time.Duration(lower * float64(time.Second))
			}
			frac := (rank - float64(below)) / float64(c-below)
			return time.Duration((lower + (upper-lower)*frac) * float64(time.Second))
		}
		lower, below = h.bounds[i], c
	}
	return time.Duration(lower * float64(time.Second))
}

type row struct{ what, figure string }

func render(rows []row) string {
	var b strings.Builder
	b.WriteString("| what | figure |\n|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s |\n", r.what, r.figure)
	}
	return b.String()
}

func secs(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }
func mib(b uint64) string         { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }
func dur(d time.Duration) string  { return d.Round(time.Millisecond).String() }
func ptr[T any](v T) *T           { return &v }
