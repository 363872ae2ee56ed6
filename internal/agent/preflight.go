// Package agent is the node agent: kernel preflight, the eBPF datapath
// (loading, pinning, adoption across restarts, uninstall), pod enrolment,
// L4 telemetry and the node's MeshNode report. See bpf/README.md.
package agent

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/meshkeeper/meshkeeper/internal/kernel"
)

// MinKernel is the oldest kernel the eBPF redirection supports (cgroup
// getsockopt hooks and netns cookies in sock_addr programs are older, but
// 5.10 LTS is the oldest release tested). Bundles carry their own minimum,
// which the operator applies to the kernel each node reports.
var MinKernel = kernel.Version{Major: 5, Minor: 10}

// Inputs are what preflight reads from the host.
type Inputs struct {
	KernelRelease string
	BTF           bool
	MountInfo     string // contents of /proc/self/mountinfo
	// Features are the kernel's BPF feature probes; nil when not probed
	// (fixtures), in which case they do not count against eligibility.
	Features []FeatureProbe
}

// Result is the preflight verdict.
type Result struct {
	KernelRelease string         `json:"kernelRelease"`
	BTF           bool           `json:"btf"`
	CgroupV2      bool           `json:"cgroupV2"`
	CgroupV2Path  string         `json:"cgroupV2Path,omitempty"`
	BPFFS         bool           `json:"bpffs"`
	Features      []FeatureProbe `json:"features,omitempty"`
	Eligible      bool           `json:"eligible"`
	Reason        string         `json:"reason,omitempty"`
}

// Evaluate decides eligibility from the inputs. bpffs may be missing: the
// agent mounts it, so it does not make a node ineligible.
func Evaluate(in Inputs) Result {
	r := Result{KernelRelease: in.KernelRelease, BTF: in.BTF, Features: in.Features}
	r.CgroupV2Path, r.BPFFS = scanMounts(in.MountInfo)
	r.CgroupV2 = r.CgroupV2Path != ""
	var reasons []string
	if v, err := kernel.Parse(in.KernelRelease); err != nil {
		reasons = append(reasons, err.Error())
	} else if v.Less(MinKernel) {
		reasons = append(reasons, fmt.Sprintf("kernel %s < %s required", v, MinKernel))
	}
	if !in.BTF {
		reasons = append(reasons, "no BTF (/sys/kernel/btf/vmlinux missing)")
	}
	if !r.CgroupV2 {
		reasons = append(reasons, "no cgroup v2 mount")
	}
	if reason := featureReason(in.Features); reason != "" {
		reasons = append(reasons, reason)
	}
	r.Eligible = len(reasons) == 0
	r.Reason = strings.Join(reasons, "; ")
	return r
}

// scanMounts finds the cgroup2 mount point (unified or hybrid layout) and
// whether a bpf filesystem is mounted at /sys/fs/bpf.
func scanMounts(mountinfo string) (cgroup2 string, bpffs bool) {
	sc := bufio.NewScanner(strings.NewReader(mountinfo))
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, tail := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(tail) < 1 {
			continue
		}
		switch mnt := fields[4]; tail[0] {
		case "cgroup2":
			if cgroup2 == "" || mnt == "/sys/fs/cgroup" {
				cgroup2 = mnt
			}
		case "bpf":
			if mnt == "/sys/fs/bpf" {
				bpffs = true
			}
		}
	}
	return cgroup2, bpffs
}

// ReadHost gathers Inputs from this machine.
func ReadHost() (Inputs, error) {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return Inputs{}, fmt.Errorf("uname: %w", err)
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return Inputs{}, err
	}
	defer f.Close()
	mi, err := io.ReadAll(f)
	if err != nil {
		return Inputs{}, err
	}
	_, btfErr := os.Stat("/sys/kernel/btf/vmlinux")
	return Inputs{KernelRelease: unix.ByteSliceToString(uts.Release[:]), BTF: btfErr == nil, MountInfo: string(mi)}, nil
}

// Preflight reads this host, probes its BPF features and evaluates them.
func Preflight() (Result, error) {
	in, err := ReadHost()
	if err != nil {
		return Result{}, err
	}
	in.Features = ProbeFeatures()
	return Evaluate(in), nil
}
