package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Relay serves the SPIRE server's admin API, which the server offers only on
// a unix socket, to clients on ln that present a certificate chaining to
// the client CA in tlsConfig: it terminates mutual TLS and forwards each
// authenticated connection's bytes to the socket, nothing else. It runs
// beside spire-server (sharing the socket's directory) so the manager can
// reach the admin API from another pod. It returns when ctx ends.
func Relay(ctx context.Context, ln net.Listener, socket string, tlsConfig *tls.Config) error {
	if tlsConfig == nil || tlsConfig.ClientAuth != tls.RequireAndVerifyClientCert || tlsConfig.ClientCAs == nil {
		return errors.New("spire relay: mutual TLS is required (client CA and RequireAndVerifyClientCert)")
	}
	tl := tls.NewListener(ln, tlsConfig)
	go func() { <-ctx.Done(); _ = tl.Close() }()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := tl.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("spire relay: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			relayConn(ctx, c.(*tls.Conn), socket)
		}()
	}
}

func relayConn(ctx context.Context, c *tls.Conn, socket string) {
	defer c.Close()
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := c.HandshakeContext(hctx)
	cancel()
	if err != nil {
		return // no client certificate, or one the CA did not sign
	}
	var d net.Dialer
	up, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// RelayTLS is the relay's TLS configuration from dir: tls.crt and tls.key
// (its serving certificate) and ca.crt (the CA client certificates must
// chain to). gRPC needs ALPN h2.
func RelayTLS(dir string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	if err != nil {
		return nil, fmt.Errorf("spire relay certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("spire relay client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("spire relay client CA: no certificate in ca.crt")
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		NextProtos:   []string{"h2"},
		MinVersion:   tls.VersionTLS13,
	}, nil
}
