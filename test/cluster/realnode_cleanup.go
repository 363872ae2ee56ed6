package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// HostSnapshot is the part of the machine a real node may change. Taken
// before a real node starts; after it stopped, the machine must compare
// equal (Diff).
type HostSnapshot struct {
	// Chains are "iptables|ip6tables <table> <chain>" of KUBE-* and CNI-*
	// chains.
	Chains []string `json:"chains"`
	// Tables are nftables tables, "<family> <name>".
	Tables []string `json:"tables"`
	// Mounts are mount points a node makes: overlay and nsfs mounts, anything
	// under a real node's state dir, kubelet or containerd paths, bpffs.
	Mounts []string `json:"mounts"`
	// Links are network links named like the bridge or a CNI veth on it.
	Links []string `json:"links"`
	// Processes are "<pid> <exe>" of node binaries, runc, shims and
	// anything in a kubepods cgroup.
	Processes []string `json:"processes"`
	// Cgroups are kubepods directories in the cgroup hierarchies.
	Cgroups []string `json:"cgroups"`
	// Paths are host paths kubelet, containerd, CNI or the charts' hostPath
	// volumes may create.
	Paths []string `json:"paths"`
	// Sysctls the kubelet and kube-proxy set, with their values.
	Sysctls map[string]string `json:"sysctls"`
	// Conntrack counts tracked connections of the pod and Service ranges.
	Conntrack int `json:"conntrack"`
	// ConntrackActive: the kernel tracks a fresh loopback connection, so
	// SO_ORIGINAL_DST answers for connections nobody redirected.
	ConntrackActive bool `json:"conntrackActive"`
	// BPFFS: bpffs is mounted at /sys/fs/bpf; BPFFSShared: as a shared
	// mount (HostToContainer propagation, the node agent's, needs shared or
	// slave; systemd makes every mount shared, this machine has no systemd).
	BPFFS       bool `json:"bpffs"`
	BPFFSShared bool `json:"bpffsShared"`
}

// hostPaths may be created by the kubelet, containerd, the CNI plugins or a
// chart's hostPath volumes (ztunnel's DirectoryOrCreate socket directory).
var hostPaths = []string{
	"/var/lib/kubelet", "/var/lib/containerd", "/run/containerd", "/opt/containerd",
	"/etc/cni/net.d", "/var/lib/cni", "/var/run/netns", "/run/netns",
	"/var/log/pods", "/var/log/containers", "/var/run/ztunnel", "/var/run/meshkeeper", "/etc/kubernetes",
	"/sys/fs/bpf/meshkeeper",
}

var nodeSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
	"net/ipv4/conf/all/route_localnet", "net/ipv4/ip_forward",
	"net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
	"net/netfilter/nf_conntrack_max", "net/netfilter/nf_conntrack_tcp_timeout_established",
	"net/netfilter/nf_conntrack_tcp_timeout_close_wait", "net/netfilter/nf_conntrack_tcp_be_liberal",
}

// TakeHostSnapshot records the machine's state (see HostSnapshot).
func TakeHostSnapshot() (*HostSnapshot, error) {
	s := &HostSnapshot{Sysctls: map[string]string{}}
	var err error
	if s.Chains, err = kubeChains(); err != nil {
		return nil, err
	}
	s.Tables = nftTables()
	s.Mounts, s.BPFFS, s.BPFFSShared = nodeMounts()
	s.Links = nodeLinks()
	s.Processes = nodeProcesses("")
	s.Cgroups = kubepodsCgroups()
	for _, p := range hostPaths {
		if _, err := os.Lstat(p); err == nil {
			s.Paths = append(s.Paths, p)
		}
	}
	for _, k := range nodeSysctls {
		if v, err := os.ReadFile("/proc/sys/" + k); err == nil {
			s.Sysctls[k] = strings.TrimSpace(string(v))
		}
	}
	s.Conntrack = conntrackCount()
	s.ConntrackActive = conntrackActive()
	return s, nil
}

// JSON encodes the snapshot (kept in the node's state dir for a later run
// to clean up after one that died).
func (s *HostSnapshot) JSON() []byte {
	b, _ := json.MarshalIndent(s, "", "  ")
	return b
}

// Diff lists what differs from before, one line per item, "+" for what
// appeared and "-" for what went.
func (s *HostSnapshot) Diff(before *HostSnapshot) []string {
	var out []string
	list := func(what string, b, a []string) {
		for _, x := range a {
			if !slices.Contains(b, x) {
				out = append(out, fmt.Sprintf("+ %s %s", what, x))
			}
		}
		for _, x := range b {
			if !slices.Contains(a, x) {
				out = append(out, fmt.Sprintf("- %s %s", what, x))
			}
		}
	}
	list("iptables chain", before.Chains, s.Chains)
	list("nft table", before.Tables, s.Tables)
	list("mount", before.Mounts, s.Mounts)
	list("link", before.Links, s.Links)
	list("process", procNames(before.Processes), procNames(s.Processes))
	list("cgroup", before.Cgroups, s.Cgroups)
	list("path", before.Paths, s.Paths)
	for k, v := range before.Sysctls {
		if s.Sysctls[k] != v {
			out = append(out, fmt.Sprintf("~ sysctl %s %s -> %s", k, v, s.Sysctls[k]))
		}
	}
	if s.Conntrack > before.Conntrack {
		out = append(out, fmt.Sprintf("+ conntrack entries of %s/%s: %d (before %d)", RealNodePodCIDR, ServiceCIDR, s.Conntrack, before.Conntrack))
	}
	if s.ConntrackActive != before.ConntrackActive {
		out = append(out, fmt.Sprintf("~ conntrack active: %v -> %v", before.ConntrackActive, s.ConntrackActive))
	}
	if s.BPFFS != before.BPFFS {
		out = append(out, fmt.Sprintf("~ bpffs at /sys/fs/bpf: %v -> %v", before.BPFFS, s.BPFFS))
	} else if s.BPFFSShared != before.BPFFSShared {
		out = append(out, fmt.Sprintf("~ bpffs at /sys/fs/bpf shared: %v -> %v", before.BPFFSShared, s.BPFFSShared))
	}
	return out
}

func procNames(ps []string) []string {
	var out []string
	for _, p := range ps {
		_, exe, _ := strings.Cut(p, " ")
		out = append(out, exe)
	}
	return out
}

func kubeChains() ([]string, error) {
	var out []string
	for _, fam := range []string{"iptables", "ip6tables"} {
		data, err := exec.Command(fam + "-save").Output()
		if err != nil {
			return nil, fmt.Errorf("%s-save: %w", fam, err)
		}
		table := ""
		for line := range strings.SplitSeq(string(data), "\n") {
			switch {
			case strings.HasPrefix(line, "*"):
				table = line[1:]
			case strings.HasPrefix(line, ":"):
				chain, _, _ := strings.Cut(line[1:], " ")
				if isNodeChain(chain) {
					out = append(out, fam+" "+table+" "+chain)
				}
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

func isNodeChain(c string) bool { return strings.HasPrefix(c, "KUBE-") || strings.HasPrefix(c, "CNI-") }

func nftTables() []string {
	data, err := exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil
	}
	var out []string
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "table "); ok {
			out = append(out, rest)
		}
	}
	sort.Strings(out)
	return out
}

func nodeMounts() (mounts []string, bpffs, bpffsShared bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, false, false
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		mp, fstype, ok := mountOf(sc.Text())
		if !ok {
			continue
		}
		if mp == "/sys/fs/bpf" && fstype == "bpf" {
			bpffs = true
			bpffsShared = strings.Contains(sc.Text(), " shared:")
			continue
		}
		if fstype == "overlay" || fstype == "nsfs" || strings.Contains(mp, "/mkrn-") ||
			strings.HasPrefix(mp, "/var/lib/kubelet") || strings.HasPrefix(mp, "/run/containerd") ||
			strings.HasPrefix(mp, "/var/run/netns/cni-") || strings.HasPrefix(mp, "/run/netns/cni-") {
			out = append(out, fstype+" "+mp)
		}
	}
	sort.Strings(out)
	return out, bpffs, bpffsShared
}

// mountOf parses a mountinfo line: mount point and file system type.
func mountOf(line string) (mp, fstype string, ok bool) {
	f := strings.Fields(line)
	if len(f) < 10 {
		return "", "", false
	}
	for i := 6; i < len(f); i++ {
		if f[i] == "-" && i+1 < len(f) {
			return unescapeMount(f[4]), f[i+1], true
		}
	}
	return "", "", false
}

func unescapeMount(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

func nodeLinks() []string {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var out []string
	for _, i := range ifs {
		if strings.HasPrefix(i.Name, "mkbr") {
			out = append(out, i.Name)
		}
	}
	if data, err := exec.Command("ip", "-o", "link", "show", "master", RealNodeBridge).Output(); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) > 1 {
				name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
				out = append(out, name)
			}
		}
	}
	sort.Strings(out)
	return out
}

// nodeProcesses: processes running a node binary (from binDir if set, else
// any binary named like one), runc, or living in a kubepods cgroup.
func nodeProcesses(binDir string) []string {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	names := append(slices.Clone(NodeBinaries), "runc")
	var out []string
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		exe, _ := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		cg, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		mine := strings.Contains(string(cg), "/kubepods")
		if exe != "" {
			if binDir != "" {
				mine = mine || strings.HasPrefix(exe, binDir+"/") || filepath.Base(exe) == "runc"
			} else {
				mine = mine || slices.Contains(names, filepath.Base(exe))
			}
		}
		if mine {
			out = append(out, fmt.Sprintf("%d %s", pid, exe))
		}
	}
	sort.Strings(out)
	return out
}

func kubepodsCgroups() []string {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	more, _ := filepath.Glob("/sys/fs/cgroup/kubepods")
	out := append(dirs, more...)
	sort.Strings(out)
	return out
}

func conntrackCount() int {
	n := 0
	for _, cidr := range []string{RealNodePodCIDR, ServiceCIDR} {
		for _, dir := range []string{"-s", "-d"} {
			out, _ := exec.Command("conntrack", "-L", dir, cidr).Output()
			for line := range strings.SplitSeq(string(out), "\n") {
				if strings.TrimSpace(line) != "" {
					n++
				}
			}
		}
	}
	return n
}

// conntrackActive makes a loopback TCP connection and asks the accepted
// socket for SO_ORIGINAL_DST: only conntrack answers that for a connection
// no one redirected.
func conntrackActive() bool {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return false
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		return false
	}
	defer c.Close()
	a, err := ln.Accept()
	if err != nil {
		return false
	}
	defer a.Close()
	rc, err := a.(*net.TCPConn).SyscallConn()
	if err != nil {
		return false
	}
	var ok bool
	_ = rc.Control(func(fd uintptr) {
		var sa syscall.RawSockaddrInet4
		size := uint32(unsafe.Sizeof(sa))
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.SOL_IP, 80, // SO_ORIGINAL_DST
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
		ok = errno == 0
	})
	return ok
}

// ensureBPFFS mounts bpffs at /sys/fs/bpf when it is not (the node agent's
// pins live there; on this machine nothing mounts it at boot).
// It makes the mount shared, as systemd does on real nodes: the chart's
// HostToContainer propagation needs a shared or slave host mount (containerd
// refuses "is mounted on /sys/fs/bpf but it is not a shared or slave mount").
func ensureBPFFS(before *HostSnapshot) error {
	if !before.BPFFS {
		if err := syscall.Mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("cluster: mount bpffs at /sys/fs/bpf: %w", err)
		}
	}
	if !before.BPFFSShared {
		if err := syscall.Mount("", "/sys/fs/bpf", "", syscall.MS_SHARED, ""); err != nil {
			return fmt.Errorf("cluster: make /sys/fs/bpf a shared mount: %w", err)
		}
	}
	return nil
}

// removeContainers deletes every container of the node's runc root, killing
// its processes; the shims then exit.
func removeContainers(dir string) error {
	root := filepath.Join(dir, "runc")
	var errs []error
	nsDirs, _ := os.ReadDir(root)
	for _, ns := range nsDirs {
		nsRoot := filepath.Join(root, ns.Name())
		out, err := exec.Command("runc", "--root", nsRoot, "list", "-q").Output()
		if err != nil {
			continue
		}
		for id := range strings.FieldsSeq(string(out)) {
			if out, err := exec.Command("runc", "--root", nsRoot, "delete", "--force", id).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("runc delete %s: %w: %s", id, err, strings.TrimSpace(string(out))))
			}
		}
	}
	return errors.Join(errs...)
}

// cleanupRealNode leaves the machine as before says it was (nil: read from
// dir/before.json, for a run that died). Every step runs even if one fails.
func cleanupRealNode(dir, binDir string, before *HostSnapshot) error {
	var errs []error
	if before == nil {
		before = &HostSnapshot{BPFFS: true}
		if data, err := os.ReadFile(filepath.Join(dir, "before.json")); err == nil {
			_ = json.Unmarshal(data, before)
		}
	}
	if err := removeContainers(dir); err != nil {
		errs = append(errs, err)
	}
	if err := killNodeProcesses(binDir); err != nil {
		errs = append(errs, err)
	}
	// Mounts under the state dir (pod volumes, rootfs, netns bind mounts),
	// deepest first.
	if err := unmountUnder(dir); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	// The bridge and anything still attached to it.
	for _, l := range nodeLinks() {
		if !slices.Contains(before.Links, l) && l != RealNodeBridge {
			_ = exec.Command("ip", "link", "del", l).Run()
		}
	}
	if _, err := net.InterfaceByName(RealNodeBridge); err == nil && !slices.Contains(before.Links, RealNodeBridge) {
		if err := run(context.Background(), "ip", "link", "del", RealNodeBridge); err != nil {
			errs = append(errs, err)
		}
	}
	if err := removeChains(before.Chains); err != nil {
		errs = append(errs, err)
	}
	removeEmptyTables(before.Tables)
	for _, cidr := range []string{RealNodePodCIDR, ServiceCIDR} {
		for _, d := range []string{"-s", "-d"} {
			_ = exec.Command("conntrack", "-D", d, cidr).Run()
		}
	}
	for _, cg := range kubepodsCgroups() {
		if !slices.Contains(before.Cgroups, cg) {
			if err := removeCgroupTree(cg); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for k, v := range before.Sysctls {
		cur, err := os.ReadFile("/proc/sys/" + k)
		if err == nil && strings.TrimSpace(string(cur)) != v {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
				errs = append(errs, fmt.Errorf("restore sysctl %s=%s: %w", k, v, err))
			}
		}
	}
	for _, p := range hostPaths {
		if slices.Contains(before.Paths, p) {
			continue
		}
		if p == "/sys/fs/bpf/meshkeeper" {
			// Pins: only a bpffs directory, removed file by file.
			_ = os.RemoveAll(p)
			continue
		}
		_ = unmountUnder(p)
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	if _, bpffs, shared := nodeMounts(); before.BPFFS && bpffs && shared && !before.BPFFSShared {
		if err := syscall.Mount("", "/sys/fs/bpf", "", syscall.MS_PRIVATE, ""); err != nil {
			errs = append(errs, fmt.Errorf("make /sys/fs/bpf private again: %w", err))
		}
	}
	if !before.BPFFS {
		if _, bpffs, _ := nodeMounts(); bpffs {
			// Nothing but the kernel's preloaded iterators: nobody else uses it.
			entries, _ := os.ReadDir("/sys/fs/bpf")
			entries = slices.DeleteFunc(entries, func(e os.DirEntry) bool {
				return e.Name() == "maps.debug" || e.Name() == "progs.debug"
			})
			if len(entries) == 0 {
				if err := syscall.Unmount("/sys/fs/bpf", 0); err != nil {
					errs = append(errs, fmt.Errorf("unmount bpffs: %w", err))
				}
			}
		}
	}
	if err := os.Remove(realNodeStatePath); err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("cluster: real node cleanup: %w", errors.Join(errs...))
	}
	return nil
}

// killNodeProcesses SIGKILLs node binaries, shims and whatever still lives
// in a pod cgroup, until none is left.
func killNodeProcesses(binDir string) error {
	for range 50 {
		procs := nodeProcesses(binDir)
		if len(procs) == 0 {
			return nil
		}
		for _, p := range procs {
			pidStr, _, _ := strings.Cut(p, " ")
			pid, _ := strconv.Atoi(pidStr)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if procs := nodeProcesses(binDir); len(procs) > 0 {
		return fmt.Errorf("processes survived SIGKILL: %v", procs)
	}
	return nil
}

func unmountUnder(dir string) error {
	var errs []error
	for range 5 {
		f, err := os.Open("/proc/self/mountinfo")
		if err != nil {
			return err
		}
		var mps []string
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if mp, _, ok := mountOf(sc.Text()); ok && (mp == dir || strings.HasPrefix(mp, dir+"/")) {
				mps = append(mps, mp)
			}
		}
		f.Close()
		if len(mps) == 0 {
			return nil
		}
		sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
		errs = errs[:0]
		for _, mp := range mps {
			if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeChains deletes the KUBE-* and CNI-* chains that were not there
// before, and every rule that jumps to them, in one iptables-restore per
// family.
func removeChains(before []string) error {
	var errs []error
	for _, fam := range []string{"iptables", "ip6tables"} {
		data, err := exec.Command(fam + "-save").Output()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var script strings.Builder
		type tableState struct {
			name   string
			ours   []string
			rules  []string
			chains []string
		}
		var tables []*tableState
		var cur *tableState
		for line := range strings.SplitSeq(string(data), "\n") {
			switch {
			case strings.HasPrefix(line, "*"):
				cur = &tableState{name: line[1:]}
				tables = append(tables, cur)
			case cur == nil:
			case strings.HasPrefix(line, ":"):
				chain, _, _ := strings.Cut(line[1:], " ")
				cur.chains = append(cur.chains, chain)
				if isNodeChain(chain) && !slices.Contains(before, fam+" "+cur.name+" "+chain) {
					cur.ours = append(cur.ours, chain)
				}
			case strings.HasPrefix(line, "-A "):
				cur.rules = append(cur.rules, line)
			}
		}
		for _, t := range tables {
			if len(t.ours) == 0 {
				continue
			}
			fmt.Fprintf(&script, "*%s\n", t.name)
			for _, r := range t.rules {
				f := strings.Fields(r)
				chain := f[1]
				if slices.Contains(t.ours, chain) {
					continue // flushed below
				}
				for i, w := range f {
					if (w == "-j" || w == "-g") && i+1 < len(f) && slices.Contains(t.ours, f[i+1]) {
						fmt.Fprintf(&script, "-D %s\n", strings.TrimPrefix(r, "-A "))
						break
					}
				}
			}
			for _, c := range t.ours {
				fmt.Fprintf(&script, "-F %s\n", c)
			}
			for _, c := range t.ours {
				fmt.Fprintf(&script, "-X %s\n", c)
			}
			script.WriteString("COMMIT\n")
		}
		if script.Len() == 0 {
			continue
		}
		cmd := exec.Command(fam+"-restore", "--noflush")
		cmd.Stdin = strings.NewReader(script.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("%s-restore: %w: %s\n%s", fam, err, strings.TrimSpace(string(out)), script.String()))
		}
	}
	return errors.Join(errs...)
}

// removeEmptyTables deletes nftables tables that appeared (iptables-nft
// creates "ip nat" and "ip filter" for the kubelet's and kube-proxy's rules;
// a nat table alone keeps conntrack on) once they hold no rule any more.
func removeEmptyTables(before []string) {
	for _, t := range nftTables() {
		if slices.Contains(before, t) {
			continue
		}
		fam, name, _ := strings.Cut(t, " ")
		out, err := exec.Command("nft", "list", "table", fam, name).Output()
		if err != nil {
			continue
		}
		if hasNftRules(string(out)) && name != "kube-proxy" {
			continue
		}
		_ = exec.Command("nft", "delete", "table", fam, name).Run()
	}
}

// hasNftRules: any line of a `nft list table` that is not a table, chain,
// base-chain declaration, brace or comment.
func hasNftRules(listing string) bool {
	for line := range strings.SplitSeq(listing, "\n") {
		l := strings.TrimSpace(line)
		switch {
		case l == "", l == "}", strings.HasPrefix(l, "table "), strings.HasPrefix(l, "chain "),
			strings.HasPrefix(l, "type "), strings.HasPrefix(l, "#"), strings.HasPrefix(l, "comment "):
		default:
			return true
		}
	}
	return false
}

func removeCgroupTree(dir string) error {
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	var errs []error
	for _, d := range dirs {
		var err error
		for range 20 {
			if err = syscall.Rmdir(d); err == nil || errors.Is(err, syscall.ENOENT) {
				err = nil
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("rmdir %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}
