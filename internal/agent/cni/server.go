package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
)

// Handler decides and acts on the plugin's requests. netns is the pod's
// network namespace, or nil when the plugin sent none; the server closes it
// after the call. ctx ends a little before the plugin stops waiting.
type Handler interface {
	Handle(ctx context.Context, req Request, netns *os.File) Response
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req Request, netns *os.File) Response

func (f HandlerFunc) Handle(ctx context.Context, req Request, netns *os.File) Response {
	return f(ctx, req, netns)
}

// Server serves the plugin on a unix socket.
type Server struct {
	ln      *net.UnixListener
	handler Handler
	log     logr.Logger
	wg      sync.WaitGroup
}

// Listen creates the socket at path (its directory too), replacing a stale
// one a previous agent left, readable and writable by root only: the
// plugin runs as root, and a request enrols a network namespace.
func Listen(path string, h Handler, log logr.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("CNI socket directory: %w", err)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("remove stale CNI socket %s: %w", path, err)
	}
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("CNI socket: %w", err)
	}
	return &Server{ln: ln, handler: h, log: log}, nil
}

// Addr is the socket's path.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Serve answers requests until ctx ends, then removes the socket (new
// ADDs fail closed until the next agent listens) and waits for the
// requests in flight.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { _ = s.ln.Close() })
	defer stop()
	defer s.wg.Wait()
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("CNI socket: accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(ctx, conn)
		}()
	}
}

// Close stops accepting and removes the socket.
func (s *Server) Close() error { return s.ln.Close() }

// agentMargin is how much earlier than the plugin the agent gives up, so
// that its answer (saying why) arrives before the plugin's own timeout.
const agentMargin = 250 * time.Millisecond

func (s *Server) serveConn(ctx context.Context, conn *net.UnixConn) {
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		s.log.Error(err, "Reading a CNI request failed")
		return
	}
	files, ferr := receivedFiles(oob[:oobn])
	defer func() {
		for _, f := range files {
			_ = f.Close()
		}
	}()
	var req Request
	resp := func() Response {
		if ferr != nil {
			return Response{Result: ResultError, Message: "reading the network namespace fd: " + ferr.Error()}
		}
		if err := json.Unmarshal(buf[:n], &req); err != nil {
			return Response{Result: ResultError, Message: "malformed request: " + err.Error()}
		}
		if req.Version != ProtocolVersion {
			return Response{Result: ResultError, Message: fmt.Sprintf("CNI plugin speaks protocol version %d, this agent %d: install the plugin of this agent's version (the agent copies it into the CNI bin directory at start)", req.Version, ProtocolVersion)}
		}
		if len(files) > 1 {
			return Response{Result: ResultError, Message: fmt.Sprintf("%d fds with one request, want at most 1", len(files))}
		}
		budget := DefaultTimeout
		if req.TimeoutMillis > 0 {
			budget = time.Duration(req.TimeoutMillis) * time.Millisecond
		}
		hctx, cancel := context.WithTimeout(ctx, max(budget-agentMargin, budget/2))
		defer cancel()
		var netns *os.File
		if len(files) == 1 {
			netns = files[0]
		}
		return s.handler.Handle(hctx, req, netns)
	}()
	body, _ := json.Marshal(resp)
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write(body); err != nil {
		s.log.Error(err, "Answering a CNI request failed (the plugin gave up?)", "pod", req.Namespace+"/"+req.Name, "command", req.Command)
	}
}

func receivedFiles(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var out []*os.File
	for i := range msgs {
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			out = append(out, os.NewFile(uintptr(fd), "netns"))
		}
	}
	return out, nil
}
