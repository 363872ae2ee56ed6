// Package zds is the node agent's side of ztunnel's ZDS protocol: the
// hand-off of each enrolled pod's network namespace to ztunnel, which then
// opens its in-pod listeners (15001, 15006, 15008, 15053) inside it.
//
// The agent is the server, as istio-cni's node agent is upstream: ztunnel
// connects to a SOCK_SEQPACKET unix socket (/var/run/ztunnel/ztunnel.sock),
// sends a ZdsHello, and then receives, one message at a time and each
// answered by an Ack:
//
//   - the snapshot: an AddWorkload for every workload the agent knows, with
//     the pod's netns fd passed by SCM_RIGHTS, or a KeepWorkload for a
//     workload whose netns the agent cannot open (ztunnel keeps what it has);
//   - SnapshotSent: ztunnel drops every workload the snapshot did not name
//     and reports ready;
//   - then AddWorkload and DelWorkload as pods come and go.
//
// Adds go to the newest connection only; deletes go to every connection, so
// a ztunnel that is draining during a node wave (an older one still
// connected) shuts down the proxies of deleted pods as well. This is what
// istio-cni's ztunnelserver.go does.
//
// Where this differs from upstream, on purpose: an unknown ZdsHello version
// is refused (logged and the connection closed) instead of being logged
// only; and an Ack that does not come within the ack timeout closes the
// connection, because acks are matched to requests only by order: after a
// lost ack every later ack would answer the wrong request. ztunnel
// reconnects and gets a fresh snapshot.
//
// The message types are upstream's own, istio.io/istio/pkg/zdsapi (generated
// from zds.proto). Depending on the istio.io/istio module for that one
// package leaves k8s.io/* at v0.37, controller-runtime at v0.25 and Helm at
// v4 (go mod tidy only moved a few small indirect modules), so no copy of
// the proto is generated here.
package zds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

// DefaultSocketPath is where ztunnel looks for its ZDS peer.
const DefaultSocketPath = "/var/run/ztunnel/ztunnel.sock"

// Defaults of Options.
const (
	DefaultAckTimeout        = 5 * time.Second
	DefaultKeepaliveInterval = 5 * time.Second
	// maxMessage bounds one message read from ztunnel: acks and hellos are
	// a few bytes; anything larger is a protocol error.
	maxMessage = 64 << 10
)

// WorkloadInfo is what ztunnel learns about a pod besides its netns.
type WorkloadInfo struct {
	Name, Namespace, ServiceAccount string
}

// ErrNoZtunnel is returned by AddWorkload when no ztunnel is connected.
// The workload stays known and is part of the snapshot the next ztunnel
// gets.
var ErrNoZtunnel = errors.New("no ztunnel is connected to the ZDS socket")

// AckError is ztunnel's answer to a request it could not carry out.
type AckError struct {
	UID, Request, Message string
}

func (e *AckError) Error() string {
	return fmt.Sprintf("ztunnel refused %s of workload %s: %s", e.Request, e.UID, e.Message)
}

// Options configure a Server.
type Options struct {
	// Path of the unix socket (DefaultSocketPath when empty).
	Path string
	// AckTimeout bounds the wait for each ack (DefaultAckTimeout when 0).
	AckTimeout time.Duration
	// KeepaliveInterval is how often an idle connection is checked
	// (DefaultKeepaliveInterval when 0).
	KeepaliveInterval time.Duration
	Log               logr.Logger
	// Metrics, when set, counts what happens on the socket.
	Metrics *Metrics
}

type workload struct {
	info  WorkloadInfo
	netns *os.File // nil: Keep in a snapshot
	// lastError is ztunnel's last ack error for this workload ("" after
	// an acked add).
	lastError string
	// ackedBy is the connection that last acked the workload's add (or
	// keep, in a snapshot) without an error; 0: none.
	ackedBy uint64
	// since is when the workload last started waiting for a ztunnel to
	// take it (recorded, or refused after it was taken).
	since time.Time
}

// WorkloadState is whether ztunnel has a workload: the newest connected
// ztunnel (the one that gets adds) acked it. When it has not, Reason says
// why, for the MeshNode's list of pods not enrolled, and Since when the
// workload started waiting.
type WorkloadState struct {
	// Known: the workload was added or kept (and not deleted).
	Known  bool
	Handed bool
	Reason string
	Since  time.Time
}

// The reasons of WorkloadState.
const (
	ReasonNoZtunnel = "no ztunnel connected"
	// ReasonRefused prefixes ztunnel's own error message.
	ReasonRefused  = "ztunnel refused: "
	ReasonNotAcked = "not acked by ztunnel yet"
)

// Server serves ztunnel's ZDS connections. Its workload set is the source
// of every snapshot: fill it (AddWorkload, KeepWorkload) before Serve so a
// ztunnel that reconnects after an agent restart keeps its view.
type Server struct {
	o       Options
	serving chan struct{}
	nextID  atomic.Uint64

	mu        sync.Mutex
	workloads map[string]*workload // by pod UID
	conns     []*conn              // in the order they said hello; the last gets adds
	// newestSince is when the newest connection last changed (one said
	// hello, or the newest left): what it has not acked waits since then.
	newestSince time.Time
	now         func() time.Time
}

// NewServer returns a server that serves nothing until Serve.
func NewServer(o Options) *Server {
	if o.Path == "" {
		o.Path = DefaultSocketPath
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = DefaultAckTimeout
	}
	if o.KeepaliveInterval <= 0 {
		o.KeepaliveInterval = DefaultKeepaliveInterval
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics()
	}
	return &Server{o: o, serving: make(chan struct{}), workloads: map[string]*workload{}, now: time.Now}
}

// Path is the socket's path.
func (s *Server) Path() string { return s.o.Path }

// Serving is closed once the socket accepts connections.
func (s *Server) Serving() <-chan struct{} { return s.serving }

// IsServing says whether the socket accepts connections.
func (s *Server) IsServing() bool {
	select {
	case <-s.serving:
		return true
	default:
		return false
	}
}

// Serve listens on the socket (replacing a stale one a previous agent left)
// and serves connections until ctx ends; then it closes every connection
// and removes the socket.
func (s *Server) Serve(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(s.o.Path), 0o755); err != nil {
		return fmt.Errorf("zds socket directory: %w", err)
	}
	if err := os.Remove(s.o.Path); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove stale zds socket %s: %w", s.o.Path, err)
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: s.o.Path, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("zds socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	close(s.serving)
	s.o.Log.Info("Serving ZDS for ztunnel", "socket", s.o.Path, "workloads", s.Workloads())
	var wg sync.WaitGroup
	defer wg.Wait()
	// A ztunnel that reconnects in a loop must not make the agent spin.
	var last time.Time
	for {
		u, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			s.o.Log.Error(err, "Accepting a ZDS connection failed")
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if d := time.Since(last); d < 100*time.Millisecond {
			time.Sleep(100*time.Millisecond - d)
		}
		last = time.Now()
		c := &conn{id: s.nextID.Add(1), u: u, reqs: make(chan *request, 64), done: make(chan struct{})}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.handle(ctx, c)
		}()
	}
}

// AddWorkload records a pod's workload and hands its network namespace to
// the newest connected ztunnel, returning once ztunnel acked it. The server
// keeps its own duplicate of netns (the caller may close its file). The
// workload is recorded even when the hand-off fails, so the next snapshot
// carries it: with no ztunnel connected it returns ErrNoZtunnel; an ack
// with an error returns an *AckError.
func (s *Server) AddWorkload(ctx context.Context, uid string, netns *os.File, info WorkloadInfo) error {
	if uid == "" {
		return errors.New("zds: add workload: empty pod UID")
	}
	if netns == nil {
		return fmt.Errorf("zds: add workload %s: no network namespace", uid)
	}
	own, err := dupFile(netns)
	if err != nil {
		return fmt.Errorf("zds: add workload %s: %w", uid, err)
	}
	s.mu.Lock()
	since := s.now()
	if old, ok := s.workloads[uid]; ok {
		if old.netns != nil {
			_ = old.netns.Close()
		}
		if old.ackedBy == 0 {
			since = old.since // still waiting: since the first try
		}
	}
	s.workloads[uid] = &workload{info: info, netns: own, since: since}
	var latest *conn
	if len(s.conns) > 0 {
		latest = s.conns[len(s.conns)-1]
	}
	// The request carries its own duplicate: a delete may close the
	// workload's file while the request waits in the queue.
	fd, err := dupFile(own)
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("zds: add workload %s: %w", uid, err)
	}
	if latest == nil {
		_ = fd.Close()
		return ErrNoZtunnel
	}
	msg := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: uid, WorkloadInfo: info.proto()}}}
	err = latest.send(ctx, msg, fd)
	s.recordResult(uid, latest.id, err)
	return err
}

// AddWorkloadPath is AddWorkload with the netns given by path
// (/proc/<pid>/ns/net, /var/run/netns/cni-..., as a CNI plugin gets it).
func (s *Server) AddWorkloadPath(ctx context.Context, uid, netnsPath string, info WorkloadInfo) error {
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("zds: add workload %s: open netns: %w", uid, err)
	}
	defer f.Close()
	return s.AddWorkload(ctx, uid, f, info)
}

// KeepWorkload records a workload whose network namespace the agent cannot
// open (after a restart, a pod it has not found again yet): snapshots carry
// a KeepWorkload for it, so ztunnel keeps the proxy it has. A later
// AddWorkload replaces it. Nothing is sent now: ztunnel accepts Keep only
// inside a snapshot.
func (s *Server) KeepWorkload(uid string, info WorkloadInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w, ok := s.workloads[uid]; ok {
		w.info = info
		return
	}
	s.workloads[uid] = &workload{info: info, since: s.now()}
}

// DelWorkload forgets a workload and tells every connected ztunnel (the
// draining ones too) to shut its proxy down, returning once all acked.
// Deleting an unknown workload is not an error: it is sent all the same,
// as a ztunnel may know it from an earlier agent.
func (s *Server) DelWorkload(ctx context.Context, uid string) error {
	s.mu.Lock()
	if w, ok := s.workloads[uid]; ok {
		if w.netns != nil {
			_ = w.netns.Close()
		}
		delete(s.workloads, uid)
	}
	conns := append([]*conn(nil), s.conns...)
	s.mu.Unlock()
	msg := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}
	var errs []error
	for _, c := range conns {
		if err := c.send(ctx, msg, nil); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Connected is the number of ztunnels that said hello and are connected.
func (s *Server) Connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Workloads is the number of workloads known (what a snapshot carries).
func (s *Server) Workloads() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.workloads)
}

// WorkloadError is ztunnel's last ack error for a workload, "" when it was
// acked without one (or is unknown).
func (s *Server) WorkloadError(uid string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w, ok := s.workloads[uid]; ok {
		return w.lastError
	}
	return ""
}

// WorkloadErrors returns every workload ztunnel refused, by pod UID.
func (s *Server) WorkloadErrors() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]string{}
	for uid, w := range s.workloads {
		if w.lastError != "" {
			out[uid] = w.lastError
		}
	}
	return out
}

// State says whether the newest connected ztunnel has taken a workload.
func (s *Server) State(uid string) WorkloadState {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, ok := s.workloads[uid]
	if !ok {
		return WorkloadState{}
	}
	st := WorkloadState{Known: true, Since: w.since}
	if s.newestSince.After(st.Since) {
		st.Since = s.newestSince
	}
	switch {
	case len(s.conns) == 0:
		st.Reason = ReasonNoZtunnel
	case w.ackedBy == s.conns[len(s.conns)-1].id:
		return WorkloadState{Known: true, Handed: true}
	case w.lastError != "":
		st.Reason = ReasonRefused + w.lastError
	default:
		st.Reason = ReasonNotAcked
	}
	return st
}

// recordResult records the outcome of handing a workload to connection
// connID: acked, refused, or not known (the connection broke, no ack in
// time), which leaves what the workload had.
func (s *Server) recordResult(uid string, connID uint64, err error) {
	var ack *AckError
	s.mu.Lock()
	defer s.mu.Unlock()
	w, ok := s.workloads[uid]
	if !ok {
		return
	}
	switch {
	case err == nil:
		w.lastError, w.ackedBy = "", connID
	case errors.As(err, &ack):
		if w.ackedBy != 0 {
			w.since = s.now() // taken before, refused now
		}
		w.lastError, w.ackedBy = ack.Message, 0
	}
}

// handle runs one connection: hello, snapshot, then requests in order,
// one at a time, each waiting for its ack.
func (s *Server) handle(ctx context.Context, c *conn) {
	log := s.o.Log.WithValues("conn", c.id)
	defer c.u.Close()
	hello, err := c.readHello(s.o.AckTimeout)
	if err != nil {
		s.o.Metrics.protocolError("hello")
		log.Error(err, "A ZDS client sent no valid hello; closing its connection")
		return
	}
	if hello.GetVersion() != zdsapi.Version_V1 {
		s.o.Metrics.protocolError("version")
		log.Error(fmt.Errorf("ZDS version %s (%d)", hello.GetVersion(), int32(hello.GetVersion())),
			"A ZDS client speaks a protocol version this agent does not; closing its connection. Run a ztunnel of the bundle's version, which speaks V1",
			"supported", zdsapi.Version_V1.String())
		return
	}
	// Take the snapshot and become the newest connection at once: an add
	// made before is in the snapshot, one made after is queued behind it.
	snap := s.register(c)
	defer s.unregister(c, log)
	s.o.Metrics.connected.Inc()
	defer s.o.Metrics.connected.Dec()
	log.Info("ztunnel connected; sending snapshot", "workloads", len(snap), "connected", s.Connected())
	if err := s.sendSnapshot(c, snap, log); err != nil {
		log.Error(err, "Sending the snapshot to ztunnel failed; closing its connection")
		return
	}
	s.o.Metrics.snapshots.Inc()
	log.Info("Snapshot sent to ztunnel", "workloads", len(snap))
	keepalive := time.NewTicker(s.o.KeepaliveInterval)
	defer keepalive.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-c.reqs:
			resp, err := c.exchange(r.msg, r.fd, s.o.AckTimeout)
			r.closeFd()
			err = s.ackResult(r.msg, resp, err)
			r.resp <- err
			if err != nil {
				var ack *AckError
				if errors.As(err, &ack) {
					log.Error(err, "ztunnel refused a request", "uid", ack.UID)
					continue
				}
				log.Error(err, "ZDS connection broken; closing it (ztunnel reconnects and gets a new snapshot)")
				return
			}
		case <-keepalive.C:
			// ztunnel sends nothing unprompted: a short read that times
			// out means it is alive; EOF means it left.
			if err := c.checkAlive(10 * time.Millisecond); err != nil {
				if errors.Is(err, errClosed) {
					log.Info("ztunnel disconnected")
				} else {
					s.o.Metrics.protocolError("unexpected")
					log.Error(err, "ZDS connection failed its keepalive; closing it")
				}
				return
			}
		}
	}
}

func (s *Server) register(c *conn) []snapEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := make([]snapEntry, 0, len(s.workloads))
	for uid, w := range s.workloads {
		e := snapEntry{uid: uid, info: w.info}
		if w.netns != nil {
			// Errors here leave a Keep: ztunnel then keeps what it has.
			e.fd, _ = dupFile(w.netns)
		}
		snap = append(snap, e)
	}
	sort.Slice(snap, func(i, j int) bool { return snap[i].uid < snap[j].uid })
	s.conns = append(s.conns, c)
	s.newestSince = s.now()
	return snap
}

func (s *Server) unregister(c *conn, log logr.Logger) {
	s.mu.Lock()
	for i, x := range s.conns {
		if x == c {
			if i == len(s.conns)-1 {
				s.newestSince = s.now()
			}
			s.conns = append(s.conns[:i], s.conns[i+1:]...)
			break
		}
	}
	left := len(s.conns)
	s.mu.Unlock()
	close(c.done)
	// Fail whatever is still queued: its sender would wait for nothing.
	for {
		select {
		case r := <-c.reqs:
			r.closeFd()
			r.resp <- errors.New("zds: ztunnel connection closed before the request was sent")
		default:
			log.Info("ZDS connection closed", "connected", left)
			return
		}
	}
}

type snapEntry struct {
	uid  string
	info WorkloadInfo
	fd   *os.File
}

func (s *Server) sendSnapshot(c *conn, snap []snapEntry, log logr.Logger) error {
	defer func() {
		for _, e := range snap {
			if e.fd != nil {
				_ = e.fd.Close()
			}
		}
	}()
	for _, e := range snap {
		var msg *zdsapi.WorkloadRequest
		if e.fd != nil {
			msg = &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: e.uid, WorkloadInfo: e.info.proto()}}}
		} else {
			msg = &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: e.uid}}}
		}
		resp, err := c.exchange(msg, e.fd, s.o.AckTimeout)
		if err := s.ackResult(msg, resp, err); err != nil {
			var ack *AckError
			if !errors.As(err, &ack) {
				return err
			}
			log.Error(err, "ztunnel refused a workload of the snapshot", "uid", e.uid)
			s.recordResult(e.uid, c.id, err)
			continue
		}
		s.recordResult(e.uid, c.id, nil)
	}
	msg := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}
	resp, err := c.exchange(msg, nil, s.o.AckTimeout)
	if err := s.ackResult(msg, resp, err); err != nil {
		var ack *AckError
		if !errors.As(err, &ack) {
			return err
		}
		log.Error(err, "ztunnel refused the end of the snapshot")
	}
	return nil
}

// ackResult turns an exchange into the request's outcome and counts it.
func (s *Server) ackResult(msg *zdsapi.WorkloadRequest, resp *zdsapi.WorkloadResponse, err error) error {
	kind, uid := describe(msg)
	if err != nil {
		s.o.Metrics.request(kind, "failed")
		return fmt.Errorf("zds %s %s: %w", kind, uid, err)
	}
	if resp.GetAck() == nil {
		s.o.Metrics.request(kind, "failed")
		s.o.Metrics.protocolError("response")
		return fmt.Errorf("zds %s %s: ztunnel answered with no ack", kind, uid)
	}
	if m := resp.GetAck().GetError(); m != "" {
		s.o.Metrics.request(kind, "ack_error")
		return &AckError{UID: uid, Request: kind, Message: m}
	}
	s.o.Metrics.request(kind, "ok")
	return nil
}

func describe(msg *zdsapi.WorkloadRequest) (kind, uid string) {
	switch p := msg.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		return "add", p.Add.GetUid()
	case *zdsapi.WorkloadRequest_Keep:
		return "keep", p.Keep.GetUid()
	case *zdsapi.WorkloadRequest_Del:
		return "delete", p.Del.GetUid()
	case *zdsapi.WorkloadRequest_SnapshotSent:
		return "snapshot_sent", ""
	}
	return "unknown", ""
}

func (i WorkloadInfo) proto() *zdsapi.WorkloadInfo {
	return &zdsapi.WorkloadInfo{Name: i.Name, Namespace: i.Namespace, ServiceAccount: i.ServiceAccount}
}

// conn is one ztunnel connection; only its handler goroutine reads and
// writes the socket.
type conn struct {
	id   uint64
	u    *net.UnixConn
	reqs chan *request
	done chan struct{}
}

// request is one queued request; its fd, if any, belongs to it: the
// handler (or whoever drops the request) closes it.
type request struct {
	msg  *zdsapi.WorkloadRequest
	fd   *os.File
	resp chan error
}

func (r *request) closeFd() {
	if r.fd != nil {
		_ = r.fd.Close()
	}
}

var errClosed = errors.New("ztunnel closed the connection")

// send queues a request for the connection's handler and waits for its
// outcome. It takes fd over: the request closes it once sent or dropped.
func (c *conn) send(ctx context.Context, msg *zdsapi.WorkloadRequest, fd *os.File) error {
	r := &request{msg: msg, fd: fd, resp: make(chan error, 1)}
	select {
	case c.reqs <- r:
	case <-c.done:
		r.closeFd()
		return errors.New("zds: ztunnel connection closed")
	case <-ctx.Done():
		r.closeFd()
		return fmt.Errorf("zds: waiting to send: %w", ctx.Err())
	}
	select {
	case err := <-r.resp:
		return err
	case <-c.done:
		// The handler answers before it lets go of the connection.
		select {
		case err := <-r.resp:
			return err
		default:
			return errors.New("zds: ztunnel connection closed before the request was sent")
		}
	case <-ctx.Done():
		return fmt.Errorf("zds: waiting for ztunnel's ack: %w", ctx.Err())
	}
}

func (c *conn) exchange(msg *zdsapi.WorkloadRequest, fd *os.File, timeout time.Duration) (*zdsapi.WorkloadResponse, error) {
	b, err := proto.Marshal(msg)
	if err != nil {
		return nil, err
	}
	var oob []byte
	if fd != nil {
		oob = unix.UnixRights(int(fd.Fd()))
	}
	if err := c.u.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	if _, _, err := c.u.WriteMsgUnix(b, oob, nil); err != nil {
		return nil, fmt.Errorf("write: %w", err)
	}
	var resp zdsapi.WorkloadResponse
	if err := c.read(&resp, timeout); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, fmt.Errorf("no ack within %s", timeout)
		}
		return nil, err
	}
	return &resp, nil
}

func (c *conn) readHello(timeout time.Duration) (*zdsapi.ZdsHello, error) {
	var h zdsapi.ZdsHello
	if err := c.read(&h, timeout); err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	return &h, nil
}

func (c *conn) checkAlive(timeout time.Duration) error {
	var resp zdsapi.WorkloadResponse
	err := c.read(&resp, timeout)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil
	case err == nil:
		return errors.New("ztunnel sent a message nobody asked for")
	}
	return err
}

// read reads one message; a message with file descriptors, a truncated one
// or one that does not parse is a protocol error.
func (c *conn) read(m proto.Message, timeout time.Duration) error {
	if err := c.u.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.u.ReadMsgUnix(buf, oob)
	if err != nil {
		return err
	}
	if oobn > 0 {
		closeRights(oob[:oobn])
		return errors.New("ztunnel sent file descriptors; it never should")
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return fmt.Errorf("message longer than %d bytes", maxMessage)
	}
	if n == 0 {
		// SOCK_SEQPACKET: a zero-length read is the peer's shutdown.
		return errClosed
	}
	if err := proto.Unmarshal(buf[:n], m); err != nil {
		return fmt.Errorf("malformed message (%d bytes): %w", n, err)
	}
	return nil
}

func closeRights(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
	}
}

func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup netns fd: %w", err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}
