package zds_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"istio.io/istio/pkg/zdsapi"

	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
	"github.com/meshkeeper/meshkeeper/test/zdsclient"
)

const recvTimeout = 3 * time.Second

// start serves a server on a short socket path until the test ends.
func start(t *testing.T, o zds.Options, seed func(*zds.Server)) (*zds.Server, *zds.Metrics) {
	t.Helper()
	dir, err := os.MkdirTemp("", "zds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	o.Path = filepath.Join(dir, "ztunnel.sock")
	o.Log = testr.New(t)
	if o.Metrics == nil {
		o.Metrics = zds.NewMetrics()
	}
	s := zds.NewServer(o)
	if seed != nil {
		seed(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Stat(o.Path); !os.IsNotExist(err) {
			t.Errorf("socket %s left behind (stat: %v)", o.Path, err)
		}
	})
	select {
	case <-s.Serving():
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	return s, o.Metrics
}

// netns opens a network namespace file (the test's own: any will do for the
// protocol) and returns it with its inode, which the receiving side must see.
func netns(t *testing.T) (*os.File, uint64) {
	t.Helper()
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Skipf("no /proc/self/ns/net: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f, inode(t, f)
}

func inode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func dial(t *testing.T, s *zds.Server, v zdsapi.Version) *zdsclient.Client {
	t.Helper()
	c, err := zdsclient.Dial(s.Path(), v)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// recvAck reads one request and acks it.
func recvAck(t *testing.T, c *zdsclient.Client) *zdsclient.Request {
	t.Helper()
	r, err := c.Recv(recvTimeout)
	if err != nil {
		t.Fatalf("recv: %v", err)
	}
	if r.Netns != nil {
		t.Cleanup(func() { r.Netns.Close() })
	}
	if err := c.Ack(""); err != nil {
		t.Fatalf("ack: %v", err)
	}
	return r
}

func snapshot(t *testing.T, c *zdsclient.Client) []*zdsclient.Request {
	t.Helper()
	var out []*zdsclient.Request
	for {
		r := recvAck(t, c)
		if r.Kind == zdsclient.SnapshotSent {
			return out
		}
		out = append(out, r)
	}
}

// closed says the server hung up: the next read sees EOF.
func closed(t *testing.T, c *zdsclient.Client) {
	t.Helper()
	r, err := c.Recv(recvTimeout)
	if err == nil {
		t.Fatalf("want the server to close the connection, got a %s request", r.Kind)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("want the server to close the connection, it stayed open")
	}
}

func TestSnapshotCarriesEveryWorkloadWithItsNetns(t *testing.T) {
	g := NewWithT(t)
	f, ino := netns(t)
	s, m := start(t, zds.Options{}, func(s *zds.Server) {
		// Before any ztunnel: recorded, and ErrNoZtunnel says nobody got it.
		g.Expect(s.AddWorkload(context.Background(), "uid-b", f, zds.WorkloadInfo{Name: "b", Namespace: "shop", ServiceAccount: "sa-b"})).To(MatchError(zds.ErrNoZtunnel))
		g.Expect(s.AddWorkload(context.Background(), "uid-a", f, zds.WorkloadInfo{Name: "a", Namespace: "shop", ServiceAccount: "sa-a"})).To(MatchError(zds.ErrNoZtunnel))
		s.KeepWorkload("uid-c", zds.WorkloadInfo{Name: "c", Namespace: "shop"})
	})
	f.Close() // the server holds its own duplicate
	c := dial(t, s, zdsapi.Version_V1)
	snap := snapshot(t, c)
	g.Expect(snap).To(HaveLen(3))
	g.Expect(snap[0]).To(HaveField("Kind", zdsclient.Add))
	g.Expect(snap[0]).To(HaveField("UID", "uid-a"))
	g.Expect(snap[0]).To(HaveField("Name", "a"))
	g.Expect(snap[0]).To(HaveField("Namespace", "shop"))
	g.Expect(snap[0]).To(HaveField("ServiceAccount", "sa-a"))
	g.Expect(inode(t, snap[0].Netns)).To(Equal(ino), "the fd passed is the pod's netns")
	g.Expect(snap[1]).To(HaveField("UID", "uid-b"))
	g.Expect(inode(t, snap[1].Netns)).To(Equal(ino))
	g.Expect(snap[2]).To(HaveField("Kind", zdsclient.Keep))
	g.Expect(snap[2]).To(HaveField("UID", "uid-c"))
	g.Expect(snap[2].Netns).To(BeNil())
	g.Eventually(s.Connected).Should(Equal(1))
	g.Eventually(func() float64 { return testutil.ToFloat64(m.Snapshots()) }).Should(BeEquivalentTo(1), "one snapshot sent")
}

func TestAddWaitsForTheAckAndReportsAckErrors(t *testing.T) {
	g := NewWithT(t)
	f, ino := netns(t)
	s, _ := start(t, zds.Options{}, nil)
	g.Expect(s.AddWorkload(context.Background(), "uid-1", f, zds.WorkloadInfo{Name: "p"})).To(MatchError(zds.ErrNoZtunnel))
	c := dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(HaveLen(1))

	acked := make(chan error, 1)
	go func() {
		acked <- s.AddWorkload(context.Background(), "uid-2", f, zds.WorkloadInfo{Name: "q", Namespace: "ns"})
	}()
	r, err := c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred())
	defer r.Netns.Close()
	g.Expect(r.Kind).To(Equal(zdsclient.Add))
	g.Expect(r.UID).To(Equal("uid-2"))
	g.Expect(inode(t, r.Netns)).To(Equal(ino))
	g.Consistently(acked, 100*time.Millisecond).ShouldNot(Receive(), "AddWorkload returns only after the ack")
	g.Expect(c.Ack("")).To(Succeed())
	g.Eventually(acked).Should(Receive(BeNil()))

	// An error ack: returned, recorded on the workload, connection kept.
	go func() { acked <- s.AddWorkload(context.Background(), "uid-3", f, zds.WorkloadInfo{Name: "r"}) }()
	r, err = c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred())
	r.Netns.Close()
	g.Expect(c.Ack("failed to enter netns")).To(Succeed())
	var ackErr *zds.AckError
	g.Eventually(acked).Should(Receive(BeAssignableToTypeOf(ackErr)))
	g.Expect(s.WorkloadError("uid-3")).To(Equal("failed to enter netns"))
	g.Expect(s.WorkloadErrors()).To(HaveKey("uid-3"))
	g.Expect(s.Connected()).To(Equal(1))

	// Deleted: ztunnel gets the delete; the workload is forgotten.
	go func() { acked <- s.DelWorkload(context.Background(), "uid-3") }()
	g.Expect(recvAck(t, c)).To(And(HaveField("Kind", zdsclient.Del), HaveField("UID", "uid-3")))
	g.Eventually(acked).Should(Receive(BeNil()))
	g.Expect(s.Workloads()).To(Equal(2))
}

// During a node wave the new ztunnel connects while the old one drains:
// adds go to the newest, deletes to both, and when the newest leaves, the
// next reconnect gets a snapshot without the deleted workload.
func TestTwoZtunnelsNewestGetsAddsBothGetDeletes(t *testing.T) {
	g := NewWithT(t)
	f, _ := netns(t)
	s, _ := start(t, zds.Options{KeepaliveInterval: 20 * time.Millisecond}, nil)
	old := dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, old)).To(BeEmpty())
	g.Eventually(s.Connected).Should(Equal(1))
	cur := dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, cur)).To(BeEmpty())
	g.Eventually(s.Connected).Should(Equal(2))

	done := make(chan error, 1)
	go func() { done <- s.AddWorkload(context.Background(), "uid-1", f, zds.WorkloadInfo{Name: "p"}) }()
	g.Expect(recvAck(t, cur)).To(HaveField("UID", "uid-1"))
	g.Eventually(done).Should(Receive(BeNil()))
	_, err := old.Recv(200 * time.Millisecond)
	g.Expect(err).To(MatchError(os.ErrDeadlineExceeded), "the draining ztunnel gets no add")

	go func() { done <- s.DelWorkload(context.Background(), "uid-1") }()
	g.Expect(recvAck(t, old)).To(And(HaveField("Kind", zdsclient.Del), HaveField("UID", "uid-1")))
	g.Expect(recvAck(t, cur)).To(And(HaveField("Kind", zdsclient.Del), HaveField("UID", "uid-1")))
	g.Eventually(done).Should(Receive(BeNil()))

	go func() { done <- s.AddWorkload(context.Background(), "uid-2", f, zds.WorkloadInfo{Name: "q"}) }()
	g.Expect(recvAck(t, cur)).To(HaveField("UID", "uid-2"))
	g.Eventually(done).Should(Receive(BeNil()))

	// The old one finishes draining; the new one restarts and reconnects.
	old.Close()
	cur.Close()
	g.Eventually(s.Connected).Should(Equal(0))
	again := dial(t, s, zdsapi.Version_V1)
	snap := snapshot(t, again)
	g.Expect(snap).To(HaveLen(1))
	g.Expect(snap[0]).To(HaveField("UID", "uid-2"))
}

func TestUnknownVersionIsRefused(t *testing.T) {
	g := NewWithT(t)
	f, _ := netns(t)
	s, m := start(t, zds.Options{}, func(s *zds.Server) { _ = s.AddWorkload(context.Background(), "uid-1", f, zds.WorkloadInfo{}) })
	c := dial(t, s, zdsapi.Version(7))
	closed(t, c)
	g.Expect(testutil.ToFloat64(m.ProtocolErrors().WithLabelValues("version"))).To(BeEquivalentTo(1))
	g.Expect(s.Connected()).To(BeZero())
	// An unset version (NOT_USED) is refused too.
	c = dial(t, s, zdsapi.Version_NOT_USED)
	closed(t, c)
	// The agent keeps serving: a V1 ztunnel gets its snapshot.
	c = dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(HaveLen(1))
}

func TestMalformedMessagesCloseTheConnection(t *testing.T) {
	g := NewWithT(t)
	f, _ := netns(t)
	s, m := start(t, zds.Options{KeepaliveInterval: 20 * time.Millisecond}, func(s *zds.Server) {
		_ = s.AddWorkload(context.Background(), "uid-1", f, zds.WorkloadInfo{})
	})

	// A hello that is not a protobuf message.
	raw := rawDial(t, s)
	g.Expect(raw.SendRaw([]byte{0xff, 0xff, 0xff, 0xff, 0x0f})).To(Succeed())
	closed(t, raw)
	g.Eventually(func() float64 { return testutil.ToFloat64(m.ProtocolErrors().WithLabelValues("hello")) }).Should(BeNumerically(">=", 1))

	// An ack that does not parse.
	c := dial(t, s, zdsapi.Version_V1)
	r, err := c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred())
	r.Netns.Close()
	g.Expect(c.SendRaw([]byte{0x0a, 0x05, 0x01})).To(Succeed())
	closed(t, c)
	g.Expect(testutil.ToFloat64(m.Requests().WithLabelValues("add", "failed"))).To(BeEquivalentTo(1))

	// A response that is not an ack (an empty WorkloadResponse).
	c = dial(t, s, zdsapi.Version_V1)
	r, err = c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred())
	r.Netns.Close()
	g.Expect(c.SendRaw([]byte{0x12, 0x00})).To(Succeed()) // an unknown field only
	closed(t, c)
	g.Expect(testutil.ToFloat64(m.ProtocolErrors().WithLabelValues("response"))).To(BeEquivalentTo(1))

	// A message nobody asked for, once the snapshot is through.
	c = dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(HaveLen(1))
	g.Expect(c.Ack("")).To(Succeed())
	closed(t, c)
	g.Expect(testutil.ToFloat64(m.ProtocolErrors().WithLabelValues("unexpected"))).To(BeEquivalentTo(1))
	g.Eventually(s.Connected).Should(BeZero())
}

// A ztunnel that dies in the middle of its snapshot leaves nothing behind:
// adds see no ztunnel, and the next one gets the whole snapshot.
func TestClientVanishingMidSnapshot(t *testing.T) {
	g := NewWithT(t)
	f, _ := netns(t)
	s, _ := start(t, zds.Options{}, func(s *zds.Server) {
		for _, uid := range []string{"uid-1", "uid-2", "uid-3"} {
			_ = s.AddWorkload(context.Background(), uid, f, zds.WorkloadInfo{Name: uid})
		}
	})
	c := dial(t, s, zdsapi.Version_V1)
	recvAck(t, c)
	r, err := c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred())
	r.Netns.Close()
	c.Close() // gone without acking the second add
	g.Eventually(s.Connected).Should(BeZero())
	g.Expect(s.AddWorkload(context.Background(), "uid-4", f, zds.WorkloadInfo{Name: "uid-4"})).To(MatchError(zds.ErrNoZtunnel))

	c = dial(t, s, zdsapi.Version_V1)
	snap := snapshot(t, c)
	g.Expect(snap).To(HaveLen(4))
	for _, r := range snap {
		g.Expect(r.Kind).To(Equal(zdsclient.Add))
	}
}

// A ztunnel that does not ack in time is dropped (acks match requests only
// by order); the add returns an error instead of hanging.
func TestNoAckTimesOut(t *testing.T) {
	g := NewWithT(t)
	f, _ := netns(t)
	s, m := start(t, zds.Options{AckTimeout: 200 * time.Millisecond}, nil)
	c := dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(BeEmpty())
	g.Eventually(s.Connected).Should(Equal(1))
	began := time.Now()
	err := s.AddWorkload(context.Background(), "uid-1", f, zds.WorkloadInfo{})
	g.Expect(err).To(MatchError(ContainSubstring("no ack within 200ms")))
	g.Expect(time.Since(began)).To(BeNumerically("<", 3*time.Second))
	r, err := c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred(), "the add was sent")
	r.Netns.Close()
	closed(t, c)
	g.Eventually(s.Connected).Should(BeZero())
	g.Expect(testutil.ToFloat64(m.Requests().WithLabelValues("add", "failed"))).To(BeEquivalentTo(1))

	// A caller's deadline bounds the wait too (a slow ztunnel).
	c = dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(HaveLen(1))
	g.Eventually(s.Connected).Should(Equal(1))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	g.Expect(s.AddWorkload(ctx, "uid-2", f, zds.WorkloadInfo{})).To(MatchError(context.DeadlineExceeded))
}

func TestServeReplacesAStaleSocket(t *testing.T) {
	g := NewWithT(t)
	dir, err := os.MkdirTemp("", "zds")
	g.Expect(err).NotTo(HaveOccurred())
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "ztunnel.sock")
	g.Expect(os.WriteFile(path, nil, 0o600)).To(Succeed())
	s := zds.NewServer(zds.Options{Path: path, Log: testr.New(t)})
	g.Expect(s.IsServing()).To(BeFalse())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	g.Eventually(s.Serving()).Should(BeClosed())
	c := dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(BeEmpty())
	cancel()
	g.Eventually(done).Should(Receive(BeNil()))
	closed(t, c)
	g.Expect(path).NotTo(BeAnExistingFile())
}

// rawDial connects without a hello.
func rawDial(t *testing.T, s *zds.Server) *zdsclient.Client {
	t.Helper()
	c, err := zdsclient.DialNoHello(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestStateSaysWhetherZtunnelHasTheWorkload: what the agent reports as a
// pod's enrolment on its MeshNode. A workload is taken only once the newest
// ztunnel acked it (live or in its snapshot); otherwise the state says why:
// no ztunnel connected, ztunnel's own refusal, or a new ztunnel that has
// not acked it yet.
func TestStateSaysWhetherZtunnelHasTheWorkload(t *testing.T) {
	g := NewWithT(t)
	f, _ := netns(t)
	s, _ := start(t, zds.Options{KeepaliveInterval: 20 * time.Millisecond}, nil)
	ctx := context.Background()
	g.Expect(s.State("uid-unknown")).To(Equal(zds.WorkloadState{}))

	before := time.Now()
	g.Expect(s.AddWorkload(ctx, "uid-a", f, zds.WorkloadInfo{Name: "a"})).To(MatchError(zds.ErrNoZtunnel))
	st := s.State("uid-a")
	g.Expect(st).To(And(HaveField("Known", true), HaveField("Handed", false), HaveField("Reason", zds.ReasonNoZtunnel)))
	g.Expect(st.Since).To(BeTemporally(">=", before))

	// The first ztunnel takes it from its snapshot.
	c := dial(t, s, zdsapi.Version_V1)
	g.Expect(snapshot(t, c)).To(HaveLen(1))
	g.Expect(s.State("uid-a")).To(Equal(zds.WorkloadState{Known: true, Handed: true}))

	// It refuses another one: the reason is ztunnel's own message.
	done := make(chan error, 1)
	go func() { done <- s.AddWorkload(ctx, "uid-b", f, zds.WorkloadInfo{Name: "b"}) }()
	r, err := c.Recv(recvTimeout)
	g.Expect(err).NotTo(HaveOccurred())
	r.Netns.Close()
	g.Expect(c.Ack("failed to get a workload certificate")).To(Succeed())
	g.Eventually(done).Should(Receive(HaveOccurred()))
	g.Expect(s.State("uid-b")).To(And(HaveField("Handed", false), HaveField("Reason", zds.ReasonRefused+"failed to get a workload certificate")))
	g.Expect(s.State("uid-a").Handed).To(BeTrue(), "a refusal is the refused workload's only")

	// A second ztunnel (a node wave) says hello and is sent the snapshot:
	// until it acks, nothing counts as taken by it. It takes a, refuses b.
	next := dial(t, s, zdsapi.Version_V1)
	g.Eventually(s.Connected).Should(Equal(2))
	g.Expect(s.State("uid-a")).To(HaveField("Reason", zds.ReasonNotAcked))
	for range 2 {
		r, err := next.Recv(recvTimeout)
		g.Expect(err).NotTo(HaveOccurred())
		r.Netns.Close()
		msg := ""
		if r.UID == "uid-b" {
			msg = "still no certificate"
		}
		g.Expect(next.Ack(msg)).To(Succeed())
	}
	g.Expect(recvAck(t, next)).To(HaveField("Kind", zdsclient.SnapshotSent))
	g.Expect(s.State("uid-a").Handed).To(BeTrue())
	g.Expect(s.State("uid-b").Reason).To(Equal(zds.ReasonRefused + "still no certificate"))

	// Every ztunnel leaves: nothing is taken.
	c.Close()
	next.Close()
	g.Eventually(s.Connected).Should(BeZero())
	g.Expect(s.State("uid-a")).To(And(HaveField("Handed", false), HaveField("Reason", zds.ReasonNoZtunnel)))

	// Deleted: unknown again.
	g.Expect(s.DelWorkload(ctx, "uid-a")).To(Succeed())
	g.Expect(s.State("uid-a").Known).To(BeFalse())
}
