package helm

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/testr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// The cluster tests run against one local cluster (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler and two kwok nodes), so that
// Deployments and DaemonSets really roll out and become ready. Each test
// uses its own release and namespace and runs in parallel.

const storageNS = "meshkeeper-system"

var (
	kc          *cluster.Cluster
	clusterSkip string // why cluster tests skip, when they do
)

var testNodes = []cluster.Node{{Name: "node-a"}, {Name: "node-b"}}

func TestMain(m *testing.M) {
	if _, err := cluster.Available(); err != nil {
		if cluster.ExitCodeUnavailable() != 0 {
			fmt.Println(err)
			os.Exit(1)
		}
		// Unit tests still run; cluster tests skip saying why.
		clusterSkip = err.Error()
		os.Exit(m.Run())
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	began := time.Now()
	var err error
	kc, err = cluster.Start(ctx, cluster.Options{Nodes: testNodes})
	if err != nil {
		fmt.Println("start cluster:", err)
		return 1
	}
	defer func() { _ = kc.Stop() }()
	fmt.Printf("cluster up in %v\n", time.Since(began).Round(time.Millisecond))
	if err := kc.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: storageNS}}); err != nil {
		fmt.Println("create storage namespace:", err)
		return 1
	}
	return m.Run()
}

// newClient returns a Client on the test cluster, logging to t at V(1).
func newClient(t *testing.T) *Client {
	t.Helper()
	if kc == nil {
		t.Skip(clusterSkip)
	}
	c, err := New(kc.Config, storageNS, testLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func testLogger(t *testing.T) logr.Logger {
	v := 0
	if os.Getenv("MESHKEEPER_TEST_DEBUG") != "" {
		v = 2
	}
	return testr.NewWithOptions(t, testr.Options{Verbosity: v})
}
