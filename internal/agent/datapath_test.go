package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	mkbpf "github.com/meshkeeper/meshkeeper/bpf"
)

const (
	serviceAddr = "10.96.0.10:80" // a ClusterIP: no route to it in a fresh namespace
	capturePort = 15001
)

var captureAddr = fmt.Sprintf("127.0.0.1:%d", capturePort)

// TestRedirectInNetns is the datapath end to end on this kernel, on an
// idle kernel and on a node where kubelet and kube-proxy rules make
// conntrack active (see nodeEnv). It asserts what the datapath guarantees:
// a client in an enrolled namespace reaches the capture proxy instead of the
// service's server, the proxy learns the service address (the true original
// destination, not conntrack's view of the redirected connection), the
// client still sees the service as its peer; a client in a namespace that is
// not enrolled reaches the server directly and never the proxy; the host's
// own connections keep their peer and original destination; and the
// outcomes are counted.
func TestRedirectInNetns(t *testing.T) {
	requirePrivileged(t)
	for _, env := range nodeEnvs {
		t.Run(env.name, func(t *testing.T) { testRedirectInNetns(t, env) })
	}
}

func testRedirectInNetns(t *testing.T, env nodeEnv) {
	g := NewWithT(t)
	env.setUp(t)
	enrolledNS, otherNS := newTestNetns(t), newTestNetns(t)
	enrolledServer, otherServer := env.addService(t, enrolledNS), env.addService(t, otherNS)

	// The environment is what it says: in a kube node conntrack answers
	// SO_ORIGINAL_DST for plain connections in the host's namespace and the
	// pod's; the pod namespaces of an idle kernel have no rule. (The host
	// of an idle run is not asserted: a kubelet may run on this machine.)
	var active bool
	var err error
	if env.kube {
		active, err = conntrackActive()
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(active).To(BeTrue(), "conntrack in the host's network namespace")
	}
	g.Expect(enrolledNS.Do(func() { active, err = conntrackActive() })).To(Succeed())
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(active).To(Equal(env.kube), "conntrack in the pod's network namespace")

	// dialService connects to the service from ns and says who answered:
	// "server", or the proxy's "orig <original destination>". The client's
	// peer is the service either way.
	dialService := func(ns *testNetns) (string, error) {
		c, err := dialIn(ns, "tcp4", serviceAddr, 2*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		sa, err := peerName(c)
		if err != nil {
			return "", err
		}
		if peer := sockaddrString(sa); peer != serviceAddr {
			return "", fmt.Errorf("peer %s, want the service %s", peer, serviceAddr)
		}
		return readReply(c)
	}

	// Before any program is loaded: the service's server answers.
	for _, ns := range []*testNetns{enrolledNS, otherNS} {
		g.Expect(dialService(ns)).To(Equal("server"), "without the datapath the server answers in %s", ns.Name)
	}

	dp, _ := loadTestDatapath(t, capturePort)
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	collector := &Collector{Node: "node-a"}
	collector.SetDatapath(dp, enroller)
	reg := NewRegistry(collector)
	pod := PodRef{Namespace: "shop", Name: "client-a", UID: "0b0e4f7e-2d8c-4bf4-9a51-0d3a6b2f1e11", Revision: "1-27-3"}

	// Loaded but not enrolled yet: still the server.
	g.Expect(dialService(enrolledNS)).To(Equal("server"), "a namespace that is not enrolled must not be redirected")

	g.Expect(enroller.EnrollPath(pod, enrolledNS.Path)).To(Succeed())
	g.Expect(metricValue(t, reg, "meshkeeper_agent_connections_total", "result", "refused")).To(Equal(0.0), "series exist at 0 once enrolled")
	proxy := startStandInProxy(t, enrolledNS, captureAddr)
	// The non-enrolled namespace gets a listener on the capture port too,
	// so that a wrongful redirect there would succeed instead of failing.
	otherProxy := startStandInProxy(t, otherNS, captureAddr)
	enrolledAtServer, otherAtServer := enrolledServer.Accepted(), otherServer.Accepted()

	const okDials = 20
	for i := range okDials {
		c, err := dialIn(enrolledNS, "tcp4", serviceAddr, 2*time.Second)
		g.Expect(err).NotTo(HaveOccurred(), "dial %d", i)
		g.Expect(c.RemoteAddr().String()).To(Equal(serviceAddr), "Go's view of the peer")
		sa, err := peerName(c)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(sockaddrString(sa)).To(Equal(serviceAddr), "getpeername must report the original destination")
		g.Expect(readReply(c)).To(Equal("orig "+serviceAddr), "the proxy must read the original destination with SO_ORIGINAL_DST")
		c.Close()
	}
	g.Expect(proxy.Accepted()).To(Equal(okDials), "every connection of the enrolled pod reaches the proxy")
	g.Expect(enrolledServer.Accepted()).To(Equal(enrolledAtServer), "no connection of the enrolled pod reaches the server around the proxy")

	// A dual-stack (AF_INET6) socket connecting to the v4-mapped address.
	var mappedPeer, mappedReply string
	var mappedErr error
	g.Expect(enrolledNS.Do(func() { mappedPeer, mappedReply, mappedErr = dialV4Mapped(serviceAddr) })).To(Succeed())
	g.Expect(mappedErr).NotTo(HaveOccurred())
	g.Expect(mappedPeer).To(Equal("[::ffff:10.96.0.10]:80"))
	g.Expect(mappedReply).To(Equal("orig " + serviceAddr))

	// Not enrolled: straight to the server, never the proxy.
	for range 3 {
		g.Expect(dialService(otherNS)).To(Equal("server"), "a namespace that is not enrolled must not be redirected")
	}
	g.Expect(otherServer.Accepted()).To(Equal(otherAtServer + 3))
	g.Expect(otherProxy.Accepted()).To(BeZero())

	// The host's own loopback traffic is untouched: a direct connection
	// keeps its peer, and the datapath answers no SO_ORIGINAL_DST for it.
	// Where conntrack is active the kernel answers it, with the address
	// the connection really went to.
	hostProxy := startStandInProxy(t, nil, "127.0.0.1:0")
	hostAddr := hostProxy.ln.Addr().String()
	hc, err := net.DialTimeout("tcp4", hostAddr, time.Second)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(hc.RemoteAddr().String()).To(Equal(hostAddr))
	hostReply, err := readReply(hc)
	g.Expect(err).NotTo(HaveOccurred())
	if env.kube {
		g.Expect(hostReply).To(Equal("orig "+hostAddr), "conntrack's answer for a connection that was not redirected: where it went")
	} else {
		g.Expect(hostReply).To(Or(HavePrefix("error "), Equal("orig "+hostAddr)),
			"for a connection that was not redirected SO_ORIGINAL_DST is not answered, or (conntrack) names where it went")
	}
	hc.Close()

	// Refused: a loopback port nobody listens on (loopback is never redirected)...
	_, err = dialIn(enrolledNS, "tcp4", "127.0.0.1:1", time.Second)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED))
	// ...and the service while the proxy is down: the connection fails
	// rather than leave the mesh for the server.
	proxy.Close()
	_, err = dialIn(enrolledNS, "tcp4", serviceAddr, time.Second)
	g.Expect(err).To(MatchError(unix.ECONNREFUSED), "redirected to a capture port nobody listens on")
	g.Expect(enrolledServer.Accepted()).To(Equal(enrolledAtServer), "with the proxy down, the enrolled pod must not reach the server")

	// Timeout: a SYN routed into lo for an address nobody has (dropped),
	// from a socket with the proxy's bypass mark (never redirected).
	addBlackholeRoute(t, enrolledNS, "10.99.0.0/24")
	d := net.Dialer{Timeout: 300 * time.Millisecond, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, DefaultBypassMark) })
		return errors.Join(err, serr)
	}}
	var terr error
	g.Expect(enrolledNS.Do(func() { _, terr = d.Dial("tcp4", "10.99.0.2:80") })).To(Succeed())
	var netErr net.Error
	g.Expect(errors.As(terr, &netErr) && netErr.Timeout()).To(BeTrue(), "want a dial timeout, got %v", terr)

	want := map[string]float64{"ok": okDials + 1, "refused": 2, "timeout": 1, "reset": 0, "error": 0}
	g.Eventually(func() map[string]float64 {
		got := map[string]float64{}
		for r := range want {
			got[r] = metricValue(t, reg, "meshkeeper_agent_connections_total", "result", r)
		}
		return got
	}).WithTimeout(2 * time.Second).Should(Equal(want))
	// The series carry the pod, its node and its revision under labels a
	// Kubernetes scrape does not overwrite (no namespace, pod or node).
	series := findMetric(t, reg, "meshkeeper_agent_connections_total", "result", "ok")
	labels := map[string]string{}
	for _, lp := range series.Label {
		labels[lp.GetName()] = lp.GetValue()
	}
	g.Expect(labels).To(Equal(map[string]string{"workload_namespace": "shop", "workload_pod": "client-a",
		"workload_node": "node-a", "workload_revision": "1-27-3", "result": "ok"}))
	// The namespace moves to another revision (the pod watcher hands the
	// enroller the pod again): the same counts, under the new revision.
	moved := pod
	moved.Revision = "1-28-2"
	enroller.Want(moved)
	g.Expect(metricValue(t, reg, "meshkeeper_agent_connections_total", "result", "ok", "workload_revision", "1-28-2")).To(Equal(want["ok"]))
	g.Expect(findMetric(t, reg, "meshkeeper_agent_connections_total", "result", "ok", "workload_revision", "1-27-3")).To(BeNil())
	h := histogram(t, reg, "meshkeeper_agent_connect_latency_seconds", "workload_revision", "1-28-2")
	g.Expect(h.GetSampleCount()).To(BeEquivalentTo(okDials + 1))
	g.Expect(h.GetSampleSum()).To(BeNumerically(">", 0))
	g.Expect(metricValue(t, reg, "meshkeeper_agent_enrolled_pods")).To(Equal(1.0))

	// Per-socket state goes when the sockets close.
	g.Eventually(func() int { return dp.MapUsage()[mkbpf.RedirectMapSocksV2].Entries }).WithTimeout(5*time.Second).Should(BeZero(), "socks entries leak")
	g.Eventually(func() int { return dp.MapUsage()[mkbpf.RedirectMapProxyConnsV2].Entries }).WithTimeout(5*time.Second).Should(BeZero(), "proxy_conns entries leak")

	enroller.Forget(pod.UID)
	g.Expect(dp.EnrolledNetns()).To(BeEmpty())
	g.Expect(dialService(enrolledNS)).To(Equal("server"), "an unenrolled namespace is no longer redirected")
}

// dialV4Mapped connects an AF_INET6 socket to the v4-mapped form of addr
// and returns its peer name and the proxy's reply. Call it in a namespace.
func dialV4Mapped(addr string) (peer, reply string, err error) {
	ap := netip.MustParseAddrPort(addr)
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", "", err
	}
	defer unix.Close(fd)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 2})
	sa := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: netip.AddrFrom16(ap.Addr().As16()).As16()}
	if err := unix.Connect(fd, sa); err != nil {
		return "", "", fmt.Errorf("connect [::ffff:%s]: %w", addr, err)
	}
	psa, err := unix.Getpeername(fd)
	if err != nil {
		return "", "", err
	}
	buf := make([]byte, 128)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return "", "", err
	}
	return sockaddrString(psa), strings.TrimSpace(string(buf[:n])), nil
}

// addBlackholeRoute routes cidr into lo in ns: a SYN to it loops back to
// a namespace that does not own the address and does not forward, so it is
// dropped silently (unlike a "blackhole" route, which fails the connect).
func addBlackholeRoute(t *testing.T, ns *testNetns, cidr string) {
	t.Helper()
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Fatalf("needs the ip command (apt package iproute2): %v", err)
	}
	for _, args := range [][]string{
		{"-n", ns.Name, "route", "add", cidr, "dev", "lo"},
	} {
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
}

// TestUninstallRemovesEverything: after Uninstall no pin, link or program
// of the datapath is left, and a second Uninstall is fine.
func TestUninstallRemovesEverything(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	dp, cfg := loadTestDatapath(t, capturePort)
	ids := dp.ProgramIDs()
	g.Expect(ids).To(HaveLen(len(attachments)))
	linkIDs := attachedLinkIDs(t, ids)
	g.Expect(linkIDs).To(HaveLen(len(attachments)), "every program is attached through a bpf_link")
	mapIDs := map[string]ebpf.MapID{}
	for name, m := range dp.Maps() {
		info, err := m.Info()
		g.Expect(err).NotTo(HaveOccurred())
		id, _ := info.ID()
		mapIDs[name] = id
	}
	g.Expect(dp.Close()).To(Succeed())

	// Closing the agent's handles leaves everything attached.
	g.Expect(attachedLinkIDs(t, ids)).To(HaveLen(len(attachments)))

	g.Expect(Uninstall(cfg.PinPath)).To(Succeed())
	_, err := os.Stat(cfg.PinPath)
	g.Expect(errors.Is(err, os.ErrNotExist)).To(BeTrue(), "pin path %s must be gone", cfg.PinPath)
	g.Expect(attachedLinkIDs(t, ids)).To(BeEmpty(), "no link may remain")
	var progIDs []ebpf.ProgramID
	for _, id := range ids {
		progIDs = append(progIDs, id)
	}
	g.Expect(waitGone(progIDs)).To(BeEmpty(), "no program may remain")
	for name, id := range mapIDs {
		g.Eventually(func() error {
			m, err := ebpf.NewMapFromID(id)
			if err == nil {
				m.Close()
				return fmt.Errorf("map %s (%d) still exists", name, id)
			}
			return nil
		}).WithTimeout(5 * time.Second).Should(Succeed())
	}
	g.Expect(Uninstall(cfg.PinPath)).To(Succeed(), "uninstall is idempotent")
}

// attachedLinkIDs lists the links in the kernel whose program is one of ids.
func attachedLinkIDs(t *testing.T, ids map[string]ebpf.ProgramID) []link.ID {
	t.Helper()
	want := map[ebpf.ProgramID]bool{}
	for _, id := range ids {
		want[id] = true
	}
	var out []link.ID
	it := new(link.Iterator)
	defer it.Close()
	for it.Next() {
		l := it.Take()
		info, err := l.Info()
		l.Close()
		if err != nil {
			continue
		}
		if want[info.Program] {
			out = append(out, info.ID)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestFeatureProbesOnThisKernel probes the real kernel: everything the
// datapath uses is there on the development and CI machines.
func TestFeatureProbesOnThisKernel(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	r, err := Preflight()
	g.Expect(err).NotTo(HaveOccurred())
	probes := r.Features
	g.Expect(probes).NotTo(BeEmpty())
	n := 0
	for _, hs := range requiredHelpers {
		n += len(hs)
	}
	g.Expect(probes).To(HaveLen(len(requiredPrograms) + len(requiredMaps) + n))
	for _, p := range probes {
		t.Logf("%-50s supported=%v %s", p.Name, p.Supported, p.Error)
		g.Expect(p.Supported).To(BeTrue(), "%s: %s", p.Name, p.Error)
	}
	g.Expect(r.Eligible).To(BeTrue(), r.Reason)
	g.Expect(probes).To(ContainElement(HaveField("Name", "helper/sock_ops/get_netns_cookie")))
}

// TestRequiredHelpersMatchObject keeps the probe list equal to the helpers
// the compiled object calls.
func TestRequiredHelpersMatchObject(t *testing.T) {
	g := NewWithT(t)
	spec, err := mkbpf.LoadRedirect()
	g.Expect(err).NotTo(HaveOccurred())
	used := map[ebpf.ProgramType]map[string]bool{}
	for _, p := range spec.Programs {
		if used[p.Type] == nil {
			used[p.Type] = map[string]bool{}
		}
		for _, ins := range p.Instructions {
			if ins.IsBuiltinCall() {
				used[p.Type][helperNames[asm.BuiltinFunc(ins.Constant)]] = true
			}
		}
	}
	for pt, fns := range used {
		probed := map[string]bool{}
		for _, fn := range requiredHelpers[pt] {
			probed[helperName(fn)] = true
		}
		g.Expect(probed).To(Equal(fns), "helpers of %s", pt)
	}
	var types []ebpf.ProgramType
	for pt := range used {
		types = append(types, pt)
	}
	g.Expect(types).To(ConsistOf(requiredPrograms))
	maps := map[ebpf.MapType]bool{}
	for _, m := range spec.Maps {
		maps[m.Type] = true
	}
	for _, mt := range requiredMaps {
		g.Expect(maps).To(HaveKey(mt), "probed map type %s is used", mt)
		delete(maps, mt)
	}
	g.Expect(maps).To(BeEmpty(), "map types used but not probed")
}

// metricValue returns the value of the one series of name whose labels
// include the given pairs (0 when absent).
func metricValue(t *testing.T, reg prometheus.Gatherer, name string, labelPairs ...string) float64 {
	t.Helper()
	m := findMetric(t, reg, name, labelPairs...)
	if m == nil {
		return 0
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return 0
}

func histogram(t *testing.T, reg prometheus.Gatherer, name string, labelPairs ...string) *dto.Histogram {
	t.Helper()
	m := findMetric(t, reg, name, labelPairs...)
	if m == nil || m.Histogram == nil {
		t.Fatalf("no histogram %s%v", name, labelPairs)
	}
	return m.Histogram
}

func findMetric(t *testing.T, reg prometheus.Gatherer, name string, labelPairs ...string) *dto.Metric {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var found *dto.Metric
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.Metric {
			for i := 0; i+1 < len(labelPairs); i += 2 {
				ok := false
				for _, lp := range m.Label {
					if lp.GetName() == labelPairs[i] && lp.GetValue() == labelPairs[i+1] {
						ok = true
					}
				}
				if !ok {
					continue next
				}
			}
			if found != nil {
				t.Fatalf("more than one series %s%v", name, labelPairs)
			}
			found = m
		}
	}
	return found
}
