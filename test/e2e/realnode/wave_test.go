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

// ztunnelWatch follows the real node's ztunnel pods during a node wave
// (the DaemonSet's and meshkeeper's surge pod): when each was created,
// ready, told to stop and gone, and for how long the node had no ready
// ztunnel that was not stopping. It follows the surge pod's log, whose last
// line holds the surge stand-in's final counters.
type ztunnelWatch struct {
	mu             sync.Mutex
	start          time.Time
	state          map[types.UID]string
	names          map[types.UID]string
	events         []string
	uncovered      time.Duration
	uncoveredSince time.Time
	surgeLog       chan string
	following      bool
}

func (w *ztunnelWatch) run(ctx context.Context) {
	w.mu.Lock()
	w.start, w.state, w.names, w.surgeLog = time.Now(), map[types.UID]string{}, map[types.UID]string{}, make(chan string, 1)
	w.mu.Unlock()
	for ctx.Err() == nil {
		var pods corev1.PodList
		if err := kc.Client.List(ctx, &pods, client.InNamespace("istio-system"), client.MatchingLabels{"meshkeeper.dev/component": "ztunnel"}); err == nil {
			now := time.Now()
			w.mu.Lock()
			covered, there := false, map[types.UID]bool{}
			for _, p := range pods.Items {
				if p.Spec.NodeName != realNode {
					continue
				}
				there[p.UID] = true
				state := "created"
				if podReady(&p) {
					state = "ready"
					covered = covered || p.DeletionTimestamp == nil
				}
				if p.DeletionTimestamp != nil {
					state = "stopping"
				}
				w.note(now, p.Name, p.UID, state)
				if isSurge(&p) && !w.following && containerRunning(&p) {
					w.following = true
					go func(name string) {
						out, _, _ := kc.Kubectl(context.WithoutCancel(ctx), "logs", "-f", "-n", "istio-system", name)
						w.surgeLog <- out
					}(p.Name)
				}
			}
			for uid, st := range w.state {
				if !there[uid] && st != "gone" {
					w.state[uid] = "gone"
					w.events = append(w.events, fmt.Sprintf("%s %s gone", w.at(now), w.names[uid]))
				}
			}
			switch {
			case !covered && w.uncoveredSince.IsZero():
				w.uncoveredSince = now
			case covered && !w.uncoveredSince.IsZero():
				w.uncovered += now.Sub(w.uncoveredSince)
				w.uncoveredSince = time.Time{}
			}
			w.mu.Unlock()
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (w *ztunnelWatch) note(now time.Time, name string, uid types.UID, state string) {
	if w.state[uid] == state {
		return
	}
	w.state[uid], w.names[uid] = state, name
	w.events = append(w.events, fmt.Sprintf("%s %s %s", w.at(now), name, state))
}

func (w *ztunnelWatch) at(t time.Time) string {
	return t.Sub(w.start).Round(100 * time.Millisecond).String()
}

// timeline is what the watch saw, from the Mesh's patch on.
func (w *ztunnelWatch) timeline() (string, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	uncovered := w.uncovered
	if !w.uncoveredSince.IsZero() {
		uncovered += time.Since(w.uncoveredSince)
	}
	return strings.Join(w.events, "\n"), uncovered
}

func isSurge(p *corev1.Pod) bool { return p.Labels["meshkeeper.dev/surge-of"] != "" }

func containerRunning(p *corev1.Pod) bool {
	for _, cs := range p.Status.ContainerStatuses {
		if cs.State.Running != nil || cs.State.Terminated != nil {
			return true
		}
	}
	return false
}

// finalStats parses the "final stats" line a stand-in logs when it ends.
func finalStats(out, which string) cluster.StandInStats {
	GinkgoHelper()
	_, js, ok := strings.Cut(out, "final stats: ")
	Expect(ok).To(BeTrue(), "the %s stand-in logged no final stats:\n%s", which, out)
	js, _, _ = strings.Cut(js, "\n")
	var st cluster.StandInStats
	Expect(json.Unmarshal([]byte(js), &st)).To(Succeed(), js)
	return st
}

// expectNodeWaveUnderTraffic changes the Mesh's version while the clients
// keep connecting through the stand-in, and checks what a user would see
// once the Mesh is Ready on it: the real node's agent and ztunnel pods run
// the DaemonSets' new template, every meshed pod is still enrolled and
// with ztunnel, not one connection failed (ztunnel moves make-before-break:
// meshkeeper's surge ztunnel listens in the pods before the old one stops,
// and the DaemonSet's new one before the surge one stops), and none went
// around ztunnel: across the old, the surge and the new stand-in, the
// server's inbound from each client, through the stand-in's inbound
// listener or directly, is at most what the stand-ins proxied outbound for
// it. The pods' timeline is printed, with how long the node had no ready
// ztunnel.
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
	go zw.run(watchCtx)

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

	// The old stand-in and the surge stand-in have ended (they drain for
	// at most their grace period); their last lines hold their counters.
	var oldLog, surgeLog string
	select {
	case oldLog = <-final:
	case <-time.After(40 * time.Second):
		Fail("the old ztunnel stand-in's log did not end")
	}
	zw.mu.Lock()
	following, surgeCh := zw.following, zw.surgeLog
	zw.mu.Unlock()
	events, uncovered := zw.timeline()
	Expect(following).To(BeTrue(), "meshkeeper started no surge ztunnel beside the old one on %s:\n%s", realNode, events)
	select {
	case surgeLog = <-surgeCh:
	case <-time.After(40 * time.Second):
		Fail("the surge ztunnel stand-in's log did not end")
	}
	old, surge := finalStats(oldLog, "old"), finalStats(surgeLog, "surge")
	stopWatch()
	st := standInStats(Default, ctx)
	srv := stats(Default, ctx, serverIP+":9000").Peers
	c1 := clientCounts(Default, ctx)
	GinkgoWriter.Printf("\nnode wave to %s under traffic: Mesh Ready on it %s after the patch; ztunnel %s replaced by %s, the node had no ready ztunnel for %s:\n%s\n",
		version, took.Round(time.Second), oldZt.Name, newZt.Name, uncovered.Round(10*time.Millisecond), events)
	GinkgoWriter.Printf("the old stand-in's last lines:\n%s\nthe surge stand-in's:\n%s\n", lastLines(oldLog, 4), lastLines(surgeLog, 4))
	GinkgoWriter.Printf("| client | connections | failed | through the old ztunnel | the surge | the new | reached the server | escapes | last error |\n|---|---|---|---|---|---|---|---|---|\n")
	for name, ip := range ips {
		viaOld := old.Count(appsNS, name, "outbound").OK - st0.Count(appsNS, name, "outbound").OK
		viaSurge := surge.Count(appsNS, name, "outbound").OK
		viaNew := st.Count(appsNS, name, "outbound").OK
		reached := old.InboundFrom(appsNS, "server", ip) - st0.InboundFrom(appsNS, "server", ip) + surge.InboundFrom(appsNS, "server", ip) + st.InboundFrom(appsNS, "server", ip) + srv[ip] - srv0[ip]
		made := c1[name].OK + c1[name].Failed - c0[name].OK - c0[name].Failed
		f := c1[name].Failed - c0[name].Failed
		GinkgoWriter.Printf("| %s | %d | %d | %d | %d | %d | %d | %d | %s |\n", name, made, f, viaOld, viaSurge, viaNew, reached, max(0, reached-viaOld-viaSurge-viaNew), c1[name].LastError)
		// Make-before-break: the surge ztunnel listened in every pod before
		// the old one closed its listeners, and the new one before the
		// surge one did. No connection failed, none went around ztunnel.
		Expect(f).To(BeZero(), "connections of %s failed during the node wave (last error: %s)", name, c1[name].LastError)
		Expect(viaSurge).To(BeNumerically(">", 0), "connections of %s through the surge ztunnel", name)
		Expect(srv[ip]-srv0[ip]).To(BeZero(), "connections from %s the server answered around the stand-in's inbound listener", name)
		Expect(reached).To(BeNumerically("<=", viaOld+viaSurge+viaNew), "connections of %s that went around ztunnel during the node wave", name)
	}
	GinkgoWriter.Printf("\nzero connections failed, zero escapes\n\n")
}

// lastLines returns the last n lines of s, each cut at 200 bytes (the final
// stats line holds every pod's counters; the table below has those).
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	lines = lines[max(0, len(lines)-n):]
	for i, l := range lines {
		if len(l) > 200 {
			lines[i] = l[:200] + " …"
		}
	}
	return strings.Join(lines, "\n")
}
