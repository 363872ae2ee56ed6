package agent

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	. "github.com/onsi/gomega"
)

func TestCheckProcRoot(t *testing.T) {
	host := procRootFacts{root: "/host/proc", procfs: true, pid1: true, selfPID: 4242, ownPID: 1}
	with := func(f func(*procRootFacts)) procRootFacts {
		c := host
		f(&c)
		return c
	}
	for _, tc := range []struct {
		name  string
		facts procRootFacts
		want  string // substring of the error; "" for none
	}{
		{"the host's proc mounted in the agent's container", host, ""},
		{"an agent run as a host process on /proc", with(func(f *procRootFacts) { f.root, f.selfPID, f.ownPID = "/proc", 4242, 4242 }), ""},
		{"missing mount", with(func(f *procRootFacts) { f.statErr = os.ErrNotExist }),
			"proc root /host/proc: file does not exist: mount the host's /proc"},
		{"a directory that is no procfs", with(func(f *procRootFacts) { f.procfs = false }), "is not a procfs mount"},
		{"no PID 1", with(func(f *procRootFacts) { f.pid1 = false }), "has no PID 1"},
		{"PID 1 is a pod's process", with(func(f *procRootFacts) { f.pid1PodUID = "6f1c2d4e-0000-4000-8000-000000000001" }),
			"is a container's, not the host's: its PID 1 belongs to pod 6f1c2d4e-0000-4000-8000-000000000001"},
		{"the container's own /proc (hostPID: false)", with(func(f *procRootFacts) { f.root, f.selfPID, f.ownPID = "/proc", 1, 1 }),
			"shows only the agent's own PID namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			err := checkProcRoot(tc.facts)
			if tc.want == "" {
				g.Expect(err).NotTo(HaveOccurred())
				return
			}
			g.Expect(err).To(MatchError(ContainSubstring(tc.want)))
			g.Expect(err.Error()).To(ContainSubstring("--proc-root"), "the error says how to fix it")
		})
	}
}

// A fake proc tree is no procfs, and its PID 1's cgroup is read.
func TestObserveProcRootFakeTree(t *testing.T) {
	g := NewWithT(t)
	root := t.TempDir()
	g.Expect(os.MkdirAll(filepath.Join(root, "1"), 0o755)).To(Succeed())
	g.Expect(os.WriteFile(filepath.Join(root, "1", "cgroup"),
		[]byte("4:memory:/kubepods/besteffort/pod6f1c2d4e-0000-4000-8000-000000000001/abc\n"), 0o644)).To(Succeed())
	f := observeProcRoot(root)
	g.Expect(f.statErr).NotTo(HaveOccurred())
	g.Expect(f.procfs).To(BeFalse())
	g.Expect(f.pid1).To(BeTrue())
	g.Expect(f.pid1PodUID).To(Equal("6f1c2d4e-0000-4000-8000-000000000001"))
	g.Expect(CheckProcRoot(root)).To(MatchError(ContainSubstring("is not a procfs mount")))
	g.Expect(CheckProcRoot(filepath.Join(root, "missing"))).To(MatchError(ContainSubstring("no such file or directory")))
}

// The test runs as a host process: /proc is the host's.
func TestCheckProcRootHost(t *testing.T) {
	NewWithT(t).Expect(CheckProcRoot("/proc")).To(Succeed())
}

// procRootChildEnv makes the test binary, started by
// TestCheckProcRootOwnPIDNamespace as PID 1 of a new PID namespace, report
// what CheckProcRoot says of its own /proc and exit.
const procRootChildEnv = "MESHKEEPER_TEST_PROCROOT_CHILD"

func init() {
	if os.Getenv(procRootChildEnv) != "1" {
		return
	}
	if err := CheckProcRoot("/proc"); err != nil {
		os.Stdout.WriteString(err.Error())
		os.Exit(3)
	}
	os.Exit(0)
}

// What the shipped chart did before --proc-root: an agent in its own PID
// namespace (hostPID: false) looking at its own /proc is refused.
func TestCheckProcRootOwnPIDNamespace(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	bin, err := os.Executable()
	g.Expect(err).NotTo(HaveOccurred())
	// unshare forks: the test binary is PID 1 of a new PID namespace with
	// its own /proc in a new mount namespace; both go when it exits.
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount-proc", bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), procRootChildEnv+"=1")
	out, err := cmd.Output()
	var exit *exec.ExitError
	g.Expect(errors.As(err, &exit)).To(BeTrue(), "the check fails in the child: %v %s", err, out)
	g.Expect(exit.ExitCode()).To(Equal(3), "%s %s", out, exit.Stderr)
	g.Expect(string(out)).To(ContainSubstring("proc root /proc shows only the agent's own PID namespace"))
}

// TestHostNetnsCookieIsTheHosts: this test runs in the host's network
// namespace, so the agent's idea of the host namespace must be this one,
// also on machines whose PID 1 cannot be inspected (a microVM's init),
// where kthreadd answers.
func TestHostNetnsCookieIsTheHosts(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	own, err := CurrentNetnsCookie()
	g.Expect(err).NotTo(HaveOccurred())
	host, fallback, err := hostNetnsCookie("/proc")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(fallback).NotTo(HaveOccurred(), "PID 1 or kthreadd answers")
	g.Expect(host).To(Equal(own))
	if _, err := NetnsCookie("/proc/1/ns/net"); err != nil {
		t.Logf("PID 1's namespace cannot be opened here (%v): kthreadd answered", err)
	}
}
