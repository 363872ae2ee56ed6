// Package realnode runs the built manager against a local cluster with one
// real node (kubelet, containerd, runc, CNI on this machine) beside kwok
// nodes, and proves the node agent as a real pod from the shipped chart: its
// security context, capabilities, mounts and ServiceAccount. Images are
// built locally (test/images); upstream ztunnel, which cannot run here, is
// swapped for a stand-in through the manager's --image flag. Root only; with
// MESHKEEPER_REQUIRE_CLUSTER=1 a real node that cannot start fails the suite.
package realnode

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/localmesh"
)

const realNode = "real-0"

var (
	kc      *cluster.Cluster
	manager *localmesh.Manager
	root    string
)

func TestRealNode(t *testing.T) {
	RegisterFailHandler(Fail)
	RunSpecs(t, "meshkeeper e2e on a real node")
}

// ginkgoTB lets cluster.SkipIfNoRealNode skip or fail a Ginkgo suite.
type ginkgoTB struct{}

func (ginkgoTB) Helper()                           {}
func (ginkgoTB) Skipf(format string, args ...any)  { Skip(fmt.Sprintf(format, args...)) }
func (ginkgoTB) Fatalf(format string, args ...any) { Fail(fmt.Sprintf(format, args...)) }

var _ = BeforeSuite(func(ctx SpecContext) {
	if _, err := cluster.Available(); err != nil {
		if cluster.ExitCodeUnavailable() != 0 {
			Fail(err.Error())
		}
		Skip(err.Error())
	}
	cluster.SkipIfNoRealNode(ginkgoTB{})
	bin := os.Getenv("MESHKEEPER_MANAGER_BIN")
	if bin == "" {
		Fail("MESHKEEPER_MANAGER_BIN is not set: run the suite with `make test-e2e`, which builds bin/manager")
	}
	var err error
	root, err = cluster.RepoRoot()
	Expect(err).NotTo(HaveOccurred())
	logDir := filepath.Join(root, ".tmp", "e2e-realnode-logs")
	Expect(os.RemoveAll(logDir)).To(Succeed())
	Expect(os.MkdirAll(logDir, 0o755)).To(Succeed())

	tar := filepath.Join(GinkgoT().TempDir(), "images.tar")
	took, err := cluster.BuildImages(ctx, tar, cluster.PauseImage, cluster.WorkloadImage, cluster.ZtunnelStandInImage, cluster.AgentImage)
	Expect(err).NotTo(HaveOccurred())
	GinkgoWriter.Printf("built images in %s\n", took.Round(time.Millisecond))

	start := time.Now()
	kc, err = cluster.Start(ctx, cluster.Options{
		LogDir: logDir,
		Nodes: []cluster.Node{
			{Name: "kwok-a", KernelVersion: "6.1.0-28-amd64"},
			{Name: "kwok-b", KernelVersion: "5.15.0-130-generic"},
		},
		RealNode:     &cluster.RealNode{Name: realNode, Images: []string{tar}},
		Stdout:       GinkgoWriter,
		StartTimeout: 3 * time.Minute,
	})
	Expect(err).NotTo(HaveOccurred(), "a real node must start on this machine")
	DeferCleanup(func() { Expect(kc.Stop()).To(Succeed()) })
	GinkgoWriter.Printf("cluster with real node %s and 2 kwok nodes up in %s (real node set-up %s)\n",
		realNode, time.Since(start).Round(time.Millisecond), kc.RealNode().SetupTime.Round(time.Millisecond))

	// What istiod would publish into istio-system; istiod itself runs on a
	// kwok node (it tolerates no real-node taint), so nothing else does.
	ensureNamespace(ctx, "istio-system")
	Expect(kc.Client.Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "istio-ca-root-cert"},
		Data:       map[string]string{"root-cert.pem": string(kc.Config.CAData)},
	})).To(Succeed())

	// This machine's root lacks CAP_SYS_RESOURCE in its bounding set, so
	// runc cannot grant it ("unable to apply caps"); kernel 6.18 charges BPF
	// memory to the memory cgroup and the agent does not need it.
	// The CNI plugin goes into the real node's own CNI directories and its
	// socket into the node's state dir, so nothing lands on the machine.
	agentValues := filepath.Join(logDir, "node-agent-values.yaml")
	rn := kc.RealNode()
	Expect(os.WriteFile(agentValues, []byte(fmt.Sprintf("memlockCapability: false\ncni:\n  binDir: %s\n  confDir: %s\n  socketDir: %s\n",
		rn.CNIBinDir, rn.CNIConfDir, filepath.Join(rn.StateDir, "run"))), 0o644)).To(Succeed())
	manager, err = localmesh.Install(ctx, kc, localmesh.Options{ManagerBin: bin, LogDir: logDir, Args: []string{
		"--component-values=node-agent=" + agentValues,
		"--agent-image=" + cluster.AgentImage.Ref,
		"--image=ztunnel=" + cluster.ZtunnelStandInImage.Ref,
		"--image=pause=" + cluster.PauseImage.Ref,
	}})
	Expect(err).NotTo(HaveOccurred())
	DeferCleanup(func() {
		if CurrentSpecReport().Failed() {
			GinkgoWriter.Printf("manager log tail:\n%s\n", manager.LogTail(60))
		}
		Expect(manager.Stop()).To(Succeed())
	})
}, NodeTimeout(8*time.Minute))

func ensureNamespace(ctx context.Context, name string) {
	GinkgoHelper()
	err := kc.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
	if !apierrors.IsAlreadyExists(err) {
		Expect(err).NotTo(HaveOccurred())
	}
}

// kubectl runs the cluster's kubectl and fails the spec on error.
func kubectl(ctx context.Context, args ...string) string {
	GinkgoHelper()
	out, stderr, err := kc.Kubectl(ctx, args...)
	Expect(err).NotTo(HaveOccurred(), "kubectl %v: %s", args, stderr)
	return out
}
