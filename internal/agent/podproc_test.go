package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// podCgroups is a cgroup v2 directory a test puts its stand-in pod
// processes under: <cgroup2 root>/<test name>/pod<uid>, which is what
// the enroller looks for in /proc/<pid>/cgroup (like the kubelet's
// .../kubepods/besteffort/pod<uid>/<container>).
type podCgroups struct {
	dir string
}

func newPodCgroups(tb testing.TB) *podCgroups {
	tb.Helper()
	pc := &podCgroups{dir: filepath.Join(cgroup2Root(tb), testName())}
	if err := os.Mkdir(pc.dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		entries, _ := os.ReadDir(pc.dir)
		for _, e := range entries {
			if e.IsDir() {
				_ = os.Remove(filepath.Join(pc.dir, e.Name()))
			}
		}
		if err := os.Remove(pc.dir); err != nil {
			tb.Errorf("remove test cgroup %s: %v", pc.dir, err)
		}
	})
	return pc
}

// podProcess is a stand-in for a pod's sandbox: a sleeping process in the
// pod's cgroup and, unless it is host-network, its own network namespace.
type podProcess struct {
	cmd *exec.Cmd
}

func (pc *podCgroups) start(tb testing.TB, podUID string, hostNetwork bool) *podProcess {
	tb.Helper()
	cg := filepath.Join(pc.dir, "pod"+podUID)
	if err := os.MkdirAll(cg, 0o755); err != nil {
		tb.Fatal(err)
	}
	fd, err := os.Open(cg)
	if err != nil {
		tb.Fatal(err)
	}
	defer fd.Close()
	cmd := exec.Command("sleep", "600")
	// No Pdeathsig: it fires when the forking *thread* exits, and the
	// enroller's setns threads exit by design. TestMain kills leftovers.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(fd.Fd())}
	if !hostNetwork {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNET
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start pod process: %v", err)
	}
	p := &podProcess{cmd: cmd}
	tb.Cleanup(p.stop)
	return p
}

func (p *podProcess) pid() int { return p.cmd.Process.Pid }

func (p *podProcess) netnsPath() string {
	return filepath.Join("/proc", strconv.Itoa(p.pid()), "ns", "net")
}

func (p *podProcess) stop() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
}
