package realnode

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/agent"
	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

const (
	appsNS     = "apps"
	clients    = 3
	cgroup2    = "/sys/fs/cgroup/unified"
	agentLabel = "meshkeeper.dev/component=node-agent"
)

const meshYAML = `apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  version: "1.27.2"
  dataplane: {mode: Ambient, redirection: EBPF, kernelFallback: IPTables}
  namespaces:
    selector: {matchLabels: {mesh: "on"}}
`

var _ = Describe("The node agent as a real pod on a real node", Ordered, func() {
	var serverIP string
	var clientIPs []string
	var agentPod corev1.Pod

	It("runs from the shipped chart on the real node once an Ambient/EBPF Mesh is Ready", func(ctx SpecContext) {
		Expect(kc.CreateNamespace(ctx, appsNS, map[string]string{"mesh": "on"})).To(Succeed())
		applyMesh(ctx)
		start := time.Now()
		Eventually(func() string {
			stopOnBrokenPod(ctx)
			return kubectlQuiet(ctx, "get", "mesh", "default", "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		}).WithContext(ctx).WithTimeout(4*time.Minute).WithPolling(time.Second).Should(Equal("True"), func() string {
			return kubectlQuiet(ctx, "get", "mesh", "default", "-o", "yaml") + "\n" + kubectlQuiet(ctx, "get", "pods", "-A", "-o", "wide")
		})
		GinkgoWriter.Printf("Mesh Ready %s after apply\n", time.Since(start).Round(time.Millisecond))
		agentPod = runningAgentPod(ctx)
		Expect(agentPod.Spec.ServiceAccountName).To(Equal("meshkeeper-node-agent"))
		Expect(agentPod.Spec.Containers[0].Image).To(Equal(cluster.AgentImage.Ref))
		Expect(agentPod.Spec.Containers[0].SecurityContext.Privileged).To(HaveValue(BeFalse()), "the chart's real security context, not privileged")

		// istiod stays off the real node; ztunnel (its stand-in) runs there.
		Expect(podNodes(ctx, "istio-system", "meshkeeper.dev/component=istiod")).NotTo(ContainElement(realNode))
		Expect(podNodes(ctx, "istio-system", "meshkeeper.dev/component=ztunnel")).To(ContainElement(realNode))
	})

	It("reports this kernel truthfully from inside the pod (agent preflight)", func(ctx SpecContext) {
		out := kubectl(ctx, "exec", "-n", "istio-system", agentPod.Name, "-c", "agent", "--", "/agent", "preflight")
		var r struct {
			KernelRelease string `json:"kernelRelease"`
			BTF           bool   `json:"btf"`
			CgroupV2Path  string `json:"cgroupV2Path"`
			BPFFS         bool   `json:"bpffs"`
			Eligible      bool   `json:"eligible"`
		}
		Expect(json.Unmarshal([]byte(out), &r)).To(Succeed(), out)
		release, err := os.ReadFile("/proc/sys/kernel/osrelease")
		Expect(err).NotTo(HaveOccurred())
		_, btfErr := os.Stat("/sys/kernel/btf/vmlinux")
		Expect(r.KernelRelease).To(Equal(strings.TrimSpace(string(release))), out)
		Expect(r.BTF).To(Equal(btfErr == nil), out)
		Expect(r.CgroupV2Path).To(Equal(cgroup2), out)
		Expect(r.BPFFS).To(BeTrue(), out)
		Expect(r.Eligible).To(BeTrue(), out)
		GinkgoWriter.Printf("agent preflight in the pod:\n%s\n", out)

		var mn meshv1.MeshNode
		Expect(kc.Client.Get(ctx, client.ObjectKey{Name: realNode}, &mn)).To(Succeed())
		Expect(mn.Status.KernelRelease).To(Equal(r.KernelRelease))
		Expect(mn.Status.Eligible).To(BeTrue())
	})

	It("chains its CNI plugin into the real node's conflist, after the node's own plugins, and serves it", func(ctx SpecContext) {
		rn := kc.RealNode()
		Eventually(func(g Gomega) {
			ps := conflistPlugins(g)
			g.Expect(pluginTypes(ps)).To(Equal([]string{"bridge", "loopback", cni.PluginType}))
			g.Expect(ps[2]["socket"]).To(Equal(filepath.Join(rn.StateDir, "run", "cni.sock")))
			g.Expect(ps[2]["excludeNamespaces"]).To(ConsistOf("kube-system", "istio-system"))
		}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
		st, err := os.Stat(filepath.Join(rn.CNIBinDir, cni.PluginType))
		Expect(err).NotTo(HaveOccurred(), "the plugin binary in the node's CNI bin directory")
		Expect(st.Mode().Perm() & 0o111).NotTo(BeZero())
		sock, err := os.Stat(filepath.Join(rn.StateDir, "run", "cni.sock"))
		Expect(err).NotTo(HaveOccurred())
		Expect(sock.Mode() & os.ModeSocket).NotTo(BeZero())
	})

	It("enrols the meshed namespace's pods: agent metrics, MeshNode status and the bpf map agree", func(ctx SpecContext) {
		Expect(kc.Client.Create(ctx, serverPod("server"))).To(Succeed())
		serverIP = waitPodIP(ctx, appsNS, "server")
		for i := range clients {
			Expect(kc.Client.Create(ctx, clientPod(fmt.Sprintf("client-%d", i), serverIP+":8080"))).To(Succeed())
		}
		clientIPs = nil
		for i := range clients {
			clientIPs = append(clientIPs, waitPodIP(ctx, appsNS, fmt.Sprintf("client-%d", i)))
		}
		wanted := clients + 1
		expectEnrolled(ctx, wanted)

		// The agent handed every meshed pod to ztunnel (its stand-in).
		Eventually(func(g Gomega) {
			st := standInStats(g, ctx)
			g.Expect(st.Ready).To(BeTrue())
			g.Expect(st.Workloads).To(Equal(wanted), "workloads the stand-in has listeners for")
		}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
		// Redirection works: every connection each client made went through
		// the stand-in's outbound listener in the client's netns, which
		// proxied it to the server; none failed.
		expectThroughStandIn(ctx, 2*time.Second)
		for _, ip := range clientIPs {
			c, err := cluster.GetWorkloadStats(ctx, ip+":9000")
			Expect(err).NotTo(HaveOccurred())
			Expect(c.Failed).To(BeZero(), "client %s: %s", ip, c.LastError)
		}
	})

	It("captures the meshed server's inbound connections to ztunnel's place, with no listener handed to the agent", func(ctx SpecContext) {
		// The stand-in's 15006 listener in the server's netns is found by
		// the kernel (sock_ops, as it starts listening): every connection
		// the server answers comes through it.
		expectInboundThroughStandIn(ctx, serverIP, 2*time.Second)
	})

	It("lets pods of an unmeshed namespace, and pods labelled istio.io/dataplane-mode=none, bypass ztunnel", func(ctx SpecContext) {
		const plainNS = "plain"
		Expect(kc.CreateNamespace(ctx, plainNS, nil)).To(Succeed())
		plain := clientPod("plain-client", serverIP+":8080")
		plain.Namespace = plainNS
		optOut := clientPod("opt-out-client", serverIP+":8080")
		optOut.Labels["istio.io/dataplane-mode"] = "none"
		Expect(kc.Client.Create(ctx, plain)).To(Succeed())
		Expect(kc.Client.Create(ctx, optOut)).To(Succeed())
		DeferCleanup(func(ctx SpecContext) {
			kubectl(ctx, "delete", "pod", "-n", appsNS, optOut.Name, "--wait", "--timeout=60s")
			kubectl(ctx, "delete", "namespace", plainNS, "--wait", "--timeout=120s")
		})
		for _, p := range []*corev1.Pod{plain, optOut} {
			ip := waitPodIP(ctx, p.Namespace, p.Name)
			Eventually(func(g Gomega) {
				c := stats(g, ctx, ip+":9000")
				g.Expect(c.OK).To(BeNumerically(">=", 50), "%s/%s talks to the server", p.Namespace, p.Name)
				g.Expect(c.Failed).To(BeZero(), "%s/%s: %s", p.Namespace, p.Name, c.LastError)
			}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
			st := standInStats(Default, ctx)
			out := st.Count(p.Namespace, p.Name, "outbound")
			Expect(out.OK+out.Failed).To(BeZero(), "connections of %s/%s through the stand-in", p.Namespace, p.Name)
			// Inbound capture does not depend on the client: at the meshed
			// server, its connections come through ztunnel's place all the
			// same, and none reaches the server around it.
			Eventually(func(g Gomega) {
				c0 := stats(g, ctx, ip+":9000")
				in := standInStats(g, ctx).InboundFrom(appsNS, "server", ip)
				c1 := stats(g, ctx, ip+":9000")
				g.Expect(c0.OK).To(BeNumerically(">=", 50))
				g.Expect(in).To(BeNumerically(">=", c0.OK-2), "inbound connections from %s/%s through the stand-in vs the client's own count", p.Namespace, p.Name)
				g.Expect(in).To(BeNumerically("<=", c1.OK+2), "inbound connections from %s/%s through the stand-in vs the client's own count", p.Namespace, p.Name)
			}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
			Expect(stats(Default, ctx, serverIP+":9000").Peers[ip]).To(BeZero(), "connections from %s/%s the server answered directly", p.Namespace, p.Name)
		}
		// Neither is enrolled nor handed to ztunnel.
		Expect(standInStats(Default, ctx).Workloads).To(Equal(clients + 1))
		expectEnrolled(ctx, clients+1)
	})

	It("loses no connection and keeps every pod enrolled while its DaemonSet replaces the agent pod", func(ctx SpecContext) {
		before := standInStats(Default, ctx)
		old := agentPod
		kubectl(ctx, "delete", "pod", "-n", "istio-system", old.Name, "--wait=false")
		Eventually(func(g Gomega) {
			p := agentPodOnRealNode(g, ctx)
			g.Expect(p.UID).NotTo(Equal(old.UID))
			g.Expect(podReady(p)).To(BeTrue())
			agentPod = *p
		}).WithContext(ctx).WithTimeout(90 * time.Second).WithPolling(200 * time.Millisecond).Should(Succeed())
		GinkgoWriter.Printf("agent pod %s replaced by %s\n", old.Name, agentPod.Name)
		expectEnrolled(ctx, clients+1)
		// Traffic kept flowing through the datapath during and after.
		time.Sleep(3 * time.Second)
		after := standInStats(Default, ctx)
		Expect(after.Workloads).To(Equal(clients+1), "ztunnel kept every workload: the new agent's snapshot named them all")
		for i, ip := range clientIPs {
			name := fmt.Sprintf("client-%d", i)
			c, err := cluster.GetWorkloadStats(ctx, ip+":9000")
			Expect(err).NotTo(HaveOccurred())
			Expect(c.Failed).To(BeZero(), "client %s failed connections across the agent restart: %s", name, c.LastError)
			b, a := before.Count(appsNS, name, "outbound"), after.Count(appsNS, name, "outbound")
			Expect(a.Failed).To(BeZero(), "stand-in connections of %s that failed (client: %d failed, %d ok; stand-in's last error: %s)", name, c.Failed, c.OK, after.LastError)
			Expect(a.OK).To(BeNumerically(">", b.OK+50), "client %s still goes through ztunnel's place after the restart", name)
		}
		expectThroughStandIn(ctx, 2*time.Second)
	})

	It("accepts new connections through a restarted ztunnel (stand-in), which gets a new snapshot", func(ctx SpecContext) {
		old := podOnRealNode(Default, ctx, "ztunnel")
		kubectl(ctx, "delete", "pod", "-n", "istio-system", old.Name, "--wait=false")
		var replaced *corev1.Pod
		Eventually(func(g Gomega) {
			p := podOnRealNode(g, ctx, "ztunnel")
			g.Expect(p.UID).NotTo(Equal(old.UID))
			g.Expect(podReady(p)).To(BeTrue(), "ready only once it got the agent's snapshot")
			replaced = p
		}).WithContext(ctx).WithTimeout(90 * time.Second).WithPolling(200 * time.Millisecond).Should(Succeed())
		GinkgoWriter.Printf("ztunnel stand-in %s replaced by %s\n", old.Name, replaced.Name)
		st := standInStats(Default, ctx)
		Expect(st.Ready).To(BeTrue())
		Expect(st.Workloads).To(Equal(clients+1), "the new ztunnel's snapshot carries every meshed pod")
		// Connections in flight or attempted while no ztunnel listened may
		// have failed; new ones go through the new one, every one of them.
		expectThroughStandIn(ctx, 2*time.Second)
	})

	It("lets none of 50 pods that connect the instant they start escape the redirect (CNI-time enrolment)", func(ctx SpecContext) {
		before := agentMetrics(Default, ctx)["meshkeeper_agent_cni_add_duration_seconds_count"]
		expectNoEscapes(ctx, serverIP, 50, 10)
		expectEnrolled(ctx, clients+1)
		// The agent's metrics count the ADDs it answered.
		Expect(agentMetrics(Default, ctx)["meshkeeper_agent_cni_add_duration_seconds_count"] - before).To(BeNumerically(">=", 50))
	})

	It("lets no connection of a pod being deleted escape: it stays redirected until its sandbox is gone", func(ctx SpecContext) {
		expectNoEscapesAtPodStop(ctx, serverIP, 6)
		expectEnrolled(ctx, clients+1)
	})

	It("fails closed: with no agent on the node a meshed pod does not start; once the agent is back it starts enrolled", func(ctx SpecContext) {
		rn := kc.RealNode()
		sockPath := filepath.Join(rn.StateDir, "run", "cni.sock")
		// Keep the agent off the node: a nodeSelector matching no node, on
		// a DaemonSet taken over from meshkeeper's drift repair
		// (meshkeeper.dev/ignore) for the while.
		offPatch := `{"metadata":{"annotations":{"meshkeeper.dev/ignore":"true"}},"spec":{"template":{"spec":{"nodeSelector":{"meshkeeper.test/agent-off":"true"}}}}}`
		onPatch := `{"metadata":{"annotations":{"meshkeeper.dev/ignore":null}},"spec":{"template":{"spec":{"nodeSelector":{"meshkeeper.test/agent-off":null}}}}}`
		kubectl(ctx, "patch", "daemonset", "-n", "istio-system", "meshkeeper-node-agent", "--type=merge", "-p", offPatch)
		DeferCleanup(func(ctx SpecContext) {
			_, _, _ = kc.Kubectl(ctx, "patch", "daemonset", "-n", "istio-system", "meshkeeper-node-agent", "--type=merge", "-p", onPatch)
		})
		Eventually(func(g Gomega) {
			var pods corev1.PodList
			g.Expect(kc.Client.List(ctx, &pods, client.InNamespace("istio-system"), client.MatchingLabels{"meshkeeper.dev/component": "node-agent"})).To(Succeed())
			for _, p := range pods.Items {
				g.Expect(p.Spec.NodeName).NotTo(Equal(realNode), "agent pod %s still on %s", p.Name, realNode)
			}
			_, err := os.Stat(sockPath)
			g.Expect(os.IsNotExist(err)).To(BeTrue(), "the agent's CNI socket after it stopped: %v", err)
		}).WithContext(ctx).WithTimeout(90 * time.Second).WithPolling(250 * time.Millisecond).Should(Succeed())
		// The plugin stays chained: the node still redirects with eBPF.
		Expect(pluginTypes(conflistPlugins(Default))).To(ContainElement(cni.PluginType))

		Expect(kc.Client.Create(ctx, serverPod("held"))).To(Succeed())
		DeferCleanup(func(ctx SpecContext) {
			_, _, _ = kc.Kubectl(ctx, "delete", "pod", "-n", appsNS, "held", "--ignore-not-found", "--wait=false")
		})
		var why string
		Eventually(func(g Gomega) {
			var events corev1.EventList
			g.Expect(kc.Client.List(ctx, &events, client.InNamespace(appsNS))).To(Succeed())
			for _, e := range events.Items {
				if e.InvolvedObject.Name == "held" && e.Reason == "FailedCreatePodSandBox" {
					why = e.Message
				}
			}
			g.Expect(why).To(ContainSubstring("the meshkeeper node agent is not serving on this node"))
		}).WithContext(ctx).WithTimeout(60 * time.Second).WithPolling(500 * time.Millisecond).Should(Succeed())
		GinkgoWriter.Printf("pod apps/held while the agent is away: FailedCreatePodSandBox: %s\n", why)
		var held corev1.Pod
		Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: appsNS, Name: "held"}, &held)).To(Succeed())
		Expect(held.Status.Phase).To(Equal(corev1.PodPending))
		Expect(held.Status.PodIP).To(BeEmpty(), "no sandbox, no address")

		// kube-system is excluded: the node's system pods start regardless.
		sys := serverPod("excluded-while-agent-away")
		sys.Namespace = "kube-system"
		Expect(kc.Client.Create(ctx, sys)).To(Succeed())
		waitPodIP(ctx, "kube-system", sys.Name)
		kubectl(ctx, "delete", "pod", "-n", "kube-system", sys.Name, "--wait=false")

		kubectl(ctx, "patch", "daemonset", "-n", "istio-system", "meshkeeper-node-agent", "--type=merge", "-p", onPatch)
		back := time.Now()
		agentPod = runningAgentPod(ctx)
		waitPodIP(ctx, appsNS, "held")
		GinkgoWriter.Printf("agent back: pod apps/held started %s after the agent's DaemonSet returned to the node\n", time.Since(back).Round(time.Millisecond))
		Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: appsNS, Name: "held"}, &held)).To(Succeed())
		entries, err := agent.PinnedEnrolled("")
		Expect(err).NotTo(HaveOccurred())
		var enrolledUIDs []string
		for _, e := range entries {
			enrolledUIDs = append(enrolledUIDs, agent.PodUIDOf(&e))
		}
		Expect(enrolledUIDs).To(ContainElement(string(held.UID)), "apps/held enrolled once it started")
		kubectl(ctx, "delete", "pod", "-n", appsNS, "held", "--wait", "--timeout=60s")
		expectEnrolled(ctx, clients+1)
	})

	It("is scraped on the real node through the shipped scrape config (pod SD), and the default SLO names the failing namespace", func(ctx SpecContext) {
		expectScrapedThroughTheShippedConfig(ctx)
	})

	It("moves the real node's agent and ztunnel to a new version in a node wave under traffic, with no failed connection, no escape and every pod still enrolled", func(ctx SpecContext) {
		expectNodeWaveUnderTraffic(ctx, serverIP, "1.27.3")
		agentPod = runningAgentPod(ctx)
	})

	It("leaves no pin, link or map entry on the real node when the Mesh is deleted", func(ctx SpecContext) {
		// The agent's programs, by the links it pinned; other agents (the
		// kwok e2e's host agent, datapath tests) may attach their own.
		all, err := agent.LinkedPrograms("")
		Expect(err).NotTo(HaveOccurred())
		// The cgroup links (the per-pod sk_lookup links of inbound capture
		// are attached to pod namespaces, not the cgroup).
		var linked []agent.Program
		for _, p := range all {
			if slices.Contains(agent.CgroupProgramNames(), p.Name) {
				linked = append(linked, p)
			}
		}
		Expect(linked).To(HaveLen(len(agent.CgroupProgramNames())))
		attached, err := agent.AttachedPrograms(cgroup2)
		Expect(err).NotTo(HaveOccurred())
		for _, p := range linked {
			Expect(slices.ContainsFunc(attached, func(a agent.Program) bool { return a.ID == p.ID })).To(BeTrue(), "%s attached at %s", p.Name, cgroup2)
		}
		kubectl(ctx, "delete", "mesh", "default", "--wait", "--timeout=180s")
		_, err = os.Stat(agent.DefaultPinPath)
		Expect(os.IsNotExist(err)).To(BeTrue(), "%s after the Mesh was deleted: %v", agent.DefaultPinPath, err)
		attached, err = agent.AttachedPrograms(cgroup2)
		Expect(err).NotTo(HaveOccurred())
		for _, p := range linked {
			Expect(slices.ContainsFunc(attached, func(a agent.Program) bool { return a.ID == p.ID })).To(BeFalse(),
				"%s (program %d) still attached at %s after the Mesh was deleted", p.Name, p.ID, cgroup2)
		}
		_, err = agent.PinnedEnrolled("")
		Expect(err).To(MatchError(os.ErrNotExist))
		// The CNI plugin: unchained (the node's own plugins untouched),
		// binary and socket gone, and new pods start without it.
		rn := kc.RealNode()
		Expect(pluginTypes(conflistPlugins(Default))).To(Equal([]string{"bridge", "loopback"}))
		_, err = os.Stat(filepath.Join(rn.CNIBinDir, cni.PluginType))
		Expect(os.IsNotExist(err)).To(BeTrue(), "the plugin binary after the Mesh was deleted: %v", err)
		_, err = os.Stat(filepath.Join(rn.StateDir, "run", "cni.sock"))
		Expect(os.IsNotExist(err)).To(BeTrue(), "the CNI socket after the Mesh was deleted: %v", err)
		Expect(kc.Client.Create(ctx, serverPod("after-uninstall"))).To(Succeed())
		waitPodIP(ctx, appsNS, "after-uninstall")
		// Workloads keep talking, now directly.
		for _, ip := range clientIPs {
			s1, err := cluster.GetWorkloadStats(ctx, ip+":9000")
			Expect(err).NotTo(HaveOccurred())
			Eventually(func(g Gomega) {
				g.Expect(stats(g, ctx, ip+":9000").OK).To(BeNumerically(">", s1.OK+10))
			}).WithContext(ctx).WithTimeout(10 * time.Second).Should(Succeed())
		}
	})
})

func applyMesh(ctx context.Context) {
	GinkgoHelper()
	f, err := os.CreateTemp("", "mesh-*.yaml")
	Expect(err).NotTo(HaveOccurred())
	defer os.Remove(f.Name())
	_, err = f.WriteString(meshYAML)
	Expect(err).NotTo(HaveOccurred())
	Expect(f.Close()).To(Succeed())
	kubectl(ctx, "apply", "-f", f.Name())
}

// stopOnBrokenPod ends an Eventually at once when a pod on the real node is
// stuck in a state that waiting does not cure, with the kubelet's reason.
func stopOnBrokenPod(ctx context.Context) {
	var pods corev1.PodList
	if err := kc.Client.List(ctx, &pods); err != nil {
		return
	}
	for _, p := range pods.Items {
		if p.Spec.NodeName != realNode {
			continue
		}
		for _, st := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			if w := st.State.Waiting; w != nil {
				switch w.Reason {
				case "CreateContainerError", "CreateContainerConfigError", "CrashLoopBackOff", "ErrImageNeverPull", "ImagePullBackOff", "RunContainerError":
					StopTrying(fmt.Sprintf("pod %s/%s container %s on %s: %s: %s", p.Namespace, p.Name, st.Name, realNode, w.Reason, w.Message)).Now()
				}
			}
		}
	}
}

func kubectlQuiet(ctx context.Context, args ...string) string {
	out, _, _ := kc.Kubectl(ctx, args...)
	return out
}

func podNodes(ctx context.Context, ns, selector string) []string {
	return strings.Fields(kubectlQuiet(ctx, "get", "pods", "-n", ns, "-l", selector, "-o", "jsonpath={.items[*].spec.nodeName}"))
}

func runningAgentPod(ctx context.Context) corev1.Pod {
	GinkgoHelper()
	var p *corev1.Pod
	Eventually(func(g Gomega) {
		stopOnBrokenPod(ctx)
		p = agentPodOnRealNode(g, ctx)
		g.Expect(podReady(p)).To(BeTrue(), "agent pod %s: %+v", p.Name, p.Status)
	}).WithContext(ctx).WithTimeout(2 * time.Minute).Should(Succeed())
	return *p
}

func agentPodOnRealNode(g Gomega, ctx context.Context) *corev1.Pod {
	var pods corev1.PodList
	g.Expect(kc.Client.List(ctx, &pods, client.InNamespace("istio-system"), client.MatchingLabels{"meshkeeper.dev/component": "node-agent"})).To(Succeed())
	var found []corev1.Pod
	for _, p := range pods.Items {
		if p.Spec.NodeName == realNode && p.DeletionTimestamp == nil {
			found = append(found, p)
		}
	}
	g.Expect(found).To(HaveLen(1), "node-agent pods on %s", realNode)
	return &found[0]
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func waitPodIP(ctx context.Context, ns, name string) string {
	GinkgoHelper()
	var pod corev1.Pod
	Eventually(func(g Gomega) {
		stopOnBrokenPod(ctx)
		g.Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &pod)).To(Succeed())
		g.Expect(podReady(&pod)).To(BeTrue(), "pod %s/%s: %+v", ns, name, pod.Status)
	}).WithContext(ctx).WithTimeout(90 * time.Second).Should(Succeed())
	return pod.Status.PodIP
}

func onRealNode(name string, containers []corev1.Container) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: appsNS, Name: name, Labels: map[string]string{"app": "workload"}},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{corev1.LabelHostname: realNode},
			Tolerations:                   []corev1.Toleration{cluster.RealNodeToleration},
			TerminationGracePeriodSeconds: new(int64),
			Containers:                    containers,
		},
	}
}

func serverPod(name string) *corev1.Pod {
	return onRealNode(name, []corev1.Container{{
		Name: "server", Image: cluster.WorkloadImage.Ref, ImagePullPolicy: corev1.PullNever,
		Args:           []string{"server", "--listen=:8080", "--stats=:9000"},
		ReadinessProbe: httpProbe(9000),
	}})
}

// clientPod runs the client, which opens a connection to target every
// 20 ms. In a meshed namespace its connections go to ztunnel's in-pod
// listener, which the ztunnel stand-in opens once the agent handed it the
// pod's netns.
func clientPod(name, target string) *corev1.Pod {
	return onRealNode(name, []corev1.Container{{
		Name: "client", Image: cluster.WorkloadImage.Ref, ImagePullPolicy: corev1.PullNever,
		Args:           []string{"client", "--target=" + target, "--interval=20ms", "--stats=:9000"},
		ReadinessProbe: httpProbe(9000),
	}})
}

// podOnRealNode is the pod of an istio-system DaemonSet (by its
// meshkeeper.dev/component) on the real node.
func podOnRealNode(g Gomega, ctx context.Context, component string) *corev1.Pod {
	var pods corev1.PodList
	g.Expect(kc.Client.List(ctx, &pods, client.InNamespace("istio-system"), client.MatchingLabels{"meshkeeper.dev/component": component})).To(Succeed())
	var found []corev1.Pod
	for _, p := range pods.Items {
		// The DaemonSet's pod: not one meshkeeper starts beside it during
		// a node wave (a surge pod).
		if p.Spec.NodeName == realNode && p.DeletionTimestamp == nil && !isSurge(&p) {
			found = append(found, p)
		}
	}
	g.Expect(found).To(HaveLen(1), "%s pods on %s", component, realNode)
	return &found[0]
}

// standInStats reads the ztunnel stand-in's counters on the real node.
func standInStats(g Gomega, ctx context.Context) cluster.StandInStats {
	p := podOnRealNode(g, ctx, "ztunnel")
	g.Expect(p.Status.PodIP).NotTo(BeEmpty())
	st, err := cluster.GetStandInStats(ctx, p.Status.PodIP+":15020")
	g.Expect(err).NotTo(HaveOccurred())
	return st
}

// expectThroughStandIn: over a window, each client's new connections and the
// stand-in's new outbound connections of that client are the same number
// (one may be in flight at either end), none failed, and there were some.
func expectThroughStandIn(ctx context.Context, window time.Duration) {
	GinkgoHelper()
	ips := map[string]string{}
	for i := range clients {
		name := fmt.Sprintf("client-%d", i)
		ips[name] = waitPodIP(ctx, appsNS, name)
	}
	Eventually(func(g Gomega) {
		type sample struct{ client, standIn, failed int64 }
		// Counters read back to back: the clients open one connection
		// every 20 ms, so at most one or two are in flight between reads.
		read := func() map[string]sample {
			out := map[string]sample{}
			st := standInStats(g, ctx)
			for name, ip := range ips {
				c := stats(g, ctx, ip+":9000")
				sc := st.Count(appsNS, name, "outbound")
				out[name] = sample{c.OK + c.Failed, sc.OK + sc.Failed, c.Failed + sc.Failed}
			}
			return out
		}
		t0 := read()
		time.Sleep(window)
		t1 := read()
		for name := range t1 {
			dc, ds := t1[name].client-t0[name].client, t1[name].standIn-t0[name].standIn
			g.Expect(dc).To(BeNumerically(">=", 20), "connections of %s in %s", name, window)
			g.Expect(ds).To(BeNumerically("~", dc, 2), "connections of %s through the stand-in (%d) vs the client's own count (%d)", name, ds, dc)
			g.Expect(t1[name].failed).To(Equal(t0[name].failed), "failed connections of %s during the window (stand-in's last error: %s)", name, standInStats(g, ctx).LastError)
		}
	}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
}

// expectInboundThroughStandIn: over a window, the server's answered
// connections and the stand-in's inbound connections of the server from
// the meshed clients are the same number (a few in flight), each meshed client's connections arrive
// through the stand-in's inbound listener by the client's address, and
// none reaches the server from a client's address directly (the server
// sees the stand-in's leg, from its own address).
func expectInboundThroughStandIn(ctx context.Context, serverIP string, window time.Duration) {
	GinkgoHelper()
	ips := map[string]string{}
	for i := range clients {
		name := fmt.Sprintf("client-%d", i)
		ips[name] = waitPodIP(ctx, appsNS, name)
	}
	Eventually(func(g Gomega) {
		type sample struct {
			answered, inbound int64
			fromClient        map[string]int64 // by client name: stand-in's inbound from it
			direct            map[string]int64 // by client name: the server's own count by peer
			client            map[string]int64 // the client's own count
		}
		read := func() sample {
			srv := stats(g, ctx, serverIP+":9000")
			st := standInStats(g, ctx)
			in := st.Count(appsNS, "server", "inbound")
			out := sample{answered: srv.OK, inbound: in.OK, fromClient: map[string]int64{}, direct: map[string]int64{}, client: map[string]int64{}}
			for name, ip := range ips {
				out.fromClient[name] = st.InboundFrom(appsNS, "server", ip)
				out.direct[name] = srv.Peers[ip]
				c := stats(g, ctx, ip+":9000")
				out.client[name] = c.OK
			}
			return out
		}
		t0 := read()
		time.Sleep(window)
		t1 := read()
		// Only the meshed clients talk to the server's port 8080 now; the
		// stand-in's whole inbound count may hold more (the stats reads
		// from the host, should the host's address not be exempt).
		da, di := t1.answered-t0.answered, t1.inbound-t0.inbound
		var dFrom int64
		for name := range ips {
			dFrom += t1.fromClient[name] - t0.fromClient[name]
		}
		g.Expect(da).To(BeNumerically(">=", 20*clients), "connections the server answered in %s", window)
		g.Expect(dFrom).To(BeNumerically("~", da, 3), "the server's inbound connections from the clients through the stand-in (%d) vs those it answered (%d)", dFrom, da)
		g.Expect(di).To(BeNumerically(">=", dFrom), "the stand-in's inbound count of the server")
		for name := range ips {
			dc, df := t1.client[name]-t0.client[name], t1.fromClient[name]-t0.fromClient[name]
			g.Expect(df).To(BeNumerically("~", dc, 2), "inbound connections from %s through the stand-in (%d) vs the client's own count (%d)", name, df, dc)
			g.Expect(t1.direct[name]).To(BeZero(), "connections from %s the server answered around the stand-in", name)
		}
	}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
}

func httpProbe(port int) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt(port)}},
		PeriodSeconds: 1,
	}
}

func stats(g Gomega, ctx context.Context, addr string) cluster.WorkloadStats {
	s, err := cluster.GetWorkloadStats(ctx, addr)
	g.Expect(err).NotTo(HaveOccurred())
	return s
}

// expectEnrolled: the agent's metrics, the MeshNode and the pinned map all
// say that exactly the wanted pods of the real node are enrolled.
func expectEnrolled(ctx context.Context, wanted int) {
	GinkgoHelper()
	Eventually(func(g Gomega) {
		var pods corev1.PodList
		g.Expect(kc.Client.List(ctx, &pods, client.InNamespace(appsNS))).To(Succeed())
		var uids []string
		for _, p := range pods.Items {
			if p.Spec.NodeName == realNode && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && p.Labels["istio.io/dataplane-mode"] != "none" {
				uids = append(uids, string(p.UID))
			}
		}
		g.Expect(uids).To(HaveLen(wanted))

		m := agentMetrics(g, ctx)
		g.Expect(m["meshkeeper_agent_enrolled_pods"]).To(Equal(float64(wanted)), "meshkeeper_agent_enrolled_pods")
		g.Expect(m["meshkeeper_agent_wanted_pods"]).To(Equal(float64(wanted)), "meshkeeper_agent_wanted_pods")

		var mn meshv1.MeshNode
		g.Expect(kc.Client.Get(ctx, client.ObjectKey{Name: realNode}, &mn)).To(Succeed())
		g.Expect(mn.Status.Enrolment).NotTo(BeNil())
		g.Expect(mn.Status.Enrolment.Wanted).To(BeEquivalentTo(wanted))
		g.Expect(mn.Status.Enrolment.Enrolled).To(BeEquivalentTo(wanted))

		entries, err := agent.PinnedEnrolled("")
		g.Expect(err).NotTo(HaveOccurred())
		var inMap []string
		for _, e := range entries {
			inMap = append(inMap, agent.PodUIDOf(&e))
		}
		g.Expect(inMap).To(ConsistOf(uids), "pod UIDs in the pinned enrolled map")
	}).WithContext(ctx).WithTimeout(60 * time.Second).WithPolling(250 * time.Millisecond).Should(Succeed())
}

// agentMetrics scrapes the agent pod's /metrics from the host (the pod's
// address is on the harness's bridge): unlabelled series only.
func agentMetrics(g Gomega, ctx context.Context) map[string]float64 {
	p := agentPodOnRealNode(g, ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.Status.PodIP+":9102/metrics", nil)
	g.Expect(err).NotTo(HaveOccurred())
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Do(req)
	g.Expect(err).NotTo(HaveOccurred())
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok || strings.Contains(name, "{") {
			continue
		}
		if v, err := strconv.ParseFloat(val, 64); err == nil {
			out[name] = v
		}
	}
	return out
}

// starterPod is a client that connects the instant it starts, with no
// init container: its first connect happens as soon as the runtime starts
// the container, right after the CNI ADD returned.
func starterPod(name, target string) *corev1.Pod {
	p := onRealNode(name, []corev1.Container{{
		Name: "client", Image: cluster.WorkloadImage.Ref, ImagePullPolicy: corev1.PullNever,
		Args: []string{"client", "--target=" + target, "--interval=50ms", "--stats=:9000"},
	}})
	p.Labels["starter"] = "true"
	return p
}

// expectNoEscapes starts n starter pods, batch at a time, and checks that
// not one of their connections went around ztunnel (the stand-in): the
// CNI ADD handed each pod's netns to the stand-in before its containers
// started, so the very first connect already finds the stand-in's in-pod
// listener (none refused), and once the pods are gone the server has
// answered exactly the connections the stand-in proxied for each pod, not
// one more from the pod's address. It prints the time the agent took to
// answer each pod's CNI ADD.
func expectNoEscapes(ctx context.Context, serverIP string, n, batch int) {
	GinkgoHelper()
	var names []string
	for b := 0; b*batch < n; b++ {
		before := stats(Default, ctx, serverIP+":9000").Peers
		// Addresses are reused (earlier pods, earlier batches): count what
		// reached the server from each address during this batch only.
		var stBefore cluster.StandInStats
		Eventually(func(g Gomega) { stBefore = standInStats(g, ctx) }).WithContext(ctx).Should(Succeed())
		var pods []string
		for i := b * batch; i < min(n, (b+1)*batch); i++ {
			p := starterPod(fmt.Sprintf("starter-%02d", i), serverIP+":8080")
			Expect(kc.Client.Create(ctx, p)).To(Succeed())
			pods = append(pods, p.Name)
		}
		ips := map[string]string{}
		for _, name := range pods {
			ips[name] = waitPodIP(ctx, appsNS, name)
		}
		for _, name := range pods {
			var s cluster.WorkloadStats
			Eventually(func(g Gomega) {
				s = stats(g, ctx, ips[name]+":9000")
				g.Expect(s.OK+s.Failed).To(BeNumerically(">=", 3), "pod %s has tried to connect", name)
			}).WithContext(ctx).WithTimeout(20 * time.Second).Should(Succeed())
			Expect(s.Failed).To(BeZero(), "pod %s: %d connections failed (last: %s): its first connects found no ztunnel listener", name, s.Failed, s.LastError)
		}
		// While the pods run: the server's inbound is captured too, so
		// every connection from a pod that reached the server, proxied
		// outbound or not, arrived through the stand-in's inbound listener
		// there, which counts it by the pod's address (one read: the
		// outbound leg is counted before the inbound leg it opens). Read
		// before the pods are deleted, so that connections from a pod
		// being torn down do not count.
		var running cluster.StandInStats
		Eventually(func(g Gomega) { running = standInStats(g, ctx) }).WithContext(ctx).Should(Succeed())
		for _, name := range pods {
			ip := ips[name]
			proxied := running.Count(appsNS, name, "outbound").OK
			reached := running.InboundFrom(appsNS, "server", ip) - stBefore.InboundFrom(appsNS, "server", ip)
			Expect(reached).To(BeNumerically("<=", proxied),
				"the server got %d connections from pod %s (%s), the stand-in proxied %d outbound: the rest went around it", reached, name, ip, proxied)
			Expect(reached).To(BeNumerically(">=", 3), "connections from pod %s reaching the server through the stand-in", name)
		}
		kubectl(ctx, "delete", "pods", "-n", appsNS, "-l", "starter=true", "--wait", "--timeout=120s")
		// The pods are gone: every counter is final.
		after := stats(Default, ctx, serverIP+":9000").Peers
		var st cluster.StandInStats
		Eventually(func(g Gomega) { st = standInStats(g, ctx) }).WithContext(ctx).Should(Succeed())
		for _, name := range pods {
			ip := ips[name]
			proxied := st.Count(appsNS, name, "outbound").OK
			Expect(proxied).To(BeNumerically(">=", 3), "the stand-in proxied %d connections of pod %s", proxied, name)
			Expect(after[ip]-before[ip]).To(BeZero(), "connections from pod %s (%s) the server answered around the stand-in's inbound listener", name, ip)
		}
		names = append(names, pods...)
	}
	took := cniAddTimes(ctx)
	var lat []time.Duration
	for _, name := range names {
		d, ok := took[appsNS+"/"+name]
		Expect(ok).To(BeTrue(), "no CNI ADD of %s in the agent's log", name)
		lat = append(lat, d)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	GinkgoWriter.Printf("\nCNI ADD answered by the agent (decide + enrol), %d pod starts in batches of %d, zero escapes:\n", len(lat), batch)
	GinkgoWriter.Printf("| pods | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n| %d | %s | %s | %s | %s |\n\n",
		len(lat), pct(0.50).Round(10*time.Microsecond), pct(0.90).Round(10*time.Microsecond), pct(0.99).Round(10*time.Microsecond), lat[len(lat)-1].Round(10*time.Microsecond))
}

// cniAddTimes reads the agent's log: pod → how long its (last) CNI ADD
// took the agent to answer.
func cniAddTimes(ctx context.Context) map[string]time.Duration {
	GinkgoHelper()
	var p *corev1.Pod
	Eventually(func(g Gomega) { p = agentPodOnRealNode(g, ctx) }).WithContext(ctx).Should(Succeed())
	out := kubectl(ctx, "logs", "-n", "istio-system", p.Name, "-c", "agent")
	took := map[string]time.Duration{}
	for line := range strings.SplitSeq(out, "\n") {
		var l struct {
			Msg     string `json:"msg"`
			Command string `json:"command"`
			Pod     string `json:"pod"`
			Result  string `json:"result"`
			Took    string `json:"took"`
		}
		if json.Unmarshal([]byte(line), &l) != nil || l.Msg != "CNI request" || l.Command != "ADD" {
			continue
		}
		if d, err := time.ParseDuration(l.Took); err == nil {
			took[l.Pod] = d
		}
	}
	return took
}

// conflistPlugins reads the real node's conflist's plugin entries.
func conflistPlugins(g Gomega) []map[string]any {
	file, err := cni.ActiveConfFile(kc.RealNode().CNIConfDir)
	g.Expect(err).NotTo(HaveOccurred())
	data, err := os.ReadFile(file)
	g.Expect(err).NotTo(HaveOccurred())
	var c struct {
		Plugins []map[string]any `json:"plugins"`
	}
	g.Expect(json.Unmarshal(data, &c)).To(Succeed(), string(data))
	return c.Plugins
}

func pluginTypes(ps []map[string]any) []string {
	var out []string
	for _, p := range ps {
		t, _ := p["type"].(string)
		out = append(out, t)
	}
	return out
}
