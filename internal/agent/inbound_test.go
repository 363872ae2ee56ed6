package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"golang.org/x/sys/unix"

	mkbpf "github.com/meshkeeper/meshkeeper/bpf"
	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

// podPair is a pod's network namespace joined to a client's by a veth pair,
// as a node joins a pod to the rest of the cluster: the pod's eth0 has
// pod4/pod6, the client's end client4/client6. Connections from the client
// arrive in the pod on eth0, not on loopback.
type podPair struct {
	pod, client   *testNetns
	pod4, pod6    string
	client4, cli6 string
}

func newPodPair(t testing.TB, env nodeEnv, subnet int) *podPair {
	t.Helper()
	p := &podPair{pod: newTestNetns(t), client: newTestNetns(t),
		pod4: fmt.Sprintf("10.250.%d.2", subnet), client4: fmt.Sprintf("10.250.%d.1", subnet),
		pod6: fmt.Sprintf("fd00:250:%d::2", subnet), cli6: fmt.Sprintf("fd00:250:%d::1", subnet)}
	ipIn(t, p.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "veth-c", "netns", p.client.Name)
	ipIn(t, p.pod, "addr", "add", p.pod4+"/24", "dev", "eth0")
	ipIn(t, p.pod, "addr", "add", p.pod6+"/64", "dev", "eth0", "nodad")
	ipIn(t, p.pod, "link", "set", "eth0", "up")
	ipIn(t, p.client, "addr", "add", p.client4+"/24", "dev", "veth-c")
	ipIn(t, p.client, "addr", "add", p.cli6+"/64", "dev", "veth-c", "nodad")
	ipIn(t, p.client, "link", "set", "veth-c", "up")
	if env.kube {
		// conntrack tracks every packet in the pod, as kube-proxy's and
		// the kubelet's rules make it do on a node.
		iptablesIn(t, p.pod, "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
	}
	return p
}

// labelServer answers each connection with one line: its label, the
// connection's local address and its peer ("inbound 10.250.0.2:8080 from
// 10.250.0.1:41234"), and counts them. It listens dual-stack with
// SO_REUSEPORT, as ztunnel's in-pod listeners do.
type labelServer struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	seen int
}

func startLabelServer(tb testing.TB, ns *testNetns, addr, label string) *labelServer {
	tb.Helper()
	return startMarkedLabelServer(tb, ns, addr, label, 0)
}

// startMarkedLabelServer is startLabelServer with SO_MARK mark on the
// listener (unless 0), as ztunnel marks every socket it opens in a pod: set
// after listen, as ztunnel's InPodSocketFactory::tcp_bind does (std's
// TcpListener::bind listens at once).
func startMarkedLabelServer(tb testing.TB, ns *testNetns, addr, label string, mark int) *labelServer {
	tb.Helper()
	s := &labelServer{}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	// Plain TCP, as ztunnel's listeners are (Go listens with MPTCP by
	// default, and an MPTCP socket cannot go into a SOCKHASH).
	lc.SetMultipathTCP(false)
	var err error
	if nsErr := ns.Do(func() { s.ln, err = lc.Listen(context.Background(), "tcp", addr) }); nsErr != nil {
		tb.Fatal(nsErr)
	}
	if err != nil {
		tb.Fatalf("%s listen %s in %s: %v", label, addr, ns.Name, err)
	}
	if mark != 0 {
		rc, err := s.ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			tb.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) }); err != nil || serr != nil {
			tb.Fatalf("mark the listener: %v", errors.Join(err, serr))
		}
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.seen++
			s.mu.Unlock()
			fmt.Fprintf(c, "%s %s from %s\n", label, unmapAddr(c.LocalAddr()), unmapAddr(c.RemoteAddr()))
			c.Close()
		}
	}()
	tb.Cleanup(s.Close)
	return s
}

func unmapAddr(a net.Addr) string {
	ta := a.(*net.TCPAddr)
	return ta.AddrPort().Addr().Unmap().String() + fmt.Sprintf(":%d", ta.Port)
}

func (s *labelServer) Close() { s.ln.Close(); s.wg.Wait() }

func (s *labelServer) Accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen
}

// File is a duplicate of the listening socket, as the agent gets one from
// ztunnel with pidfd_getfd.
func (s *labelServer) File(tb testing.TB) *os.File {
	tb.Helper()
	f, err := s.ln.(*net.TCPListener).File()
	if err != nil {
		tb.Fatal(err)
	}
	return f
}

// ask dials addr from ns (with SO_MARK mark unless 0) and returns the one
// line the server answered.
func ask(ns *testNetns, addr string, mark int) (string, error) {
	d := net.Dialer{Timeout: 2 * time.Second}
	if mark != 0 {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
			return errors.Join(err, serr)
		}
	}
	var c net.Conn
	var err error
	if nsErr := ns.Do(func() { c, err = d.Dial("tcp", addr) }); nsErr != nil {
		return "", nsErr
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	return readReply(c)
}

func captureInbound(t testing.TB, dp *Datapath, ns *testNetns, listener *labelServer) {
	t.Helper()
	h, err := os.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	f := listener.File(t)
	// The datapath keeps no reference: the caller closes its duplicate.
	defer f.Close()
	if err := dp.CaptureInbound(ns.Cookie(t), h, f); err != nil {
		t.Fatal(err)
	}
}

// TestInboundCapture is inbound capture end to end, on an idle kernel and
// on a kube node: connections from outside the pod to any port of an
// enrolled, captured pod reach the stand-in for ztunnel's inbound listener
// (15006), IPv4 and IPv6, with the original destination as the accepted
// socket's local address; HBONE (15008) reaches the HBONE listener as it is;
// the proxy's own (marked) connections to the application reach it; a pod
// that is not captured is untouched; a captured pod whose listener is gone
// refuses rather than let connections reach the application unproxied; an
// agent restart keeps capturing; unenrolment and uninstall leave nothing.
func TestInboundCapture(t *testing.T) {
	requirePrivileged(t)
	for _, env := range nodeEnvs {
		t.Run(env.name, func(t *testing.T) { testInboundCapture(t, env) })
	}
}

func testInboundCapture(t *testing.T, env nodeEnv) {
	g := NewWithT(t)
	env.setUp(t)
	pair, other := newPodPair(t, env, 1), newPodPair(t, env, 2)
	app := startLabelServer(t, pair.pod, ":8080", "app")
	hbone := startLabelServer(t, pair.pod, ":15008", "hbone")
	otherApp := startLabelServer(t, other.pod, ":8080", "app")
	// The pod that is not captured has an inbound listener too, so that a
	// wrongful capture there would be seen.
	otherInbound := startMarkedLabelServer(t, other.pod, ":15006", "inbound", DefaultBypassMark)

	app4, app6 := pair.pod4+":8080", "["+pair.pod6+"]:8080"
	for _, addr := range []string{app4, app6} {
		g.Expect(ask(pair.client, addr, 0)).To(HavePrefix("app "+unbracket(addr)+" from "), "before capture, %s reaches the application", addr)
	}

	dp, cfg := loadTestDatapath(t, capturePort)
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	pod := PodRef{Namespace: "shop", Name: "server", UID: "4f1e9a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b"}
	g.Expect(enroller.EnrollPath(pod, pair.pod.Path)).To(Succeed())
	g.Expect(enroller.EnrollPath(PodRef{Namespace: "shop", Name: "other", UID: "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"}, other.pod.Path)).To(Succeed())
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("app "), "enrolled but not captured yet: the application answers")

	inbound := startMarkedLabelServer(t, pair.pod, ":15006", "inbound", DefaultBypassMark)
	captureInbound(t, dp, pair.pod, inbound)
	atApp := app.Accepted()

	for _, tc := range []struct{ addr, from string }{
		{app4, pair.client4},
		{app6, pair.cli6},
		{pair.pod4 + ":9999", pair.client4}, // no listener on that port: captured all the same
		{"[" + pair.pod6 + "]:443", pair.cli6},
	} {
		for range 5 {
			reply, err := ask(pair.client, tc.addr, 0)
			g.Expect(err).NotTo(HaveOccurred(), tc.addr)
			g.Expect(reply).To(MatchRegexp(`^inbound %s from %s:\d+$`, regexpQuote(unbracket(tc.addr)), regexpQuote(tc.from)),
				"the inbound listener gets the connection, its local address the original destination, its peer the client")
		}
	}
	g.Expect(inbound.Accepted()).To(Equal(20))
	g.Expect(app.Accepted()).To(Equal(atApp), "no inbound connection reaches the application around the proxy")

	// HBONE reaches ztunnel's HBONE listener untouched.
	for _, addr := range []string{pair.pod4 + ":15008", "[" + pair.pod6 + "]:15008"} {
		g.Expect(ask(pair.client, addr, 0)).To(HavePrefix("hbone "+unbracket(addr)+" from "), addr)
	}
	g.Expect(hbone.Accepted()).To(Equal(2))

	// The proxy's own connection to the application (in the pod, with
	// ztunnel's mark) reaches it: neither outbound nor inbound capture
	// takes it. An unmarked one from the pod to itself is outbound, and
	// goes to the outbound capture port, where nobody listens here.
	g.Expect(ask(pair.pod, app4, DefaultBypassMark)).To(HavePrefix("app "+app4+" from "), "ztunnel-marked socket")
	g.Expect(ask(pair.pod, app6, DefaultBypassMark)).To(HavePrefix("app "+unbracket(app6)+" from "), "ztunnel-marked socket, IPv6")
	_, err = ask(pair.pod, app4, 0)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED), "an unmarked connect from the pod is outbound-captured")

	// The pod that is enrolled but not captured: untouched.
	for _, addr := range []string{other.pod4 + ":8080", "[" + other.pod6 + "]:8080"} {
		g.Expect(ask(other.client, addr, 0)).To(HavePrefix("app "), addr)
	}
	g.Expect(otherInbound.Accepted()).To(BeZero())
	g.Expect(otherApp.Accepted()).To(Equal(2))

	// The node's own connections (the kubelet's probes) are exempt once the
	// agent names the node's addresses: here the client plays the node.
	g.Expect(dp.SetInboundBypassSources([]netip.Addr{netip.MustParseAddr(pair.client4), netip.MustParseAddr(pair.cli6)})).To(Succeed())
	atApp = app.Accepted()
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("app "+app4+" from "+pair.client4), "a probe from the node")
	g.Expect(ask(pair.client, app6, 0)).To(HavePrefix("app "+unbracket(app6)+" from "+pair.cli6), "a probe from the node, IPv6")
	g.Expect(app.Accepted()).To(Equal(atApp + 2))
	g.Expect(dp.SetInboundBypassSources(nil)).To(Succeed())
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("inbound "), "captured again once the source is no longer exempt")
	atApp = app.Accepted()

	// Another pod's address cannot be claimed.
	h, err := os.Open(other.pod.Path)
	g.Expect(err).NotTo(HaveOccurred())
	f := otherInbound.File(t)
	g.Expect(dp.CaptureInbound(pair.pod.Cookie(t), h, f)).To(MatchError(ContainSubstring("not")), "cookie of another netns")
	h.Close()
	f.Close()

	// Agent restart: the handles go, capture stays; the new agent adopts
	// the link, and replaces its program when it differs.
	g.Expect(dp.Close()).To(Succeed())
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("inbound "), "while no agent runs")
	linkName := inboundLinkPrefix + fmt.Sprint(pair.pod.Cookie(t))
	for _, force := range []bool{false, true} {
		c := cfg
		c.ForceReplace = force
		dp2, report, err := LoadDatapath(c)
		g.Expect(err).NotTo(HaveOccurred())
		want := LinkAdopted
		if force {
			want = LinkUpdated
		}
		g.Expect(report.InboundLinks).To(Equal(map[string]LinkAction{linkName: want}))
		g.Expect(ask(pair.client, app6, 0)).To(HavePrefix("inbound "), "after a restart (force=%v)", force)
		g.Expect(dp2.Close()).To(Succeed())
	}
	dp, _, err = LoadDatapath(cfg)
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { dp.Close() })
	enroller, err = NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(enroller.EnrollPath(pod, pair.pod.Path)).To(Succeed(), "the restarted agent finds the pod again")

	// ztunnel gone (its listener closed): fail closed.
	atApp = app.Accepted()
	inbound.Close()
	_, err = ask(pair.client, app4, 0)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED), "captured pod without its inbound listener refuses")
	_, err = ask(pair.client, app6, 0)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED))
	g.Expect(app.Accepted()).To(Equal(atApp), "and nothing reaches the application")
	g.Expect(dp.MapUsage()[mkbpf.RedirectMapInboundListeners].Entries).To(BeZero(), "the kernel drops a closed listener from the map")
	// A new ztunnel brings a new listener.
	inbound = startMarkedLabelServer(t, pair.pod, ":15006", "inbound", DefaultBypassMark)
	captureInbound(t, dp, pair.pod, inbound)
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("inbound " + app4))

	// Unenrolment releases inbound capture: link, pin and map entries.
	progID := linkProgram(t, filepath.Join(cfg.PinPath, linkPinnedName, linkName))
	enroller.Forget(pod.UID)
	_, err = os.Stat(filepath.Join(cfg.PinPath, linkPinnedName, linkName))
	g.Expect(errors.Is(err, os.ErrNotExist)).To(BeTrue(), "the inbound link's pin is gone")
	g.Expect(linksOfProgram(t, progID)).To(BeEmpty(), "no sk_lookup link remains attached")
	g.Expect(dp.MapUsage()[mkbpf.RedirectMapInboundAddrs].Entries).To(BeZero())
	g.Expect(dp.MapUsage()[mkbpf.RedirectMapInboundListeners].Entries).To(BeZero())
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("app "), "an unenrolled pod is no longer captured")
	g.Expect(dp.ReleaseInbound(pair.pod.Cookie(t))).To(Succeed(), "release is idempotent")
}

// TestInboundUninstall: `agent uninstall` removes the sk_lookup links of
// captured pods too, and their traffic reaches the application again.
func TestInboundUninstall(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	pair := newPodPair(t, nodeEnvs[0], 3)
	startLabelServer(t, pair.pod, ":8080", "app")
	inbound := startMarkedLabelServer(t, pair.pod, ":15006", "inbound", DefaultBypassMark)
	dp, cfg := loadTestDatapath(t, capturePort)
	g.Expect(dp.EnrollNetns(pair.pod.Cookie(t), "6b7c8d9e-0f1a-4b2c-9d3e-4f5a6b7c8d9e")).To(Succeed())
	captureInbound(t, dp, pair.pod, inbound)
	g.Expect(ask(pair.client, pair.pod4+":8080", 0)).To(HavePrefix("inbound "))
	progID := linkProgram(t, filepath.Join(cfg.PinPath, linkPinnedName, inboundLinkPrefix+fmt.Sprint(pair.pod.Cookie(t))))
	g.Expect(dp.Close()).To(Succeed())

	g.Expect(Uninstall(cfg.PinPath)).To(Succeed())
	_, err := os.Stat(cfg.PinPath)
	g.Expect(errors.Is(err, os.ErrNotExist)).To(BeTrue())
	g.Expect(linksOfProgram(t, progID)).To(BeEmpty())
	g.Expect(waitGone([]ebpf.ProgramID{progID})).To(BeEmpty(), "the sk_lookup program is freed")
	g.Expect(ask(pair.client, pair.pod4+":8080", 0)).To(HavePrefix("app "))
}

func linkProgram(t *testing.T, pin string) ebpf.ProgramID {
	t.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.Program
}

func linksOfProgram(t *testing.T, id ebpf.ProgramID) []link.ID {
	t.Helper()
	return attachedLinkIDs(t, map[string]ebpf.ProgramID{"p": id})
}

func netipMustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func unbracket(addr string) string {
	ap, err := netipParseAddrPort(addr)
	if err != nil {
		return addr
	}
	return ap
}

func netipParseAddrPort(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	return host + ":" + port, nil
}

func regexpQuote(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '.', '[', ']', ':':
			out = append(out, '\\')
		}
		out = append(out, s[i])
	}
	return string(out)
}

// TestCaptureInboundRefusesBadInput: what the ZDS server could get wrong is
// refused with a message that says what is wrong, and nothing is captured.
func TestCaptureInboundRefusesBadInput(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	pair := newPodPair(t, nodeEnvs[0], 4)
	bare := newTestNetns(t) // loopback only
	dp, _ := loadTestDatapath(t, capturePort)
	inbound := startMarkedLabelServer(t, pair.pod, ":15006", "inbound", DefaultBypassMark)
	h, err := os.Open(pair.pod.Path)
	g.Expect(err).NotTo(HaveOccurred())
	defer h.Close()

	var udp net.PacketConn
	g.Expect(pair.pod.Do(func() { udp, err = net.ListenPacket("udp", ":15006") })).To(Succeed())
	g.Expect(err).NotTo(HaveOccurred())
	defer udp.Close()
	uf, err := udp.(*net.UDPConn).File()
	g.Expect(err).NotTo(HaveOccurred())
	defer uf.Close()
	g.Expect(dp.CaptureInbound(pair.pod.Cookie(t), h, uf)).To(MatchError(ContainSubstring("not a listening plain TCP socket")))

	var mptcp net.Listener
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(true)
	g.Expect(pair.pod.Do(func() { mptcp, err = lc.Listen(context.Background(), "tcp", ":15016") })).To(Succeed())
	g.Expect(err).NotTo(HaveOccurred())
	defer mptcp.Close()
	mf, err := mptcp.(*net.TCPListener).File()
	g.Expect(err).NotTo(HaveOccurred())
	defer mf.Close()
	if proto, _ := unix.GetsockoptInt(int(mf.Fd()), unix.SOL_SOCKET, unix.SO_PROTOCOL); proto == unix.IPPROTO_MPTCP {
		g.Expect(dp.CaptureInbound(pair.pod.Cookie(t), h, mf)).To(MatchError(ContainSubstring("MPTCP")))
	}

	bh, err := os.Open(bare.Path)
	g.Expect(err).NotTo(HaveOccurred())
	defer bh.Close()
	lf := inbound.File(t)
	defer lf.Close()
	g.Expect(dp.CaptureInbound(bare.Cookie(t), bh, lf)).To(MatchError(ContainSubstring("no address to capture")))

	captured, err := dp.InboundCaptured()
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(captured).To(BeEmpty())
	g.Expect(dp.MapUsage()[mkbpf.RedirectMapInboundAddrs].Entries).To(BeZero())
	g.Expect(ask(pair.client, pair.pod4+":15006", 0)).To(HavePrefix("inbound "+pair.pod4+":15006"), "the listener itself still works")

	// Two pods with one address: the second is refused, the first (an
	// enrolled one) keeps its capture.
	g.Expect(dp.EnrollNetns(pair.pod.Cookie(t), "4f1e9a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b")).To(Succeed())
	captureInbound(t, dp, pair.pod, inbound)
	twin := newPodPair(t, nodeEnvs[0], 4)
	twinInbound := startMarkedLabelServer(t, twin.pod, ":15006", "inbound", DefaultBypassMark)
	th, err := os.Open(twin.pod.Path)
	g.Expect(err).NotTo(HaveOccurred())
	defer th.Close()
	tf := twinInbound.File(t)
	defer tf.Close()
	g.Expect(dp.CaptureInbound(twin.pod.Cookie(t), th, tf)).To(MatchError(ContainSubstring("is captured for netns")))
	g.Expect(dp.InboundCaptured()).To(ConsistOf(pair.pod.Cookie(t)))
	g.Expect(ask(pair.client, pair.pod4+":8080", 0)).To(HavePrefix("inbound " + pair.pod4 + ":8080"))
}

// TestZeroBypassMarkRefused: a bypass mark of 0 would exempt every
// unmarked socket, so the datapath refuses it before touching the kernel.
func TestZeroBypassMarkRefused(t *testing.T) {
	g := NewWithT(t)
	_, _, err := LoadDatapath(DatapathConfig{PinPath: "/nonexistent/meshkeeper-test", CgroupPath: "/sys/fs/cgroup",
		CaptureAddr: netipMustAddrPort("127.0.0.1:15001")})
	g.Expect(err).To(MatchError(ContainSubstring("bypass mark 0 would exempt every unmarked socket")))
	g.Expect(err).To(MatchError(ContainSubstring("0x539")))
	g.Expect(CheckBypassMark(DefaultBypassMark)).To(Succeed())
}

// listeningZtunnel plays ztunnel's part in a hand-off for
// TestInboundListenerFromKernel: on AddWorkload it opens its inbound
// listener, marked, in the pod's netns, and hands no socket to anyone, as
// ztunnel does.
type listeningZtunnel struct {
	t         testing.TB
	pods      map[string]*testNetns // by pod UID
	listeners map[string]*labelServer
}

func (z *listeningZtunnel) AddWorkload(_ context.Context, uid string, _ *os.File, _ zds.WorkloadInfo) error {
	z.listeners[uid] = startMarkedLabelServer(z.t, z.pods[uid], ":15006", "ztunnel", DefaultBypassMark)
	return nil
}
func (z *listeningZtunnel) KeepWorkload(string, zds.WorkloadInfo) {}
func (z *listeningZtunnel) DelWorkload(_ context.Context, uid string) error {
	if l := z.listeners[uid]; l != nil {
		l.Close()
	}
	return nil
}

// TestInboundListenerFromKernel: the live agent's inbound capture, with no
// listener passed to it. A pod handed to ztunnel is captured inbound; the
// listener ztunnel opens on 15006 with its mark inside the pod (after the
// datapath is loaded) is found by the kernel, so connections from outside
// to any port of the pod reach it, with the original destination as local
// address. ztunnel marks its listener only after listen, as upstream does.
// A ztunnel that restarts and listens again is found again without the
// agent; an unmarked listener on 15006 (the application's, say) is never
// handed ztunnel's traffic; unenrolment releases everything.
func TestInboundListenerFromKernel(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	pair, rogue := newPodPair(t, nodeEnvs[0], 5), newPodPair(t, nodeEnvs[0], 6)
	app := startLabelServer(t, pair.pod, ":8080", "app")
	rogueApp := startLabelServer(t, rogue.pod, ":8080", "app")
	dp, cfg := loadTestDatapath(t, capturePort)
	pod := PodRef{Namespace: "shop", Name: "server", UID: "7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"}
	roguePod := PodRef{Namespace: "shop", Name: "rogue", UID: "8d9e0f1a-2b3c-4d4e-9f5a-6b7c8d9e0f1a"}
	zt := &listeningZtunnel{t: t, pods: map[string]*testNetns{pod.UID: pair.pod}, listeners: map[string]*labelServer{}}
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	enroller.SetHandoff(zt)

	g.Expect(enroller.EnrollPathHandedOff(pod, pair.pod.Path)).To(Succeed())
	cookie := pair.pod.Cookie(t)
	g.Expect(dp.InboundListener(cookie)).To(BeTrue(), "the kernel put ztunnel's listener in the map as it started listening")
	g.Expect(dp.InboundCaptured()).To(ConsistOf(cookie))
	app4, app6 := pair.pod4+":8080", "["+pair.pod6+"]:8080"
	for _, tc := range []struct{ addr, from string }{{app4, pair.client4}, {app6, pair.cli6}, {pair.pod4 + ":9999", pair.client4}} {
		g.Expect(ask(pair.client, tc.addr, 0)).To(MatchRegexp(`^ztunnel %s from %s:\d+$`, regexpQuote(unbracket(tc.addr)), regexpQuote(tc.from)), tc.addr)
	}
	g.Expect(zt.listeners[pod.UID].Accepted()).To(Equal(3))
	g.Expect(app.Accepted()).To(BeZero(), "nothing reaches the application around ztunnel")

	// ztunnel restarts: while it is away the pod refuses; its new listener
	// is found without the agent doing anything.
	zt.listeners[pod.UID].Close()
	_, err = ask(pair.client, app4, 0)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED), "fail closed while ztunnel is away")
	g.Expect(dp.InboundListener(cookie)).To(BeFalse())
	again := startMarkedLabelServer(t, pair.pod, ":15006", "ztunnel-2", DefaultBypassMark)
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("ztunnel-2 "+app4+" from "), "the restarted ztunnel's listener")
	zt.listeners[pod.UID] = again

	// ztunnel's outbound leg from a client pod on this node (a marked
	// socket in another enrolled netns) is inbound to the server pod like
	// any other connection: only ztunnel's own leg inside the server pod
	// reaches the application directly.
	g.Expect(dp.EnrollNetns(pair.client.Cookie(t), "9e0f1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b")).To(Succeed())
	g.Expect(ask(pair.client, app4, DefaultBypassMark)).To(HavePrefix("ztunnel-2 "+app4+" from "+pair.client4), "marked, from another enrolled pod")
	g.Expect(ask(pair.pod, app4, DefaultBypassMark)).To(HavePrefix("app "+app4+" from "+pair.pod4), "marked, from inside the pod: ztunnel's own leg")
	g.Expect(app.Accepted()).To(Equal(1))
	_, err = dp.UnenrollNetns(pair.client.Cookie(t))
	g.Expect(err).NotTo(HaveOccurred())

	// An unmarked listener on 15006 is not ztunnel's: a captured pod with
	// only that one refuses (it is in the map: the mark is checked at
	// lookup, since ztunnel sets it after listen).
	zt.pods[roguePod.UID] = rogue.pod
	g.Expect(enroller.EnrollPathHandedOff(roguePod, rogue.pod.Path)).To(Succeed())
	zt.listeners[roguePod.UID].Close()
	unmarked := startLabelServer(t, rogue.pod, ":15006", "not-ztunnel")
	_, err = ask(rogue.client, rogue.pod4+":8080", 0)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED))
	g.Expect(unmarked.Accepted()).To(BeZero())
	g.Expect(rogueApp.Accepted()).To(BeZero())
	g.Expect(dp.InboundListener(rogue.pod.Cookie(t))).To(BeTrue())
	unmarked.Close()

	// Unenrolment releases: link, pin, addresses, listener entry.
	linkPin := filepath.Join(cfg.PinPath, linkPinnedName, inboundLinkPrefix+fmt.Sprint(cookie))
	progID := linkProgram(t, linkPin)
	enroller.Forget(pod.UID)
	enroller.Forget(roguePod.UID)
	_, err = os.Stat(linkPin)
	g.Expect(errors.Is(err, os.ErrNotExist)).To(BeTrue(), "the inbound link's pin is gone")
	g.Expect(linksOfProgram(t, progID)).To(BeEmpty(), "no sk_lookup link remains attached")
	g.Expect(dp.MapUsage()[mkbpf.RedirectMapInboundAddrs].Entries).To(BeZero())
	g.Expect(dp.MapUsage()[mkbpf.RedirectMapInboundListeners].Entries).To(BeZero())
	g.Expect(ask(pair.client, app4, 0)).To(HavePrefix("app "), "an unenrolled pod is no longer captured")
}

// TestAdoptedPodInboundWaitsForItsListener: a pod enrolled before this
// agent started whose ztunnel listener predates the datapath's listen hook
// (an agent upgraded from one without inbound capture) is not captured on
// adoption, which would refuse its inbound connections while ztunnel is
// fine; once ztunnel listens again, the next full scan captures it.
func TestAdoptedPodInboundWaitsForItsListener(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	dp, _ := loadTestDatapath(t, capturePort)
	cgroups := newPodCgroups(t)
	app := PodRef{Namespace: "shop", Name: "app", UID: "0f1a2b3c-4d5e-4f6a-8b7c-8d9e0f1a2b3c"}
	proc := cgroups.start(t, app.UID, false)
	ns := &testNetns{Name: "pod-" + app.Name, Path: proc.netnsPath()}
	runCmd(t, "nsenter", "--net="+ns.Path, "ip", "addr", "add", "10.250.9.2/32", "dev", "lo")
	runCmd(t, "nsenter", "--net="+ns.Path, "ip", "link", "set", "lo", "up")
	cookie := ns.Cookie(t)

	// What the earlier agent left: the pod enrolled, ztunnel listening, its
	// listener not in the capture map.
	g.Expect(dp.EnrollNetns(cookie, app.UID)).To(Succeed())
	old := startMarkedLabelServer(t, ns, ":15006", "ztunnel", DefaultBypassMark)
	g.Expect(dp.objs.InboundListeners.Delete(cookie)).To(Succeed())

	h := &handoffLog{ack: true}
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	enroller.SetHandoff(h)
	enroller.Want(app)
	enroller.Sync(true)
	g.Expect(enroller.Cookies(app.UID)).To(ConsistOf(cookie))
	g.Expect(dp.InboundLinked(cookie)).To(BeFalse(), "not captured while ztunnel's listener is unknown")
	g.Expect(ask(ns, "10.250.9.2:15006", DefaultBypassMark)).To(HavePrefix("ztunnel "), "ztunnel still answers")

	// ztunnel restarts: its new listener is put in the map by the kernel,
	// and the next full scan captures the pod.
	old.Close()
	startMarkedLabelServer(t, ns, ":15006", "ztunnel-2", DefaultBypassMark)
	g.Expect(dp.InboundListener(cookie)).To(BeTrue())
	enroller.Sync(true)
	g.Expect(dp.InboundLinked(cookie)).To(BeTrue(), "captured once ztunnel listens again")
	g.Expect(dp.InboundCaptured()).To(ConsistOf(cookie))
	enroller.Forget(app.UID)
	g.Expect(dp.InboundLinked(cookie)).To(BeFalse())
}
