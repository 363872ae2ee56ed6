package webhooks

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// Keys of the certificate Secret. tls.crt and tls.key make it a regular
// kubernetes.io/tls Secret; the CA key lets any replica issue a new serving
// certificate; ca-previous.crt keeps trusting the CA being replaced until it
// expires, so a rotation never breaks a replica that still serves the old
// certificate.
const (
	SecretKeyCA         = "ca.crt"
	SecretKeyCAKey      = "ca.key"
	SecretKeyCert       = corev1.TLSCertKey       // tls.crt
	SecretKeyKey        = corev1.TLSPrivateKeyKey // tls.key
	SecretKeyPreviousCA = "ca-previous.crt"

	// DefaultCertValidity is the validity of the CA and the serving
	// certificate when CertOptions.Validity is zero.
	DefaultCertValidity = 365 * 24 * time.Hour
	// DefaultCertRefresh is how often NewCertRefresher checks when every is zero.
	DefaultCertRefresh = time.Hour
)

// clockSkew backdates certificates so a replica whose clock is slightly
// behind does not see them as not yet valid.
const clockSkew = 5 * time.Minute

// CertOptions says where the webhook serving certificate lives.
type CertOptions struct {
	// Namespace and SecretName locate the Secret that holds the CA and the
	// serving certificate, shared by every replica.
	Namespace, SecretName string
	// WebhookConfigName is the ValidatingWebhookConfiguration whose webhooks
	// get the CA bundle.
	WebhookConfigName string
	// CertDir is where tls.crt and tls.key are written for the webhook server.
	CertDir string
	// Hosts are the DNS names or IP addresses the serving certificate is for,
	// e.g. meshkeeper-webhook.meshkeeper-system.svc.
	Hosts []string
	// Validity of the CA and the serving certificate (default 365 days). Both
	// are renewed when less than a third of it is left.
	Validity time.Duration
}

func (o CertOptions) withDefaults() (CertOptions, error) {
	var missing []string
	for _, f := range []struct{ name, val string }{
		{"Namespace", o.Namespace}, {"SecretName", o.SecretName},
		{"WebhookConfigName", o.WebhookConfigName}, {"CertDir", o.CertDir},
	} {
		if f.val == "" {
			missing = append(missing, f.name)
		}
	}
	if len(o.Hosts) == 0 {
		missing = append(missing, "Hosts")
	}
	for _, h := range o.Hosts {
		if h == "" {
			missing = append(missing, "Hosts (an empty host)")
			break
		}
	}
	if len(missing) > 0 {
		return o, fmt.Errorf("webhook certificate options: %v must be set", missing)
	}
	if o.Validity < 0 {
		return o, fmt.Errorf("webhook certificate options: Validity %s must be positive, e.g. 8760h", o.Validity)
	}
	if o.Validity == 0 {
		o.Validity = DefaultCertValidity
	}
	return o, nil
}

// EnsureCerts makes sure a CA and a serving certificate for opts.Hosts exist
// in the Secret, are not about to expire, are written to opts.CertDir, and
// that the webhook configuration trusts the CA. c must read through to the
// API server (no cache); it is called before the manager starts. Replicas
// racing to create or renew the Secret converge on whichever write won.
//
// RBAC: get, create and update on Secrets in opts.Namespace; get and patch on
// the ValidatingWebhookConfiguration.
func EnsureCerts(ctx context.Context, c client.Client, opts CertOptions) error {
	opts, err := opts.withDefaults()
	if err != nil {
		return err
	}
	kp, err := ensureSecret(ctx, c, opts, time.Now())
	if err != nil {
		return err
	}
	if err := writeCertFiles(opts.CertDir, kp); err != nil {
		return err
	}
	return patchCABundle(ctx, c, opts.WebhookConfigName, kp.caBundle(time.Now()))
}

// certBundle is the content of the Secret.
type certBundle struct {
	caPEM, caKeyPEM, certPEM, keyPEM, previousCAPEM []byte
}

func bundleFromSecret(s *corev1.Secret) *certBundle {
	return &certBundle{
		caPEM:         s.Data[SecretKeyCA],
		caKeyPEM:      s.Data[SecretKeyCAKey],
		certPEM:       s.Data[SecretKeyCert],
		keyPEM:        s.Data[SecretKeyKey],
		previousCAPEM: s.Data[SecretKeyPreviousCA],
	}
}

func (b *certBundle) data() map[string][]byte {
	d := map[string][]byte{
		SecretKeyCA:    b.caPEM,
		SecretKeyCAKey: b.caKeyPEM,
		SecretKeyCert:  b.certPEM,
		SecretKeyKey:   b.keyPEM,
	}
	if len(b.previousCAPEM) > 0 {
		d[SecretKeyPreviousCA] = b.previousCAPEM
	}
	return d
}

// caBundle is the current CA followed by the previous one while it is valid.
func (b *certBundle) caBundle(now time.Time) []byte {
	out := append([]byte(nil), b.caPEM...)
	if prev, err := parseCertPEM(b.previousCAPEM); err == nil && now.Before(prev.NotAfter) && !bytes.Equal(b.previousCAPEM, b.caPEM) {
		out = append(out, b.previousCAPEM...)
	}
	return out
}

// ensureSecret reads, creates or renews the Secret and returns what it holds.
// On a lost race (AlreadyExists, Conflict) it reads again and takes what the
// other replica wrote if that is good.
func ensureSecret(ctx context.Context, c client.Client, opts CertOptions, now time.Time) (*certBundle, error) {
	key := types.NamespacedName{Namespace: opts.Namespace, Name: opts.SecretName}
	ref := klog.KRef(opts.Namespace, opts.SecretName)
	logger := log.FromContext(ctx).WithValues("secret", ref)
	const attempts = 5
	for range attempts {
		var s corev1.Secret
		err := c.Get(ctx, key, &s)
		switch {
		case apierrors.IsNotFound(err):
			kp, err := issue(nil, opts, now)
			if err != nil {
				return nil, err
			}
			s = corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{
					Namespace: opts.Namespace, Name: opts.SecretName,
					Labels: map[string]string{"app.kubernetes.io/managed-by": "meshkeeper"},
				},
				Type: corev1.SecretTypeTLS,
				Data: kp.data(),
			}
			err = c.Create(ctx, &s)
			if apierrors.IsAlreadyExists(err) {
				logger.V(1).Info("Webhook certificate Secret created by another replica; using it")
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("create webhook certificate secret %s: %w", ref, err)
			}
			logger.Info("Created webhook serving certificate", "hosts", opts.Hosts, "notAfter", kp.notAfter())
			return kp, nil
		case err != nil:
			return nil, fmt.Errorf("get webhook certificate secret %s: %w", ref, err)
		}

		current := bundleFromSecret(&s)
		reason := renewalReason(current, opts.Hosts, now)
		if reason == "" {
			return current, nil
		}
		kp, err := issue(current, opts, now)
		if err != nil {
			return nil, err
		}
		s.Data = kp.data()
		err = c.Update(ctx, &s)
		if apierrors.IsConflict(err) {
			logger.V(1).Info("Webhook certificate Secret changed by another replica; reading it again")
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("renew webhook certificate in secret %s (%s): %w", ref, reason, err)
		}
		logger.Info("Renewed webhook serving certificate", "reason", reason, "hosts", opts.Hosts, "notAfter", kp.notAfter())
		return kp, nil
	}
	return nil, fmt.Errorf("webhook certificate secret %s keeps changing under us (%d attempts); retry", ref, attempts)
}

// renewalReason says why the bundle must be renewed, or "" when it is good.
func renewalReason(b *certBundle, hosts []string, now time.Time) string {
	ca, _, err := parseCA(b)
	if err != nil {
		return err.Error()
	}
	if expiresSoon(ca, now) {
		return fmt.Sprintf("CA expires at %s", ca.NotAfter.UTC().Format(time.RFC3339))
	}
	return leafProblem(b, ca, hosts, now)
}

// leafProblem says why the serving certificate must be reissued, or "".
func leafProblem(b *certBundle, ca *x509.Certificate, hosts []string, now time.Time) string {
	leaf, err := parseCertPEM(b.certPEM)
	if err != nil {
		return "serving certificate: " + err.Error()
	}
	key, err := parseKeyPEM(b.keyPEM)
	if err != nil {
		return "serving key: " + err.Error()
	}
	if !publicKeysEqual(leaf.PublicKey, key.Public()) {
		return "serving key does not match the certificate"
	}
	if err := leaf.CheckSignatureFrom(ca); err != nil {
		return "serving certificate is not signed by the CA"
	}
	if expiresSoon(leaf, now) {
		return fmt.Sprintf("serving certificate expires at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	for _, h := range hosts {
		if err := leaf.VerifyHostname(h); err != nil {
			return fmt.Sprintf("serving certificate does not cover host %q", h)
		}
	}
	return ""
}

// expiresSoon is true when less than a third of the validity is left.
func expiresSoon(c *x509.Certificate, now time.Time) bool {
	validity := c.NotAfter.Sub(c.NotBefore)
	return c.NotAfter.Sub(now) < validity/3 || now.Before(c.NotBefore)
}

// issue returns a bundle good for opts at now, keeping what is still good in
// current: a fresh CA only when the CA itself is bad or ending (the old one
// stays trusted as the previous CA), a fresh serving certificate otherwise.
func issue(current *certBundle, opts CertOptions, now time.Time) (*certBundle, error) {
	out := &certBundle{}
	var ca *x509.Certificate
	var caKey crypto.Signer
	if current != nil {
		if c, k, err := parseCA(current); err == nil && !expiresSoon(c, now) {
			ca, caKey = c, k
			out.caPEM, out.caKeyPEM, out.previousCAPEM = current.caPEM, current.caKeyPEM, current.previousCAPEM
		} else if err == nil && now.Before(c.NotAfter) {
			out.previousCAPEM = current.caPEM
		}
	}
	if ca == nil {
		var err error
		ca, caKey, out.caPEM, out.caKeyPEM, err = newCA(opts.Validity, now)
		if err != nil {
			return nil, err
		}
	} else if current != nil && leafProblem(current, ca, opts.Hosts, now) == "" {
		out.certPEM, out.keyPEM = current.certPEM, current.keyPEM
		return out, nil
	}
	var err error
	out.certPEM, out.keyPEM, err = newServingCert(ca, caKey, opts.Hosts, opts.Validity, now)
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (b *certBundle) notAfter() time.Time {
	if c, err := parseCertPEM(b.certPEM); err == nil {
		return c.NotAfter
	}
	return time.Time{}
}

func newCA(validity time.Duration, now time.Time) (*x509.Certificate, crypto.Signer, []byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("generate webhook CA key: %w", err)
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "meshkeeper-webhook-ca", Organization: []string{"meshkeeper"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("create webhook CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("parse webhook CA certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

func newServingCert(ca *x509.Certificate, caKey crypto.Signer, hosts []string, validity time.Duration, now time.Time) ([]byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate webhook serving key: %w", err)
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, nil, err
	}
	notAfter := now.Add(validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: hosts[0], Organization: []string{"meshkeeper"}},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("create webhook serving certificate for %v: %w", hosts, err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

func serialNumber() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generate certificate serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseCA(b *certBundle) (*x509.Certificate, crypto.Signer, error) {
	ca, err := parseCertPEM(b.caPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !ca.IsCA {
		return nil, nil, errors.New("CA certificate is not a CA")
	}
	key, err := parseKeyPEM(b.caKeyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("CA key: %w", err)
	}
	if !publicKeysEqual(ca.PublicKey, key.Public()) {
		return nil, nil, errors.New("CA key does not match the CA certificate")
	}
	return ca, key, nil
}

func parseCertPEM(data []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("missing or not a PEM certificate")
	}
	return x509.ParseCertificate(block.Bytes)
}

func parseKeyPEM(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("missing or not a PEM key")
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		if s, ok := k.(crypto.Signer); ok {
			return s, nil
		}
		return nil, errors.New("unsupported private key type")
	}
	k, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	return k, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// writeCertFiles writes tls.crt and tls.key into dir, each by an atomic
// rename, and only when their content changed (the webhook server's
// certwatcher reloads on change).
func writeCertFiles(dir string, b *certBundle) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create webhook cert dir %s: %w", dir, err)
	}
	// Key first: a watcher that reloads between the two writes then fails
	// the pair check and reloads again on the certificate write.
	if err := writeFileAtomic(filepath.Join(dir, SecretKeyKey), b.keyPEM, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, SecretKeyCert), b.certPEM, 0o644)
}

func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close() //nolint:errcheck,gosec // the write error is the one to report
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close() //nolint:errcheck,gosec // the chmod error is the one to report
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close() //nolint:errcheck,gosec // the sync error is the one to report
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename into %s: %w", path, err)
	}
	return nil
}

// patchCABundle sets caBundle on every webhook of the configuration, and
// nothing else, with a strategic merge patch keyed by webhook name.
func patchCABundle(ctx context.Context, c client.Client, name string, caBundle []byte) error {
	var vwc admissionregistrationv1.ValidatingWebhookConfiguration
	if err := c.Get(ctx, types.NamespacedName{Name: name}, &vwc); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("ValidatingWebhookConfiguration %q not found: install it (config/webhook) before starting meshkeeper, or set the webhook configuration name meshkeeper should patch", name)
		}
		return fmt.Errorf("get ValidatingWebhookConfiguration %q: %w", name, err)
	}
	type clientConfig struct {
		CABundle []byte `json:"caBundle"`
	}
	type hook struct {
		Name         string       `json:"name"`
		ClientConfig clientConfig `json:"clientConfig"`
	}
	var hooks []hook
	for _, w := range vwc.Webhooks {
		if !bytes.Equal(w.ClientConfig.CABundle, caBundle) {
			hooks = append(hooks, hook{Name: w.Name, ClientConfig: clientConfig{CABundle: caBundle}})
		}
	}
	if len(hooks) == 0 {
		return nil
	}
	patch, err := json.Marshal(map[string]any{"webhooks": hooks})
	if err != nil {
		return fmt.Errorf("build caBundle patch: %w", err)
	}
	if err := c.Patch(ctx, &vwc, client.RawPatch(types.StrategicMergePatchType, patch)); err != nil {
		return fmt.Errorf("set caBundle on ValidatingWebhookConfiguration %q: %w", name, err)
	}
	log.FromContext(ctx).Info("Set webhook CA bundle", "validatingWebhookConfiguration", name, "webhooks", len(hooks))
	return nil
}

// NewCertRefresher returns a Runnable that runs EnsureCerts every interval
// (default 1h) on every replica, leader or not: each replica serves webhooks
// from its own cert dir. The webhook server's certwatcher picks up new files.
func NewCertRefresher(c client.Client, opts CertOptions, every time.Duration) manager.Runnable {
	if every <= 0 {
		every = DefaultCertRefresh
	}
	return &certRefresher{c: c, opts: opts, every: every}
}

type certRefresher struct {
	c     client.Client
	opts  CertOptions
	every time.Duration
}

var _ manager.LeaderElectionRunnable = &certRefresher{}

// NeedLeaderElection is false: every replica keeps its own files fresh.
func (r *certRefresher) NeedLeaderElection() bool { return false }

// Start refreshes until ctx is done. Errors are logged and retried at the
// next tick; the current certificate stays in use meanwhile.
func (r *certRefresher) Start(ctx context.Context) error {
	logger := log.FromContext(ctx).WithName("webhook-certs")
	t := time.NewTicker(r.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := EnsureCerts(ctx, r.c, r.opts); err != nil {
				logger.Error(err, "Refresh webhook serving certificate failed; retrying at the next interval",
					"secret", klog.KRef(r.opts.Namespace, r.opts.SecretName), "interval", r.every)
			}
		}
	}
}
