package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultProcRoot is where the node-agent chart mounts the host's /proc. The
// agent runs with hostPID: false, so its own /proc shows only its container;
// pods are found through the host's procfs.
const DefaultProcRoot = "/host/proc"

// procRootFacts is what the agent observed of a proc root, before deciding
// whether pods can be found through it.
type procRootFacts struct {
	root string
	// statErr is why root could not be read, if it could not.
	statErr error
	// procfs is true when root is a procfs mount.
	procfs bool
	// pid1 is true when root has a PID 1.
	pid1 bool
	// pid1PodUID is the pod UID PID 1's cgroup names ("" for none).
	pid1PodUID string
	// selfPID is the agent's pid as root sees it (root/self), 0 when root
	// has no self link (root's PID namespace does not contain the agent).
	selfPID int
	// ownPID is the agent's pid in its own PID namespace (os.Getpid).
	ownPID int
}

// checkProcRoot decides whether root is a host's procfs, through which every
// pod's processes are visible. It returns a user-facing error that says what
// is wrong and how to fix it.
func checkProcRoot(f procRootFacts) error {
	const fix = "mount the host's /proc (hostPath /proc) and pass its mount point with --proc-root; the node-agent chart mounts it at " + DefaultProcRoot
	switch {
	case f.statErr != nil:
		return fmt.Errorf("proc root %s: %v: %s", f.root, f.statErr, fix)
	case !f.procfs:
		return fmt.Errorf("proc root %s is not a procfs mount: %s", f.root, fix)
	case !f.pid1:
		return fmt.Errorf("proc root %s has no PID 1, so it is not the host's process table: %s", f.root, fix)
	case f.pid1PodUID != "":
		return fmt.Errorf("proc root %s is a container's, not the host's: its PID 1 belongs to pod %s: %s", f.root, f.pid1PodUID, fix)
	case f.selfPID == 1 && f.ownPID == 1:
		// The agent is the init of the PID namespace root shows: root shows
		// the agent's container only (hostPID: false and its own /proc).
		return fmt.Errorf("proc root %s shows only the agent's own PID namespace (the agent is its PID 1), not the host's processes: %s", f.root, fix)
	}
	return nil
}

// CheckProcRoot returns an error when root is not a host's procfs: the
// enroller would find no pod through it, and the node would enrol nothing.
func CheckProcRoot(root string) error {
	return checkProcRoot(observeProcRoot(root))
}

func observeProcRoot(root string) procRootFacts {
	f := procRootFacts{root: root, ownPID: os.Getpid()}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		f.statErr = err
		return f
	}
	f.procfs = st.Type == unix.PROC_SUPER_MAGIC
	if _, err := os.Stat(filepath.Join(root, "1")); err == nil {
		f.pid1 = true
		if b, err := os.ReadFile(filepath.Join(root, "1", "cgroup")); err == nil {
			f.pid1PodUID = PodUIDFromCgroup(b)
		}
	}
	if target, err := os.Readlink(filepath.Join(root, "self")); err == nil {
		f.selfPID, _ = strconv.Atoi(target)
	}
	return f
}

// hostNetnsCookie is the cookie of the host's network namespace, the one of
// PID 1 under procRoot. The agent runs with hostNetwork: false, so its own
// namespace is not the host's. Some PID 1s cannot be inspected even by root
// (a microVM's init: EACCES on /proc/1/ns/net); then kthreadd (PID 2),
// whose kernel threads always live in the host's namespace, answers. Only
// when neither can be opened (a test's fake proc tree) it falls back to the
// agent's own namespace and says why.
//
// It matters: runc puts a container's first process into the pod's cgroup
// before that process joins the pod's netns, so a scan can see a pod
// process in the host's namespace; refusing the wrong cookie would enrol
// the host's namespace (every host connection redirected) and hand it to
// ztunnel.
func hostNetnsCookie(procRoot string) (cookie uint64, fallback error, err error) {
	c, err := NetnsCookie(filepath.Join(procRoot, "1", "ns", "net"))
	if err == nil {
		return c, nil, nil
	}
	if comm, cerr := os.ReadFile(filepath.Join(procRoot, "2", "comm")); cerr == nil && strings.TrimSpace(string(comm)) == "kthreadd" {
		if c, kerr := NetnsCookie(filepath.Join(procRoot, "2", "ns", "net")); kerr == nil {
			return c, nil, nil
		}
	}
	own, ownErr := CurrentNetnsCookie()
	if ownErr != nil {
		return 0, nil, fmt.Errorf("host network namespace: %w; own: %w", err, ownErr)
	}
	return own, err, nil
}

func procRootOrDefault(root string) string {
	if root == "" {
		return "/proc"
	}
	return root
}
