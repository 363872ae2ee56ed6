package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"

	"github.com/meshkeeper/meshkeeper/test/zdsclient"
)

// The datapath benchmarks of issue 4; `make bench-datapath` runs them and
// prints the table for the README (hack/benchtable.sh). They report what
// they measure and assert nothing about speed or size.

// BenchmarkConnect measures connections per second and connect+first-byte
// latency through the same stand-in proxy (startStandInProxy on
// 127.0.0.1:15001), each path in a fresh network namespace of its own:
//
//   - direct: the client connects to 127.0.0.1:15001 itself; no datapath is
//     loaded, no netfilter rule exists. The floor.
//   - ebpf: the datapath is loaded and the namespace enrolled; the client
//     connects to 10.96.0.10:80 and is redirected by the cgroup programs.
//   - iptables: no datapath; a nat OUTPUT REDIRECT rule in the namespace,
//     what istio-cni installs (here as a single rule, not istio's chains).
//
// and the same for inbound (inbound-direct, inbound-ebpf, inbound-iptables;
// see below). The paths take turns, benchConnectRounds times (sub-benchmarks direct,
// ebpf, iptables, ebpf#01, iptables#01, direct#01, ...), so that a noisy
// neighbour on the machine hits them alike; hack/benchtable.sh takes each
// path's median and compares the paths round by round. The datapath is
// loaded for each ebpf round and removed after it, so the other paths run
// without any of its programs attached.
//
// One op is socket + connect + the first read of the proxy's reply (the
// latency, per op) + reading on to the proxy's FIN + close, with raw
// blocking syscalls on a thread locked in the namespace, so that the client
// adds as little as possible (and allocates nothing) on top of what the
// kernel and the proxy do; the allocations reported are the proxy's. The
// client closes after the proxy, as a proxy's client normally does, so its
// ports never wait in TIME_WAIT: the iptables client's address is not a
// loopback one, so tcp_tw_reuse=2 would not free them, and tens of
// thousands of connections to the one service address would run through
// the ephemeral port range (the connects slowing down on the way).
func BenchmarkConnect(b *testing.B) {
	requirePrivileged(b)
	svc := netip.MustParseAddrPort(serviceAddr)
	capture := netip.MustParseAddrPort(captureAddr)

	directNS := newTestNetns(b)
	startStandInProxy(b, directNS, captureAddr)

	ebpfNS := newTestNetns(b)
	startStandInProxy(b, ebpfNS, captureAddr)
	pod := PodRef{Namespace: "bench", Name: "client", UID: "5c1f2a7e-0d4b-4e8a-9b6f-3a2d1c0e9f01"}

	iptablesNS := newTestNetns(b)
	// The connect(2) route lookup happens before the nat OUTPUT hook, so
	// 10.96.0.10 needs a route that lets the SYN out (in a pod: the default
	// route via eth0). Tried on Linux 6.18, iptables 1.8.9 (nf_tables):
	// "local 10.96.0.10/32 dev lo" works (as does adding the address to lo;
	// the client's source address is then 10.96.0.10); a unicast
	// "10.96.0.10/32 dev lo" times out (the SYN is dropped); "blackhole"
	// fails connect with EINVAL and "unreachable" with EHOSTUNREACH, the SYN
	// never reaching OUTPUT.
	runCmd(b, "ip", "-n", iptablesNS.Name, "route", "add", "local", svc.Addr().String()+"/32", "dev", "lo")
	runCmd(b, "ip", "netns", "exec", iptablesNS.Name, "iptables", "-w", "5", "-t", "nat", "-A", "OUTPUT",
		"-p", "tcp", "-d", svc.Addr().String(), "--dport", strconv.Itoa(int(svc.Port())),
		"-j", "REDIRECT", "--to-ports", strconv.Itoa(capturePort))
	startStandInProxy(b, iptablesNS, captureAddr)

	// Inbound: a client in another namespace connects over a veth pair to
	// the pod's address, port 8080, and the same stand-in inbound listener
	// (15006 in the pod) answers: directly (the client dials 15006), through
	// the sk_lookup program (the datapath is loaded and the pod's inbound
	// captured for each ebpf round), or through a nat PREROUTING REDIRECT to
	// 15006 in the pod's namespace, what istio-cni's in-pod rules do.
	inDirect, inEBPF, inIptables := newPodPair(b, nodeEnvs[0], 11), newPodPair(b, nodeEnvs[0], 12), newPodPair(b, nodeEnvs[0], 13)
	startMarkedLabelServer(b, inDirect.pod, ":15006", "inbound", DefaultBypassMark)
	inEBPFListener := startMarkedLabelServer(b, inEBPF.pod, ":15006", "inbound", DefaultBypassMark)
	startMarkedLabelServer(b, inIptables.pod, ":15006", "inbound", DefaultBypassMark)
	runCmd(b, "ip", "netns", "exec", inIptables.pod.Name, "iptables", "-w", "5", "-t", "nat", "-A", "PREROUTING",
		"-p", "tcp", "-d", inIptables.pod4, "--dport", "8080", "-j", "REDIRECT", "--to-ports", "15006")
	inPod := PodRef{Namespace: "bench", Name: "server", UID: "6d2e3b8f-1e5c-4f9b-8c7a-4b3e2d1f0a12"}
	port := func(addr string, p uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(addr), p) }

	paths := []struct {
		name string
		run  func(b *testing.B)
	}{
		{"inbound-direct", func(b *testing.B) {
			benchConnect(b, inDirect.client, port(inDirect.pod4, 15006), "inbound ")
		}},
		{"inbound-ebpf", func(b *testing.B) {
			dp, _ := loadTestDatapath(b, capturePort)
			if err := dp.EnrollNetns(inEBPF.pod.Cookie(b), inPod.UID); err != nil {
				b.Fatal(err)
			}
			captureInbound(b, dp, inEBPF.pod, inEBPFListener)
			defer reportBPFTime(b, dp)()
			benchConnect(b, inEBPF.client, port(inEBPF.pod4, 8080), "inbound "+inEBPF.pod4+":8080")
		}},
		{"inbound-iptables", func(b *testing.B) {
			benchConnect(b, inIptables.client, port(inIptables.pod4, 8080), "inbound ")
		}},
		{"direct", func(b *testing.B) {
			// Not redirected: the proxy has no original destination to report.
			benchConnect(b, directNS, capture, "error ")
		}},
		{"ebpf", func(b *testing.B) {
			dp, _ := loadTestDatapath(b, capturePort)
			enroller, err := NewEnroller(dp, "", logr.Discard())
			if err != nil {
				b.Fatal(err)
			}
			if err := enroller.EnrollPath(pod, ebpfNS.Path); err != nil {
				b.Fatal(err)
			}
			defer reportBPFTime(b, dp)()
			benchConnect(b, ebpfNS, svc, "orig "+serviceAddr)
		}},
		{"iptables", func(b *testing.B) {
			benchConnect(b, iptablesNS, svc, "orig "+serviceAddr)
		}},
	}
	for round := range benchConnectRounds {
		// Each round starts with another path, so none always follows the
		// same one.
		for i := range paths {
			p := paths[(round+i)%len(paths)]
			b.Run(p.name, p.run)
		}
	}
}

// reportBPFTime turns on the kernel's BPF run-time statistics and returns a
// function that reports the datapath's programs' own run time per
// connection (bpf-ns/conn, over the b.N measured connections and the one
// checked before): what the datapath costs, whatever the machine's load.
// The statistics add two clock reads to every program run.
func reportBPFTime(b *testing.B, dp *Datapath) func() {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enable BPF run-time statistics: %v", err)
	}
	total := func() time.Duration {
		var t time.Duration
		for name, p := range dp.programs() {
			st, err := p.Stats()
			if err != nil {
				b.Fatalf("stats of %s: %v", name, err)
			}
			t += st.Runtime
		}
		return t
	}
	t0 := total()
	return func() {
		defer stats.Close()
		b.ReportMetric(float64(total()-t0)/float64(b.N+1), "bpf-ns/conn")
	}
}

// benchConnectRounds is how many times each BenchmarkConnect path runs.
const benchConnectRounds = 30

const (
	// benchSockTimeoutSec bounds each connect and read of a measured op.
	benchSockTimeoutSec = 2
	// benchBudget bounds one sub-benchmark's measured loop.
	benchBudget = 90 * time.Second
)

var benchSockTimeout = unix.Timeval{Sec: benchSockTimeoutSec}

// benchConnect checks once that a connection to dst from ns gets a reply
// starting with want, then measures connect+first-byte to dst.
func benchConnect(b *testing.B, ns *testNetns, dst netip.AddrPort, want string) {
	b.Helper()
	c, err := dialIn(ns, "tcp4", dst.String(), 2*time.Second)
	if err != nil {
		b.Fatalf("check dial %s: %v", dst, err)
	}
	reply, err := readReply(c)
	c.Close()
	if err != nil {
		b.Fatalf("check reply from %s: %v", dst, err)
	}
	if !strings.HasPrefix(reply, want) {
		b.Fatalf("connection to %s: proxy replied %q, want %q...", dst, reply, want)
	}

	sa := &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	lat := make([]int64, 0, 1<<16) // ns per op; grows (rarely) past 65536 ops
	var opErr error
	var wrongReplies int
	var lastWrong [64]byte
	deadline := time.Now().Add(benchBudget)
	var ru0, ru1 unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru0)
	if err := ns.Do(func() {
		var buf [64]byte
		for b.Loop() {
			t0 := time.Now()
			fd, n, err := connectFirstByte(sa, buf[:])
			lat = append(lat, int64(time.Since(t0)))
			if err == nil {
				if buf[0] != want[0] {
					wrongReplies++
					copy(lastWrong[:], buf[:n])
				}
				err = readToEOFAndClose(fd, buf[:])
			}
			if err != nil {
				opErr = fmt.Errorf("op %d: %w", len(lat), err)
				return
			}
			if t0.After(deadline) {
				opErr = fmt.Errorf("still running after %s (%d ops)", benchBudget, len(lat))
				return
			}
		}
	}); err != nil {
		b.Fatal(err)
	}
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru1)
	if opErr != nil {
		b.Fatal(opErr)
	}
	if wrongReplies > 0 {
		b.Fatalf("%d of %d replies did not start with %q, e.g. %q", wrongReplies, len(lat), want, bytes.TrimRight(lastWrong[:], "\x00\n"))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
	b.ReportMetric(float64(percentile(lat, 0.50))/1e3, "p50-µs")
	b.ReportMetric(float64(percentile(lat, 0.99))/1e3, "p99-µs")
	// CPU of this process (client and proxy, and the kernel's work done on
	// their behalf, loopback and veth softirqs included) per connection.
	cpu := time.Duration(ru1.Utime.Nano()-ru0.Utime.Nano()) + time.Duration(ru1.Stime.Nano()-ru0.Stime.Nano())
	b.ReportMetric(float64(cpu.Microseconds())/float64(max(len(lat), 1)), "cpu-µs/conn")
}

// connectFirstByte opens a TCP connection to sa and reads once; on success
// the caller closes fd. Run it on a thread in the client's namespace.
func connectFirstByte(sa unix.Sockaddr, buf []byte) (fd, n int, err error) {
	fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("socket: %w", err)
	}
	n, err = firstByte(fd, sa, buf)
	if err != nil {
		unix.Close(fd)
		return -1, 0, err
	}
	return fd, n, nil
}

func firstByte(fd int, sa unix.Sockaddr, buf []byte) (int, error) {
	// SO_SNDTIMEO bounds a blocking connect, SO_RCVTIMEO each read.
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &benchSockTimeout); err != nil {
		return 0, err
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &benchSockTimeout); err != nil {
		return 0, err
	}
	// With a timeout set, a socket call interrupted by a signal (the Go
	// runtime's preemption and GC signals) fails with EINTR even though the
	// handler is SA_RESTART; a connect called again goes on waiting for the
	// same handshake.
	err := unix.Connect(fd, sa)
	for i := 0; errors.Is(err, unix.EINTR) && i < 100; i++ {
		err = unix.Connect(fd, sa)
	}
	if err != nil && !errors.Is(err, unix.EISCONN) {
		return 0, fmt.Errorf("connect: %w", err)
	}
	n, err := readOnce(fd, buf)
	if err != nil {
		return 0, fmt.Errorf("read: %w", err)
	}
	if n == 0 {
		return 0, fmt.Errorf("read: %w", io.ErrUnexpectedEOF)
	}
	return n, nil
}

// readToEOFAndClose reads what is left of the proxy's one-line reply, up to
// its FIN, and closes fd.
func readToEOFAndClose(fd int, buf []byte) error {
	defer unix.Close(fd)
	for range 16 {
		n, err := readOnce(fd, buf)
		if err != nil {
			return fmt.Errorf("read to EOF: %w", err)
		}
		if n == 0 {
			return nil
		}
	}
	return errors.New("read to EOF: the proxy sent more than its one line")
}

func readOnce(fd int, buf []byte) (int, error) {
	n, err := unix.Read(fd, buf)
	for i := 0; errors.Is(err, unix.EINTR) && i < 100; i++ {
		n, err = unix.Read(fd, buf)
	}
	return n, err
}

// percentile is the nearest-rank percentile of sorted values.
func percentile(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func runCmd(tb testing.TB, name string, args ...string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, name, args...).CombinedOutput(); err != nil {
		tb.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// agentRSS is the last BenchmarkAgentRSS250 measurement: the benchmark
// function runs first with b.N == 1 and may run again with a larger b.N,
// which reports the same measurement instead of starting over.
var agentRSS *agentMemory

type agentMemory struct {
	rssKiB, anonKiB, hwmKiB int
}

// BenchmarkAgentRSS250 measures the resident memory of the real agent
// binary (`agent run --no-kube`) with 250 enrolled network namespaces, each
// handed to ztunnel's place over ZDS (the test client, test/zdsclient,
// takes and acks every one, the netns fd passed): once
// per benchmark run (b.N == 1), whatever b.N is later. It reports VmRSS,
// once the agent serves 250 enrolled pods on /metrics and has been scraped,
// as RSS-MiB, its anonymous part (RssAnon: heap, stacks; the rest is pages
// of the binary and libc) as anon-RSS-MiB, and the peak (VmHWM) as
// peak-RSS-MiB. The binary is $MESHKEEPER_AGENT_BIN or built from
// ./cmd/agent. The agent runs in a namespace of its own so that its metrics
// listener and the scrapes stay on that namespace's loopback; it gets no
// GOGC, GOMEMLIMIT or GODEBUG from the environment, so it runs with its own
// defaults.
func BenchmarkAgentRSS250(b *testing.B) {
	requirePrivileged(b)
	if b.N == 1 || agentRSS == nil {
		agentRSS = measureAgentMemory(b, 250)
	}
	b.ReportMetric(0, "ns/op") // not a time measurement
	b.ReportMetric(float64(agentRSS.rssKiB)/1024, "RSS-MiB")
	b.ReportMetric(float64(agentRSS.anonKiB)/1024, "anon-RSS-MiB")
	b.ReportMetric(float64(agentRSS.hwmKiB)/1024, "peak-RSS-MiB")
}

func measureAgentMemory(b *testing.B, pods int) *agentMemory {
	b.Helper()
	bin := os.Getenv("MESHKEEPER_AGENT_BIN")
	if bin == "" {
		bin = filepath.Join(b.TempDir(), "agent")
		goCmd, err := exec.LookPath("go")
		if err != nil {
			b.Fatalf("no go command to build the agent (or set MESHKEEPER_AGENT_BIN): %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		out, err := exec.CommandContext(ctx, goCmd, "build", "-o", bin, "github.com/meshkeeper/meshkeeper/cmd/agent").CombinedOutput()
		cancel()
		if err != nil {
			b.Fatalf("go build ./cmd/agent: %v: %s", err, out)
		}
	}

	agentNS := newTestNetns(b)
	var podsFile bytes.Buffer
	for i := range pods {
		ns := newTestNetns(b)
		fmt.Fprintf(&podsFile, "bench/pod-%03d 00000000-0000-4000-8000-%012d %s\n", i, i, ns.Path)
	}
	podsPath := filepath.Join(b.TempDir(), "pods")
	if err := os.WriteFile(podsPath, podsFile.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
	pinPath := filepath.Join("/sys/fs/bpf", testName())
	b.Cleanup(func() {
		// After `agent uninstall` below this finds nothing; it matters when
		// the benchmark stopped before.
		if err := Uninstall(pinPath); err != nil {
			b.Errorf("uninstall %s: %v", pinPath, err)
		}
	})

	// Its ZDS server on a socket of its own, never the host's
	// /var/run/ztunnel (a real node's agent may serve there).
	zdsDir, err := os.MkdirTemp("", "mk-zds")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(zdsDir) })
	cmd := exec.Command(bin, "run", "--no-kube", "--pods-file", podsPath, "--pin-path", pinPath,
		"--cgroup-path", cgroup2Root(b), "--metrics-addr", "127.0.0.1:0", "--proc-root", "/proc",
		"--zds-socket", filepath.Join(zdsDir, "ztunnel.sock"))
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k != "GOGC" && k != "GOMEMLIMIT" && k != "GODEBUG" {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	// The agent dies with the thread that forked it, which lives until the
	// agent has exited (or this process dies).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logs := &agentLog{addrc: make(chan string, 1)}
	cmd.Stdout, cmd.Stderr = logs, logs
	startc, exitc := make(chan error, 1), make(chan error, 1)
	go func() {
		if err := agentNS.Do(func() {
			if err := cmd.Start(); err != nil {
				startc <- err
				return
			}
			startc <- nil
			exitc <- cmd.Wait()
		}); err != nil {
			startc <- err
		}
	}()
	if err := <-startc; err != nil {
		b.Fatalf("start agent: %v", err)
	}
	exited := false
	stop := func() error {
		if exited {
			return nil
		}
		exited = true
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exitc:
			return err
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exitc
			return errors.New("agent did not stop within 10s of SIGTERM; killed")
		}
	}
	b.Cleanup(func() { _ = stop() })
	fail := func(format string, args ...any) {
		b.Helper()
		_ = stop()
		b.Fatalf("%s\nagent log (tail):\n%s", fmt.Sprintf(format, args...), logs.tail())
	}

	var addr string
	select {
	case addr = <-logs.addrc:
	case err := <-exitc:
		exited = true
		fail("agent exited before serving metrics: %v", err)
	case <-time.After(30 * time.Second):
		fail("agent did not log its metrics address within 30s")
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			return dialIn(agentNS, network, address, 2*time.Second)
		},
	}}
	scrape := func() (float64, error) {
		resp, err := client.Get("http://" + addr + "/metrics")
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("GET /metrics: %s", resp.Status)
		}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "meshkeeper_agent_enrolled_pods "); ok {
				return strconv.ParseFloat(v, 64)
			}
		}
		if err := sc.Err(); err != nil {
			return 0, err
		}
		return 0, errors.New("no meshkeeper_agent_enrolled_pods in /metrics")
	}

	// ztunnel's place: the ZDS test client connects and acks every add,
	// so the 250 pods are handed to it as on a real node.
	var zc *zdsclient.Client
	zdsDeadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if zc, err = zdsclient.Dial(filepath.Join(zdsDir, "ztunnel.sock"), zdsapi.Version_V1); err == nil {
			break
		}
		if time.Now().After(zdsDeadline) {
			fail("ztunnel stand-in cannot connect to the agent's ZDS socket within 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.Cleanup(func() { zc.Close() })
	handed := map[string]bool{}
	for len(handed) < pods {
		r, err := zc.Recv(30 * time.Second)
		if err != nil {
			fail("ZDS: %d of %d pods handed to ztunnel: %v", len(handed), pods, err)
		}
		if r.Netns != nil {
			r.Netns.Close()
		}
		if err := zc.Ack(""); err != nil {
			fail("ZDS ack: %v", err)
		}
		if r.Kind == zdsclient.Add {
			handed[r.UID] = true
		}
	}
	// Answer whatever else comes (SnapshotSent, re-adds) until the end.
	go func() {
		for {
			r, err := zc.Recv(time.Minute)
			if err != nil {
				return
			}
			if r.Netns != nil {
				r.Netns.Close()
			}
			if zc.Ack("") != nil {
				return
			}
		}
	}()

	deadline := time.Now().Add(60 * time.Second)
	var enrolled float64
	var scrapeErr error
	for enrolled != float64(pods) {
		select {
		case err := <-exitc:
			exited = true
			fail("agent exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			fail("/metrics reports %v enrolled pods after 60s, want %d (last error: %v)", enrolled, pods, scrapeErr)
		}
		time.Sleep(100 * time.Millisecond)
		enrolled, scrapeErr = scrape()
	}
	// Steady state: let the pods-file poll and a full scan tick, and scrape
	// once more, as Prometheus would.
	time.Sleep(2 * time.Second)
	if enrolled, err := scrape(); err != nil || enrolled != float64(pods) {
		fail("second scrape: %v enrolled, %v", enrolled, err)
	}
	mem, err := readProcMemory(cmd.Process.Pid)
	if err != nil {
		fail("%v", err)
	}
	if err := stop(); err != nil {
		b.Fatalf("agent on SIGTERM: %v\nagent log (tail):\n%s", err, logs.tail())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, bin, "uninstall", "--pin-path", pinPath).CombinedOutput(); err != nil {
		b.Fatalf("agent uninstall --pin-path %s: %v: %s", pinPath, err, out)
	}
	return mem
}

// readProcMemory reads VmRSS, RssAnon and VmHWM of a process.
func readProcMemory(pid int) (*agentMemory, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	m := &agentMemory{rssKiB: -1, anonKiB: -1, hwmKiB: -1}
	for line := range strings.Lines(string(status)) {
		k, v, _ := strings.Cut(line, ":")
		var dst *int
		switch k {
		case "VmRSS":
			dst = &m.rssKiB
		case "RssAnon":
			dst = &m.anonKiB
		case "VmHWM":
			dst = &m.hwmKiB
		default:
			continue
		}
		f := strings.Fields(v) // "12345 kB"
		if len(f) != 2 || f[1] != "kB" {
			return nil, fmt.Errorf("/proc/%d/status: %q", pid, line)
		}
		if *dst, err = strconv.Atoi(f[0]); err != nil {
			return nil, fmt.Errorf("/proc/%d/status: %q: %w", pid, line, err)
		}
	}
	if m.rssKiB < 0 || m.anonKiB < 0 || m.hwmKiB < 0 {
		return nil, fmt.Errorf("/proc/%d/status: no VmRSS, RssAnon or VmHWM", pid)
	}
	return m, nil
}

// agentLog collects the agent's output (JSON log lines), keeps its tail for
// failure messages and sends the metrics address once it is logged.
type agentLog struct {
	mu      sync.Mutex
	partial []byte
	lines   []string
	addrc   chan string
	sent    bool
}

var metricsAddrRE = regexp.MustCompile(`"addr":"([^"]+)"`)

func (l *agentLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		if !l.sent && strings.Contains(line, "Serving metrics") {
			if m := metricsAddrRE.FindStringSubmatch(line); m != nil {
				l.sent = true
				l.addrc <- m[1]
			}
		}
		l.lines = append(l.lines, line)
		if len(l.lines) > 40 {
			l.lines = l.lines[len(l.lines)-40:]
		}
	}
	return len(p), nil
}

func (l *agentLog) tail() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n") + string(l.partial)
}
