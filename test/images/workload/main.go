// Command workload is the test workload of the real-node e2e tests, one
// binary with three modes:
//
//	workload server  --listen :8080 --stats :9000
//	workload client  --target 10.213.0.12:8080 --interval 20ms --stats :9000
//	workload capture --listen 127.0.0.1:15001 --mark 0x539 --stats :9001
//
// The server answers each connection's line "ping" with "pong <hostname>".
// The client opens a new connection every interval, sends "ping", and
// counts a connection as ok only when the answer came back. capture stands
// in for ztunnel's in-pod listener (upstream ztunnel cannot run here): it
// accepts what the node agent's eBPF programs redirect to the capture port,
// asks each connection for its original destination (SO_ORIGINAL_DST, which
// the agent's getsockopt program answers), dials it with the bypass mark
// and copies bytes both ways. Every mode serves its counters as JSON on
// GET /stats.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Stats are what GET /stats returns.
type Stats struct {
	Mode      string `json:"mode"`
	OK        int64  `json:"ok"`
	Failed    int64  `json:"failed"`
	LastError string `json:"lastError,omitempty"`
	// Peers (server) counts answered connections by the peer's address.
	Peers map[string]int64 `json:"peers,omitempty"`
}

type counters struct {
	mode      string
	ok, fail  atomic.Int64
	mu        sync.Mutex
	lastError string
	peers     map[string]int64
}

func (c *counters) peer(addr net.Addr) {
	ip := addr.String()
	if t, ok := addr.(*net.TCPAddr); ok {
		ip = t.IP.String()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.peers == nil {
		c.peers = map[string]int64{}
	}
	c.peers[ip]++
}

func (c *counters) failed(err error) {
	c.fail.Add(1)
	c.mu.Lock()
	c.lastError = time.Now().UTC().Format(time.RFC3339Nano) + " " + err.Error()
	c.mu.Unlock()
	log.Printf("%s: %v", c.mode, err)
}

func (c *counters) stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	peers := make(map[string]int64, len(c.peers))
	for k, v := range c.peers {
		peers[k] = v
	}
	return Stats{Mode: c.mode, OK: c.ok.Load(), Failed: c.fail.Load(), LastError: c.lastError, Peers: peers}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: workload server|client|capture [flags]")
		os.Exit(2)
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	listen := fs.String("listen", ":8080", "server, capture: address to listen on")
	target := fs.String("target", "", "client: address to connect to")
	interval := fs.Duration("interval", 20*time.Millisecond, "client: time between connections")
	drain := fs.Duration("drain", 0, "client: keep connecting this long after SIGTERM, as an application finishing its work in its termination grace period")
	mark := fs.Uint("mark", 0x539, "capture: SO_MARK of upstream connections (the agent's bypass mark)")
	statsAddr := fs.String("stats", ":9000", "address of GET /stats")
	_ = fs.Parse(os.Args[2:])

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	c := &counters{mode: mode}
	go serveStats(*statsAddr, c)

	var err error
	switch mode {
	case "server":
		err = server(ctx, *listen, c)
	case "client":
		err = client(lingering(ctx, *drain), *target, *interval, c)
	case "capture":
		err = capture(ctx, *listen, uint32(*mark), c)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil && ctx.Err() == nil {
		log.Fatal(err)
	}
}

func serveStats(addr string, c *counters) {
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(c.stats())
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}

func server(ctx context.Context, addr string, c *counters) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); ln.Close() }()
	host, _ := os.Hostname()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(conn).ReadString('\n')
			if err != nil {
				c.failed(fmt.Errorf("read from %s: %w", conn.RemoteAddr(), err))
				return
			}
			if line != "ping\n" {
				c.failed(fmt.Errorf("unexpected %q from %s", line, conn.RemoteAddr()))
				return
			}
			if _, err := fmt.Fprintf(conn, "pong %s\n", host); err != nil {
				c.failed(err)
				return
			}
			c.peer(conn.RemoteAddr())
			c.ok.Add(1)
		}()
	}
}

// lingering is a context that ends drain after ctx does.
func lingering(ctx context.Context, drain time.Duration) context.Context {
	if drain <= 0 {
		return ctx
	}
	out, cancel := context.WithCancel(context.WithoutCancel(ctx))
	go func() {
		<-ctx.Done()
		log.Printf("SIGTERM: connecting for %s more", drain)
		time.Sleep(drain)
		cancel()
	}()
	return out
}

func client(ctx context.Context, target string, interval time.Duration, c *counters) error {
	if target == "" {
		return errors.New("client needs --target")
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	// The first connection the instant the process starts: what an
	// enrolment that comes after the pod's start would let escape.
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
			}
		}
		if err := ping(target); err != nil {
			c.failed(err)
			continue
		}
		c.ok.Add(1)
	}
}

func ping(target string) error {
	conn, err := net.DialTimeout("tcp", target, 2*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(conn, "ping\n"); err != nil {
		return fmt.Errorf("write to %s: %w", target, err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read from %s: %w", target, err)
	}
	if len(line) < 5 || line[:5] != "pong " {
		return fmt.Errorf("unexpected answer %q from %s", line, target)
	}
	return nil
}

// capture is the stand-in for ztunnel's in-pod outbound listener.
func capture(ctx context.Context, addr string, mark uint32, c *counters) error {
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); ln.Close() }()
	dialer := net.Dialer{Timeout: 2 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		return serr
	}}
	for {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer conn.Close()
			orig, err := originalDst(conn.(*net.TCPConn))
			if err != nil {
				c.failed(fmt.Errorf("SO_ORIGINAL_DST of %s: %w", conn.RemoteAddr(), err))
				return
			}
			up, err := dialer.Dial("tcp4", orig.String())
			if err != nil {
				c.failed(fmt.Errorf("dial original destination %s: %w", orig, err))
				return
			}
			defer up.Close()
			c.ok.Add(1)
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(up, conn); up.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
			go func() { _, _ = io.Copy(conn, up); conn.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
			<-done
			<-done
		}()
	}
}

// originalDst is getsockopt(SOL_IP, SO_ORIGINAL_DST) on an accepted socket.
func originalDst(conn *net.TCPConn) (netip.AddrPort, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var sa syscall.RawSockaddrInet4
	var serr error
	if err := rc.Control(func(fd uintptr) {
		size := uint32(unsafe.Sizeof(sa))
		const soOriginalDst = 80
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.SOL_IP, soOriginalDst,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = errno
		}
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, serr
	}
	port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port), nil
}
