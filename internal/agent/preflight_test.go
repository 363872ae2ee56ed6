package agent

import (
	"os"
	"testing"

	. "github.com/onsi/gomega"
)

const (
	unifiedMounts = `25 1 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
30 25 0:26 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700`
	hybridMounts = `25 1 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory`
	v1OnlyMounts = `25 1 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro
27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory`
)

func TestEvaluate(t *testing.T) {
	cases := []struct {
		name     string
		in       Inputs
		eligible bool
		cgroup   string
		bpffs    bool
		reason   string
	}{
		{"6.x unified", Inputs{KernelRelease: "6.1.0-28-amd64", BTF: true, MountInfo: unifiedMounts}, true, "/sys/fs/cgroup", true, ""},
		{"6.x hybrid, bpffs not mounted yet", Inputs{KernelRelease: "6.18.44", BTF: true, MountInfo: hybridMounts}, true, "/sys/fs/cgroup/unified", false, ""},
		{"5.10 is the minimum", Inputs{KernelRelease: "5.10.0-33-amd64", BTF: true, MountInfo: unifiedMounts}, true, "/sys/fs/cgroup", true, ""},
		{"5.4 too old", Inputs{KernelRelease: "5.4.0-216-generic", BTF: true, MountInfo: unifiedMounts}, false, "/sys/fs/cgroup", true, "kernel 5.4.0 < 5.10.0 required"},
		{"4.19 too old", Inputs{KernelRelease: "4.19.0", BTF: true, MountInfo: unifiedMounts}, false, "/sys/fs/cgroup", true, "kernel 4.19.0 < 5.10.0 required"},
		{"no BTF", Inputs{KernelRelease: "6.1.0", BTF: false, MountInfo: unifiedMounts}, false, "/sys/fs/cgroup", true, "no BTF"},
		{"cgroup v1 only", Inputs{KernelRelease: "6.1.0", BTF: true, MountInfo: v1OnlyMounts}, false, "", false, "no cgroup v2 mount"},
		{"garbage release", Inputs{KernelRelease: "banana", BTF: true, MountInfo: unifiedMounts}, false, "/sys/fs/cgroup", true, `kernel release "banana"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			r := Evaluate(tc.in)
			g.Expect(r.Eligible).To(Equal(tc.eligible))
			g.Expect(r.CgroupV2Path).To(Equal(tc.cgroup))
			g.Expect(r.BPFFS).To(Equal(tc.bpffs))
			if tc.reason == "" {
				g.Expect(r.Reason).To(BeEmpty())
			} else {
				g.Expect(r.Reason).To(ContainSubstring(tc.reason))
			}
		})
	}
}

// TestPreflightOnThisHost runs preflight on the real kernel. The development
// and CI machines run 6.x with BTF and a cgroup2 mount, so they are eligible.
func TestPreflightOnThisHost(t *testing.T) {
	g := NewWithT(t)
	in, err := ReadHost()
	g.Expect(err).NotTo(HaveOccurred())
	r := Evaluate(in)
	t.Logf("this host: %+v", r)
	_, statErr := os.Stat("/sys/kernel/btf/vmlinux")
	g.Expect(r.BTF).To(Equal(statErr == nil))
	g.Expect(r.KernelRelease).NotTo(BeEmpty())
	if os.Getenv("MESHKEEPER_REQUIRE_PRIVILEGED") == "1" {
		g.Expect(r.Eligible).To(BeTrue(), "CI machines must pass eBPF preflight: %s", r.Reason)
	}
}
