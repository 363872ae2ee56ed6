package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"golang.org/x/sys/unix"

	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

func requirePrivileged(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("MESHKEEPER_REQUIRE_PRIVILEGED") == "1" {
		t.Fatal("needs root to create network namespaces; MESHKEEPER_REQUIRE_PRIVILEGED=1 makes this a failure")
	}
	t.Skip("needs root to create network namespaces (MESHKEEPER_REQUIRE_PRIVILEGED=1 fails instead of skipping)")
}

// podNetns makes a network namespace with lo up, bind-mounted under
// /run/netns so iptables can run in it, and removed when the test ends.
func podNetns(t *testing.T) (name string, f *os.File) {
	t.Helper()
	name = fmt.Sprintf("mk-standin-%d-%d", os.Getpid(), netnsSeq.Add(1))
	path := filepath.Join("/run/netns", name)
	if err := os.MkdirAll("/run/netns", 0o755); err != nil {
		t.Fatal(err)
	}
	h, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	t.Cleanup(func() {
		_ = unix.Unmount(path, unix.MNT_DETACH)
		_ = os.Remove(path)
	})
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		if err := unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, ""); err != nil {
			errc <- err
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("netns: %v", err)
	}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	f, err = os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return name, f
}

var netnsSeq atomic.Int64

func in(t *testing.T, netns *os.File, fn func() error) {
	t.Helper()
	if err := inNetns(netns, fn); err != nil {
		t.Fatal(err)
	}
}

func ping(netns *os.File, addr string) error {
	return inNetns(netns, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		if line != "pong\n" {
			return fmt.Errorf("answer %q", line)
		}
		return nil
	})
}

// TestStandInProxiesAWorkloadsConnections hands a pod netns to the stand-in
// through the agent's ZDS server and checks what ztunnel would do: its
// outbound listener gets what is redirected (here by iptables REDIRECT in
// the pod netns, which answers SO_ORIGINAL_DST like the agent's eBPF),
// proxies it to the original destination with the in-pod mark (so it is
// not redirected again) and counts it; a delete closes the listeners; a
// reconnect's snapshot brings them back and drops what it does not name.
func TestStandInProxiesAWorkloadsConnections(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	name, netns := podNetns(t)
	// The pod's own server, and the capture: everything to 127.0.0.1:8080
	// without the in-pod mark goes to the outbound listener.
	var accepted atomic.Int64
	var ln net.Listener
	in(t, netns, func() error {
		var err error
		ln, err = net.Listen("tcp4", "127.0.0.1:8080")
		return err
	})
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				defer c.Close()
				if l, err := bufio.NewReader(c).ReadString('\n'); err == nil && l == "ping\n" {
					_, _ = io.WriteString(c, "pong\n")
				}
			}()
		}
	}()
	if out, err := exec.Command("ip", "netns", "exec", name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "8080",
		"-m", "mark", "!", "--mark", fmt.Sprint(InpodMark), "-j", "REDIRECT", "--to-ports", fmt.Sprint(OutboundPort)).CombinedOutput(); err != nil {
		t.Fatalf("iptables: %v: %s", err, out)
	}

	dir, err := os.MkdirTemp("", "standin")
	g.Expect(err).NotTo(HaveOccurred())
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "ztunnel.sock")
	serve := func(seed func(*zds.Server)) (*zds.Server, func()) {
		srv := zds.NewServer(zds.Options{Path: sock, Log: testr.New(t), KeepaliveInterval: 50 * time.Millisecond})
		if seed != nil {
			seed(srv)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- srv.Serve(ctx) }()
		<-srv.Serving()
		return srv, func() { cancel(); g.Expect(<-done).To(Succeed()) }
	}
	srv, stopServer := serve(nil)

	s := NewStandIn(InpodMark)
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { s.Run(ctx, sock); close(ran) }()
	defer func() { cancel(); <-ran; s.Close() }()
	g.Eventually(s.Ready, 5*time.Second).Should(BeTrue(), "ready once the (empty) snapshot came")

	const uid = "0b6e1c9a-3f2d-4e8a-b7c5-9d1e2f3a4b5c"
	g.Eventually(srv.Connected).Should(Equal(1))
	g.Expect(srv.AddWorkload(context.Background(), uid, netns, zds.WorkloadInfo{Name: "client", Namespace: "shop"})).To(Succeed())
	for range 5 {
		g.Expect(ping(netns, "127.0.0.1:8080")).To(Succeed())
	}
	g.Expect(accepted.Load()).To(BeEquivalentTo(5), "the server saw the stand-in's connections")
	g.Expect(s.Stats().Counts).To(ContainElement(Count{Namespace: "shop", Pod: "client", Direction: Outbound, OK: 5}))

	// Inbound listeners are there; one addressed to the listener itself
	// has no original destination and is counted as failed.
	g.Expect(ping(netns, "127.0.0.1:15006")).NotTo(Succeed())
	g.Eventually(func() []Count { return s.Stats().Counts }).Should(ContainElement(Count{Namespace: "shop", Pod: "client", Direction: Inbound, Failed: 1}))

	// Delete: the listeners close, so redirected connections are refused.
	g.Expect(srv.DelWorkload(context.Background(), uid)).To(Succeed())
	g.Expect(s.Workloads()).To(BeZero())
	g.Expect(ping(netns, "127.0.0.1:8080")).To(MatchError(ContainSubstring("refused")))

	// The agent restarts with the workload and a stale one gone: the
	// stand-in reconnects, and its listeners come back with the snapshot.
	_, other := podNetns(t)
	g.Expect(srv.AddWorkload(context.Background(), "stale", other, zds.WorkloadInfo{Name: "stale", Namespace: "shop"})).To(Succeed())
	g.Expect(s.Workloads()).To(Equal(1))
	stopServer()
	srv, stopServer = serve(func(srv *zds.Server) {
		_ = srv.AddWorkload(context.Background(), uid, netns, zds.WorkloadInfo{Name: "client", Namespace: "shop"})
	})
	defer stopServer()
	g.Eventually(srv.Connected, 5*time.Second).Should(Equal(1))
	g.Eventually(func() error { return ping(netns, "127.0.0.1:8080") }, 5*time.Second).Should(Succeed())
	g.Eventually(s.Workloads).Should(Equal(1), "the stale workload was dropped by the snapshot")
	g.Expect(strings.Join(workloadNames(s), ",")).To(Equal("shop/client"))
}

func workloadNames(s *StandIn) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, w := range s.workloads {
		out = append(out, w.namespace+"/"+w.name)
	}
	return out
}
