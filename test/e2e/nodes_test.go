package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// The node agent runs here as a real process for one kwok node (node-c):
// its preflight probes this machine's kernel, it loads (or fails to load)
// the real eBPF datapath, and writes node-c's MeshNode through the API
// server. The operator must act on that report.
var _ = Describe("Node eligibility from kernels and the node agent's report", Ordered, func() {
	var agentBin, logDir string

	BeforeAll(func() {
		requirePrivileged()
		agentBin = os.Getenv("MESHKEEPER_AGENT_BIN")
		if agentBin == "" {
			Fail("MESHKEEPER_AGENT_BIN is not set: run the suite with `make test-e2e`, which builds bin/agent")
		}
		logDir = filepath.Join(root, ".tmp", "e2e-logs")
	})

	podNodes := func(ctx context.Context, component string) []string {
		return strings.Fields(kubectl(ctx, "get", "pods", "-n", "istio-system", "-l", "meshkeeper.dev/component="+component,
			"--field-selector=status.phase=Running", "-o", "jsonpath={.items[*].spec.nodeName}"))
	}
	nodeLabel := func(ctx context.Context, node string) string {
		return kubectl(ctx, "get", "node", node, "-o", `jsonpath={.metadata.labels.meshkeeper\.dev/redirection}`)
	}
	preflightMessage := func(ctx context.Context) string {
		return kubectl(ctx, "get", "mesh", "default", "-o", `jsonpath={.status.conditions[?(@.type=="PreflightPassed")].message}`)
	}

	It("installs a Mesh with the iptables fallback", func(ctx SpecContext) {
		applyYAML(ctx, `apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  version: "1.28"
  dataplane: {mode: Ambient, redirection: EBPF, kernelFallback: IPTables}
  namespaces: {selector: {matchLabels: {nodes-e2e: "on"}}}
`)
		kubectl(ctx, "wait", "--for=condition=Ready", "mesh/default", "--timeout=120s")
		Expect(nodeLabel(ctx, "node-a")).To(Equal("iptables"))
		Expect(nodeLabel(ctx, "node-c")).To(Equal("ebpf"))
	})

	It("moves a node whose agent cannot load the datapath to the fallback, and back once it can", func(ctx SpecContext) {
		uname := unix.Utsname{}
		Expect(unix.Uname(&uname)).To(Succeed())
		release := unix.ByteSliceToString(uname.Release[:])
		pinPath := fmt.Sprintf("/sys/fs/bpf/meshkeeper-e2e-%d", os.Getpid())
		DeferCleanup(func() {
			out, err := exec.Command(agentBin, "uninstall", "--pin-path", pinPath).CombinedOutput()
			Expect(err).NotTo(HaveOccurred(), "agent uninstall: %s", out)
		})
		meshNode := func(ctx context.Context) string {
			out, _, _ := kc.Kubectl(ctx, "get", "meshnode", "node-c", "-o",
				`jsonpath={.status.kernelRelease} {.status.eligible} {.status.reason}`)
			return out
		}

		By("an agent whose datapath fails to load (no such cgroup)")
		agent := startAgent(ctx, agentBin, logDir, "agent-broken.log", pinPath, "--cgroup-path=/sys/fs/cgroup/meshkeeper-e2e-missing")
		Eventually(meshNode).WithContext(ctx).WithTimeout(30*time.Second).
			Should(HavePrefix(release+" false eBPF datapath failed to load"), "node-c's MeshNode is the real report from this kernel")
		Eventually(nodeLabel).WithContext(ctx).WithArguments("node-c").WithTimeout(30 * time.Second).Should(Equal("iptables"))
		Eventually(podNodes).WithContext(ctx).WithArguments("istio-cni").WithTimeout(30 * time.Second).Should(ConsistOf("node-a", "node-c"))
		Eventually(podNodes).WithContext(ctx).WithArguments("node-agent").WithTimeout(30 * time.Second).Should(ConsistOf("node-b"))
		Eventually(preflightMessage).WithContext(ctx).WithTimeout(30 * time.Second).
			Should(ContainSubstring("node-c: preflight: eBPF datapath failed to load"))
		mesh := &meshv1.Mesh{}
		Expect(kc.Client.Get(ctx, client.ObjectKey{Name: "default"}, mesh)).To(Succeed())
		Expect(mesh.Status.Nodes).To(Equal(meshv1.NodeCounts{Total: 3, Eligible: 1, Fallback: 2}))
		agent.stop()

		By("the same agent with a working datapath")
		agent = startAgent(ctx, agentBin, logDir, "agent.log", pinPath)
		Eventually(meshNode).WithContext(ctx).WithTimeout(30 * time.Second).Should(Equal(release + " true "))
		Expect(kubectl(ctx, "get", "meshnode", "node-c", "-o", "jsonpath={.status.redirection}")).To(Equal("ebpf"))
		Eventually(nodeLabel).WithContext(ctx).WithArguments("node-c").WithTimeout(30 * time.Second).Should(Equal("ebpf"))
		Eventually(podNodes).WithContext(ctx).WithArguments("node-agent").WithTimeout(30 * time.Second).Should(ConsistOf("node-b", "node-c"))
		Eventually(podNodes).WithContext(ctx).WithArguments("istio-cni").WithTimeout(30 * time.Second).Should(ConsistOf("node-a"))
		Eventually(preflightMessage).WithContext(ctx).WithTimeout(30 * time.Second).ShouldNot(ContainSubstring("node-c"))
		Expect(filepath.Join(pinPath, "links")).To(BeADirectory(), "the agent pinned its links")

		By("a restart keeps the datapath; leaving eBPF redirection removes it as the agent stops")
		agent.stop()
		Expect(filepath.Join(pinPath, "links")).To(BeADirectory(), "stopping on an eBPF node detaches nothing")
		agent = startAgent(ctx, agentBin, logDir, "agent-restarted.log", pinPath)
		Eventually(meshNode).WithContext(ctx).WithTimeout(30 * time.Second).Should(Equal(release + " true "))
		kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", `{"spec":{"dataplane":{"redirection":"IPTables","kernelFallback":null}}}`)
		Eventually(nodeLabel).WithContext(ctx).WithArguments("node-c").WithTimeout(30 * time.Second).Should(Equal("iptables"))
		agent.stop()
		Expect(pinPath).NotTo(BeAnExistingFile(), "an agent whose node left eBPF redirection removes its datapath")
		kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", `{"spec":{"dataplane":{"redirection":"EBPF","kernelFallback":"IPTables"}}}`)
		Eventually(nodeLabel).WithContext(ctx).WithArguments("node-c").WithTimeout(30 * time.Second).Should(Equal("ebpf"))
	})

	It("reports the Mesh Degraded while a pod the agent should redirect stays unenrolled, and recovers", func(ctx SpecContext) {
		pinPath := fmt.Sprintf("/sys/fs/bpf/meshkeeper-e2e-%d-enrol", os.Getpid())
		DeferCleanup(func() {
			out, err := exec.Command(agentBin, "uninstall", "--pin-path", pinPath).CombinedOutput()
			Expect(err).NotTo(HaveOccurred(), "agent uninstall: %s", out)
		})
		startAgent(ctx, agentBin, logDir, "agent-enrolment.log", pinPath)
		enrolment := func(ctx context.Context) string {
			out, _, _ := kc.Kubectl(ctx, "get", "meshnode", "node-c", "-o",
				`jsonpath={.status.enrolment.wanted} {.status.enrolment.enrolled} {.status.enrolment.notEnrolled[*].name}`)
			return out
		}
		degraded := func(ctx context.Context) string {
			return kubectl(ctx, "get", "mesh", "default", "-o", `jsonpath={.status.conditions[?(@.type=="Degraded")].reason} {.status.conditions[?(@.type=="Degraded")].message}`)
		}
		Eventually(enrolment).WithContext(ctx).WithTimeout(30 * time.Second).Should(Equal("0 0 "))

		By("a pod on node-c whose sandbox the agent cannot find (kwok runs no process)")
		applyYAML(ctx, `apiVersion: v1
kind: Namespace
metadata: {name: nodes-e2e-enrol, labels: {nodes-e2e: "on"}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: nodes-e2e-enrol}
spec:
  nodeName: node-c
  containers: [{name: web, image: registry.example/web:1}]
`)
		DeferCleanup(func(ctx SpecContext) {
			_, _, _ = kc.Kubectl(ctx, "delete", "namespace", "nodes-e2e-enrol", "--ignore-not-found", "--wait=false")
		})
		Eventually(enrolment).WithContext(ctx).WithTimeout(30*time.Second).Should(Equal("1 0 web-1"), "the agent wants it and says it is not enrolled")
		Eventually(degraded).WithContext(ctx).WithTimeout(90 * time.Second).Should(And(
			HavePrefix(meshv1.ReasonPodsNotEnrolled+" "),
			ContainSubstring("node-c: 1 of 1 wanted pods not enrolled: nodes-e2e-enrol/web-1")))

		By("the pod goes: the Mesh recovers")
		kubectl(ctx, "delete", "pod", "-n", "nodes-e2e-enrol", "web-1", "--grace-period=0", "--force")
		Eventually(enrolment).WithContext(ctx).WithTimeout(30 * time.Second).Should(Equal("0 0 "))
		Eventually(degraded).WithContext(ctx).WithTimeout(30 * time.Second).ShouldNot(HavePrefix(meshv1.ReasonPodsNotEnrolled))
	})

	It("keeps the old-kernel node out of the mesh with kernelFallback: Block, and says so", func(ctx SpecContext) {
		kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p", `{"spec":{"dataplane":{"kernelFallback":"Block"}}}`)
		Eventually(nodeLabel).WithContext(ctx).WithArguments("node-a").WithTimeout(30 * time.Second).Should(Equal("blocked"))
		Eventually(podNodes).WithContext(ctx).WithArguments("ztunnel").WithTimeout(30 * time.Second).Should(ConsistOf("node-b", "node-c"))
		Eventually(podNodes).WithContext(ctx).WithArguments("istio-cni").WithTimeout(30 * time.Second).Should(BeEmpty())
		Expect(podNodes(ctx, "node-agent")).To(ConsistOf("node-b", "node-c"))
		Eventually(func() string {
			return kubectl(ctx, "get", "mesh", "default", "-o", "jsonpath={.status.nodes.blocked}")
		}).WithTimeout(30 * time.Second).Should(Equal("1"))
		Eventually(preflightMessage).WithContext(ctx).WithTimeout(30 * time.Second).
			Should(ContainSubstring("node-a: kernel 5.4.0 < 5.10.0 required (blocked)"))
	})

	AfterAll(func(ctx SpecContext) {
		_, _, _ = kc.Kubectl(ctx, "delete", "mesh", "default", "--wait", "--timeout=120s", "--ignore-not-found")
		// The agent is gone; its report must not outlive this spec.
		_, _, _ = kc.Kubectl(ctx, "delete", "meshnode", "node-c", "--ignore-not-found")
	})
})

// agentProcess is a node agent running as a host process for a kwok node.
type agentProcess struct {
	cmd  *exec.Cmd
	done chan error
}

// startAgent runs `agent run` for node-c against the local cluster's API
// server; it is stopped (SIGTERM, which detaches nothing) by stop or at the
// end of the spec.
func startAgent(ctx context.Context, bin, logDir, logName, pinPath string, extra ...string) *agentProcess {
	GinkgoHelper()
	log, err := os.Create(filepath.Join(logDir, logName))
	Expect(err).NotTo(HaveOccurred())
	// Its own ZDS socket: the host's /var/run/ztunnel is the real node's
	// (its agent pod serves ztunnel there).
	zdsDir, err := os.MkdirTemp("", "mk-zds")
	Expect(err).NotTo(HaveOccurred())
	DeferCleanup(os.RemoveAll, zdsDir)
	args := append([]string{"run", "--node-name=node-c", "--kubeconfig=" + kc.KubeconfigPath,
		"--metrics-addr=127.0.0.1:0", "--pin-path=" + pinPath, "--proc-root=/proc",
		"--zds-socket=" + filepath.Join(zdsDir, "ztunnel.sock")}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	Expect(cmd.Start()).To(Succeed())
	a := &agentProcess{cmd: cmd, done: make(chan error, 1)}
	go func() { a.done <- cmd.Wait(); _ = log.Close() }()
	DeferCleanup(a.stop)
	return a
}

func (a *agentProcess) stop() {
	if a.cmd.ProcessState != nil || a.cmd.Process == nil {
		return
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
}

// applyYAML applies a manifest given inline.
func applyYAML(ctx context.Context, manifest string) {
	GinkgoHelper()
	f := filepath.Join(GinkgoT().TempDir(), "manifest.yaml")
	Expect(os.WriteFile(f, []byte(manifest), 0o644)).To(Succeed())
	kubectl(ctx, "apply", "-f", f)
}

// requirePrivileged skips a spec that needs root (eBPF), or fails it when
// MESHKEEPER_REQUIRE_PRIVILEGED=1 (CI).
func requirePrivileged() {
	GinkgoHelper()
	if os.Geteuid() == 0 {
		return
	}
	const why = "needs root (CAP_BPF, CAP_SYS_ADMIN) to run the node agent's eBPF datapath"
	if os.Getenv("MESHKEEPER_REQUIRE_PRIVILEGED") == "1" {
		Fail(why + "; MESHKEEPER_REQUIRE_PRIVILEGED=1 makes this a failure")
	}
	Skip(why + "; run as root (MESHKEEPER_REQUIRE_PRIVILEGED=1 fails instead of skipping)")
}
