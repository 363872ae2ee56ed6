package cni

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	. "github.com/onsi/gomega"
)

type recorded struct {
	req   Request
	inode uint64
}

// serve runs a Server with h on a temporary socket until the test ends.
func serve(t *testing.T, h HandlerFunc) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "cni.sock")
	srv, err := Listen(sock, h, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

func inode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestAddPassesTheNetnsAndWaitsForTheAnswer(t *testing.T) {
	g := NewWithT(t)
	var mu sync.Mutex
	var got []recorded
	sock := serve(t, func(_ context.Context, req Request, netns *os.File) Response {
		mu.Lock()
		defer mu.Unlock()
		r := recorded{req: req}
		if netns != nil {
			r.inode = inode(t, netns)
		}
		got = append(got, r)
		return Response{Result: ResultEnrolled}
	})
	own, err := os.Open("/proc/self/ns/net")
	g.Expect(err).NotTo(HaveOccurred())
	defer own.Close()

	c := PluginConf{Socket: sock, Timeout: "2s", ExcludeNamespaces: []string{"kube-system"}}
	pod := Pod{Namespace: "apps", Name: "web-0", UID: "u-1"}
	resp, err := PluginAdd(context.Background(), c, pod, "cid", "/proc/self/ns/net")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(resp.Result).To(Equal(ResultEnrolled))
	g.Expect(got).To(HaveLen(1))
	g.Expect(got[0].req).To(MatchFields(got[0].req, pod))
	g.Expect(got[0].inode).To(Equal(inode(t, own)), "the agent received the pod's network namespace itself")

	// Excluded namespaces never reach the agent.
	resp, err = PluginAdd(context.Background(), c, Pod{Namespace: "kube-system", Name: "dns", UID: "u-2"}, "cid", "/proc/self/ns/net")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(resp.Result).To(Equal(ResultSkipped))
	g.Expect(got).To(HaveLen(1))

	// DEL without a namespace: told, never failing.
	PluginDel(context.Background(), c, pod, "cid", "")
	g.Expect(got).To(HaveLen(2))
	g.Expect(got[1].req.Command).To(Equal(CommandDel))
	g.Expect(got[1].inode).To(BeZero())
}

// MatchFields checks the request's pod fields and protocol version.
func MatchFields(req Request, pod Pod) OmegaMatcher {
	return And(
		WithTransform(func(r Request) int { return r.Version }, Equal(ProtocolVersion)),
		WithTransform(func(r Request) Command { return r.Command }, Equal(CommandAdd)),
		WithTransform(func(r Request) Pod { return Pod{r.Namespace, r.Name, r.UID} }, Equal(pod)),
		WithTransform(func(r Request) bool { return r.TimeoutMillis > 0 && r.TimeoutMillis <= 2000 }, BeTrue()),
	)
}

func TestAddFailsClosed(t *testing.T) {
	pod := Pod{Namespace: "apps", Name: "web-0", UID: "u-1"}
	t.Run("no agent", func(t *testing.T) {
		g := NewWithT(t)
		c := PluginConf{Socket: filepath.Join(t.TempDir(), "absent.sock"), Timeout: "1s"}
		_, err := PluginAdd(context.Background(), c, pod, "cid", "/proc/self/ns/net")
		g.Expect(err).To(MatchError(ErrAgentUnreachable))
		g.Expect(err.Error()).To(And(ContainSubstring("apps/web-0 not started"), ContainSubstring("kubelet retries"), ContainSubstring("delete the Mesh")))
	})
	t.Run("agent back within the timeout", func(t *testing.T) {
		g := NewWithT(t)
		sock := filepath.Join(t.TempDir(), "cni.sock")
		go func() {
			time.Sleep(300 * time.Millisecond) // a restarting agent
			srv, err := Listen(sock, HandlerFunc(func(context.Context, Request, *os.File) Response {
				return Response{Result: ResultEnrolled}
			}), logr.Discard())
			if err != nil {
				t.Error(err)
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			_ = srv.Serve(ctx)
		}()
		resp, err := PluginAdd(context.Background(), PluginConf{Socket: sock, Timeout: "2s"}, pod, "cid", "/proc/self/ns/net")
		g.Expect(err).NotTo(HaveOccurred(), "the ADD waits for the agent rather than fail at once")
		g.Expect(resp.Result).To(Equal(ResultEnrolled))
	})
	t.Run("agent does not answer in time", func(t *testing.T) {
		g := NewWithT(t)
		release := make(chan struct{})
		defer close(release)
		sock := serve(t, func(ctx context.Context, _ Request, _ *os.File) Response {
			select {
			case <-release:
			case <-time.After(5 * time.Second):
			}
			return Response{Result: ResultEnrolled}
		})
		began := time.Now()
		_, err := PluginAdd(context.Background(), PluginConf{Socket: sock, Timeout: "300ms"}, pod, "cid", "/proc/self/ns/net")
		g.Expect(err).To(MatchError(ErrAgentTimeout))
		g.Expect(err.Error()).To(ContainSubstring("within 300ms"))
		g.Expect(time.Since(began)).To(BeNumerically("<", 3*time.Second))
	})
	t.Run("agent refuses", func(t *testing.T) {
		g := NewWithT(t)
		sock := serve(t, func(context.Context, Request, *os.File) Response {
			return Response{Result: ResultError, Message: "cannot tell whether the pod is meshed: read pod: forbidden"}
		})
		_, err := PluginAdd(context.Background(), PluginConf{Socket: sock}, pod, "cid", "/proc/self/ns/net")
		g.Expect(err).To(MatchError(ContainSubstring("could not enrol it: cannot tell whether the pod is meshed")))
	})
	t.Run("skipped pods start", func(t *testing.T) {
		g := NewWithT(t)
		sock := serve(t, func(context.Context, Request, *os.File) Response {
			return Response{Result: ResultSkipped, Message: "namespace apps is not in the mesh"}
		})
		resp, err := PluginAdd(context.Background(), PluginConf{Socket: sock}, pod, "cid", "/proc/self/ns/net")
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(resp.Message).To(ContainSubstring("not in the mesh"))
	})
	t.Run("bad timeout in the conf", func(t *testing.T) {
		g := NewWithT(t)
		_, err := PluginAdd(context.Background(), PluginConf{Socket: "/x", Timeout: "soon"}, pod, "cid", "/proc/self/ns/net")
		g.Expect(err).To(MatchError(ContainSubstring(`timeout "soon"`)))
	})
}

func TestServerRejectsAnotherProtocolVersionAndGarbage(t *testing.T) {
	g := NewWithT(t)
	called := false
	sock := serve(t, func(context.Context, Request, *os.File) Response {
		called = true
		return Response{Result: ResultEnrolled}
	})
	ask := func(body []byte) Response {
		c, err := net.Dial("unixpacket", sock)
		g.Expect(err).NotTo(HaveOccurred())
		defer c.Close()
		_, err = c.Write(body)
		g.Expect(err).NotTo(HaveOccurred())
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		g.Expect(err).NotTo(HaveOccurred())
		var r Response
		g.Expect(json.Unmarshal(buf[:n], &r)).To(Succeed())
		return r
	}
	body, _ := json.Marshal(Request{Version: 99, Command: CommandAdd, Namespace: "a", Name: "b"})
	r := ask(body)
	g.Expect(r.Result).To(Equal(ResultError))
	g.Expect(r.Message).To(ContainSubstring("protocol version 99"))
	r = ask([]byte("{not json"))
	g.Expect(r.Result).To(Equal(ResultError))
	g.Expect(r.Message).To(ContainSubstring("malformed request"))
	g.Expect(called).To(BeFalse())
}
