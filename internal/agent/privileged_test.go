package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// requirePrivileged skips a test that needs root (BPF, network namespaces),
// or fails it when MESHKEEPER_REQUIRE_PRIVILEGED=1 (CI).
func requirePrivileged(tb testing.TB) {
	tb.Helper()
	var reason string
	switch {
	case os.Geteuid() != 0:
		reason = "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) to load eBPF programs and create network namespaces"
	case os.Getenv("MESHKEEPER_SKIP_PRIVILEGED") == "1":
		reason = "MESHKEEPER_SKIP_PRIVILEGED=1"
	}
	if reason == "" {
		return
	}
	if os.Getenv("MESHKEEPER_REQUIRE_PRIVILEGED") == "1" {
		tb.Fatalf("%s; MESHKEEPER_REQUIRE_PRIVILEGED=1 makes this a failure", reason)
	}
	tb.Skipf("%s; run as root (MESHKEEPER_REQUIRE_PRIVILEGED=1 fails instead of skipping)", reason)
}

// testPinPrefix names the pin directories of test datapaths:
// /sys/fs/bpf/meshkeeper-test-<pid>-<n>. TestMain removes the ones whose
// test process is gone (a test binary killed by its timeout runs no
// cleanups).
const testPinPrefix = "meshkeeper-test-"

var testSeq atomic.Int64

func TestMain(m *testing.M) {
	sweepStaleTestState()
	code := m.Run()
	sweepStaleTestState()
	os.Exit(code)
}

// sweepStaleTestState uninstalls test datapaths and deletes test network
// namespaces left by test processes that no longer run.
func sweepStaleTestState() {
	if os.Geteuid() != 0 {
		return
	}
	stale := func(name string) bool {
		rest := strings.TrimPrefix(name, testPinPrefix)
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil {
			return false
		}
		return pid == os.Getpid() || unix.Kill(pid, 0) == unix.ESRCH
	}
	if entries, err := os.ReadDir("/sys/fs/bpf"); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), testPinPrefix) && stale(e.Name()) {
				if err := Uninstall(filepath.Join("/sys/fs/bpf", e.Name())); err != nil {
					fmt.Fprintln(os.Stderr, "sweep:", err)
				}
			}
		}
	}
	if r := Evaluate(mustReadHost()); r.CgroupV2Path != "" {
		if entries, err := os.ReadDir(r.CgroupV2Path); err == nil {
			for _, e := range entries {
				if e.IsDir() && strings.HasPrefix(e.Name(), testPinPrefix) && stale(e.Name()) {
					removeTestCgroup(filepath.Join(r.CgroupV2Path, e.Name()))
				}
			}
		}
	}
	sweepHostRules(stale)
	if entries, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), testPinPrefix) && stale(e.Name()) {
				path := filepath.Join("/run/netns", e.Name())
				_ = unix.Unmount(path, unix.MNT_DETACH)
				_ = os.Remove(path)
			}
		}
	}
}

func mustReadHost() Inputs {
	in, _ := ReadHost()
	return in
}

// removeTestCgroup kills the processes in a test's pod cgroups and removes
// them.
func removeTestCgroup(dir string) {
	subs, _ := os.ReadDir(dir)
	for _, s := range subs {
		if !s.IsDir() {
			continue
		}
		sub := filepath.Join(dir, s.Name())
		if b, err := os.ReadFile(filepath.Join(sub, "cgroup.procs")); err == nil {
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			}
		}
		for i := 0; i < 100 && os.Remove(sub) != nil; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	_ = os.Remove(dir)
}

// testName returns a unique name for this process's test objects.
func testName() string {
	return fmt.Sprintf("%s%d-%d", testPinPrefix, os.Getpid(), testSeq.Add(1))
}

// cgroup2Root is this machine's cgroup v2 mount, from preflight.
func cgroup2Root(tb testing.TB) string {
	tb.Helper()
	in, err := ReadHost()
	if err != nil {
		tb.Fatal(err)
	}
	r := Evaluate(in)
	if r.CgroupV2Path == "" {
		tb.Fatal("no cgroup v2 mount on this machine")
	}
	return r.CgroupV2Path
}

// loadTestDatapath installs a datapath under a test pin path at the cgroup2
// root and uninstalls it when the test ends, whatever happens.
func loadTestDatapath(tb testing.TB, capturePort uint16) (*Datapath, DatapathConfig) {
	tb.Helper()
	cfg := DatapathConfig{
		PinPath:     filepath.Join("/sys/fs/bpf", testName()),
		CgroupPath:  cgroup2Root(tb),
		CaptureAddr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), capturePort),
		BypassMark:  DefaultBypassMark,
	}
	tb.Cleanup(func() {
		if err := Uninstall(cfg.PinPath); err != nil {
			tb.Errorf("uninstall test datapath: %v", err)
		}
	})
	dp, report, err := LoadDatapath(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { dp.Close() })
	for name, action := range report.Links {
		if action != LinkAttached {
			tb.Fatalf("fresh test datapath: link %s %s, want attached", name, action)
		}
	}
	return dp, cfg
}

// testNetns is a network namespace made by a test, bind-mounted at
// /run/netns/<name> (so `ip -n <name>` works), with lo up.
type testNetns struct {
	Name, Path string
}

func newTestNetns(tb testing.TB) *testNetns {
	tb.Helper()
	ns := &testNetns{Name: testName()}
	ns.Path = filepath.Join("/run/netns", ns.Name)
	if err := os.MkdirAll("/run/netns", 0o755); err != nil {
		tb.Fatal(err)
	}
	f, err := os.Create(ns.Path)
	if err != nil {
		tb.Fatal(err)
	}
	f.Close()
	tb.Cleanup(func() {
		if err := unix.Unmount(ns.Path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			tb.Errorf("unmount %s: %v", ns.Path, err)
		}
		os.Remove(ns.Path)
	})
	errc := make(chan error, 1)
	go func() {
		// This thread enters the new namespace and is never unlocked: it
		// exits with the goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		if err := unix.Mount("/proc/thread-self/ns/net", ns.Path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount netns: %w", err)
			return
		}
		errc <- setLinkUp("lo")
	}()
	if err := <-errc; err != nil {
		tb.Fatalf("create netns %s: %v", ns.Name, err)
	}
	return ns
}

func setLinkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("get flags of %s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// Do runs f on a thread inside the namespace and waits for it. Sockets f
// creates belong to the namespace for their whole life, whichever thread
// uses them later.
func (ns *testNetns) Do(f func()) error {
	h, err := os.Open(ns.Path)
	if err != nil {
		return err
	}
	defer h.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Setns(int(h.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns.Name, err)
			return
		}
		f()
		errc <- nil
	}()
	return <-errc
}

// Cookie is the namespace's netns cookie.
func (ns *testNetns) Cookie(tb testing.TB) uint64 {
	tb.Helper()
	c, err := NetnsCookie(ns.Path)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// programExists reports whether a BPF program with this ID is loaded.
func programExists(id ebpf.ProgramID) bool {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false
	}
	p.Close()
	return true
}

// waitGone waits up to 5s for programs to be freed (the kernel frees them
// after an RCU grace period).
func waitGone(ids []ebpf.ProgramID) []ebpf.ProgramID {
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []ebpf.ProgramID
		for _, id := range ids {
			if programExists(id) {
				left = append(left, id)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}
