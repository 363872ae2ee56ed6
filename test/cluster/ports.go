package cluster

import "net"

// FreePort returns a TCP port that is free on 127.0.0.1 when it returns.
// Nothing reserves it: another process may bind it before the caller's
// server does. For several ports at once use FreePorts, which never returns
// the same port twice.
func FreePort() (int, error) {
	return freePortOn("127.0.0.1")
}

// FreePorts returns n distinct free TCP ports on 127.0.0.1: each is held
// open until all are found, so none is handed out twice.
func FreePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// freePortOn returns a TCP port free on ip, an address of this machine
// other than loopback (the real node's bridge address).
func freePortOn(ip string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close() //nolint:errcheck // only its port is wanted
	return l.Addr().(*net.TCPAddr).Port, nil
}
