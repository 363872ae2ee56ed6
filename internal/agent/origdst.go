package agent

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST from linux/netfilter_ipv4.h, and
// IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h (the same
// number, at level SOL_IPV6).
const soOriginalDst = 80

// OriginalDst asks an accepted connection for its original destination with
// getsockopt SO_ORIGINAL_DST, as a proxy behind iptables REDIRECT or behind
// meshkeeper's datapath does: at SOL_IP for an IPv4 connection (also one
// accepted by a dual-stack listener), at SOL_IPV6 (IP6T_SO_ORIGINAL_DST) for
// a native IPv6 one.
func OriginalDst(c syscall.Conn) (netip.AddrPort, error) {
	v6 := false
	if nc, ok := c.(net.Conn); ok {
		if la, ok := nc.LocalAddr().(*net.TCPAddr); ok {
			a, _ := netip.AddrFromSlice(la.IP)
			v6 = a.Is6() && !a.Is4In6()
		}
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var sa4 unix.RawSockaddrInet4
	var sa6 unix.RawSockaddrInet6
	var sysErr error
	if err := raw.Control(func(fd uintptr) {
		level, ptr, size := uintptr(unix.SOL_IP), unsafe.Pointer(&sa4), uint32(unsafe.Sizeof(sa4))
		if v6 {
			level, ptr, size = unix.SOL_IPV6, unsafe.Pointer(&sa6), uint32(unsafe.Sizeof(sa6))
		}
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, level, soOriginalDst,
			uintptr(ptr), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			sysErr = errno
		}
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if sysErr != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", sysErr)
	}
	if v6 {
		if sa6.Family != unix.AF_INET6 {
			return netip.AddrPort{}, fmt.Errorf("getsockopt IP6T_SO_ORIGINAL_DST: family %d", sa6.Family)
		}
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa6.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa6.Addr), port), nil
	}
	if sa4.Family != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: family %d", sa4.Family)
	}
	port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
	return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port), nil
}
