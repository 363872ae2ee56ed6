package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Call sends one request to the agent at socket, with netns's fd attached
// when netns is not nil, and waits for the answer until ctx ends. A failure
// to connect wraps ErrAgentUnreachable; no answer before ctx's deadline
// wraps ErrAgentTimeout.
func Call(ctx context.Context, socket string, req Request, netns *os.File) (Response, error) {
	req.Version = ProtocolVersion
	if dl, ok := ctx.Deadline(); ok && req.TimeoutMillis == 0 {
		req.TimeoutMillis = time.Until(dl).Milliseconds()
	}
	body, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socket)
	if err != nil {
		if ctx.Err() != nil {
			return Response{}, fmt.Errorf("%w: connecting to %s: %w", ErrAgentTimeout, socket, err)
		}
		return Response{}, fmt.Errorf("%w: %w", ErrAgentUnreachable, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	if _, _, err := conn.WriteMsgUnix(body, oob, nil); err != nil {
		return Response{}, classify(ctx, socket, "sending the request", err)
	}
	buf := make([]byte, maxMessage)
	n, _, _, _, err := conn.ReadMsgUnix(buf, nil)
	if err != nil {
		return Response{}, classify(ctx, socket, "waiting for the answer", err)
	}
	if n == 0 {
		return Response{}, fmt.Errorf("%w: %s closed the connection without an answer", ErrAgentUnreachable, socket)
	}
	var resp Response
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		return Response{}, fmt.Errorf("answer from %s: %w", socket, err)
	}
	switch resp.Result {
	case ResultEnrolled, ResultSkipped, ResultError:
	default:
		return Response{}, fmt.Errorf("answer from %s: unknown result %q", socket, resp.Result)
	}
	return resp, nil
}

func classify(ctx context.Context, socket, doing string, err error) error {
	var ne net.Error
	if ctx.Err() != nil || (errors.As(err, &ne) && ne.Timeout()) {
		return fmt.Errorf("%w: %s at %s", ErrAgentTimeout, doing, socket)
	}
	return fmt.Errorf("%w: %s at %s: %w", ErrAgentUnreachable, doing, socket, err)
}
