// Package zdsclient is a test double of ztunnel's side of the ZDS protocol
// (ztunnel's src/inpod/protocol.rs): it connects to the node agent's
// SOCK_SEQPACKET socket, says hello, and reads the agent's requests one at
// a time, each to be answered by Ack. It uses istio's own message types
// (istio.io/istio/pkg/zdsapi). It is never shipped: the ztunnel stand-in
// image and the agent's protocol tests use it.
package zdsclient

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

// Kind is the kind of a request from the agent.
type Kind string

// The requests the agent sends.
const (
	Add          Kind = "add"
	Keep         Kind = "keep"
	Del          Kind = "delete"
	SnapshotSent Kind = "snapshot_sent"
)

// Request is one request from the agent. Netns is the pod's network
// namespace for an Add (the receiver closes it).
type Request struct {
	Kind                            Kind
	UID                             string
	Name, Namespace, ServiceAccount string
	Netns                           *os.File
}

// Client is one connection to the agent.
type Client struct {
	u *net.UnixConn
}

// Dial connects to the socket at path and sends a hello with version
// (zdsapi.Version_V1 is what ztunnel speaks).
func Dial(path string, version zdsapi.Version) (*Client, error) {
	c, err := DialNoHello(path)
	if err != nil {
		return nil, err
	}
	if err := c.SendRaw(mustMarshal(&zdsapi.ZdsHello{Version: version})); err != nil {
		c.Close()
		return nil, fmt.Errorf("hello: %w", err)
	}
	return c, nil
}

// DialNoHello connects and sends nothing (tests send their own hello).
func DialNoHello(path string) (*Client, error) {
	u, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	return &Client{u: u}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.u.Close() }

// SendRaw writes one message as is (tests send malformed ones with it).
func (c *Client) SendRaw(b []byte) error {
	_, _, err := c.u.WriteMsgUnix(b, nil, nil)
	return err
}

// Recv reads the next request, waiting at most timeout.
func (c *Client) Recv(timeout time.Duration) (*Request, error) {
	if err := c.u.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.u.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	fds, err := rights(oob[:oobn])
	if err != nil {
		return nil, err
	}
	closeAll := func() {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeAll()
		return nil, errors.New("truncated message")
	}
	if n == 0 && oobn == 0 {
		return nil, errors.New("connection closed by the agent")
	}
	var m zdsapi.WorkloadRequest
	if err := proto.Unmarshal(buf[:n], &m); err != nil {
		closeAll()
		return nil, fmt.Errorf("malformed request: %w", err)
	}
	r := &Request{}
	switch p := m.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		r.Kind, r.UID = Add, p.Add.GetUid()
		wi := p.Add.GetWorkloadInfo()
		r.Name, r.Namespace, r.ServiceAccount = wi.GetName(), wi.GetNamespace(), wi.GetServiceAccount()
		if len(fds) != 1 {
			closeAll()
			return nil, fmt.Errorf("add %s came with %d file descriptors, want 1 (the netns)", r.UID, len(fds))
		}
		r.Netns = os.NewFile(uintptr(fds[0]), "netns:"+r.UID)
		return r, nil
	case *zdsapi.WorkloadRequest_Keep:
		r.Kind, r.UID = Keep, p.Keep.GetUid()
	case *zdsapi.WorkloadRequest_Del:
		r.Kind, r.UID = Del, p.Del.GetUid()
	case *zdsapi.WorkloadRequest_SnapshotSent:
		r.Kind = SnapshotSent
	default:
		closeAll()
		return nil, errors.New("request with no payload")
	}
	if len(fds) != 0 {
		closeAll()
		return nil, fmt.Errorf("%s came with %d file descriptors, want none", r.Kind, len(fds))
	}
	return r, nil
}

// Ack answers the last request; a non-empty errMsg is an error ack.
func (c *Client) Ack(errMsg string) error {
	return c.SendRaw(mustMarshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: errMsg}}}))
}

func rights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		f, err := unix.ParseUnixRights(&m)
		if err != nil {
			return nil, err
		}
		fds = append(fds, f...)
	}
	return fds, nil
}

func mustMarshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}
