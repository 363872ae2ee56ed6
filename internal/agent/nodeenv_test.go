package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// The datapath tests run in two node environments:
//
//   - idle: a kernel with no netfilter rule, where nothing tracks
//     connections (a fresh development machine);
//   - kube node: what every real node has once a kubelet and kube-proxy
//     ran. Their iptables rules (kubelet's KUBE-FIREWALL, kube-proxy's
//     conntrack matches and nat DNAT of ClusterIPs) make conntrack track
//     every connection in the host's network namespace, and conntrack then
//     answers SO_ORIGINAL_DST for connections that were never redirected.
//
// A pod's namespace gets a route to the service and a server behind it in
// both: a client that is not redirected reaches the server, one that is
// reaches the capture proxy, and the tests count connections at each.
type nodeEnv struct {
	name string
	// kube adds kube-proxy-style rules: the service is a ClusterIP DNATed
	// by nat OUTPUT to an endpoint, INVALID packets are dropped, and the
	// host's namespace gets a conntrack-matching rule.
	kube bool
}

var nodeEnvs = []nodeEnv{
	{name: "idle kernel"},
	{name: "kube node with conntrack", kube: true},
}

// Addresses of the service's endpoint in a kube node environment: a pod IP.
const endpointAddr = "10.244.0.2:8080"

// setUp prepares the host for the environment (removed by t.Cleanup).
func (e nodeEnv) setUp(tb testing.TB) {
	tb.Helper()
	if e.kube {
		hostConntrack(tb)
	}
}

// addService gives ns a route to serviceAddr and a server behind it, and
// returns the server. In a kube node the server listens on an endpoint
// address and nat OUTPUT DNATs the service to it, as kube-proxy does.
func (e nodeEnv) addService(tb testing.TB, ns *testNetns) *countingServer {
	tb.Helper()
	svc := strings.Split(serviceAddr, ":")
	if !e.kube {
		ipIn(tb, ns, "addr", "add", svc[0]+"/32", "dev", "lo")
		return startCountingServer(tb, ns, serviceAddr)
	}
	ep := strings.Split(endpointAddr, ":")
	ipIn(tb, ns, "addr", "add", ep[0]+"/32", "dev", "lo")
	ipIn(tb, ns, "route", "add", "10.96.0.0/12", "dev", "lo")
	iptablesIn(tb, ns, "-t", "nat", "-A", "OUTPUT", "-d", svc[0]+"/32", "-p", "tcp", "--dport", svc[1],
		"-m", "comment", "--comment", "KUBE-SVC stand-in", "-j", "DNAT", "--to-destination", endpointAddr)
	iptablesIn(tb, ns, "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
	return startCountingServer(tb, ns, endpointAddr)
}

// hostConntrackComment marks this process's rules in the host namespace;
// sweepStaleTestState removes those of test processes that are gone.
func hostConntrackComment() string { return testName() }

var hostRuleRE = regexp.MustCompile(`^-A (\S+) (.*--comment "?` + testPinPrefix + `(\d+)-\d+"?.*)$`)

// hostConntrack makes conntrack active in the host's network namespace the
// way a kubelet's and kube-proxy's rules do: a filter rule with a conntrack
// match (this one matches and does nothing else). t.Cleanup deletes it,
// whatever happened.
func hostConntrack(tb testing.TB) {
	tb.Helper()
	spec := []string{"OUTPUT", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED,RELATED",
		"-m", "comment", "--comment", hostConntrackComment()}
	tb.Cleanup(func() {
		if out, err := exec.Command("iptables", append([]string{"-w", "-D"}, spec...)...).CombinedOutput(); err != nil {
			tb.Errorf("remove host conntrack rule: %v: %s", err, out)
		}
	})
	iptables(tb, nil, append([]string{"-A"}, spec...)...)
}

// sweepHostRules deletes host rules left by test processes that are gone
// (a test binary killed by its timeout runs no cleanups).
func sweepHostRules(stale func(string) bool) {
	out, err := exec.Command("iptables-save", "-t", "filter").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		m := hostRuleRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[3])
		if !stale(fmt.Sprintf("%s%d-0", testPinPrefix, pid)) {
			continue
		}
		args := append([]string{"-w", "-D", m[1]}, splitRule(m[2])...)
		if out, err := exec.Command("iptables", args...).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "sweep: iptables %s: %v: %s\n", strings.Join(args, " "), err, out)
		}
	}
}

// splitRule splits an iptables-save rule into arguments (quoted comments).
func splitRule(s string) []string {
	var out []string
	for len(s) > 0 {
		s = strings.TrimLeft(s, " ")
		if s == "" {
			break
		}
		if s[0] == '"' {
			end := strings.IndexByte(s[1:], '"')
			if end < 0 {
				return append(out, s[1:])
			}
			out = append(out, s[1:end+1])
			s = s[end+2:]
			continue
		}
		end := strings.IndexByte(s, ' ')
		if end < 0 {
			return append(out, s)
		}
		out = append(out, s[:end])
		s = s[end:]
	}
	return out
}

// conntrackActive is true when the calling thread's namespace tracks
// connections: SO_ORIGINAL_DST is then answered for a plain loopback
// connection.
func conntrackActive() (bool, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return false, err
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		return false, err
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		return false, err
	}
	defer s.Close()
	_, err = OriginalDst(s.(*net.TCPConn))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	}
	return false, err
}

// ipIn runs ip(8) in ns.
func ipIn(tb testing.TB, ns *testNetns, args ...string) {
	tb.Helper()
	args = append([]string{"-n", ns.Name}, args...)
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		tb.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// iptablesIn runs iptables in ns; its rules go with the namespace.
func iptablesIn(tb testing.TB, ns *testNetns, args ...string) {
	tb.Helper()
	iptables(tb, ns, args...)
}

func iptables(tb testing.TB, ns *testNetns, args ...string) {
	tb.Helper()
	if _, err := exec.LookPath("iptables"); err != nil {
		tb.Fatalf("needs iptables (apt package iptables): %v", err)
	}
	cmd := exec.Command("iptables", append([]string{"-w"}, args...)...)
	if ns != nil {
		cmd = exec.Command("ip", append([]string{"netns", "exec", ns.Name, "iptables", "-w"}, args...)...)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("%s: %v: %s", strings.Join(cmd.Args, " "), err, out)
	}
}

// countingServer stands in for a service's backend: it counts the
// connections it accepts and answers each with "server".
type countingServer struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	seen int
}

func startCountingServer(tb testing.TB, ns *testNetns, addr string) *countingServer {
	tb.Helper()
	s := &countingServer{}
	var err error
	if nsErr := ns.Do(func() { s.ln, err = net.Listen("tcp4", addr) }); nsErr != nil {
		tb.Fatal(nsErr)
	}
	if err != nil {
		tb.Fatalf("server listen %s in %s: %v", addr, ns.Name, err)
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
			_, _ = c.Write([]byte("server\n"))
			c.Close()
		}
	}()
	tb.Cleanup(func() { s.ln.Close(); s.wg.Wait() })
	return s
}

func (s *countingServer) Accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen
}

// The kube node environment leaves the host as it found it, also when the
// test using it fails: its conntrack rule goes with the test's cleanups, and
// a rule of a test process that is gone is swept.
func TestKubeNodeEnvCleansUp(t *testing.T) {
	requirePrivileged(t)
	rules := func() string {
		out, err := exec.Command("iptables-save", "-t", "filter").Output()
		if err != nil {
			t.Fatalf("iptables-save: %v", err)
		}
		return string(out)
	}
	// A rule added without a cleanup, as by a test binary killed by its
	// timeout before its cleanups ran.
	comment := testName()
	iptables(t, nil, "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", comment)
	if !strings.Contains(rules(), comment) {
		t.Fatalf("rule %s not added", comment)
	}
	// While its process runs the sweep keeps it...
	sweepHostRules(func(name string) bool { return false })
	if !strings.Contains(rules(), comment) {
		t.Fatal("the sweep removed a live test's rule")
	}
	// ...and removes it once its process counts as gone.
	sweepHostRules(func(name string) bool {
		return strings.HasPrefix(name, fmt.Sprintf("%s%d-", testPinPrefix, os.Getpid()))
	})
	if strings.Contains(rules(), comment) {
		t.Fatalf("the sweep left %s behind:\n%s", comment, rules())
	}

	// The environment's rule is removed by t.Cleanup, which runs whether
	// the test passed or failed.
	t.Run("kube node", func(t *testing.T) {
		nodeEnvs[1].setUp(t)
		if !strings.Contains(rules(), testPinPrefix+strconv.Itoa(os.Getpid())) {
			t.Fatal("the kube node environment added no host rule")
		}
	})
	if strings.Contains(rules(), testPinPrefix+strconv.Itoa(os.Getpid())) {
		t.Fatalf("the kube node environment left a host rule behind:\n%s", rules())
	}
}
