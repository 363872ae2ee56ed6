package controller

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/onsi/gomega"
	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// The integration tests run the reconciler in-process against a real local
// cluster (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
// kwok nodes, so the components' pods really get scheduled and become
// Ready), without the admission webhook, so a spec that admission would
// refuse can reach the reconciler.

const (
	operatorNamespace   = "meshkeeper-system"
	componentsNamespace = "istio-system"
)

var (
	k8s        client.Client
	kc         *cluster.Cluster
	helmClient *helm.Client
	// suiteCatalog is the suite reconciler's catalog: the embedded one,
	// unless a test swaps in its own live catalog (and swaps it back).
	suiteCatalog   = &swappableCatalog{}
	catalogChecked = make(chan event.GenericEvent, 1)
	// metricsAddr is where the suite's manager serves /metrics.
	metricsAddr string
	// windowClock is what the reconciler reads maintenance windows from:
	// the real time unless a test sets one.
	windowClock = &settableClock{}
)

// swappableCatalog is the embedded catalog until a test Uses another.
type swappableCatalog struct{ live atomic.Pointer[bundle.Live] }

func (s *swappableCatalog) current() *bundle.Live {
	if l := s.live.Load(); l != nil {
		return l
	}
	return embeddedLive
}

var embeddedLive = bundle.NewLive(bundle.Default(), "")

// withoutIstiodWebhooks makes the reconciler's catalog the embedded one with
// istiod's injector and config validator off until the test ends. No istiod
// runs in this suite, and both webhooks fail closed: with them on, no pod a
// restart creates in a meshed namespace could be admitted. test/istiod has
// a real istiod inject by the labels meshkeeper writes.
func withoutIstiodWebhooks(t *testing.T, g gomega.Gomega) {
	t.Helper()
	cat, err := bundle.Default().WithValues(bundle.Istiod, map[string]any{
		"validation": map[string]any{"enabled": false}, "injection": map[string]any{"enabled": false}})
	g.Expect(err).NotTo(gomega.HaveOccurred())
	suiteCatalog.Use(t, bundle.NewLive(cat, ""))
}

func (s *swappableCatalog) Catalog() *bundle.Catalog  { return s.current().Catalog() }
func (s *swappableCatalog) State() bundle.SourceState { return s.current().State() }

// Use makes l the reconciler's catalog until the test ends.
func (s *swappableCatalog) Use(t interface{ Cleanup(func()) }, l *bundle.Live) {
	s.live.Store(l)
	t.Cleanup(func() { s.live.Store(nil) })
}

// settableClock is the real clock until Set, then a fixed time.
type settableClock struct {
	mu sync.Mutex
	at time.Time
}

func (c *settableClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.at.IsZero() {
		return time.Now()
	}
	return c.at
}

func (c *settableClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }

// Set fixes the time; the zero time is the real clock again.
func (c *settableClock) Set(at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.at = at
}

func TestMain(m *testing.M) {
	if _, err := cluster.Available(); err != nil {
		fmt.Println(err)
		os.Exit(cluster.ExitCodeUnavailable())
	}
	level := zapcore.Level(2) // errors only
	if os.Getenv("MESHKEEPER_TEST_DEBUG") != "" {
		level = -1
	}
	ctrl.SetLogger(zap.New(zap.UseDevMode(true), zap.Level(level)))
	// Subtests make their own Gomega; they inherit these defaults.
	gomega.SetDefaultEventuallyTimeout(slow)
	gomega.SetDefaultEventuallyPollingInterval(200 * time.Millisecond)
	gomega.SetDefaultConsistentlyDuration(2 * time.Second)
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var err error
	kc, err = cluster.Start(ctx, cluster.Options{
		CRDDirectoryPaths: []string{filepath.Join("..", "..", "config", "crd", "bases")},
		// Every spire-server install binds one volume and its claim outlives
		// the release (SPIRE's data is kept, as on a real cluster); the
		// default 4 ran out after the fourth SPIRE test, and later tests'
		// spire-server never became ready.
		Volumes: 32,
		Nodes: []cluster.Node{
			{Name: "node-new", KernelVersion: "6.1.0-28-amd64", Labels: map[string]string{"pool": "canary"}},
			{Name: "node-mid", KernelVersion: "5.15.0-130-generic"},
			{Name: "node-old", KernelVersion: "5.4.0-216-generic"},
		},
	})
	if err != nil {
		fmt.Println("start cluster:", err)
		return 1
	}
	defer func() {
		cancel() // stop the manager before the cluster under it
		_ = kc.Stop()
	}()
	k8s = kc.Client
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: operatorNamespace}}); err != nil {
		fmt.Println("create namespace:", err)
		return 1
	}
	helmClient, err = helm.New(kc.Config, operatorNamespace, ctrl.Log.WithName("helm"))
	if err != nil {
		fmt.Println("helm:", err)
		return 1
	}
	// The manager serves its real /metrics (TestDashboardAndRules scrapes it).
	metricsAddr, err = freeLoopbackAddr()
	if err != nil {
		fmt.Println("metrics port:", err)
		return 1
	}
	mgr, err := ctrl.NewManager(kc.Config, ctrl.Options{Scheme: kc.Scheme, Metrics: metricsserver.Options{BindAddress: metricsAddr}})
	if err != nil {
		fmt.Println("manager:", err)
		return 1
	}
	if err := (&MeshReconciler{
		Client:              mgr.GetClient(),
		Recorder:            mgr.GetEventRecorder("meshkeeper"),
		Helm:                helmClient,
		Catalogs:            suiteCatalog,
		CatalogChecked:      catalogChecked,
		Clock:               windowClock,
		ComponentsNamespace: componentsNamespace,
		SpireServer:         testSpire.connect,
		SpireRelay:          testSpire.relay,
		Workloads:           kc.Client,
	}).SetupWithManager(mgr); err != nil {
		fmt.Println("setup:", err)
		return 1
	}
	go func() { _ = mgr.Start(ctx) }()
	return m.Run()
}

func ptr[T any](v T) *T { return &v }

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close() //nolint:errcheck // only its port is wanted
	return l.Addr().String(), nil
}

// slow is the timeout for anything that waits on workloads becoming ready.
const slow = 90 * time.Second
