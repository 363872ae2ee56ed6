package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"
)

// TestCatalogSourceFlags: bad --catalog-* flags fail before the manager
// connects anywhere, naming the flag and what would do.
func TestCatalogSourceFlags(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "key.pub.pem")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	const ref = "oci://registry.example.com/meshkeeper/catalog:stable"
	pinned := "oci://registry.example.com/meshkeeper/catalog@sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	cases := []struct {
		name string
		o    options
		want string // "" = accepted
	}{
		{name: "no source: the embedded catalog", o: options{}},
		{name: "a tag and a key", o: options{catalogSource: ref, catalogPublicKey: keyFile, catalogInterval: time.Minute}},
		{name: "a pinned digest, no key", o: options{catalogSource: pinned, catalogInterval: time.Minute}},
		{name: "a tag without a key", o: options{catalogSource: ref, catalogInterval: time.Minute}, want: "nothing to verify it with"},
		{name: "a key that is not one", o: options{catalogSource: ref, catalogPublicKey: "main.go", catalogInterval: time.Minute}, want: "--catalog-public-key main.go: not a PEM PUBLIC KEY block"},
		{name: "no reference", o: options{catalogSource: "oci://registry.example.com/meshkeeper/catalog", catalogPublicKey: keyFile, catalogInterval: time.Minute}, want: "no tag or digest"},
		{name: "polling too often", o: options{catalogSource: ref, catalogPublicKey: keyFile, catalogInterval: time.Millisecond}, want: "--catalog-interval 1ms: want at least 1s"},
		{name: "a key without a source", o: options{catalogPublicKey: keyFile}, want: "need --catalog-source"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			_, err := catalogSourceFlags(tc.o)
			if tc.want == "" {
				g.Expect(err).NotTo(HaveOccurred())
				return
			}
			g.Expect(err).To(MatchError(ContainSubstring(tc.want)))
		})
	}
}

// TestSpireFlags: --spire-server-address host:port is the relay beside
// spire-server, which needs the relay's image; with --spire-tls-dir the
// operator brings the certificates, else meshkeeper keeps them.
func TestSpireFlags(t *testing.T) {
	g := NewWithT(t)
	_, relay, err := spireFlags(options{}, nil)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(relay).To(BeNil(), "no address: no relay")
	_, relay, err = spireFlags(options{spireServerAddress: "unix:///run/spire/api.sock"}, nil)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(relay).To(BeNil(), "the admin socket itself: no relay")

	_, _, err = spireFlags(options{spireServerAddress: "spire-server.istio-system.svc:8082"}, nil)
	g.Expect(err).To(MatchError(ContainSubstring("set --spire-relay-image to this manager's image")))

	o := options{spireServerAddress: "spire-server.istio-system.svc:8082", spireRelayImage: "ghcr.io/meshkeeper/manager:0.1.0",
		namespace: "meshkeeper-system", spireRelaySecret: "meshkeeper-spire-relay"}
	_, relay, err = spireFlags(o, nil)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(*relay()).To(And(HaveField("Image", "ghcr.io/meshkeeper/manager:0.1.0"), HaveField("ManageCerts", true),
		HaveField("Namespace", "meshkeeper-system"), HaveField("Secret", "meshkeeper-spire-relay")))
	o.spireTLSDir = "/etc/spire-relay"
	_, relay, err = spireFlags(o, nil)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(relay().ManageCerts).To(BeFalse(), "certificates the operator brings are not written by meshkeeper")
}
