package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/test/spire"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T, name string) testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return testCA{cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes tls.crt, tls.key and ca.crt (peerCA: what the peer must chain to) into dir.
func (ca testCA) issue(t *testing.T, dir string, client bool, peerCA testCA) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "meshkeeper"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	if client {
		tpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"tls.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"tls.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
		"ca.crt":  peerCA.pem,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRelay reaches a real spire-server's admin API from "another pod":
// over mutual TLS through the relay to the admin socket. A client without
// a certificate of the client CA gets nothing.
func TestRelay(t *testing.T) {
	g := NewWithT(t)
	s := spire.StartServer(t, spire.ServerOptions{})
	_, err := s.CLI("entry", "create", "-parentID", "spiffe://example.org/node", "-spiffeID", "spiffe://example.org/static/db", "-selector", "unix:uid:999")
	g.Expect(err).NotTo(HaveOccurred())

	serverCA, clientCA, otherCA := newCA(t, "relay"), newCA(t, "manager"), newCA(t, "stranger")
	dir := t.TempDir()
	serverCA.issue(t, filepath.Join(dir, "relay"), false, clientCA)
	clientCA.issue(t, filepath.Join(dir, "manager"), true, serverCA)
	otherCA.issue(t, filepath.Join(dir, "stranger"), true, serverCA)

	cfg, err := identity.RelayTLS(filepath.Join(dir, "relay"))
	g.Expect(err).NotTo(HaveOccurred())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	g.Expect(err).NotTo(HaveOccurred())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- identity.Relay(ctx, ln, s.Socket, cfg) }()
	t.Cleanup(func() { cancel(); <-done })

	srv, err := identity.Connector(ln.Addr().String(), filepath.Join(dir, "manager"))(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	defer srv.Close()
	entries, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(spiffeIDs(entries)).To(ConsistOf("spiffe://example.org/static/db"))

	stranger, err := identity.Connector(ln.Addr().String(), filepath.Join(dir, "stranger"))(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	defer stranger.Close()
	sctx, scancel := context.WithTimeout(ctx, 3*time.Second)
	defer scancel()
	_, err = stranger.ListEntries(sctx)
	g.Expect(err).To(HaveOccurred(), "a client certificate of another CA is refused")
}
