package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestPodUIDFromCgroup(t *testing.T) {
	cases := []struct {
		name, content, uid string
	}{
		{"cgroupfs v1 (hybrid host)", "12:memory:/kubepods/burstable/pod1b4e2f4c-3a5d-4e8f-9a0b-1c2d3e4f5a6b/0123abcd\n0::/\n", "1b4e2f4c-3a5d-4e8f-9a0b-1c2d3e4f5a6b"},
		{"systemd driver", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e2f4c_3a5d_4e8f_9a0b_1c2d3e4f5a6b.slice/cri-containerd-0123.scope\n", "1b4e2f4c-3a5d-4e8f-9a0b-1c2d3e4f5a6b"},
		{"guaranteed QoS", "0::/kubepods/pod0b0e4f7e-2d8c-4bf4-9a51-0d3a6b2f1e11/abc\n", "0b0e4f7e-2d8c-4bf4-9a51-0d3a6b2f1e11"},
		{"host process", "0::/system.slice/kubelet.service\n", ""},
		{"not a UID", "0::/kubepods/podnotauid/abc\n", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			NewWithT(t).Expect(PodUIDFromCgroup([]byte(tc.content))).To(Equal(tc.uid))
		})
	}
}

func TestWantPod(t *testing.T) {
	pod := func(mut func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "shop"}, Status: corev1.PodStatus{Phase: corev1.PodRunning}}
		if mut != nil {
			mut(p)
		}
		return p
	}
	now := metav1.Now()
	cases := []struct {
		name       string
		pod        *corev1.Pod
		nsEnrolled bool
		want       bool
	}{
		{"running pod in an enrolled namespace", pod(nil), true, true},
		{"pending pod (sandbox not started yet)", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending }), true, true},
		{"namespace not enrolled", pod(nil), false, false},
		{"host network", pod(func(p *corev1.Pod) { p.Spec.HostNetwork = true }), true, false},
		{"succeeded", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }), true, false},
		{"failed", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }), true, false},
		{"opted out", pod(func(p *corev1.Pod) { p.Labels = map[string]string{"istio.io/dataplane-mode": "none"} }), true, false},
		{"terminating keeps redirection during its grace period", pod(func(p *corev1.Pod) { p.DeletionTimestamp = &now }), true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			NewWithT(t).Expect(WantPod(tc.pod, tc.nsEnrolled)).To(Equal(tc.want))
		})
	}
}

func TestReadPodsFile(t *testing.T) {
	g := NewWithT(t)
	path := t.TempDir() + "/pods"
	g.Expect(writeFile(path, "# comment\nshop/a 11111111-2222-3333-4444-555555555555\n\nshop/b 66666666-7777-8888-9999-000000000000 /run/netns/b\n")).To(Succeed())
	entries, err := readPodsFile(path)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(entries).To(Equal([]podsFileEntry{
		{ref: PodRef{Namespace: "shop", Name: "a", UID: "11111111-2222-3333-4444-555555555555"}},
		{ref: PodRef{Namespace: "shop", Name: "b", UID: "66666666-7777-8888-9999-000000000000"}, netns: "/run/netns/b"},
	}))
	g.Expect(writeFile(path, "nonamespace uid\n")).To(Succeed())
	_, err = readPodsFile(path)
	g.Expect(err).To(MatchError(ContainSubstring(`want "<namespace>/<name> <uid> [<netns path>]"`)))
}

// TestEnrollerFindsPodsByCgroup: a wanted pod is enrolled as soon as a
// process in its cgroup appears, in that process's network namespace; a
// host-network pod never enrolls the host's namespace; a replaced sandbox
// is followed; an unwanted pod is removed.
func TestEnrollerFindsPodsByCgroup(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	dp, _ := loadTestDatapath(t, capturePort)
	cgroups := newPodCgroups(t)
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go enroller.Run(ctx)

	app := PodRef{Namespace: "shop", Name: "app", UID: "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c"}
	hostnet := PodRef{Namespace: "shop", Name: "hostnet", UID: "4a3b2c1d-0e9f-4a8b-9c7d-6e5f4a3b2c1d"}
	enroller.Want(app)
	enroller.Want(hostnet)
	time.Sleep(50 * time.Millisecond) // wanted before its sandbox exists, as with a new pod

	started := time.Now()
	proc := cgroups.start(t, app.UID, false)
	cookie, err := NetnsCookie(proc.netnsPath())
	g.Expect(err).NotTo(HaveOccurred())
	g.Eventually(func() []uint64 { return enroller.Cookies(app.UID) }).WithTimeout(2 * time.Second).WithPolling(time.Millisecond).Should(ConsistOf(cookie))
	t.Logf("enrolled %s after %s", app, time.Since(started))
	g.Expect(time.Since(started)).To(BeNumerically("<", 500*time.Millisecond), "a new pod's namespace is found within a few scan intervals")

	cgroups.start(t, hostnet.UID, true)
	enroller.Sync(true)
	g.Consistently(func() []uint64 { return enroller.Cookies(hostnet.UID) }).WithTimeout(200*time.Millisecond).Should(BeEmpty(), "never the host's namespace")
	// What the MeshNode reports: two wanted, one enrolled, the other waiting.
	wanted, enrolled, waiting := enroller.Enrolment()
	g.Expect([]int{wanted, enrolled}).To(Equal([]int{2, 1}))
	g.Expect(waiting).To(HaveLen(1))
	g.Expect(waiting[0].Pod).To(Equal(hostnet))
	g.Expect(waiting[0].Since).To(BeTemporally("<", started), "since it was wanted, before its sandbox started")

	// The sandbox is replaced: new process, new namespace.
	proc.stop()
	proc2 := cgroups.start(t, app.UID, false)
	cookie2, err := NetnsCookie(proc2.netnsPath())
	g.Expect(err).NotTo(HaveOccurred())
	enroller.Sync(true)
	g.Expect(enroller.Cookies(app.UID)).To(ConsistOf(cookie2))
	g.Expect(dp.EnrolledNetns()).To(HaveLen(1))

	enroller.Forget(app.UID)
	g.Expect(dp.EnrolledNetns()).To(BeEmpty())
}

func TestEnrolmentStatus(t *testing.T) {
	g := NewWithT(t)
	t0 := time.Date(2026, 12, 1, 22, 0, 0, 0, time.UTC)
	var waiting []PodWaiting
	for i := range 25 {
		waiting = append(waiting, PodWaiting{Pod: PodRef{Namespace: "shop", Name: fmt.Sprintf("web-%02d", i)}, Since: t0.Add(time.Duration(i) * time.Second)})
	}
	st := EnrolmentStatus(40, 15, waiting, t0.Add(time.Minute))
	g.Expect(st.Wanted).To(BeEquivalentTo(40))
	g.Expect(st.Enrolled).To(BeEquivalentTo(15))
	g.Expect(st.NotEnrolled).To(HaveLen(v1alpha1.MaxNotEnrolledPods), "the list is bounded")
	g.Expect(st.NotEnrolledOmitted).To(BeEquivalentTo(5), "and says how many it left out")
	g.Expect(st.NotEnrolled[0].Name).To(Equal("web-00"), "the longest waiting first")
	g.Expect(st.NotEnrolled[0].Since.Time).To(Equal(t0))

	all := EnrolmentStatus(3, 3, nil, t0)
	g.Expect(all.NotEnrolled).To(BeEmpty())
	g.Expect(all.NotEnrolledOmitted).To(BeZero())

	// Rewritten only on change: a later count of the same pods is the same.
	g.Expect(sameEnrolment(st, EnrolmentStatus(40, 15, waiting, t0.Add(time.Hour)))).To(BeTrue())
	g.Expect(sameEnrolment(st, EnrolmentStatus(40, 16, waiting[1:], t0.Add(time.Hour)))).To(BeFalse())
	g.Expect(sameEnrolment(nil, all)).To(BeFalse())
}

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o644) }

func TestDetachOnExit(t *testing.T) {
	node := func(labels map[string]string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: labels}}
	}
	gone := apierrors.NewNotFound(schema.GroupResource{Resource: "nodes"}, "n1")
	cases := []struct {
		name   string
		node   *corev1.Node
		err    error
		detach bool
	}{
		{"still eBPF: a restart or upgrade keeps redirection", node(map[string]string{"meshkeeper.dev/redirection": "ebpf"}), nil, false},
		{"moved to the iptables fallback", node(map[string]string{"meshkeeper.dev/redirection": "iptables"}), nil, true},
		{"blocked", node(map[string]string{"meshkeeper.dev/redirection": "blocked"}), nil, true},
		{"label released (Mesh deleted or Sidecar mode)", node(nil), nil, true},
		{"node deleted", nil, gone, true},
		{"API server unreachable: keep", nil, errors.New("connection refused"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			detach, why := DetachOnExit(tc.node, tc.err)
			if detach != tc.detach || why == "" {
				t.Fatalf("DetachOnExit = %v, %q; want %v with a reason", detach, why, tc.detach)
			}
		})
	}
}

// /readyz: ready once the datapath is loaded and enrolment runs, whatever
// the pods' enrolment (that is the MeshNode's and the Mesh's to report).
func TestAgentReadiness(t *testing.T) {
	g := NewWithT(t)
	c := &Collector{}
	ok, why := c.Ready()
	g.Expect(ok).To(BeFalse())
	g.Expect(why).To(ContainSubstring("not eligible"))
	c.Eligible.Store(true)
	ok, why = c.Ready()
	g.Expect(ok).To(BeFalse())
	g.Expect(why).To(ContainSubstring("datapath is not loaded"))
	c.SetDatapath(&Datapath{}, &Enroller{pods: map[string]*podState{"u": {ref: PodRef{Name: "slow"}}}})
	ok, _ = c.Ready()
	g.Expect(ok).To(BeTrue(), "a pod still waiting for enrolment does not make the agent unready")
}
