package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
// (its serving certificate) and ca.crt (the CAs client certificates must
// chain to). The files are read again at every handshake, so a Secret volume
// the kubelet updates (a renewed certificate, a new CA) takes effect on the
// next connection without a restart; a handshake while the files are
// unreadable fails, the relay keeps running. gRPC needs ALPN h2.
func RelayTLS(dir string) (*tls.Config, error) {
	if _, err := loadRelayTLS(dir); err != nil {
		return nil, err
	}
	return &tls.Config{
		// Checked by Relay; the real settings come per handshake.
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  x509.NewCertPool(),
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return loadRelayTLS(dir)
		},
	}, nil
}

func loadRelayTLS(dir string) (*tls.Config, error) {
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

// RelayOptions configure RunRelay, the relay container's entry point
// (`manager spire-relay`).
type RelayOptions struct {
	// Listen is the mutual-TLS address, e.g. ":8082".
	Listen string
	// Health serves /live and /ready over plain HTTP, e.g. ":8083"; empty:
	// none. /ready answers 200 only when the certificates load and the admin
	// socket accepts a connection.
	Health string
	// Socket is spire-server's admin socket.
	Socket string
	// TLSDir holds tls.crt, tls.key and ca.crt (the relay's Secret).
	TLSDir string
}

// RunRelay serves the relay until ctx ends.
func RunRelay(ctx context.Context, o RelayOptions) error {
	cfg, err := RelayTLS(o.TLSDir)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("spire relay: %w", err)
	}
	if o.Health != "" {
		hl, err := net.Listen("tcp", o.Health)
		if err != nil {
			_ = ln.Close()
			return fmt.Errorf("spire relay health: %w", err)
		}
		hs := &http.Server{Handler: relayHealth(o), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = hs.Serve(hl) }()
		defer hs.Close()
	}
	return Relay(ctx, ln, o.Socket, cfg)
}

func relayHealth(o RelayOptions) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		if _, err := loadRelayTLS(o.TLSDir); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		var d net.Dialer
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		c, err := d.DialContext(ctx, "unix", o.Socket)
		if err != nil {
			http.Error(w, "spire-server admin socket: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_ = c.Close()
		_, _ = io.WriteString(w, "ok\n")
	})
	return mux
}
