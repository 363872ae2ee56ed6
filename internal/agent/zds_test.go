package agent

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"istio.io/istio/pkg/zdsapi"

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
