package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Connector returns how the manager reaches the SPIRE server API:
//   - "" : nowhere; every call returns ErrNotConfigured.
//   - "unix:///path/api.sock": the server's admin socket (the manager shares
//     the socket's directory, or a test runs the server on the host).
//   - "host:port": TLS to the server's admin API relayed from its socket
//     (see the README's "Reaching the SPIRE server"). tlsDir holds tls.crt
//     and tls.key (the client certificate the far end requires) and ca.crt
//     (what the far end's certificate must chain to); they are read at
//     every connection, so rotated files are picked up.
func Connector(address, tlsDir string) func(context.Context) (Server, error) {
	return func(context.Context) (Server, error) {
		switch {
		case address == "":
			return nil, ErrNotConfigured
		case strings.HasPrefix(address, "unix:"):
			return Dial(address, nil)
		}
		cfg, err := clientTLS(address, tlsDir)
		if err != nil {
			return nil, err
		}
		return Dial(address, cfg)
	}
}

func clientTLS(address, dir string) (*tls.Config, error) {
	if dir == "" {
		return nil, fmt.Errorf("SPIRE server %s: a TLS directory (tls.crt, tls.key, ca.crt) is required off the admin socket", address)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	if err != nil {
		return nil, fmt.Errorf("SPIRE server client certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("SPIRE server CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("SPIRE server CA: no certificate in ca.crt")
	}
	host := address
	if i := strings.LastIndex(address, ":"); i > 0 {
		host = address[:i]
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS13}, nil
}

// SecretConnector reaches the SPIRE server API at address (host:port)
// through the relay, with the client certificate in the manager's relay
// Secret, which load returns (read at every connection: a renewed
// certificate is used at once). serverName is what the relay's serving
// certificate must be valid for; empty: address's host.
func SecretConnector(address, serverName string, load func(context.Context) (map[string][]byte, error)) func(context.Context) (Server, error) {
	if serverName == "" {
		serverName = address
		if i := strings.LastIndex(address, ":"); i > 0 {
			serverName = address[:i]
		}
	}
	return func(ctx context.Context) (Server, error) {
		data, err := load(ctx)
		if err != nil {
			return nil, fmt.Errorf("SPIRE relay client certificate: %w", err)
		}
		cfg, err := ClientTLSFromSecret(data, serverName)
		if err != nil {
			return nil, err
		}
		return Dial(address, cfg)
	}
}
