package realnode

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshkeeper/meshkeeper/internal/agent"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// stopperPod is a client that keeps connecting for a while after SIGTERM,
// as an application finishing its work in its termination grace period.
// With terminationGracePeriodSeconds 0 it leaves the API server the moment
// it is deleted, while the kubelet still gives its container at least 2 s
// to stop: its last connections are made by a pod the API no longer has.
func stopperPod(name, target string) *corev1.Pod {
	p := onRealNode(name, []corev1.Container{{
		Name: "client", Image: cluster.WorkloadImage.Ref, ImagePullPolicy: corev1.PullNever,
		Args:           []string{"client", "--target=" + target, "--interval=10ms", "--drain=1500ms", "--stats=:9000"},
		ReadinessProbe: httpProbe(9000),
	}})
	p.Labels["stopper"] = "true"
	return p
}

// expectNoEscapesAtPodStop deletes n pods that connect until they are
// killed and checks, once their sandboxes are gone, that every connection
// of theirs that reached the server came through the stand-in's outbound
// listener in the pod: the server's inbound from each pod's address
// (through the stand-in's inbound listener, or directly) is at most what
// the stand-in proxied outbound for the pod. Before the agent kept
// deleted pods enrolled until their sandbox was gone, the connections made
// between the pod's deletion and its containers' end went out unredirected.
func expectNoEscapesAtPodStop(ctx context.Context, serverIP string, n int) {
	GinkgoHelper()
	srvBefore := stats(Default, ctx, serverIP+":9000").Peers
	var stBefore cluster.StandInStats
	Eventually(func(g Gomega) { stBefore = standInStats(g, ctx) }).WithContext(ctx).Should(Succeed())
	var names []string
	for i := range n {
		p := stopperPod(fmt.Sprintf("stopper-%d", i), serverIP+":8080")
		Expect(kc.Client.Create(ctx, p)).To(Succeed())
		names = append(names, p.Name)
	}
	ips, uids := map[string]string{}, map[string]string{}
	for _, name := range names {
		ips[name] = waitPodIP(ctx, appsNS, name)
		var p corev1.Pod
		Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: appsNS, Name: name}, &p)).To(Succeed())
		uids[name] = string(p.UID)
	}
	atDelete := map[string]cluster.WorkloadStats{}
	for _, name := range names {
		Eventually(func(g Gomega) {
			s := stats(g, ctx, ips[name]+":9000")
			g.Expect(s.OK).To(BeNumerically(">=", 20), "pod %s connects", name)
			g.Expect(s.Failed).To(BeZero(), "pod %s: %s", name, s.LastError)
		}).WithContext(ctx).WithTimeout(20 * time.Second).Should(Succeed())
	}
	for _, name := range names {
		atDelete[name] = stats(Default, ctx, ips[name]+":9000")
	}
	kubectl(ctx, "delete", "pods", "-n", appsNS, "-l", "stopper=true", "--wait", "--timeout=120s")
	// Gone from the API server; their containers connect on for 1.5 s.
	// Every counter is final once the agent has let go of the pods (their
	// sandboxes are gone) and their containers are gone.
	Eventually(func(g Gomega) {
		entries, err := agent.PinnedEnrolled("")
		g.Expect(err).NotTo(HaveOccurred())
		for _, e := range entries {
			for name, uid := range uids {
				g.Expect(agent.PodUIDOf(&e)).NotTo(Equal(uid), "pod %s still enrolled", name)
			}
		}
		g.Expect(standInStats(g, ctx).Workloads).To(Equal(clients+1), "ztunnel told the pods are gone")
	}).WithContext(ctx).WithTimeout(60 * time.Second).WithPolling(250 * time.Millisecond).Should(Succeed())
	st := standInStats(Default, ctx)
	srvAfter := stats(Default, ctx, serverIP+":9000").Peers
	var total, afterDelete int64
	for _, name := range names {
		ip := ips[name]
		proxied := st.Count(appsNS, name, "outbound").OK
		reached := st.InboundFrom(appsNS, "server", ip) - stBefore.InboundFrom(appsNS, "server", ip)
		direct := srvAfter[ip] - srvBefore[ip]
		GinkgoWriter.Printf("pod %s (%s): %d ok before its deletion, %d proxied outbound in all, %d reached the server through its inbound listener, %d directly\n",
			name, ip, atDelete[name].OK, proxied, reached, direct)
		Expect(direct).To(BeZero(), "connections from pod %s the server answered around the stand-in's inbound listener", name)
		Expect(reached).To(BeNumerically("<=", proxied),
			"pod %s: the server got %d connections from it, the stand-in proxied %d outbound: %d went around ztunnel while the pod stopped", name, reached, proxied, reached-proxied)
		Expect(proxied).To(BeNumerically(">", atDelete[name].OK), "pod %s connected after its deletion, through the stand-in", name)
		total += proxied
		afterDelete += proxied - atDelete[name].OK
	}
	GinkgoWriter.Printf("\n%d pods deleted while connecting: %d connections proxied, %d of them after the pods left the API server, zero escapes\n\n", n, total, afterDelete)
}

// clientCounts reads every client's counters.
func clientCounts(g Gomega, ctx context.Context) map[string]cluster.WorkloadStats {
	out := map[string]cluster.WorkloadStats{}
	for i := range clients {
		name := fmt.Sprintf("client-%d", i)
		var p corev1.Pod
		g.Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: appsNS, Name: name}, &p)).To(Succeed())
		out[name] = stats(g, ctx, p.Status.PodIP+":9000")
	}
	return out
}

// newestRevisionHash is the controller-revision-hash of a DaemonSet's
// newest template.
func newestRevisionHash(g Gomega, ctx context.Context, name string) string {
	var ds appsv1.DaemonSet
	g.Expect(kc.Client.Get(ctx, client.ObjectKey{Namespace: "istio-system", Name: name}, &ds)).To(Succeed())
	var revs appsv1.ControllerRevisionList
	g.Expect(kc.Client.List(ctx, &revs, client.InNamespace("istio-system"))).To(Succeed())
	var newest *appsv1.ControllerRevision
	for i, r := range revs.Items {
		for _, o := range r.OwnerReferences {
			if o.UID == ds.UID && (newest == nil || r.Revision > newest.Revision) {
				newest = &revs.Items[i]
			}
		}
	}
	g.Expect(newest).NotTo(BeNil(), "no ControllerRevision of DaemonSet %s", name)
	return newest.Labels[appsv1.DefaultDaemonSetUniqueLabelKey]
}

// ztunnelWatch follows the real node's ztunnel pods during a node wave:
// when the old one was marked deleted and left the API server, when the
// new one was created, its container started, and it was ready.
type ztunnelWatch struct {
	mu                                        sync.Mutex
	deleted, removed, created, started, ready time.Time
}

func (w *ztunnelWatch) run(ctx context.Context, old types.UID) {
	for ctx.Err() == nil {
		var pods corev1.PodList
		if err := kc.Client.List(ctx, &pods, client.InNamespace("istio-system"), client.MatchingLabels{"meshkeeper.dev/component": "ztunnel"}); err == nil {
			now := time.Now()
			oldThere := false
			w.mu.Lock()
			for _, p := range pods.Items {
				if p.Spec.NodeName != realNode {
					continue
				}
				if p.UID == old {
					oldThere = true
					if p.DeletionTimestamp != nil && w.deleted.IsZero() {
						w.deleted = now
					}
					continue
				}
				if w.created.IsZero() {
					w.created = p.CreationTimestamp.Time
				}
				for _, cs := range p.Status.ContainerStatuses {
					if r := cs.State.Running; r != nil && w.started.IsZero() {
						w.started = r.StartedAt.Time
					}
				}
				if podReady(&p) && w.ready.IsZero() {
					w.ready = now
				}
			}
			if !oldThere {
				if w.deleted.IsZero() {
					w.deleted = now
				}
				if w.removed.IsZero() {
					w.removed = now
				}
			}
			done := !w.ready.IsZero()
			w.mu.Unlock()
			if done {
				return
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// timeline says, from the old pod's deletion, when each step came.
func (w *ztunnelWatch) timeline() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	at := func(t time.Time) string {
		if t.IsZero() {
			return "?"
		}
		return t.Sub(w.deleted).Round(100 * time.Millisecond).String()
	}
	return fmt.Sprintf("old ztunnel pod deleted at 0s, gone from the API server at %s; new pod created at %s (second precision), its container started at %s, ready at %s",
		at(w.removed), at(w.created), at(w.started), at(w.ready))
}

// expectNodeWaveUnderTraffic changes the Mesh's version while the clients
// keep connecting through the stand-in, and checks what a user would see
// once the Mesh is Ready on it: the real node's agent and ztunnel pods run
// the DaemonSets' new template, every meshed pod is still enrolled and
// with ztunnel, and no connection went around ztunnel: across the old and
// the new stand-in, the server's inbound from each client, through the
// stand-in's inbound listener or directly, is at most what the stand-ins
// proxied outbound for it. Connections that failed (refused while no
// ztunnel listened in the pods: fail closed) are printed with the time the
// node had no ready ztunnel.
func expectNodeWaveUnderTraffic(ctx context.Context, serverIP, version string) {
	GinkgoHelper()
	oldAgent := agentPodOnRealNode(Default, ctx)
	oldZt := podOnRealNode(Default, ctx, "ztunnel")
	// The old stand-in's counters up to its end: the last line it logs.
	final := make(chan string, 1)
	go func() {
		out, _, _ := kc.Kubectl(context.WithoutCancel(ctx), "logs", "-f", "-n", "istio-system", oldZt.Name)
		final <- out
	}()
	var st0 cluster.StandInStats
	Eventually(func(g Gomega) { st0 = standInStats(g, ctx) }).WithContext(ctx).Should(Succeed())
	c0 := clientCounts(Default, ctx)
	srv0 := stats(Default, ctx, serverIP+":9000").Peers
	ips := map[string]string{}
	for i := range clients {
		name := fmt.Sprintf("client-%d", i)
		ips[name] = waitPodIP(ctx, appsNS, name)
	}
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	var zw ztunnelWatch
	go zw.run(watchCtx, oldZt.UID)

	start := time.Now()
	kubectl(ctx, "patch", "mesh", "default", "--type=merge", "-p",
		fmt.Sprintf(`{"spec":{"version":%q,"rollout":{"nodes":{"bake":"0s","soak":"0s"},"namespaces":{"bake":"0s"},"retireAfter":"0s"}}}`, version))
	Eventually(func(g Gomega) {
		stopOnBrokenPod(ctx)
		out := kubectlQuiet(ctx, "get", "mesh", "default", "-o", `jsonpath={.status.version.installed} {.status.conditions[?(@.type=="Ready")].status}`)
		g.Expect(out).To(Equal(version+" True"), "Mesh installed version and Ready")
		for _, component := range []string{"node-agent", "ztunnel"} {
			p := podOnRealNode(g, ctx, component)
			g.Expect(p.Labels[appsv1.DefaultDaemonSetUniqueLabelKey]).To(Equal(newestRevisionHash(g, ctx, p.OwnerReferences[0].Name)), "%s pod %s runs the DaemonSet's new template", component, p.Name)
			g.Expect(podReady(p)).To(BeTrue())
		}
	}).WithContext(ctx).WithTimeout(6*time.Minute).WithPolling(time.Second).Should(Succeed(), func() string {
		return kubectlQuiet(ctx, "get", "mesh", "default", "-o", "yaml") + "\n" + kubectlQuiet(ctx, "get", "pods", "-n", "istio-system", "-o", "wide", "-L", "meshkeeper.dev/revision,controller-revision-hash")
	})
	took := time.Since(start)
	newAgent := agentPodOnRealNode(Default, ctx)
	newZt := podOnRealNode(Default, ctx, "ztunnel")
	Expect(newAgent.UID).NotTo(Equal(oldAgent.UID), "the node wave replaced the agent pod")
	Expect(newZt.UID).NotTo(Equal(oldZt.UID), "the node wave replaced the ztunnel pod")
	rev := strings.ReplaceAll(version, ".", "-")
	Expect(newAgent.Labels).To(HaveKeyWithValue("meshkeeper.dev/revision", rev))
	Expect(newZt.Labels).To(HaveKeyWithValue("meshkeeper.dev/revision", rev))

	// Every meshed pod still enrolled, and with the new ztunnel.
	expectEnrolled(ctx, clients+1)
	Eventually(func(g Gomega) {
		st := standInStats(g, ctx)
		g.Expect(st.Ready).To(BeTrue())
		g.Expect(st.Workloads).To(Equal(clients + 1))
	}).WithContext(ctx).WithTimeout(30 * time.Second).Should(Succeed())
	// New connections go through the new ztunnel, every one of them.
	expectThroughStandIn(ctx, 2*time.Second)

	var old cluster.StandInStats
	var oldLog string
	select {
	case out := <-final:
		oldLog = out
		_, js, ok := strings.Cut(out, "final stats: ")
		Expect(ok).To(BeTrue(), "the old stand-in logged no final stats:\n%s", out)
		js, _, _ = strings.Cut(js, "\n")
		Expect(json.Unmarshal([]byte(js), &old)).To(Succeed(), js)
	case <-time.After(30 * time.Second):
		Fail("the old ztunnel stand-in's log did not end")
	}
	st := standInStats(Default, ctx)
	srv := stats(Default, ctx, serverIP+":9000").Peers
	c1 := clientCounts(Default, ctx)
	GinkgoWriter.Printf("\nnode wave to %s under traffic: Mesh Ready on it %s after the patch; ztunnel %s replaced by %s: %s\n",
		version, took.Round(time.Second), oldZt.Name, newZt.Name, zw.timeline())
	GinkgoWriter.Printf("the old stand-in's last lines:\n%s\n", lastLines(oldLog, 6))
	GinkgoWriter.Printf("| client | connections | failed | through the old ztunnel | through the new | reached the server | escapes | last error |\n|---|---|---|---|---|---|---|---|\n")
	var failed int64
	for name, ip := range ips {
		viaOld := old.Count(appsNS, name, "outbound").OK - st0.Count(appsNS, name, "outbound").OK
		viaNew := st.Count(appsNS, name, "outbound").OK
		reached := old.InboundFrom(appsNS, "server", ip) - st0.InboundFrom(appsNS, "server", ip) + st.InboundFrom(appsNS, "server", ip) + srv[ip] - srv0[ip]
		made := c1[name].OK + c1[name].Failed - c0[name].OK - c0[name].Failed
		f := c1[name].Failed - c0[name].Failed
		failed += f
		GinkgoWriter.Printf("| %s | %d | %d | %d | %d | %d | %d | %s |\n", name, made, f, viaOld, viaNew, reached, max(0, reached-viaOld-viaNew), c1[name].LastError)
		if f > 0 {
			// ztunnel's in-pod listener was not there (refused), or the
			// draining ztunnel's leg was cut (reset): failed closed,
			// never let around it.
			Expect(c1[name].LastError).To(Or(ContainSubstring("connection refused"), ContainSubstring("connection reset by peer")), "how connections of %s failed", name)
		}
		Expect(srv[ip]-srv0[ip]).To(BeZero(), "connections from %s the server answered around the stand-in's inbound listener", name)
		Expect(reached).To(BeNumerically("<=", viaOld+viaNew), "connections of %s that went around ztunnel during the node wave", name)
	}
	// Connections fail while no ztunnel listens in the pods: with an
	// OnDelete DaemonSet the new ztunnel pod is created only once the old
	// one has left the API server (the DaemonSet controller surges only in
	// a RollingUpdate with maxSurge), and the old one, draining as ztunnel
	// does, closed its listeners at SIGTERM and stays until the connections
	// it holds end (idle keep-alive connections: the whole grace period).
	// So the node has no ztunnel for up to terminationGracePeriodSeconds.
	// They fail closed (above); none escapes.
	GinkgoWriter.Printf("\n%d connections refused while the node had no ztunnel, zero escapes\n\n", failed)
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
