package agent

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// NetnsCookie returns the cookie of the network namespace at path
// (/proc/<pid>/ns/net, /run/netns/<name>, ...): the value the datapath's
// programs get from bpf_get_netns_cookie. It creates a socket inside the
// namespace on a dedicated, locked OS thread and reads SO_NETNS_COOKIE.
func NetnsCookie(path string) (uint64, error) {
	ns, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("netns cookie: %w", err)
	}
	defer ns.Close()
	type result struct {
		cookie uint64
		err    error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread is never unlocked: it leaves the host network
		// namespace, so it must die with this goroutine rather than go back
		// to the scheduler's pool.
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("netns cookie: setns %s: %w", path, err)}
			return
		}
		c, err := socketNetnsCookie()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.cookie, r.err
}

// CurrentNetnsCookie returns the cookie of the calling thread's network
// namespace (the agent runs in the host's).
func CurrentNetnsCookie() (uint64, error) { return socketNetnsCookie() }

func socketNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("netns cookie: socket: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("netns cookie: SO_NETNS_COOKIE (kernel >= 5.14): %w", err)
	}
	return c, nil
}
