package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// TestRealNode starts a cluster with a real node beside a kwok node, runs a
// server and a client pod from locally built images on it, checks that they
// talk over the harness's bridge and that the pods got addresses from its
// CNI config, then stops the cluster and checks that the machine is as it
// was before: no processes, mounts, links, chains, tables, cgroups, paths,
// sysctls or conntrack state left.
func TestRealNode(t *testing.T) {
	SkipIfUnavailable(t)
	SkipIfNoRealNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	before, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	tar := filepath.Join(t.TempDir(), "images.tar")
	took, err := BuildImages(ctx, tar, PauseImage, WorkloadImage)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built images in %s", took.Round(time.Millisecond))

	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	logDir := filepath.Join(root, ".tmp", "realnode-test-logs")
	if err := os.RemoveAll(logDir); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	c, err := Start(ctx, Options{
		LogDir:   logDir,
		Nodes:    []Node{{Name: "kwok-0", KernelVersion: "6.1.0"}},
		RealNode: &RealNode{Name: "real-0", Images: []string{tar}},
		Stdout:   testWriter{t},
		Volumes:  -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = c.Stop()
		}
	})
	t.Logf("cluster with a real node ready in %s (real node set-up %s)", time.Since(began).Round(time.Millisecond), c.RealNode().SetupTime.Round(time.Millisecond))

	var node corev1.Node
	if err := c.Client.Get(ctx, client.ObjectKey{Name: "real-0"}, &node); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(node.Status.NodeInfo.ContainerRuntimeVersion, "containerd://") {
		t.Errorf("real node runtime = %q, want containerd://...", node.Status.NodeInfo.ContainerRuntimeVersion)
	}
	if !hasTaint(&node, RealNodeTaint) {
		t.Errorf("real node taints = %v, want %v", node.Spec.Taints, RealNodeTaint)
	}

	if err := c.CreateNamespace(ctx, "work", nil); err != nil {
		t.Fatal(err)
	}
	server := workloadPod("server", "real-0", "server", "--listen=:8080", "--stats=:9000")
	if err := c.Client.Create(ctx, server); err != nil {
		t.Fatal(err)
	}
	serverIP := waitPodRunning(ctx, t, c, "work", "server")
	client := workloadPod("client", "real-0", "client", "--target="+serverIP+":8080", "--interval=50ms", "--stats=:9000")
	if err := c.Client.Create(ctx, client); err != nil {
		t.Fatal(err)
	}
	clientIP := waitPodRunning(ctx, t, c, "work", "client")
	prefix := netip.MustParsePrefix(RealNodePodCIDR)
	for _, ip := range []string{serverIP, clientIP} {
		if a, err := netip.ParseAddr(ip); err != nil || !prefix.Contains(a) {
			t.Errorf("pod IP %s is not from the harness's CNI range %s", ip, RealNodePodCIDR)
		}
	}

	// The client's connections reach the server: both count them.
	var cs, ss WorkloadStats
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		cs, _ = GetWorkloadStats(ctx, clientIP+":9000")
		ss, _ = GetWorkloadStats(ctx, serverIP+":9000")
		if cs.OK >= 10 && ss.OK >= 10 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if cs.OK < 10 || ss.OK < 10 || cs.Failed != 0 {
		t.Errorf("client ok=%d failed=%d (%s), server ok=%d: want both >= 10 and no failure", cs.OK, cs.Failed, cs.LastError, ss.OK)
	}
	// kube-apiserver reaches the kubelet through its egress proxy: logs and
	// exec work, and nothing was refused.
	logger := workloadPod("logger", "real-0", "client", "--target="+serverIP+":8081", "--interval=200ms", "--stats=:9000")
	if err := c.Client.Create(ctx, logger); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, c, "work", "logger")
	var logs string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if logs, _, err = c.Kubectl(ctx, "logs", "-n", "work", "logger"); err == nil && strings.Contains(logs, "connection refused") {
			break
		}
	}
	if err != nil || !strings.Contains(logs, "connection refused") {
		t.Errorf("kubectl logs work/logger: %v; output %q, want the client's failed dials", err, logs)
	}
	_, stderr, err := c.Kubectl(ctx, "exec", "-n", "work", "server", "--", "/workload")
	if err == nil || !strings.Contains(stderr, "usage: workload") {
		t.Errorf("kubectl exec work/server -- /workload: %v, stderr %q: want the workload's usage and exit status 2", err, stderr)
	}
	if refused := c.EgressRefused(); len(refused) > 0 {
		t.Errorf("the egress proxy refused %v with a real node", refused)
	}
	kubelet := 0
	for _, a := range c.EgressAttempts() {
		if strings.HasPrefix(a.Target, RealNodeBridgeIP+":") && !a.Refused && a.Err == "" {
			kubelet++
		}
	}
	if kubelet == 0 {
		t.Errorf("no connection to the kubelet on %s went through the egress proxy: %+v", RealNodeBridgeIP, c.EgressAttempts())
	}

	// What the running node changed: the cleanup below has work to do.
	during, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Join(during.Diff(before), "\n")
	t.Logf("while the real node runs:\n%s", changed)
	for _, want := range []string{"+ iptables chain iptables nat KUBE-SERVICES", "+ mount overlay", "+ process", "+ cgroup", "+ link " + RealNodeBridge} {
		if !strings.Contains(changed, want) {
			t.Errorf("a running real node shows no %q: the snapshot does not see what the cleanup must undo", want)
		}
	}
	links := nodeLinks()
	if len(links) < 3 { // the bridge and a veth per pod
		t.Errorf("links on %s = %v, want the bridge and two pod veths", RealNodeBridge, links)
	}

	if err := c.Stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
	stopped = true
	after, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if diff := after.Diff(before); len(diff) > 0 {
		t.Errorf("the machine is not as it was before the real node started:\n%s", strings.Join(diff, "\n"))
	}
	for _, l := range links {
		if _, err := os.Stat("/sys/class/net/" + l); err == nil {
			t.Errorf("link %s is still there", l)
		}
	}
}

func hasTaint(n *corev1.Node, t corev1.Taint) bool {
	for _, x := range n.Spec.Taints {
		if x.Key == t.Key && x.Value == t.Value && x.Effect == t.Effect {
			return true
		}
	}
	return false
}

func workloadPod(name, node string, args ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "work", Name: name},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			Tolerations:                   []corev1.Toleration{RealNodeToleration},
			TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{
				Name:            name,
				Image:           WorkloadImage.Ref,
				ImagePullPolicy: corev1.PullNever,
				Args:            args,
			}},
		},
	}
}

func waitPodRunning(ctx context.Context, t *testing.T, c *Cluster, ns, name string) string {
	t.Helper()
	var pod corev1.Pod
	err := c.waitUntil(ctx, "pod "+ns+"/"+name+" running", func(ctx context.Context) (bool, string, error) {
		if err := c.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &pod); err != nil {
			return false, err.Error(), nil
		}
		for _, st := range pod.Status.ContainerStatuses {
			if st.State.Running == nil {
				return false, fmt.Sprintf("container %s: %+v", st.Name, st.State), nil
			}
		}
		return pod.Status.Phase == corev1.PodRunning && pod.Status.PodIP != "", string(pod.Status.Phase), nil
	})
	if err != nil {
		t.Fatalf("%v%s", err, c.logTails(30))
	}
	return pod.Status.PodIP
}

// TestRealNodeCleansUpAfterADeadRun: a test process that dies (SIGKILL, a
// timeout) runs no cleanup and leaves its containers, mounts, chains and
// bridge behind. The next real node cleans that up before it starts, so the
// machine is as it was once that one stops.
func TestRealNodeCleansUpAfterADeadRun(t *testing.T) {
	SkipIfUnavailable(t)
	SkipIfNoRealNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	before, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	tar := filepath.Join(t.TempDir(), "images.tar")
	if _, err := BuildImages(ctx, tar, PauseImage, WorkloadImage); err != nil {
		t.Fatal(err)
	}
	start := func() *Cluster {
		c, err := Start(ctx, Options{RealNode: &RealNode{Name: "real-0", Images: []string{tar}}, Stdout: testWriter{t}, Volumes: -1})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := start()
	if err := c.CreateNamespace(ctx, "work", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Client.Create(ctx, workloadPod("server", "real-0", "server")); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, c, "work", "server")

	// Die: every process of the cluster is killed, nothing is cleaned up.
	c.abandonForTest()
	dead, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	left := strings.Join(dead.Diff(before), "\n")
	for _, want := range []string{"+ process /pause", "+ mount overlay", "+ link " + RealNodeBridge, "+ iptables chain iptables nat KUBE-SERVICES"} {
		if !strings.Contains(left, want) {
			t.Errorf("a dead run should leave %q behind; it left:\n%s", want, left)
		}
	}

	c = start()
	if err := c.Stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
	after, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if diff := after.Diff(before); len(diff) > 0 {
		t.Errorf("the machine is not as it was before the dead run:\n%s", strings.Join(diff, "\n"))
	}
}
