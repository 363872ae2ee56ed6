package identity

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// The relay's mutual TLS uses one private CA, kept by the manager, and two
// Secrets (README, "Reaching the SPIRE server"):
//
//   - the manager's Secret, in the manager's namespace: the CA and its key,
//     and the manager's client certificate; it never leaves the manager;
//   - the relay's Secret, in the components' namespace, mounted by the relay
//     beside spire-server: its serving certificate and the CA certificates
//     client certificates must chain to, and no CA key and no client key, so
//     whoever can read the components' namespace's Secrets (istiod can) gets
//     no way to call the SPIRE admin API.
//
// One CA signs both leaves; extended key usages keep them apart (the
// serving certificate is no client certificate, Go's verification checks).
// Rotation never breaks a connection: a leaf is renewed under the same CA; a
// CA is replaced only when it nears its end, and then the previous CA stays
// trusted on both sides and the manager keeps its previous client
// certificate, presenting whichever one the relay's acceptable CAs name, so a
// relay whose mounted Secret lags behind (the kubelet syncs Secret volumes
// every minute or so) still lets the manager in.

// Keys of the manager's relay Secret.
const (
	RelayKeyCA           = "ca.crt"
	RelayKeyCAKey        = "ca.key"
	RelayKeyCert         = "tls.crt"
	RelayKeyKey          = "tls.key"
	RelayKeyPreviousCA   = "ca-previous.crt"
	RelayKeyPreviousCert = "tls-previous.crt"
	RelayKeyPreviousKey  = "tls-previous.key"
)

// Validity of the relay's CA and leaves. Each is renewed once less than a
// third of it is left: a leaf after 60 days, the CA after two years.
const (
	RelayCAValidity   = 3 * 365 * 24 * time.Hour
	RelayLeafValidity = 90 * 24 * time.Hour
	relayClockSkew    = 5 * time.Minute
)

// RelayCerts is what EnsureRelayCerts returns: the data of both Secrets.
type RelayCerts struct {
	// Manager is the manager's Secret: RelayKey* keys.
	Manager map[string][]byte
	// Relay is the relay's Secret: ca.crt (every CA client certificates may
	// chain to), tls.crt and tls.key (its serving certificate for Hosts).
	Relay map[string][]byte
}

// EnsureRelayCerts returns the Secrets' data good at now for a relay
// reachable as hosts, keeping whatever is still good in the current data (nil
// maps when the Secrets do not exist yet). reason is why anything changed,
// "" when both are as they should be (then the returned maps are the
// current ones).
func EnsureRelayCerts(manager, relay map[string][]byte, hosts []string, now time.Time) (out RelayCerts, reason string, err error) {
	if len(hosts) == 0 {
		return out, "", errors.New("relay certificates: no host names for the relay's serving certificate")
	}
	out.Manager = copyData(manager)
	ca, caKey, caErr := parseCAPair(manager[RelayKeyCA], manager[RelayKeyCAKey])
	var reasons []string
	switch {
	case caErr != nil:
		reasons = append(reasons, "CA: "+caErr.Error())
	case soon(ca, now):
		reasons = append(reasons, fmt.Sprintf("CA expires at %s", ca.NotAfter.UTC().Format(time.RFC3339)))
	}
	if len(reasons) > 0 {
		// A new CA. The one it replaces, while still valid, stays trusted
		// and its client certificate stays presentable.
		delete(out.Manager, RelayKeyPreviousCA)
		delete(out.Manager, RelayKeyPreviousCert)
		delete(out.Manager, RelayKeyPreviousKey)
		if caErr == nil && now.Before(ca.NotAfter) {
			if leafOK(manager[RelayKeyCert], manager[RelayKeyKey], ca, nil, x509.ExtKeyUsageClientAuth, now, false) == "" {
				out.Manager[RelayKeyPreviousCA] = manager[RelayKeyCA]
				out.Manager[RelayKeyPreviousCert] = manager[RelayKeyCert]
				out.Manager[RelayKeyPreviousKey] = manager[RelayKeyKey]
			}
		}
		if ca, caKey, out.Manager[RelayKeyCA], out.Manager[RelayKeyCAKey], err = newRelayCA(now); err != nil {
			return out, "", err
		}
		delete(out.Manager, RelayKeyCert) // issued below under the new CA
	} else if prev, err := parseCert(manager[RelayKeyPreviousCA]); err == nil && !now.Before(prev.NotAfter) {
		reasons = append(reasons, "the previous CA expired")
		delete(out.Manager, RelayKeyPreviousCA)
		delete(out.Manager, RelayKeyPreviousCert)
		delete(out.Manager, RelayKeyPreviousKey)
	}
	if why := leafOK(out.Manager[RelayKeyCert], out.Manager[RelayKeyKey], ca, nil, x509.ExtKeyUsageClientAuth, now, true); why != "" {
		reasons = append(reasons, "client certificate: "+why)
		if out.Manager[RelayKeyCert], out.Manager[RelayKeyKey], err = newRelayLeaf(ca, caKey, nil, x509.ExtKeyUsageClientAuth, now); err != nil {
			return out, "", err
		}
	}

	trusted := append(append([]byte(nil), out.Manager[RelayKeyCA]...), out.Manager[RelayKeyPreviousCA]...)
	out.Relay = map[string][]byte{RelayKeyCA: trusted, RelayKeyCert: relay[RelayKeyCert], RelayKeyKey: relay[RelayKeyKey]}
	if !bytes.Equal(relay[RelayKeyCA], trusted) {
		reasons = append(reasons, "the relay's trusted CAs changed")
	}
	if why := leafOK(relay[RelayKeyCert], relay[RelayKeyKey], ca, hosts, x509.ExtKeyUsageServerAuth, now, true); why != "" {
		reasons = append(reasons, "relay serving certificate: "+why)
		if out.Relay[RelayKeyCert], out.Relay[RelayKeyKey], err = newRelayLeaf(ca, caKey, hosts, x509.ExtKeyUsageServerAuth, now); err != nil {
			return out, "", err
		}
	}
	if len(reasons) == 0 {
		return RelayCerts{Manager: manager, Relay: relay}, "", nil
	}
	return out, joinReasons(reasons), nil
}

// ClientTLSFromSecret is the manager's TLS configuration towards the relay
// from the manager's Secret: it trusts the current and the previous CA and
// presents the client certificate the relay asks for (its acceptable CAs),
// the current one when the relay names none it has.
func ClientTLSFromSecret(data map[string][]byte, serverName string) (*tls.Config, error) {
	current, err := tls.X509KeyPair(data[RelayKeyCert], data[RelayKeyKey])
	if err != nil {
		return nil, fmt.Errorf("SPIRE relay client certificate: %w", err)
	}
	certs := []tls.Certificate{current}
	if prev, err := tls.X509KeyPair(data[RelayKeyPreviousCert], data[RelayKeyPreviousKey]); err == nil {
		certs = append(certs, prev)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data[RelayKeyCA]) {
		return nil, errors.New("SPIRE relay CA: no certificate in " + RelayKeyCA)
	}
	pool.AppendCertsFromPEM(data[RelayKeyPreviousCA])
	return &tls.Config{
		RootCAs:    pool,
		ServerName: serverName,
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(req *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			for i := range certs {
				if req.SupportsCertificate(&certs[i]) == nil {
					return &certs[i], nil
				}
			}
			return &certs[0], nil
		},
	}, nil
}

func copyData(in map[string][]byte) map[string][]byte {
	out := make(map[string][]byte, len(in))
	for k, v := range in {
		out[k] = v
	}
	return out
}

func joinReasons(rs []string) string {
	var b bytes.Buffer
	for i, r := range rs {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(r)
	}
	return b.String()
}

// soon is true when less than a third of c's validity is left (or it is not
// valid yet).
func soon(c *x509.Certificate, now time.Time) bool {
	return c.NotAfter.Sub(now) < c.NotAfter.Sub(c.NotBefore)/3 || now.Before(c.NotBefore)
}

// leafOK says why the leaf in certPEM/keyPEM is not good under ca for hosts
// and usage at now, or "". checkSoon also asks for renewal ahead of expiry.
func leafOK(certPEM, keyPEM []byte, ca *x509.Certificate, hosts []string, usage x509.ExtKeyUsage, now time.Time, checkSoon bool) string {
	if len(certPEM) == 0 {
		return "missing"
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return err.Error()
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return err.Error()
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return "not valid under the current CA: " + err.Error()
	}
	if checkSoon && soon(leaf, now) {
		return fmt.Sprintf("expires at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	for _, h := range hosts {
		if err := leaf.VerifyHostname(h); err != nil {
			return fmt.Sprintf("does not cover %q", h)
		}
	}
	return ""
}

func parseCert(data []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("missing or not a PEM certificate")
	}
	return x509.ParseCertificate(block.Bytes)
}

func parseCAPair(certPEM, keyPEM []byte) (*x509.Certificate, crypto.Signer, error) {
	ca, err := parseCert(certPEM)
	if err != nil {
		return nil, nil, err
	}
	if !ca.IsCA {
		return nil, nil, errors.New("not a CA certificate")
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, nil, errors.New("missing or not a PEM key")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("CA key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, errors.New("CA key: unsupported key type")
	}
	if pub, ok := ca.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(signer.Public()) {
		return nil, nil, errors.New("CA key does not match the CA certificate")
	}
	return ca, signer, nil
}

func newRelayCA(now time.Time) (*x509.Certificate, crypto.Signer, []byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("relay CA key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, nil, nil, err
	}
	tpl := &x509.Certificate{
		SerialNumber: serial,
		// The time in the name tells the current CA from the previous one
		// in a TLS handshake's acceptable CAs.
		Subject:               pkix.Name{CommonName: "meshkeeper-spire-relay-ca " + now.UTC().Format(time.RFC3339), Organization: []string{"meshkeeper"}},
		NotBefore:             now.Add(-relayClockSkew),
		NotAfter:              now.Add(RelayCAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, key.Public(), key)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("relay CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

// newRelayLeaf issues a serving certificate for hosts (usage ServerAuth) or
// the manager's client certificate (ClientAuth).
func newRelayLeaf(ca *x509.Certificate, caKey crypto.Signer, hosts []string, usage x509.ExtKeyUsage, now time.Time) ([]byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("relay certificate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	notAfter := now.Add(RelayLeafValidity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	cn := "meshkeeper-manager"
	if len(hosts) > 0 {
		cn = hosts[0]
	}
	tpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"meshkeeper"}},
		NotBefore:    now.Add(-relayClockSkew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     hosts,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("relay certificate for %v: %w", hosts, err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}
