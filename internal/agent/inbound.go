package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	mkbpf "github.com/meshkeeper/meshkeeper/bpf"
)

// Inbound capture (see bpf/README.md, "Inbound"): an sk_lookup program
// attached to an enrolled pod's network namespace hands every TCP SYN for one
// of the pod's addresses, arriving on an interface other than loopback and
// for a port other than the proxy's own (15001, 15006, 15008, 15020, 15021,
// 15053), to the proxy's inbound listener in that namespace (ztunnel's 15006).
// HBONE (15008) reaches ztunnel's HBONE listener by the normal lookup.
//
// The listener is ztunnel's own socket, which the agent never holds: the
// sockops program puts it in inbound_listeners as it starts listening (see
// CaptureInboundNetns). The enroller calls CaptureInboundNetns when it
// redirects a pod that it hands to ztunnel; UnenrollNetns releases it
// (ReleaseInbound). Everything is pinned: an agent restart keeps capturing,
// `agent uninstall` removes it.

// ErrNoInboundAddr: a namespace with only loopback and link-local
// addresses has nothing inbound capture could apply to.
var ErrNoInboundAddr = errors.New("the namespace has no address to capture (only loopback or link-local)")

// inboundLinkPrefix names the pinned sk_lookup link of one netns:
// links/mk_sk_lookup-<netns cookie>.
const inboundLinkPrefix = mkbpf.RedirectProgMkSkLookup + "-"

func (d *Datapath) inboundLinkPin(cookie uint64) string {
	return filepath.Join(d.cfg.PinPath, linkPinnedName, inboundLinkPrefix+strconv.FormatUint(cookie, 10))
}

// CaptureInbound captures the inbound TCP of the network namespace netns
// (whose cookie is cookie, as enrolled with EnrollNetns) to listener, a
// listening TCP socket inside that namespace, and is CaptureInboundNetns
// otherwise. The live agent never has the listener (ztunnel opens it in
// the pod's netns, in a process the agent cannot reach): there the kernel
// puts it in the map as it starts listening (see CaptureInboundNetns); this
// is for a proxy that hands its listener over, and for tests. The datapath
// keeps no reference to the file: close it after the call, so that the
// listener goes out of the capture map when its owner closes it.
func (d *Datapath) CaptureInbound(cookie uint64, netns *os.File, listener *os.File) error {
	if err := checkListener(listener); err != nil {
		return fmt.Errorf("capture inbound of netns %d: %w", cookie, err)
	}
	got, addrs, err := netnsAddrs(netns)
	if err != nil {
		return fmt.Errorf("capture inbound of netns %d: %w", cookie, err)
	}
	if got != cookie {
		return fmt.Errorf("capture inbound: the namespace file has netns cookie %d, not %d", got, cookie)
	}
	if err := withFd(listener, func(fd int) error {
		return d.objs.InboundListeners.Update(cookie, uint64(fd), ebpf.UpdateAny)
	}); err != nil {
		return fmt.Errorf("capture inbound of netns %d: put listener in %s: %w", cookie, mkbpf.RedirectMapInboundListeners, err)
	}
	return d.captureAddrs(cookie, netns, addrs)
}

// CaptureInboundNetns captures the inbound TCP of the network namespace
// netns (whose cookie is cookie, as enrolled with EnrollNetns) to the
// proxy's inbound listener there, whenever it has one: mk_sockops puts every
// TCP socket that starts listening on port 15006 with the proxy's mark into
// inbound_listeners under its netns cookie (ztunnel marks every socket it
// opens in a pod, its listeners too), and the kernel removes it when it
// closes. So a ztunnel that listens before this call (as it does once it
// acked the hand-off) or after it (a restarted one, taking the pod from its
// snapshot) is found alike; until it listens, inbound connections are
// refused (RST), never delivered around it. Addresses are the namespace's
// non-loopback, non-link-local addresses as they are now. Calling it again
// (new addresses) replaces what was captured.
func (d *Datapath) CaptureInboundNetns(cookie uint64, netns *os.File) error {
	got, addrs, err := netnsAddrs(netns)
	if err != nil {
		return fmt.Errorf("capture inbound of netns %d: %w", cookie, err)
	}
	if got != cookie {
		return fmt.Errorf("capture inbound: the namespace file has netns cookie %d, not %d", got, cookie)
	}
	return d.captureAddrs(cookie, netns, addrs)
}

// InboundListener tells whether the namespace's inbound listener is in the
// capture map.
func (d *Datapath) InboundListener(cookie uint64) (bool, error) {
	// A SOCKHASH lookup from user space answers the socket's cookie.
	var sockCookie uint64
	err := d.objs.InboundListeners.Lookup(cookie, &sockCookie)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ebpf.ErrKeyNotExist):
		return false, nil
	default:
		return false, fmt.Errorf("read %s: %w", mkbpf.RedirectMapInboundListeners, err)
	}
}

// InboundLinked tells whether the namespace's inbound is captured (its
// sk_lookup link is pinned).
func (d *Datapath) InboundLinked(cookie uint64) bool {
	_, err := os.Stat(d.inboundLinkPin(cookie))
	return err == nil
}

// captureAddrs records the namespace's addresses and attaches its link.
func (d *Datapath) captureAddrs(cookie uint64, netns *os.File, addrs []netip.Addr) error {
	if len(addrs) == 0 {
		return fmt.Errorf("capture inbound of netns %d: %w", cookie, ErrNoInboundAddr)
	}
	owners, err := d.inboundAddrs()
	if err != nil {
		return err
	}
	keys := map[mkbpf.RedirectPodAddr]bool{}
	for _, a := range addrs {
		k := podAddrKey(a)
		if other, ok := owners[k]; ok && other != cookie && d.netnsEnrolled(other) {
			return fmt.Errorf("capture inbound of netns %d: address %s is captured for netns %d already: two enrolled pods on one node with the same address", cookie, a, other)
		}
		keys[k] = true
	}
	for k := range keys {
		if err := d.objs.InboundAddrs.Update(k, cookie, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("capture inbound of netns %d: %w", cookie, err)
		}
	}
	// Addresses the namespace had at an earlier capture and lost.
	for k, owner := range owners {
		if owner == cookie && !keys[k] {
			_ = d.objs.InboundAddrs.Delete(k)
		}
	}
	if _, err := d.attachInbound(cookie, netns); err != nil {
		return fmt.Errorf("capture inbound of netns %d: %w", cookie, err)
	}
	return nil
}

// ReleaseInbound stops capturing the inbound TCP of a namespace: its link
// is detached and unpinned, its addresses and listener leave the maps. It
// is idempotent.
func (d *Datapath) ReleaseInbound(cookie uint64) error {
	var errs []error
	pin := d.inboundLinkPin(cookie)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
		}
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("load pinned link %s: %w", pin, err))
	}
	owners, err := d.inboundAddrs()
	if err != nil {
		errs = append(errs, err)
	}
	for k, owner := range owners {
		if owner == cookie {
			if err := d.objs.InboundAddrs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if err := d.objs.InboundListeners.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("release inbound of netns %d: %w", cookie, err))
	}
	return errors.Join(errs...)
}

// InboundCaptured lists the netns cookies whose inbound is captured (a
// pinned sk_lookup link exists).
func (d *Datapath) InboundCaptured() ([]uint64, error) {
	entries, err := os.ReadDir(filepath.Join(d.cfg.PinPath, linkPinnedName))
	if err != nil {
		return nil, err
	}
	var out []uint64
	for _, e := range entries {
		if c, ok := strings.CutPrefix(e.Name(), inboundLinkPrefix); ok {
			if v, err := strconv.ParseUint(c, 10, 64); err == nil {
				out = append(out, v)
			}
		}
	}
	return out, nil
}

// attachInbound makes sure the netns has a pinned sk_lookup link running
// this agent's program.
func (d *Datapath) attachInbound(cookie uint64, netns *os.File) (LinkAction, error) {
	prog := d.objs.MkSkLookup
	pin := d.inboundLinkPin(cookie)
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return "", fmt.Errorf("load pinned link %s: %w", pin, err)
	default:
		defer old.Close()
		info, err := old.Info()
		if err != nil {
			return "", fmt.Errorf("pinned link %s: %w", pin, err)
		}
		if ns := info.NetNs(); ns != nil && ns.NetnsInode != 0 {
			same, err := sameProgram(info.Program, prog)
			if err != nil {
				return "", err
			}
			if same {
				return LinkAdopted, nil
			}
			if err := old.Update(prog); err != nil {
				return "", fmt.Errorf("replace program of pinned link %s: %w", pin, err)
			}
			return LinkUpdated, nil
		}
		// The namespace the link was attached to is gone (a cookie is
		// never reused, so this is a stale pin): replace it.
		_ = old.Unpin()
	}
	l, err := link.AttachNetNs(int(netns.Fd()), prog)
	if err != nil {
		return "", fmt.Errorf("attach sk_lookup to the netns (kernel >= 5.9): %w", err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return "", fmt.Errorf("pin link %s: %w", pin, err)
	}
	l.Close()
	return LinkAttached, nil
}

// adoptInboundLinks gives every pinned inbound link this agent's program and
// removes those whose namespace is gone.
func (d *Datapath) adoptInboundLinks(actions map[string]LinkAction) error {
	cookies, err := d.InboundCaptured()
	if err != nil {
		return err
	}
	for _, cookie := range cookies {
		pin := d.inboundLinkPin(cookie)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("load pinned link %s: %w", pin, err)
		}
		info, err := l.Info()
		if err != nil {
			l.Close()
			return fmt.Errorf("pinned link %s: %w", pin, err)
		}
		if ns := info.NetNs(); ns == nil || ns.NetnsInode == 0 {
			l.Close()
			if err := d.ReleaseInbound(cookie); err != nil {
				return err
			}
			continue
		}
		same, err := sameProgram(info.Program, d.objs.MkSkLookup)
		action := LinkAdopted
		if err == nil && (!same || d.cfg.ForceReplace) {
			err = l.Update(d.objs.MkSkLookup)
			action = LinkUpdated
		}
		l.Close()
		if err != nil {
			return fmt.Errorf("pinned link %s: %w", pin, err)
		}
		actions[filepath.Base(pin)] = action
	}
	return nil
}

// netnsEnrolled tells whether a netns cookie is in the enrolled map; an
// address left captured for one that is not (a pod gone while no agent ran)
// may be taken over.
func (d *Datapath) netnsEnrolled(cookie uint64) bool {
	var v mkbpf.RedirectPodInfo
	return d.objs.Enrolled.Lookup(cookie, &v) == nil
}

// inboundAddrs reads the captured addresses and their namespaces.
func (d *Datapath) inboundAddrs() (map[mkbpf.RedirectPodAddr]uint64, error) {
	out := map[mkbpf.RedirectPodAddr]uint64{}
	var k mkbpf.RedirectPodAddr
	var v uint64
	it := d.objs.InboundAddrs.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", mkbpf.RedirectMapInboundAddrs, err)
	}
	return out, nil
}

// withFd runs f with the descriptor of file without os.File.Fd, which would
// put the descriptor in blocking mode: the listener shares its open file
// description with ztunnel's, whose accept loop must stay non-blocking.
func withFd(file *os.File, f func(fd int) error) error {
	rc, err := file.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// checkListener makes sure f is a listening TCP socket.
func checkListener(f *os.File) error {
	if f == nil {
		return errors.New("no listener")
	}
	return withFd(f, checkListenerFd)
}

func checkListenerFd(fd int) error {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("listener is not a socket: %w", err)
	}
	proto, err1 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	acc, err2 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("listener: %w", err)
	}
	if typ != unix.SOCK_STREAM || proto != unix.IPPROTO_TCP || acc != 1 {
		return fmt.Errorf("listener is not a listening plain TCP socket (type %d, protocol %d (MPTCP is %d), listening %d)", typ, proto, unix.IPPROTO_MPTCP, acc)
	}
	return nil
}

// netnsAddrs enters netns on a locked thread (that dies afterwards) and
// returns its cookie and the addresses inbound capture applies to.
func netnsAddrs(netns *os.File) (uint64, []netip.Addr, error) {
	type result struct {
		cookie uint64
		addrs  []netip.Addr
		err    error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread leaves the host netns
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("setns: %w", err)}
			return
		}
		c, err := socketNetnsCookie()
		if err != nil {
			ch <- result{err: err}
			return
		}
		ifaddrs, err := net.InterfaceAddrs()
		if err != nil {
			ch <- result{err: fmt.Errorf("list addresses: %w", err)}
			return
		}
		var addrs []netip.Addr
		for _, ia := range ifaddrs {
			pfx, err := netip.ParsePrefix(ia.String())
			if err != nil {
				continue
			}
			a := pfx.Addr().Unmap()
			if a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsUnspecified() {
				continue
			}
			addrs = append(addrs, a)
		}
		ch <- result{cookie: c, addrs: addrs}
	}()
	r := <-ch
	return r.cookie, r.addrs, r.err
}

func podAddrKey(a netip.Addr) mkbpf.RedirectPodAddr {
	if a.Is4() {
		b := a.As4()
		return mkbpf.RedirectPodAddr{Family: unix.AF_INET, Ip: [4]uint32{binary.NativeEndian.Uint32(b[:])}}
	}
	return mkbpf.RedirectPodAddr{Family: unix.AF_INET6, Ip: ip6Words(a)}
}

// ip6Words is an IPv6 address as the programs hold it: four 32-bit words in
// network byte order.
func ip6Words(a netip.Addr) [4]uint32 {
	b := a.As16()
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// SetInboundBypassSources replaces the sources whose inbound connections
// are never captured: the node's own addresses, so that the kubelet's probes
// (and the rest of the node's connections to its pods) reach the
// application directly, as istio-cni arranges by SNATting them to
// 169.254.7.127 on the host and exempting that source in the pod.
func (d *Datapath) SetInboundBypassSources(addrs []netip.Addr) error {
	want := map[mkbpf.RedirectPodAddr]bool{}
	for _, a := range addrs {
		want[podAddrKey(a.Unmap())] = true
	}
	if len(want) > int(d.objs.InboundBypassSrc.MaxEntries()) {
		return fmt.Errorf("inbound bypass sources: %d addresses, at most %d", len(want), d.objs.InboundBypassSrc.MaxEntries())
	}
	var stale []mkbpf.RedirectPodAddr
	var k mkbpf.RedirectPodAddr
	var v uint8
	it := d.objs.InboundBypassSrc.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", mkbpf.RedirectMapInboundBypassSrc, err)
	}
	for k := range want {
		if err := d.objs.InboundBypassSrc.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("inbound bypass sources: %w", err)
		}
	}
	for _, k := range stale {
		_ = d.objs.InboundBypassSrc.Delete(k)
	}
	return nil
}

// NodeAddrs are the global addresses of the node's network namespace, read
// through PID 1 of procRoot (the agent's own pod need not be on the host
// network): the sources of the kubelet's probes.
func NodeAddrs(procRoot string) ([]netip.Addr, error) {
	f, err := os.Open(filepath.Join(procRootOrDefault(procRoot), "1", "ns", "net"))
	if err != nil {
		return nil, fmt.Errorf("the node's network namespace: %w", err)
	}
	defer f.Close()
	_, addrs, err := netnsAddrs(f)
	if err != nil {
		return nil, fmt.Errorf("the node's addresses: %w", err)
	}
	return addrs, nil
}
