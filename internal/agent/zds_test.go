package agent

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"istio.io/istio/pkg/zdsapi"

	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
	"github.com/meshkeeper/meshkeeper/test/zdsclient"
)

// TestRunHandsPodsToZtunnel runs the agent (without an API server, pods from
// a pods file) with its ZDS server: /readyz is ok only once the socket
// serves; a ztunnel that connects gets the enrolled pod's netns in its
// snapshot; after an agent restart the reconnecting ztunnel gets the same
// pod again (its view is not lost); a pod that goes is deleted.
func TestRunHandsPodsToZtunnel(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	ns := newTestNetns(t)
	var st syscall.Stat_t
	g.Expect(syscall.Stat(ns.Path, &st)).To(Succeed())

	dir, err := os.MkdirTemp("", "zds")
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "ztunnel.sock")
	podsFile := filepath.Join(dir, "pods")
	const uid = "3c1f8a52-7d0e-4b8e-9a51-0d6c2f4e8b17"
	g.Expect(os.WriteFile(podsFile, []byte("shop/web "+uid+" "+ns.Path+"\n"), 0o600)).To(Succeed())

	pinPath := filepath.Join("/sys/fs/bpf", testName())
	t.Cleanup(func() {
		if err := Uninstall(pinPath); err != nil {
			t.Errorf("uninstall %s: %v", pinPath, err)
		}
	})
	addr := freeLocalAddr(t)
	start := func() (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		ready := make(chan struct{})
		done := make(chan error, 1)
		go func() {
			done <- Run(ctx, RunOptions{MetricsAddr: addr, CapturePort: capturePort, BypassMark: DefaultBypassMark,
				PinPath: pinPath, CgroupPath: cgroup2Root(t), ProcRoot: "/proc", PodsFile: podsFile,
				ZDSSocket: sock, Ready: ready, Log: testr.New(t)})
		}()
		select {
		case <-ready:
		case err := <-done:
			t.Fatalf("Run returned before it was ready: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("not ready within 30s")
		}
		stopped := false
		stop = func() {
			if stopped {
				return
			}
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
		t.Cleanup(stop)
		return stop
	}
	readyz := func() int {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	snapshot := func(c *zdsclient.Client) []*zdsclient.Request {
		var out []*zdsclient.Request
		for {
			r, err := c.Recv(5 * time.Second)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(c.Ack("")).To(Succeed())
			if r.Kind == zdsclient.SnapshotSent {
				return out
			}
			out = append(out, r)
		}
	}
	expectPod := func(snap []*zdsclient.Request) {
		g.Expect(snap).To(HaveLen(1))
		r := snap[0]
		defer r.Netns.Close()
		g.Expect(r.Kind).To(Equal(zdsclient.Add))
		g.Expect(r.UID).To(Equal(uid))
		g.Expect(r.Namespace).To(Equal("shop"))
		g.Expect(r.Name).To(Equal("web"))
		var got syscall.Stat_t
		g.Expect(syscall.Fstat(int(r.Netns.Fd()), &got)).To(Succeed())
		g.Expect(got.Ino).To(Equal(st.Ino), "ztunnel gets the pod's own netns")
	}

	stop := start()
	g.Eventually(readyz, 10*time.Second, 50*time.Millisecond).Should(Equal(http.StatusOK))
	g.Expect(sock).To(BeAnExistingFile())
	c, err := zdsclient.Dial(sock, zdsapi.Version_V1)
	g.Expect(err).NotTo(HaveOccurred())
	defer c.Close()
	expectPod(snapshot(c))

	// Agent restart: ztunnel loses its peer, reconnects to the new agent and
	// is told about the same pod before SnapshotSent.
	stop()
	_, err = c.Recv(5 * time.Second)
	g.Expect(err).To(HaveOccurred(), "the old agent's connection ends")
	c.Close()
	start()
	g.Eventually(readyz, 10*time.Second, 50*time.Millisecond).Should(Equal(http.StatusOK))
	c, err = zdsclient.Dial(sock, zdsapi.Version_V1)
	g.Expect(err).NotTo(HaveOccurred())
	defer c.Close()
	expectPod(snapshot(c))

	// The pod goes: ztunnel is told to delete it.
	time.Sleep(10 * time.Millisecond) // a new mtime for the pods file
	g.Expect(os.WriteFile(podsFile, nil, 0o600)).To(Succeed())
	r, err := c.Recv(10 * time.Second)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(c.Ack("")).To(Succeed())
	g.Expect(r.Kind).To(Equal(zdsclient.Del))
	g.Expect(r.UID).To(Equal(uid))
}

// handoffLog records what the enroller hands to ztunnel.
type handoffLog struct {
	mu     sync.Mutex
	calls  []string
	before func(uid string) // runs inside AddWorkload
	ack    bool             // AddWorkload succeeds (else: no ztunnel)
}

func (h *handoffLog) AddWorkload(_ context.Context, uid string, netns *os.File, info zds.WorkloadInfo) error {
	if h.before != nil {
		h.before(uid)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, "add "+uid+" "+info.Namespace+"/"+info.Name+" sa="+info.ServiceAccount)
	if h.ack {
		return nil
	}
	return zds.ErrNoZtunnel
}

func (h *handoffLog) KeepWorkload(uid string, _ zds.WorkloadInfo) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, "keep "+uid)
}

func (h *handoffLog) DelWorkload(_ context.Context, uid string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, "delete "+uid)
	return nil
}

func (h *handoffLog) take() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := h.calls
	h.calls = nil
	return out
}

// TestEnrollerHandsOffBeforeRedirecting: a pod found by the /proc scan is
// handed to ztunnel before its netns is put in the redirect map; after an
// agent restart the new enroller hands the adopted pod over again (for the
// next snapshot), keeps a pod still enrolled whose processes it cannot
// find, deletes at ztunnel an enrolment no pod claims, and a pod that goes
// is deleted.
func TestEnrollerHandsOffBeforeRedirecting(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	dp, _ := loadTestDatapath(t, capturePort)
	cgroups := newPodCgroups(t)
	app := PodRef{Namespace: "shop", Name: "app", UID: "5b4c3d2e-1f0a-4b9c-8d7e-6f5a4b3c2d1e", ServiceAccount: "web"}
	proc := cgroups.start(t, app.UID, false)
	cookie, err := NetnsCookie(proc.netnsPath())
	g.Expect(err).NotTo(HaveOccurred())

	h := &handoffLog{before: func(uid string) {
		entries, err := dp.EnrolledNetns()
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(entries).NotTo(HaveKey(cookie), "ztunnel gets %s before its traffic is redirected", uid)
	}}
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	enroller.SetHandoff(h)
	enroller.Want(app)
	enroller.Sync(true)
	g.Expect(enroller.Cookies(app.UID)).To(ConsistOf(cookie))
	g.Expect(h.take()).To(Equal([]string{"add " + app.UID + " shop/app sa=web"}))

	// What an earlier agent left: a pod still running whose processes this
	// scan will not find (kept), and an enrolment of a pod that is gone.
	unfound := PodRef{Namespace: "shop", Name: "unfound", UID: "6c5d4e3f-2a1b-4c0d-9e8f-7a6b5c4d3e2f"}
	const unfoundCookie, staleCookie = 0x5eed0001, 0x5eed0002
	g.Expect(dp.EnrollNetns(unfoundCookie, unfound.UID)).To(Succeed())
	g.Expect(dp.EnrollNetns(staleCookie, "7d6e5f4a-3b2c-4d1e-8f9a-8b7c6d5e4f3a")).To(Succeed())

	// The agent restarts.
	h.before = nil
	restarted, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	restarted.SetHandoff(h)
	restarted.Want(app)
	restarted.Want(unfound)
	restarted.Reconcile()
	restarted.Sync(true)
	restarted.KeepUnfound()
	g.Expect(h.take()).To(Equal([]string{
		"delete 7d6e5f4a-3b2c-4d1e-8f9a-8b7c6d5e4f3a",
		"add " + app.UID + " shop/app sa=web",
		"keep " + unfound.UID,
	}))
	restarted.Forget(app.UID)
	g.Expect(h.take()).To(Equal([]string{"delete " + app.UID}))
	restarted.Forget(unfound.UID)

	// The CNI path: no ztunnel took the pod, so it is not redirected and
	// the caller learns why; once ztunnel acks, it is.
	h.take()
	err = restarted.EnrollPathHandedOff(app, proc.netnsPath())
	g.Expect(err).To(MatchError(zds.ErrNoZtunnel))
	g.Expect(restarted.Cookies(app.UID)).To(BeEmpty())
	g.Expect(dp.EnrolledNetns()).NotTo(HaveKey(cookie))
	h.ack = true
	g.Expect(restarted.EnrollPathHandedOff(app, proc.netnsPath())).To(Succeed())
	g.Expect(restarted.Cookies(app.UID)).To(ConsistOf(cookie))
	g.Expect(h.take()).To(HaveLen(2))
	restarted.Forget(app.UID)
}
