package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// standInProxy stands in for the node proxy: it listens on the capture
// address inside a pod's namespace, asks each accepted connection for its
// original destination (SO_ORIGINAL_DST) and writes it back as one line,
// "orig 10.96.0.10:80" or "error <why>", then closes the connection.
type standInProxy struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	seen int
}

func startStandInProxy(tb testing.TB, ns *testNetns, addr string) *standInProxy {
	tb.Helper()
	p := &standInProxy{}
	var err error
	network := "tcp4"
	if strings.HasPrefix(addr, "[") {
		network = "tcp6"
	}
	listen := func() { p.ln, err = net.Listen(network, addr) }
	if ns != nil {
		if nsErr := ns.Do(listen); nsErr != nil {
			tb.Fatal(nsErr)
		}
	} else {
		listen()
	}
	if err != nil {
		tb.Fatalf("stand-in proxy listen %s: %v", addr, err)
	}
	p.wg.Add(1)
	go p.serve()
	tb.Cleanup(p.Close)
	return p
}

func (p *standInProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.seen++
		p.mu.Unlock()
		go func() {
			defer c.Close()
			orig, err := OriginalDst(c.(*net.TCPConn))
			if err != nil {
				fmt.Fprintf(c, "error %v\n", err)
				return
			}
			fmt.Fprintf(c, "orig %s\n", orig)
		}()
	}
}

func (p *standInProxy) Close() {
	p.ln.Close()
	p.wg.Wait()
}

func (p *standInProxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen
}

// dialIn connects from inside ns.
func dialIn(ns *testNetns, network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	var err error
	if nsErr := ns.Do(func() { c, err = net.DialTimeout(network, addr, timeout) }); nsErr != nil {
		return nil, nsErr
	}
	return c, err
}

// readReply reads the stand-in proxy's one-line answer.
func readReply(c net.Conn) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// peerName is getpeername(2) on a connection.
func peerName(c net.Conn) (unix.Sockaddr, error) {
	raw, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return nil, err
	}
	var sa unix.Sockaddr
	var gerr error
	if err := raw.Control(func(fd uintptr) { sa, gerr = unix.Getpeername(int(fd)) }); err != nil {
		return nil, err
	}
	return sa, gerr
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return fmt.Sprintf("%d.%d.%d.%d:%d", a.Addr[0], a.Addr[1], a.Addr[2], a.Addr[3], a.Port)
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
	}
	return fmt.Sprintf("%v", sa)
}
