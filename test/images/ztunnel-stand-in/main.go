// Command ztunnel-stand-in is a TEST DOUBLE of ztunnel for the real-node
// e2e tests, because upstream ztunnel cannot be built here. It is never
// shipped and its image is meshkeeper.test/ztunnel-stand-in.
//
// It does what ztunnel in in-pod mode does with each workload, minus mTLS
// and policy:
//   - it is a ZDS client (test/zdsclient, istio's own message types): it
//     connects to the node agent's socket, says hello, receives the
//     snapshot, adds, keeps and deletes, and acks each; after SnapshotSent it
//     drops the workloads the snapshot did not name, and on a lost
//     connection it keeps its workloads and reconnects;
//   - for each workload it enters the pod's netns from the fd it got (a
//     locked OS thread, setns) and listens there on 15001 (outbound: it
//     asks SO_ORIGINAL_DST, which the agent's eBPF answers, and proxies to
//     it), 15006 and 15008 (inbound: it proxies to the local address the
//     connection was accepted on, the original destination under
//     sk_lookup/TPROXY-like capture), all with plain TCP, not MPTCP, as
//     ztunnel (tokio) listens; its sockets, listeners too, carry ztunnel's
//     in-pod SO_MARK, 0x539 (1337: istio-cni's InpodMark, which ztunnel's
//     in-pod config matches), so the agent never redirects them again;
//   - a Delete closes the workload's listeners;
//   - its in-pod listeners use SO_REUSEPORT, as ztunnel's in-pod socket
//     factory does, so a new ztunnel can listen in a pod while the old one
//     still does (a surge);
//   - on SIGTERM it drains as ztunnel does: it closes every listener at
//     once (new connections go to the other ztunnel, if one listens),
//     lets the connections it holds finish (at most --drain, by default
//     the pod's TERMINATION_GRACE_PERIOD_SECONDS less one second), logs
//     its final counters as one "final stats" JSON line, and exits.
//
// It counts connections per pod and direction on :15020/metrics (and as
// JSON on :15020/stats, with each pod's inbound connections by client
// address), and is ready on :15021/healthz/ready only once it
// got a SnapshotSent, as ztunnel is.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"

	"github.com/meshkeeper/meshkeeper/test/zdsclient"
)

// InpodMark is ztunnel's SO_MARK on the sockets it opens in a pod's netns.
const InpodMark = 0x539

// The in-pod listeners' ports.
const (
	OutboundPort = 15001
	InboundPort  = 15006
	HBONEPort    = 15008
)

// Directions counted.
const (
	Outbound = "outbound"
	Inbound  = "inbound"
	HBONE    = "hbone"
)

func main() {
	socket := flag.String("zds-socket", "/var/run/ztunnel/ztunnel.sock", "the node agent's ZDS socket")
	metricsAddr := flag.String("metrics", ":15020", "address of /metrics and /stats")
	readyAddr := flag.String("ready", ":15021", "address of /healthz/ready")
	mark := flag.Uint("mark", InpodMark, "SO_MARK of upstream sockets")
	drain := flag.Duration("drain", defaultDrain(), "on SIGTERM, how long the connections held may take to finish")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	s := NewStandIn(uint32(*mark))
	go serveHTTP(*metricsAddr, s.MetricsHandler())
	go serveHTTP(*readyAddr, s.ReadyHandler())
	s.Run(ctx, *socket)
	// Stop accepting at once, as ztunnel does on SIGTERM, then drain.
	s.Close()
	if !s.Drain(*drain) {
		log.Printf("drain: connections still open after %s; closing them", *drain)
	}
	final, _ := json.Marshal(s.Stats())
	log.Printf("final stats: %s", final)
}

// defaultDrain is the pod's termination grace period less a second, as
// ztunnel drains within TERMINATION_GRACE_PERIOD_SECONDS.
func defaultDrain() time.Duration {
	if v, err := strconv.Atoi(os.Getenv("TERMINATION_GRACE_PERIOD_SECONDS")); err == nil && v > 1 {
		return time.Duration(v-1) * time.Second
	}
	return 5 * time.Second
}

func serveHTTP(addr string, h http.Handler) {
	srv := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}

// StandIn is the ztunnel stand-in's state: its workloads and counters.
type StandIn struct {
	mark  uint32
	ready atomic.Bool

	inflight sync.WaitGroup // connections being proxied

	mu        sync.Mutex
	workloads map[string]*workload // by pod UID
	counts    map[countKey]*atomic.Int64
	// inboundPeers counts the inbound connections proxied for each pod
	// ("namespace/name") by the client's address: the application sees the
	// stand-in's leg, from its own address, so this is where a test learns
	// who connected.
	inboundPeers map[string]map[string]int64
	lastError    string
}

type countKey struct{ namespace, pod, direction, result string }

type workload struct {
	uid, name, namespace string
	netns                *os.File
	ino                  uint64
	listeners            []net.Listener
}

// NewStandIn returns a stand-in with no workloads.
func NewStandIn(mark uint32) *StandIn {
	return &StandIn{mark: mark, workloads: map[string]*workload{}, counts: map[countKey]*atomic.Int64{}, inboundPeers: map[string]map[string]int64{}}
}

// Ready says whether a snapshot was received.
func (s *StandIn) Ready() bool { return s.ready.Load() }

// Run connects to the agent and serves its requests until ctx ends,
// reconnecting whenever the connection is lost.
func (s *StandIn) Run(ctx context.Context, socket string) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		c, err := zdsclient.Dial(socket, zdsapi.Version_V1)
		if err != nil {
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		log.Printf("connected to %s", socket)
		stop := context.AfterFunc(ctx, func() { c.Close() })
		err = s.serve(c)
		stop()
		c.Close()
		log.Printf("ZDS connection ended: %v; keeping %d workloads, reconnecting", err, s.Workloads())
	}
}

func (s *StandIn) serve(c *zdsclient.Client) error {
	inSnapshot := true
	seen := map[string]bool{}
	for {
		r, err := c.Recv(24 * time.Hour)
		if err != nil {
			return err
		}
		var ackErr string
		switch r.Kind {
		case zdsclient.Add:
			seen[r.UID] = true
			if err := s.add(r); err != nil {
				ackErr = err.Error()
				log.Printf("add %s/%s (%s): %v", r.Namespace, r.Name, r.UID, err)
			}
		case zdsclient.Keep:
			if !inSnapshot {
				ackErr = "keep outside a snapshot"
			}
			seen[r.UID] = true
		case zdsclient.Del:
			s.del(r.UID)
		case zdsclient.SnapshotSent:
			s.reconcile(seen)
			inSnapshot = false
			s.ready.Store(true)
			log.Printf("snapshot received: %d workloads", s.Workloads())
		}
		if err := c.Ack(ackErr); err != nil {
			return err
		}
	}
}

// add starts a workload's listeners inside its netns (or keeps them, when
// it is the netns the workload already has).
func (s *StandIn) add(r *zdsclient.Request) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(r.Netns.Fd()), &st); err != nil {
		r.Netns.Close()
		return fmt.Errorf("stat netns: %w", err)
	}
	s.mu.Lock()
	old := s.workloads[r.UID]
	s.mu.Unlock()
	if old != nil && old.ino == st.Ino {
		r.Netns.Close()
		return nil
	}
	w := &workload{uid: r.UID, name: r.Name, namespace: r.Namespace, netns: r.Netns, ino: st.Ino}
	for _, l := range []struct {
		network, addr, direction string
		optional                 bool
	}{
		{"tcp4", "127.0.0.1:" + strconv.Itoa(OutboundPort), Outbound, false},
		{"tcp6", "[::1]:" + strconv.Itoa(OutboundPort), Outbound, true},
		{"tcp", ":" + strconv.Itoa(InboundPort), Inbound, false},
		{"tcp", ":" + strconv.Itoa(HBONEPort), HBONE, false},
	} {
		var ln net.Listener
		err := inNetns(w.netns, func() error {
			var err error
			ln, err = s.listen(l.network, l.addr)
			return err
		})
		if err != nil {
			if l.optional {
				continue
			}
			w.close()
			return fmt.Errorf("listen on %s in the pod's netns: %w", l.addr, err)
		}
		w.listeners = append(w.listeners, ln)
		go s.accept(w, ln, l.direction)
	}
	s.mu.Lock()
	s.workloads[r.UID] = w
	for _, d := range []string{Outbound, Inbound, HBONE} {
		for _, res := range []string{"ok", "failed"} {
			s.counter(countKey{w.namespace, w.name, d, res})
		}
	}
	s.mu.Unlock()
	if old != nil {
		old.close()
	}
	log.Printf("workload %s/%s (%s) added", w.namespace, w.name, w.uid)
	return nil
}

// listen is how ztunnel (Rust) listens in a pod: plain TCP (Go would
// listen with MPTCP, which the agent's listener map refuses) with
// SO_REUSEPORT (a second ztunnel may listen beside it), then its
// in-pod mark, set right after listen as ztunnel's InPodSocketFactory does
// on every socket it opens there (std's TcpListener::bind listens at once).
// The agent's datapath takes a listener on 15006 as ztunnel's only when it
// carries the mark.
func (s *StandIn) listen(network, addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, err
	}
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		ln.Close()
		return nil, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(s.mark))
	}); err != nil || serr != nil {
		ln.Close()
		return nil, fmt.Errorf("mark the listener: %w", errors.Join(err, serr))
	}
	return ln, nil
}

func (s *StandIn) del(uid string) {
	s.mu.Lock()
	w := s.workloads[uid]
	delete(s.workloads, uid)
	s.mu.Unlock()
	if w != nil {
		w.close()
		log.Printf("workload %s/%s (%s) deleted", w.namespace, w.name, uid)
	}
}

// reconcile drops the workloads a snapshot did not name.
func (s *StandIn) reconcile(seen map[string]bool) {
	s.mu.Lock()
	var gone []string
	for uid := range s.workloads {
		if !seen[uid] {
			gone = append(gone, uid)
		}
	}
	s.mu.Unlock()
	for _, uid := range gone {
		s.del(uid)
	}
}

// Close closes every workload's listeners.
func (s *StandIn) Close() {
	s.mu.Lock()
	ws := s.workloads
	s.workloads = map[string]*workload{}
	s.mu.Unlock()
	for _, w := range ws {
		w.close()
	}
}

// Workloads is the number of workloads the stand-in proxies.
func (s *StandIn) Workloads() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.workloads)
}

// Drain waits until the connections being proxied have finished, at most
// timeout; false when some are still open.
func (s *StandIn) Drain(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() { s.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

func (w *workload) close() {
	for _, ln := range w.listeners {
		_ = ln.Close()
	}
	_ = w.netns.Close()
}

func (s *StandIn) counter(k countKey) *atomic.Int64 {
	c, ok := s.counts[k]
	if !ok {
		c = &atomic.Int64{}
		s.counts[k] = c
	}
	return c
}

func (s *StandIn) count(w *workload, direction string, err error) {
	res := "ok"
	s.mu.Lock()
	if err != nil {
		res = "failed"
		s.lastError = fmt.Sprintf("%s %s connection of %s/%s: %v", time.Now().UTC().Format(time.RFC3339Nano), direction, w.namespace, w.name, err)
		log.Print(s.lastError)
	}
	c := s.counter(countKey{w.namespace, w.name, direction, res})
	s.mu.Unlock()
	c.Add(1)
}

func (s *StandIn) countPeer(w *workload, peer string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pod := w.namespace + "/" + w.name
	if s.inboundPeers[pod] == nil {
		s.inboundPeers[pod] = map[string]int64{}
	}
	s.inboundPeers[pod][peer]++
}

func (s *StandIn) accept(w *workload, ln net.Listener, direction string) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return // closed by a Delete
		}
		s.inflight.Add(1)
		go func() {
			defer s.inflight.Done()
			s.proxy(w, conn.(*net.TCPConn), direction)
		}()
	}
}

// proxy finds where a connection was going and copies it there.
func (s *StandIn) proxy(w *workload, conn *net.TCPConn, direction string) {
	defer conn.Close()
	var dst netip.AddrPort
	var err error
	if direction == Outbound {
		dst, err = originalDst(conn)
		if err != nil {
			s.count(w, direction, fmt.Errorf("SO_ORIGINAL_DST of %s: %w", conn.RemoteAddr(), err))
			return
		}
	} else {
		dst = conn.LocalAddr().(*net.TCPAddr).AddrPort()
		if p := dst.Port(); p == InboundPort || p == HBONEPort {
			// Addressed to the listener itself: no original destination.
			s.count(w, direction, fmt.Errorf("connection from %s addressed to the %s listener itself", conn.RemoteAddr(), direction))
			return
		}
	}
	if dst.Port() == OutboundPort && dst.Addr().IsLoopback() {
		s.count(w, direction, fmt.Errorf("original destination of %s is the outbound listener itself (not redirected)", conn.RemoteAddr()))
		return
	}
	var up net.Conn
	err = inNetns(w.netns, func() error {
		d := net.Dialer{Timeout: 2 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(s.mark))
			}); err != nil {
				return err
			}
			return serr
		}}
		var err error
		up, err = d.Dial("tcp", dst.String())
		return err
	})
	if err != nil {
		s.count(w, direction, fmt.Errorf("dial %s: %w", dst, err))
		return
	}
	defer up.Close()
	s.count(w, direction, nil)
	if direction == Inbound {
		s.countPeer(w, conn.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String())
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, conn); _ = up.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { _, _ = io.Copy(conn, up); _ = conn.CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}

// inNetns runs f on a fresh OS thread inside the netns. Sockets f creates
// belong to that netns for their whole life. The thread is never unlocked:
// it dies with its goroutine instead of going back to the pool in the
// wrong namespace.
func inNetns(netns *os.File, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// originalDst asks an accepted socket for its original destination
// (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST for IPv6).
func originalDst(conn *net.TCPConn) (netip.AddrPort, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	const soOriginalDst = 80
	v6 := conn.LocalAddr().(*net.TCPAddr).IP.To4() == nil
	var out netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v6 {
			var sa unix.RawSockaddrInet6
			size := uint32(unsafe.Sizeof(sa))
			_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IPV6, soOriginalDst,
				uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
			if errno != 0 {
				serr = errno
				return
			}
			port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
			out = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port)
			return
		}
		var sa unix.RawSockaddrInet4
		size := uint32(unsafe.Sizeof(sa))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, soOriginalDst,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = errno
			return
		}
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		out = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
	})
	if err == nil {
		err = serr
	}
	return out, err
}

// Count is one pod's connections in one direction, as /stats returns them.
type Count struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Direction string `json:"direction"`
	OK        int64  `json:"ok"`
	Failed    int64  `json:"failed"`
}

// Stats is what GET /stats returns.
type Stats struct {
	Ready     bool    `json:"ready"`
	Workloads int     `json:"workloads"`
	Counts    []Count `json:"counts"`
	// InboundPeers: pod ("namespace/name") -> client address -> inbound
	// connections proxied.
	InboundPeers map[string]map[string]int64 `json:"inboundPeers,omitempty"`
	LastError    string                      `json:"lastError,omitempty"`
}

// Stats returns the stand-in's counters.
func (s *StandIn) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	by := map[[3]string]*Count{}
	for k, v := range s.counts {
		key := [3]string{k.namespace, k.pod, k.direction}
		c, ok := by[key]
		if !ok {
			c = &Count{Namespace: k.namespace, Pod: k.pod, Direction: k.direction}
			by[key] = c
		}
		if k.result == "ok" {
			c.OK = v.Load()
		} else {
			c.Failed = v.Load()
		}
	}
	out := Stats{Ready: s.ready.Load(), Workloads: len(s.workloads), Counts: []Count{}, LastError: s.lastError, InboundPeers: map[string]map[string]int64{}}
	for pod, peers := range s.inboundPeers {
		out.InboundPeers[pod] = maps.Clone(peers)
	}
	for _, c := range by {
		out.Counts = append(out.Counts, *c)
	}
	sort.Slice(out.Counts, func(i, j int) bool {
		a, b := out.Counts[i], out.Counts[j]
		if a.Namespace+"/"+a.Pod != b.Namespace+"/"+b.Pod {
			return a.Namespace+"/"+a.Pod < b.Namespace+"/"+b.Pod
		}
		return a.Direction < b.Direction
	})
	return out
}

// MetricsHandler serves /metrics (Prometheus text) and /stats (JSON).
func (s *StandIn) MetricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		st := s.Stats()
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintln(w, "# HELP ztunnel_stand_in_connections_total Connections the ztunnel stand-in (a test double) proxied, per pod, direction and result.")
		fmt.Fprintln(w, "# TYPE ztunnel_stand_in_connections_total counter")
		for _, c := range st.Counts {
			for _, r := range []struct {
				name string
				v    int64
			}{{"ok", c.OK}, {"failed", c.Failed}} {
				fmt.Fprintf(w, "ztunnel_stand_in_connections_total{workload_namespace=%q,workload_pod=%q,direction=%q,result=%q} %d\n", c.Namespace, c.Pod, c.Direction, r.name, r.v)
			}
		}
		fmt.Fprintln(w, "# HELP ztunnel_stand_in_workloads Workloads the ztunnel stand-in has listeners for.")
		fmt.Fprintln(w, "# TYPE ztunnel_stand_in_workloads gauge")
		fmt.Fprintf(w, "ztunnel_stand_in_workloads %d\n", st.Workloads)
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(s.Stats())
	})
	return mux
}

// ReadyHandler serves /healthz/ready: 200 once a snapshot was received.
func (s *StandIn) ReadyHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !s.Ready() {
			http.Error(w, "no ZDS snapshot from the node agent yet", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	return mux
}
