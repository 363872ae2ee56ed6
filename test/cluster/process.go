package cluster

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a child process in its own process group, logging to LogDir.
type proc struct {
	name    string
	cmd     *exec.Cmd
	log     *os.File
	done    chan struct{}
	waitErr error
}

func (c *Cluster) startProc(name string, args []string) (*proc, error) {
	return c.startBin(name, filepath.Join(c.BinDir, name), args, c.childEnv())
}

// startBin starts bin as the component name with env.
func (c *Cluster) startBin(name, bin string, args, env []string) (*proc, error) {
	f, err := c.openLog(name)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(f, "# %s %s\n", bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Dir = c.tmpDir
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("cluster: start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: f, done: make(chan struct{})}
	if c.reaper != nil {
		c.reaper.add(cmd.Process.Pid)
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill SIGKILLs the process group and waits for the leader to be reaped.
func (p *proc) kill(timeout time.Duration) error {
	defer p.log.Close()
	// The group may outlive its leader; kill it in any case.
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		_ = p.cmd.Process.Kill()
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("cluster: %s (pid %d) did not exit after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// deadChild reports the first child that exited, restarting kube-scheduler
// (on another port) if it lost a port race with another process.
func (c *Cluster) deadChild() error {
	c.restartMu.Lock()
	defer c.restartMu.Unlock()
	c.mu.Lock()
	procs := slices.Clone(c.procs)
	c.mu.Unlock()
	for _, p := range procs {
		if !p.exited() {
			continue
		}
		if p.name == "kube-scheduler" && c.schedulerRestarts < 3 && logContains(p.log.Name(), "address already in use") {
			c.schedulerRestarts++
			_ = p.log.Close()
			c.mu.Lock()
			c.procs = slices.DeleteFunc(c.procs, func(q *proc) bool { return q == p })
			c.mu.Unlock()
			return c.startScheduler()
		}
		return fmt.Errorf("%s (pid %d) exited: %v", p.name, p.cmd.Process.Pid, p.waitErr)
	}
	return nil
}

func logContains(path, s string) bool {
	data, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(data), s)
}

// reaper is a /bin/sh child that survives us: it reads process-group ids on
// its stdin and, when stdin reaches EOF (we exited or died, however), kills
// those groups. It covers etcd and kube-apiserver, which envtest starts
// without a parent-death signal, and backs up Pdeathsig for the others.
type reaper struct {
	mu   sync.Mutex
	cmd  *exec.Cmd
	w    io.WriteCloser
	done bool
}

const reaperScript = `pg=""; while read -r p; do pg="$pg $p"; done; for p in $pg; do kill -9 -"$p" 2>/dev/null; done; exit 0`

func startReaper() (*reaper, error) {
	cmd := exec.Command("/bin/sh", "-c", reaperScript)
	// Own process group (a terminal's ^C must not take it down before it
	// has done its job), and no parent-death signal, of course.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	w, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &reaper{cmd: cmd, w: w}, nil
}

func (r *reaper) add(pgid int) {
	if r == nil || pgid <= 1 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.done {
		_, _ = fmt.Fprintf(r.w, "%d\n", pgid)
	}
}

// finish ends the reaper: with killGroups it first kills the registered
// groups (closing its stdin), otherwise it is just killed.
func (r *reaper) finish(killGroups bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	r.done = true
	if !killGroups {
		_ = r.cmd.Process.Kill()
	}
	_ = r.w.Close()
	waited := make(chan struct{})
	go func() { _ = r.cmd.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		_ = r.cmd.Process.Kill()
		<-waited
	}
}
