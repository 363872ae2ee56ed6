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

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"

	mkbpf "github.com/meshkeeper/meshkeeper/bpf"
	"github.com/meshkeeper/meshkeeper/test/zdsclient"
)

const (
	serviceAddr6 = "[fd00:96::10]:80" // an IPv6 ClusterIP
	service6     = "fd00:96::10"
)

// withService6 gives ns the IPv6 service address on lo and a server behind
// it, so that a connection that escaped capture would be answered (and
// counted) by it.
func withService6(t *testing.T, ns *testNetns) *labelServer {
	t.Helper()
	ipIn(t, ns, "-6", "addr", "add", service6+"/128", "dev", "lo", "nodad")
	return startLabelServer(t, ns, serviceAddr6, "server")
}

// TestIPv6Outbound: native IPv6 connects from an enrolled namespace go to
// the proxy on [::1]:15001, which reads the original destination with
// IP6T_SO_ORIGINAL_DST; the client sees the service as its peer; a socket
// with the proxy's mark and a namespace that is not enrolled go straight to
// the service; per-socket state goes with the sockets. On an idle kernel and
// on a kube node.
func TestIPv6Outbound(t *testing.T) {
	requirePrivileged(t)
	for _, env := range nodeEnvs {
		t.Run(env.name, func(t *testing.T) {
			g := NewWithT(t)
			env.setUp(t)
			enrolledNS, otherNS := newTestNetns(t), newTestNetns(t)
			if env.kube {
				iptablesIn(t, enrolledNS, "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
			}
			server, otherServer := withService6(t, enrolledNS), withService6(t, otherNS)
			dp, _ := loadTestDatapath(t, capturePort)
			enroller, err := NewEnroller(dp, "", testr.New(t))
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(enroller.EnrollPath(PodRef{Namespace: "shop", Name: "v6", UID: "7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"}, enrolledNS.Path)).To(Succeed())
			proxy := startStandInProxy(t, enrolledNS, fmt.Sprintf("[::1]:%d", capturePort))
			otherProxy := startStandInProxy(t, otherNS, fmt.Sprintf("[::1]:%d", capturePort))

			for i := range 10 {
				c, err := dialIn(enrolledNS, "tcp6", serviceAddr6, 2*time.Second)
				g.Expect(err).NotTo(HaveOccurred(), "dial %d", i)
				sa, err := peerName(c)
				g.Expect(err).NotTo(HaveOccurred())
				g.Expect(sockaddrString(sa)).To(Equal(serviceAddr6), "getpeername reports the original destination")
				g.Expect(readReply(c)).To(Equal("orig "+serviceAddr6), "the proxy reads it with IP6T_SO_ORIGINAL_DST")
				c.Close()
			}
			g.Expect(proxy.Accepted()).To(Equal(10))
			g.Expect(server.Accepted()).To(BeZero(), "no IPv6 connection of the enrolled pod reaches the service around the proxy")

			g.Expect(ask(enrolledNS, serviceAddr6, DefaultBypassMark)).To(HavePrefix("server "), "the proxy's own (marked) socket")
			g.Expect(ask(enrolledNS, fmt.Sprintf("[::1]:%d", capturePort), 0)).To(HavePrefix("error "), "loopback is not redirected")
			g.Expect(ask(otherNS, serviceAddr6, 0)).To(HavePrefix("server "), "a namespace that is not enrolled")
			g.Expect(otherProxy.Accepted()).To(BeZero())
			g.Expect(otherServer.Accepted()).To(Equal(1))

			g.Eventually(func() int { return dp.MapUsage()[mkbpf.RedirectMapSocksV2].Entries }).WithTimeout(5*time.Second).Should(BeZero(), "socks entries leak")
			g.Eventually(func() int { return dp.MapUsage()[mkbpf.RedirectMapProxyConnsV2].Entries }).WithTimeout(5*time.Second).Should(BeZero(), "proxy_conns entries leak")
			g.Eventually(func() int { return dp.MapUsage()[mkbpf.RedirectMapBypassConns].Entries }).WithTimeout(5*time.Second).Should(BeZero(), "bypass_conns entries leak")
		})
	}
}

// udpServer answers every datagram with its label.
type udpServer struct {
	pc   net.PacketConn
	wg   sync.WaitGroup
	mu   sync.Mutex
	seen int
}

func startUDPServer(t *testing.T, ns *testNetns, network, addr, label string) *udpServer {
	t.Helper()
	s := &udpServer{}
	var err error
	if nsErr := ns.Do(func() { s.pc, err = net.ListenPacket(network, addr) }); nsErr != nil {
		t.Fatal(nsErr)
	}
	if err != nil {
		t.Fatalf("udp listen %s: %v", addr, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		buf := make([]byte, 512)
		for {
			_, from, err := s.pc.ReadFrom(buf)
			if err != nil {
				return
			}
			s.mu.Lock()
			s.seen++
			s.mu.Unlock()
			_, _ = s.pc.WriteTo([]byte(label), from)
		}
	}()
	t.Cleanup(func() { s.pc.Close(); s.wg.Wait() })
	return s
}

func (s *udpServer) Received() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen
}

// udpAsk sends one datagram to dst from ns, connected (connect, then
// write) or not (sendto), and returns the reply and the address it came
// from, as recvfrom reports it.
func udpAsk(ns *testNetns, dst string, connected bool, mark int) (reply, from string, err error) {
	ctl := func(_, _ string, rc syscall.RawConn) error {
		if mark == 0 {
			return nil
		}
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
		return errors.Join(err, serr)
	}
	var nsErr error
	nsErr = ns.Do(func() {
		var c *net.UDPConn
		if connected {
			d := net.Dialer{Control: ctl}
			var nc net.Conn
			nc, err = d.Dial("udp", dst)
			if err != nil {
				return
			}
			c = nc.(*net.UDPConn)
			_, err = c.Write([]byte("query"))
		} else {
			lc := net.ListenConfig{Control: ctl}
			var pc net.PacketConn
			pc, err = lc.ListenPacket(context.Background(), "udp", ":0")
			if err != nil {
				return
			}
			c = pc.(*net.UDPConn)
			_, err = c.WriteTo([]byte("query"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(dst)))
		}
		defer c.Close()
		if err != nil {
			return
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 512)
		n, src, rerr := c.ReadFromUDPAddrPort(buf)
		if rerr != nil {
			err = rerr
			return
		}
		reply = string(buf[:n])
		from = netip.AddrPortFrom(src.Addr().Unmap(), src.Port()).String()
	})
	if nsErr != nil {
		return "", "", nsErr
	}
	return reply, from, err
}

// TestDNSCapture: DNS from an enrolled pod goes to ztunnel's DNS proxy
// (15053 on the pod's loopback) only when the datapath has DNS capture on;
// replies seem to come from the server the query was for (recvmsg), UDP
// connected and not, IPv4 and IPv6, and TCP to port 53 too. The proxy's own
// (marked) queries, other UDP and namespaces that are not enrolled are left
// alone.
func TestDNSCapture(t *testing.T) {
	requirePrivileged(t)
	for _, env := range nodeEnvs {
		t.Run(env.name, func(t *testing.T) { testDNSCapture(t, env) })
	}
}

func testDNSCapture(t *testing.T, env nodeEnv) {
	g := NewWithT(t)
	env.setUp(t)
	ns, otherNS := newTestNetns(t), newTestNetns(t)
	if env.kube {
		iptablesIn(t, ns, "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
	}
	for _, n := range []*testNetns{ns, otherNS} {
		ipIn(t, n, "addr", "add", "10.96.0.10/32", "dev", "lo")
		ipIn(t, n, "-6", "addr", "add", service6+"/128", "dev", "lo", "nodad")
	}
	server4 := startUDPServer(t, ns, "udp4", "10.96.0.10:53", "server")
	server6 := startUDPServer(t, ns, "udp6", "["+service6+"]:53", "server")
	startUDPServer(t, ns, "udp4", "10.96.0.10:5353", "server")
	startUDPServer(t, otherNS, "udp4", "10.96.0.10:53", "server")
	tcpServer := startLabelServer(t, ns, "10.96.0.10:53", "server")
	dns4 := startUDPServer(t, ns, "udp4", fmt.Sprintf("127.0.0.1:%d", DefaultDNSPort), "dns")
	dns6 := startUDPServer(t, ns, "udp6", fmt.Sprintf("[::1]:%d", DefaultDNSPort), "dns")
	dnsTCP := startLabelServer(t, ns, fmt.Sprintf("127.0.0.1:%d", DefaultDNSPort), "dns")
	otherDNS := startUDPServer(t, otherNS, "udp4", fmt.Sprintf("127.0.0.1:%d", DefaultDNSPort), "dns")

	dp, cfg := loadTestDatapath(t, capturePort)
	pod := PodRef{Namespace: "shop", Name: "dns", UID: "8d9e0f1a-2b3c-4d4e-9f5a-6b7c8d9e0f1a"}
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(enroller.EnrollPath(pod, ns.Path)).To(Succeed())

	// DNS capture off (the default): the server answers.
	for _, connected := range []bool{false, true} {
		g.Expect(udpAskOK(ns, "10.96.0.10:53", connected, 0)).To(Equal("server from 10.96.0.10:53"), "DNS capture off, connected=%v", connected)
	}
	g.Expect(dns4.Received()).To(BeZero())

	// The agent restarts with --dns-capture.
	g.Expect(dp.Close()).To(Succeed())
	cfg.DNSPort = DefaultDNSPort
	dp, _, err = LoadDatapath(cfg)
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { dp.Close() })
	at4, at6 := server4.Received(), server6.Received()

	for _, connected := range []bool{false, true} {
		g.Expect(udpAskOK(ns, "10.96.0.10:53", connected, 0)).To(Equal("dns from 10.96.0.10:53"), "IPv4, connected=%v", connected)
		g.Expect(udpAskOK(ns, "["+service6+"]:53", connected, 0)).To(Equal("dns from ["+service6+"]:53"), "IPv6, connected=%v", connected)
	}
	g.Expect(dns4.Received()).To(Equal(2))
	g.Expect(dns6.Received()).To(Equal(2))
	g.Expect(server4.Received()).To(Equal(at4), "no query reaches the server around the DNS proxy")
	g.Expect(server6.Received()).To(Equal(at6))
	g.Expect(ask(ns, "10.96.0.10:53", 0)).To(HavePrefix("dns 127.0.0.1:15053 from "), "DNS over TCP")
	g.Expect(dnsTCP.Accepted()).To(Equal(1))
	g.Expect(tcpServer.Accepted()).To(BeZero())

	// Left alone: the DNS proxy's own upstream query (marked), other UDP,
	// a namespace that is not enrolled.
	g.Expect(udpAskOK(ns, "10.96.0.10:53", false, DefaultBypassMark)).To(Equal("server from 10.96.0.10:53"), "marked")
	g.Expect(udpAskOK(ns, "10.96.0.10:5353", false, 0)).To(Equal("server from 10.96.0.10:5353"), "not DNS")
	g.Expect(udpAskOK(otherNS, "10.96.0.10:53", false, 0)).To(Equal("server from 10.96.0.10:53"), "not enrolled")
	g.Expect(otherDNS.Received()).To(BeZero())
}

func udpAskOK(ns *testNetns, dst string, connected bool, mark int) (string, error) {
	reply, from, err := udpAsk(ns, dst, connected, mark)
	if err != nil {
		return "", err
	}
	return reply + " from " + from, nil
}

// TestRunSendsDNSToZtunnelWithDNSCapture: the agent itself, run as the
// node-agent chart runs it when the bundle's dnsCapture is on
// (--dns-capture) and off, with ztunnel (the ZDS test client) taking the
// pod: an enrolled pod's DNS query, UDP and TCP to port 53, reaches the
// listener on 15053 in its netns when on; when off UDP goes to the server
// it was sent to and TCP to ztunnel's outbound listener, as any TCP.
func TestRunSendsDNSToZtunnelWithDNSCapture(t *testing.T) {
	requirePrivileged(t)
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("dnsCapture=%v", on), func(t *testing.T) {
			g := NewWithT(t)
			ns := newTestNetns(t)
			ipIn(t, ns, "addr", "add", "10.96.0.10/32", "dev", "lo")
			server := startUDPServer(t, ns, "udp4", "10.96.0.10:53", "server")
			tcpServer := startLabelServer(t, ns, "10.96.0.10:53", "server")
			dns := startUDPServer(t, ns, "udp4", fmt.Sprintf("127.0.0.1:%d", DefaultDNSPort), "dns")
			dnsTCP := startLabelServer(t, ns, fmt.Sprintf("127.0.0.1:%d", DefaultDNSPort), "dns")

			dir, err := os.MkdirTemp("", "zds")
			g.Expect(err).NotTo(HaveOccurred())
			t.Cleanup(func() { os.RemoveAll(dir) })
			sock, podsFile := filepath.Join(dir, "ztunnel.sock"), filepath.Join(dir, "pods")
			const uid = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"
			g.Expect(os.WriteFile(podsFile, []byte("shop/dns "+uid+" "+ns.Path+"\n"), 0o600)).To(Succeed())
			pinPath := filepath.Join("/sys/fs/bpf", testName())
			t.Cleanup(func() {
				if err := Uninstall(pinPath); err != nil {
					t.Errorf("uninstall %s: %v", pinPath, err)
				}
			})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() {
				done <- Run(ctx, RunOptions{MetricsAddr: "0", CapturePort: capturePort, BypassMark: DefaultBypassMark, DNSCapture: on,
					PinPath: pinPath, CgroupPath: cgroup2Root(t), ProcRoot: "/proc", PodsFile: podsFile, ZDSSocket: sock, Log: testr.New(t)})
			}()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			})
			// ztunnel connects and takes the pod from its snapshot.
			var c *zdsclient.Client
			g.Eventually(func() error { c, err = zdsclient.Dial(sock, zdsapi.Version_V1); return err }).WithTimeout(30 * time.Second).Should(Succeed())
			t.Cleanup(func() { c.Close() })
			var got []string
			for {
				r, err := c.Recv(10 * time.Second)
				g.Expect(err).NotTo(HaveOccurred())
				if r.Netns != nil {
					r.Netns.Close()
				}
				g.Expect(c.Ack("")).To(Succeed())
				if r.Kind == zdsclient.SnapshotSent {
					break
				}
				got = append(got, r.UID)
			}
			g.Expect(got).To(ConsistOf(uid))

			// ztunnel's outbound listener: where TCP goes when it is not DNS
			// capture's (TCP to port 53 is TCP like any other then).
			outbound := startStandInProxy(t, ns, fmt.Sprintf("127.0.0.1:%d", capturePort))
			for _, connected := range []bool{false, true} {
				want := "server"
				if on {
					want = "dns"
				}
				g.Expect(udpAskOK(ns, "10.96.0.10:53", connected, 0)).To(Equal(want+" from 10.96.0.10:53"), "UDP, connected=%v", connected)
			}
			reply, err := ask(ns, "10.96.0.10:53", 0)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(tcpServer.Accepted()).To(BeZero(), "TCP never reaches the server around ztunnel")
			if on {
				g.Expect(reply).To(HavePrefix("dns "), "TCP 53 to the DNS proxy")
				g.Expect(dns.Received()).To(Equal(2))
				g.Expect(dnsTCP.Accepted()).To(Equal(1))
				g.Expect(server.Received()).To(BeZero(), "no UDP query reaches the server around the DNS proxy")
				g.Expect(outbound.Accepted()).To(BeZero())
			} else {
				g.Expect(reply).To(Equal("orig 10.96.0.10:53"), "TCP 53 is outbound TCP: ztunnel's 15001")
				g.Expect(server.Received()).To(Equal(2), "UDP goes direct")
				g.Expect(dns.Received()).To(BeZero())
				g.Expect(dnsTCP.Accepted()).To(BeZero())
				g.Expect(outbound.Accepted()).To(Equal(1))
			}
		})
	}
}
