// Package e2e runs the built manager binary against a local cluster: etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler and kwok fake nodes,
// all built from pinned modules (make cluster-bins).
package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/localmesh"
)

var (
	kc      *cluster.Cluster
	manager *localmesh.Manager
	root    string
)

func TestE2E(t *testing.T) {
	RegisterFailHandler(Fail)
	RunSpecs(t, "meshkeeper e2e")
}

var _ = BeforeSuite(func(ctx SpecContext) {
	bin := os.Getenv("MESHKEEPER_MANAGER_BIN")
	if bin == "" {
		Fail("MESHKEEPER_MANAGER_BIN is not set: run the suite with `make test-e2e`, which builds bin/manager")
	}
	var err error
	root, err = cluster.RepoRoot()
	Expect(err).NotTo(HaveOccurred())
	logDir := filepath.Join(root, ".tmp", "e2e-logs")
	Expect(os.MkdirAll(logDir, 0o755)).To(Succeed())

	start := time.Now()
	kc, err = cluster.Start(ctx, cluster.Options{
		LogDir: logDir,
		Nodes: []cluster.Node{
			{Name: "node-a", KernelVersion: "5.4.0-216-generic", Labels: map[string]string{"pool": "canary"}},
			{Name: "node-b", KernelVersion: "5.15.0-130-generic"},
			{Name: "node-c", KernelVersion: "6.1.0-28-amd64"},
		},
	})
	Expect(err).NotTo(HaveOccurred())
	DeferCleanup(func() { Expect(kc.Stop()).To(Succeed()) })
	GinkgoWriter.Printf("local cluster with 3 kwok nodes up in %s\n", time.Since(start).Round(time.Millisecond))

	manager, err = localmesh.Install(ctx, kc, localmesh.Options{ManagerBin: bin, LogDir: logDir, OwnServiceAccount: true})
	Expect(err).NotTo(HaveOccurred())
	DeferCleanup(func() {
		if CurrentSpecReport().Failed() {
			GinkgoWriter.Printf("manager log tail:\n%s\n", manager.LogTail(60))
		}
		Expect(manager.Stop()).To(Succeed())
	})
	GinkgoWriter.Printf("meshkeeper manager ready in %s, running as ServiceAccount %s/%s with config/rbac\n",
		time.Since(start).Round(time.Millisecond), localmesh.Namespace, localmesh.ServiceAccount)
}, NodeTimeout(5*time.Minute))

// kubectl runs the cluster's kubectl and fails the spec on error.
func kubectl(ctx context.Context, args ...string) string {
	GinkgoHelper()
	out, stderr, err := kc.Kubectl(ctx, args...)
	Expect(err).NotTo(HaveOccurred(), "kubectl %v: %s", args, stderr)
	return out
}
