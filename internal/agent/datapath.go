package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	mkbpf "github.com/meshkeeper/meshkeeper/bpf"
)

// DefaultPinPath is where the agent pins its maps, programs and links.
const DefaultPinPath = "/sys/fs/bpf/meshkeeper"

// DefaultBypassMark is the SO_MARK of the node proxy's own sockets, which
// are never redirected: upstream ztunnel in in-pod mode marks every socket it
// opens in a pod's netns with 0x539 (1337), and istio-cni's in-pod iptables
// rules match the same mark.
const DefaultBypassMark = 0x539

// DefaultDNSPort is where ztunnel's DNS proxy listens in each pod's netns.
const DefaultDNSPort = 15053

// attachment is one program of the datapath and its cgroup hook.
type attachment struct {
	prog   string // program name in the object, also the pin name
	attach ebpf.AttachType
}

var attachments = []attachment{
	{mkbpf.RedirectProgMkConnect4, ebpf.AttachCGroupInet4Connect},
	{mkbpf.RedirectProgMkConnect6, ebpf.AttachCGroupInet6Connect},
	{mkbpf.RedirectProgMkSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
	{mkbpf.RedirectProgMkSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	{mkbpf.RedirectProgMkRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	{mkbpf.RedirectProgMkRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
	{mkbpf.RedirectProgMkGetpeername4, ebpf.AttachCgroupInet4GetPeername},
	{mkbpf.RedirectProgMkGetpeername6, ebpf.AttachCgroupInet6GetPeername},
	{mkbpf.RedirectProgMkGetsockopt, ebpf.AttachCGroupGetsockopt},
	{mkbpf.RedirectProgMkSockops, ebpf.AttachCGroupSockOps},
}

// DatapathConfig says where and how to install the datapath.
type DatapathConfig struct {
	// PinPath is the bpffs directory that holds maps/, progs/ and links/.
	PinPath string
	// CgroupPath is the cgroup v2 directory the programs attach to: the
	// root of the cgroup2 hierarchy found by preflight.
	CgroupPath string
	// CaptureAddr is the node proxy's capture address inside each enrolled
	// pod's network namespace, e.g. 127.0.0.1:15001.
	CaptureAddr netip.AddrPort
	// CaptureAddr6 is where native IPv6 connects go: [::1] and CaptureAddr's
	// port when unset.
	CaptureAddr6 netip.AddrPort
	// DNSPort, when not 0, captures DNS (UDP, and TCP to port 53) from
	// enrolled pods to this port on the capture addresses: ztunnel's DNS
	// proxy (15053), for bundles that enable it. 0 leaves DNS alone.
	DNSPort uint16
	// BypassMark is the SO_MARK of sockets that are never redirected (the
	// proxy's own sockets). It must not be 0: every socket has mark 0.
	BypassMark uint32
	// ForceReplace replaces attached programs even when the running ones
	// are identical (same kernel tag).
	ForceReplace bool
}

// LinkAction is what loading did with one program's link.
type LinkAction string

const (
	LinkAttached LinkAction = "attached" // no pinned link existed: attached and pinned
	LinkAdopted  LinkAction = "adopted"  // pinned link kept, its program is identical
	LinkUpdated  LinkAction = "updated"  // pinned link kept, program replaced atomically
	LinkReplaced LinkAction = "replaced" // pinned link pointed elsewhere: new link first, then the old one removed
)

// Subdirectories of the pin path.
const (
	mapPinnedName  = "maps"
	progPinnedName = "progs"
	linkPinnedName = "links"
)

// LoadReport says what LoadDatapath found and did.
type LoadReport struct {
	// AdoptedMaps are the maps that were already pinned and were reused.
	AdoptedMaps []string
	// Links maps each program name to what happened to its link.
	Links map[string]LinkAction
	// InboundLinks maps the pinned sk_lookup link of each captured pod
	// netns (mk_sk_lookup-<netns cookie>) to what happened to it; links of
	// namespaces that are gone are removed and not listed.
	InboundLinks map[string]LinkAction
}

// Datapath is the loaded eBPF datapath. Close releases this process's
// handles and leaves everything pinned and attached; Uninstall removes it.
type Datapath struct {
	cfg   DatapathConfig
	objs  mkbpf.RedirectObjects
	links map[string]link.Link
}

// LoadDatapath loads the programs, adopts or creates the pinned maps, and
// attaches each program at cfg.CgroupPath through a pinned bpf_link. A link
// that is already pinned is kept: its program is swapped atomically with
// link.Update when it differs, so redirection never has a gap.
func LoadDatapath(cfg DatapathConfig) (*Datapath, LoadReport, error) {
	report := LoadReport{Links: map[string]LinkAction{}, InboundLinks: map[string]LinkAction{}}
	if cfg.PinPath == "" {
		cfg.PinPath = DefaultPinPath
	}
	if cfg.CgroupPath == "" {
		return nil, report, errors.New("load datapath: no cgroup v2 path (preflight found none)")
	}
	if !cfg.CaptureAddr.Addr().Is4() || cfg.CaptureAddr.Port() == 0 {
		return nil, report, fmt.Errorf("load datapath: capture address %s: want an IPv4 address and a port", cfg.CaptureAddr)
	}
	if !cfg.CaptureAddr6.IsValid() {
		cfg.CaptureAddr6 = netip.AddrPortFrom(netip.IPv6Loopback(), cfg.CaptureAddr.Port())
	}
	if !cfg.CaptureAddr6.Addr().Is6() || cfg.CaptureAddr6.Addr().Is4In6() || cfg.CaptureAddr6.Port() != cfg.CaptureAddr.Port() {
		return nil, report, fmt.Errorf("load datapath: IPv6 capture address %s: want an IPv6 address with the IPv4 capture port %d", cfg.CaptureAddr6, cfg.CaptureAddr.Port())
	}
	if err := CheckBypassMark(cfg.BypassMark); err != nil {
		return nil, report, fmt.Errorf("load datapath: %w", err)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, report, fmt.Errorf("load datapath: remove memlock rlimit: %w", err)
	}
	if err := EnsureBPFFS(filepath.Dir(cfg.PinPath)); err != nil {
		return nil, report, err
	}
	for _, dir := range []string{cfg.PinPath, filepath.Join(cfg.PinPath, mapPinnedName), filepath.Join(cfg.PinPath, progPinnedName), filepath.Join(cfg.PinPath, linkPinnedName)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, report, fmt.Errorf("load datapath: %w", err)
		}
	}

	spec, err := mkbpf.LoadRedirect()
	if err != nil {
		return nil, report, fmt.Errorf("load datapath: %w", err)
	}
	mapDir := filepath.Join(cfg.PinPath, mapPinnedName)
	for name := range spec.Maps {
		if _, err := os.Stat(filepath.Join(mapDir, name)); err == nil {
			report.AdoptedMaps = append(report.AdoptedMaps, name)
		}
	}
	d := &Datapath{cfg: cfg, links: map[string]link.Link{}}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: mapDir}})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, report, fmt.Errorf("load datapath: verifier rejected a program: %+v", verr)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, report, fmt.Errorf("load datapath: a pinned map under %s has another layout than this agent's (%w); maps change names when their layout changes, so this is a downgrade or a corrupt pin: run `agent uninstall` and start the agent again", mapDir, err)
		}
		return nil, report, fmt.Errorf("load datapath: %w", err)
	}
	if err := d.writeConfig(); err != nil {
		d.Close()
		return nil, report, err
	}
	for _, a := range attachments {
		action, err := d.attach(a)
		if err != nil {
			d.Close()
			return nil, report, fmt.Errorf("load datapath: %s: %w", a.prog, err)
		}
		report.Links[a.prog] = action
	}
	// The inbound links of enrolled pods (pinned per netns) take this
	// agent's sk_lookup program too.
	if err := d.adoptInboundLinks(report.InboundLinks); err != nil {
		d.Close()
		return nil, report, fmt.Errorf("load datapath: %w", err)
	}
	return d, report, nil
}

func (d *Datapath) program(name string) *ebpf.Program {
	return d.programs()[name]
}

func (d *Datapath) programs() map[string]*ebpf.Program {
	o := &d.objs
	return map[string]*ebpf.Program{
		mkbpf.RedirectProgMkConnect4:     o.MkConnect4,
		mkbpf.RedirectProgMkConnect6:     o.MkConnect6,
		mkbpf.RedirectProgMkSendmsg4:     o.MkSendmsg4,
		mkbpf.RedirectProgMkSendmsg6:     o.MkSendmsg6,
		mkbpf.RedirectProgMkRecvmsg4:     o.MkRecvmsg4,
		mkbpf.RedirectProgMkRecvmsg6:     o.MkRecvmsg6,
		mkbpf.RedirectProgMkGetpeername4: o.MkGetpeername4,
		mkbpf.RedirectProgMkGetpeername6: o.MkGetpeername6,
		mkbpf.RedirectProgMkGetsockopt:   o.MkGetsockopt,
		mkbpf.RedirectProgMkSockops:      o.MkSockops,
		mkbpf.RedirectProgMkSkLookup:     o.MkSkLookup,
	}
}

// CheckBypassMark refuses a bypass mark of 0: every socket that sets no
// mark has mark 0, so it would exempt every pod's traffic from the mesh.
func CheckBypassMark(mark uint32) error {
	if mark == 0 {
		return fmt.Errorf("bypass mark 0 would exempt every unmarked socket from redirection; use the proxy's real SO_MARK (ztunnel: 0x%x = %d, the default)", DefaultBypassMark, DefaultBypassMark)
	}
	return nil
}

func (d *Datapath) writeConfig() error {
	ip := d.cfg.CaptureAddr.Addr().As4()
	cfg := mkbpf.RedirectConfig{
		// Network byte order in memory: the bytes as they are on the wire.
		ProxyIp4:   binary.NativeEndian.Uint32(ip[:]),
		ProxyIp6:   ip6Words(d.cfg.CaptureAddr6.Addr()),
		ProxyPort:  htons(d.cfg.CaptureAddr.Port()),
		DnsPort:    htons(d.cfg.DNSPort),
		BypassMark: d.cfg.BypassMark,
	}
	if err := d.objs.MkConfigV2.Put(uint32(0), &cfg); err != nil {
		return fmt.Errorf("load datapath: write config: %w", err)
	}
	return nil
}

// attach makes sure the program's pinned link exists at the cgroup and runs
// this agent's program.
func (d *Datapath) attach(a attachment) (LinkAction, error) {
	prog := d.program(a.prog)
	linkPin := filepath.Join(d.cfg.PinPath, linkPinnedName, a.prog)
	progPin := filepath.Join(d.cfg.PinPath, progPinnedName, a.prog)
	cgroupID, err := cgroupID(d.cfg.CgroupPath)
	if err != nil {
		return "", err
	}

	old, err := link.LoadPinnedLink(linkPin, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
		old = nil
	case err != nil:
		return "", fmt.Errorf("load pinned link %s: %w", linkPin, err)
	}
	if old != nil {
		info, err := old.Info()
		if err != nil {
			old.Close()
			return "", fmt.Errorf("pinned link %s: %w", linkPin, err)
		}
		if cg := info.Cgroup(); cg != nil && cg.CgroupId == cgroupID && uint32(cg.AttachType) == uint32(a.attach) {
			same, err := sameProgram(info.Program, prog)
			if err != nil {
				old.Close()
				return "", err
			}
			action := LinkAdopted
			if !same || d.cfg.ForceReplace {
				if err := old.Update(prog); err != nil {
					old.Close()
					return "", fmt.Errorf("replace program of pinned link %s: %w", linkPin, err)
				}
				action = LinkUpdated
			}
			if err := repin(prog, progPin, action == LinkUpdated); err != nil {
				old.Close()
				return "", err
			}
			d.links[a.prog] = old
			return action, nil
		}
		// Pinned at another cgroup or hook: attach the new link first, then
		// drop the old one, so the hook is never empty.
		defer func() {
			_ = old.Unpin()
			_ = old.Close()
		}()
	}

	l, err := link.AttachCgroup(link.CgroupOptions{Path: d.cfg.CgroupPath, Attach: a.attach, Program: prog})
	if err != nil {
		return "", fmt.Errorf("attach to cgroup %s: %w", d.cfg.CgroupPath, err)
	}
	if old != nil {
		// Free the pin name of the old link (it stays attached until the
		// deferred close above, after the new link is in place).
		if err := old.Unpin(); err != nil {
			l.Close()
			return "", fmt.Errorf("unpin stale link %s: %w", linkPin, err)
		}
	}
	if err := l.Pin(linkPin); err != nil {
		// Without bpf_link support the program would detach when the agent
		// exits: refuse instead of leaving a half-working datapath.
		l.Close()
		return "", fmt.Errorf("pin link %s (needs bpf_link for cgroup programs, kernel >= 5.7): %w", linkPin, err)
	}
	if err := repin(prog, progPin, true); err != nil {
		return "", err
	}
	d.links[a.prog] = l
	if old != nil {
		return LinkReplaced, nil
	}
	return LinkAttached, nil
}

// sameProgram reports whether the attached program with id has the same
// kernel tag (a hash of its instructions, map references excluded) as prog.
func sameProgram(id ebpf.ProgramID, prog *ebpf.Program) (bool, error) {
	running, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false, fmt.Errorf("open attached program %d: %w", id, err)
	}
	defer running.Close()
	ri, err := running.Info()
	if err != nil {
		return false, err
	}
	ni, err := prog.Info()
	if err != nil {
		return false, err
	}
	return ri.Tag == ni.Tag && ri.Type == ni.Type, nil
}

// repin pins prog at path, replacing what is there when replace is set or
// nothing is pinned yet.
func repin(prog *ebpf.Program, path string, replace bool) error {
	if _, err := os.Stat(path); err == nil {
		if !replace {
			return nil
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("unpin %s: %w", path, err)
		}
	}
	if err := prog.Pin(path); err != nil {
		return fmt.Errorf("pin program %s: %w", path, err)
	}
	// Pin records the path on the Go object; forget it so that Close never
	// touches the pin.
	return nil
}

// ProgramIDs returns the kernel IDs of this datapath's programs.
func (d *Datapath) ProgramIDs() map[string]ebpf.ProgramID {
	ids := map[string]ebpf.ProgramID{}
	for _, a := range attachments {
		if info, err := d.links[a.prog].Info(); err == nil {
			ids[a.prog] = info.Program
		}
	}
	return ids
}

// Maps returns the datapath's maps by name.
func (d *Datapath) Maps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		mkbpf.RedirectMapEnrolled:         d.objs.Enrolled,
		mkbpf.RedirectMapMkConfigV2:       d.objs.MkConfigV2,
		mkbpf.RedirectMapSocksV2:          d.objs.SocksV2,
		mkbpf.RedirectMapProxyConnsV2:     d.objs.ProxyConnsV2,
		mkbpf.RedirectMapDnsSocks:         d.objs.DnsSocks,
		mkbpf.RedirectMapInboundAddrs:     d.objs.InboundAddrs,
		mkbpf.RedirectMapInboundListeners: d.objs.InboundListeners,
		mkbpf.RedirectMapBypassConns:      d.objs.BypassConns,
		mkbpf.RedirectMapInboundBypassSrc: d.objs.InboundBypassSrc,
	}
}

// Close releases this process's handles. Everything stays pinned and
// attached: this is what an agent does on SIGTERM or before an upgrade.
func (d *Datapath) Close() error {
	var errs []error
	for _, l := range d.links {
		errs = append(errs, l.Close())
	}
	d.links = map[string]link.Link{}
	errs = append(errs, d.objs.Close())
	return errors.Join(errs...)
}

// Uninstall detaches every link pinned under pinPath and removes every pin.
// It is idempotent: a missing pin path is success.
func Uninstall(pinPath string) error {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	if _, err := os.Stat(pinPath); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	linkDir := filepath.Join(pinPath, linkPinnedName)
	entries, err := os.ReadDir(linkDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, e := range entries {
		path := filepath.Join(linkDir, e.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", path, err))
			continue
		}
		// Detach even if another process (a running agent) still holds the
		// link; closing our handle alone would leave it attached.
		if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", path, err))
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", path, err))
		}
		l.Close()
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// Programs and maps: removing the pins drops the last references.
	if err := os.RemoveAll(pinPath); err != nil {
		return fmt.Errorf("remove %s: %w", pinPath, err)
	}
	return nil
}

// EnsureBPFFS mounts a bpf filesystem at dir (normally /sys/fs/bpf) unless
// one is there already.
func EnsureBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	return nil
}

// cgroupID is the kernel's ID of a cgroup v2 directory: its inode number.
func cgroupID(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

func ntohs(v uint16) uint16 { return htons(v) }
