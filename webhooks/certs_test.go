package webhooks

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// certFixture is a namespace and a ValidatingWebhookConfiguration with two
// webhooks that never match anything, for EnsureCerts to patch.
func certFixture(t *testing.T, c client.Client, name string) CertOptions {
	t.Helper()
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := c.Create(ctx, ns); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	hook := func(n string) admissionregistrationv1.ValidatingWebhook {
		return admissionregistrationv1.ValidatingWebhook{
			Name:         n,
			ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: ptr.To("https://127.0.0.1:1/never")},
			Rules: []admissionregistrationv1.RuleWithOperations{{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule:       admissionregistrationv1.Rule{APIGroups: []string{"never.invalid"}, APIVersions: []string{"v1"}, Resources: []string{"things"}},
			}},
			FailurePolicy:           ptr.To(admissionregistrationv1.Ignore),
			SideEffects:             ptr.To(admissionregistrationv1.SideEffectClassNone),
			AdmissionReviewVersions: []string{"v1"},
		}
	}
	vwc := &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks:   []admissionregistrationv1.ValidatingWebhook{hook("a." + name + ".test"), hook("b." + name + ".test")},
	}
	if err := c.Create(ctx, vwc); err != nil {
		t.Fatalf("create webhook configuration: %v", err)
	}
	t.Cleanup(func() {
		_ = c.Delete(context.Background(), vwc)
		_ = c.Delete(context.Background(), ns)
	})
	return CertOptions{
		Namespace: name, SecretName: "webhook-certs", WebhookConfigName: name,
		CertDir: t.TempDir(), Hosts: []string{"meshkeeper-webhook." + name + ".svc", "127.0.0.1"},
		Validity: 365 * 24 * time.Hour,
	}
}

func getSecret(g Gomega, c client.Client, opts CertOptions) *corev1.Secret {
	var s corev1.Secret
	g.Expect(c.Get(context.Background(), client.ObjectKey{Namespace: opts.Namespace, Name: opts.SecretName}, &s)).To(Succeed())
	return &s
}

func caBundles(g Gomega, c client.Client, name string) [][]byte {
	var vwc admissionregistrationv1.ValidatingWebhookConfiguration
	g.Expect(c.Get(context.Background(), client.ObjectKey{Name: name}, &vwc)).To(Succeed())
	var out [][]byte
	for _, w := range vwc.Webhooks {
		out = append(out, w.ClientConfig.CABundle)
	}
	return out
}

func mustCert(g Gomega, pemData []byte) *x509.Certificate {
	c, err := parseCertPEM(pemData)
	g.Expect(err).NotTo(HaveOccurred())
	return c
}

// expectServes checks the files in CertDir are a key pair the CA vouches
// for, for every host.
func expectServes(g Gomega, opts CertOptions, caPEM []byte) {
	certPEM, err := os.ReadFile(filepath.Join(opts.CertDir, "tls.crt"))
	g.Expect(err).NotTo(HaveOccurred())
	keyPEM, err := os.ReadFile(filepath.Join(opts.CertDir, "tls.key"))
	g.Expect(err).NotTo(HaveOccurred())
	_, err = tls.X509KeyPair(certPEM, keyPEM)
	g.Expect(err).NotTo(HaveOccurred(), "tls.crt and tls.key do not match")
	info, err := os.Stat(filepath.Join(opts.CertDir, "tls.key"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(info.Mode().Perm()).To(Equal(os.FileMode(0o600)))

	pool := x509.NewCertPool()
	g.Expect(pool.AppendCertsFromPEM(caPEM)).To(BeTrue())
	leaf := mustCert(g, certPEM)
	for _, h := range opts.Hosts {
		_, err := leaf.Verify(x509.VerifyOptions{DNSName: h, Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		g.Expect(err).NotTo(HaveOccurred(), "serving certificate for %s", h)
	}
	g.Expect(leaf.PublicKeyAlgorithm).To(Equal(x509.ECDSA))
}

func TestEnsureCerts(t *testing.T) {
	_, _, c := testAPIServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	opts := certFixture(t, c, "certs-basic")

	// First call: creates the Secret, writes the files, sets every caBundle.
	g.Expect(EnsureCerts(ctx, c, opts)).To(Succeed())
	s := getSecret(g, c, opts)
	g.Expect(s.Type).To(Equal(corev1.SecretTypeTLS))
	g.Expect(s.Data).To(HaveKey("ca.crt"))
	g.Expect(s.Data).To(HaveKey("ca.key"))
	g.Expect(s.Data).NotTo(HaveKey("ca-previous.crt"))
	ca := mustCert(g, s.Data["ca.crt"])
	g.Expect(ca.IsCA).To(BeTrue())
	g.Expect(ca.NotAfter).To(BeTemporally("~", time.Now().Add(opts.Validity), time.Minute))
	expectServes(g, opts, s.Data["ca.crt"])
	g.Expect(os.ReadFile(filepath.Join(opts.CertDir, "tls.crt"))).To(Equal(s.Data["tls.crt"]))
	g.Expect(caBundles(g, c, opts.WebhookConfigName)).To(Equal([][]byte{s.Data["ca.crt"], s.Data["ca.crt"]}))

	// Second call, from "another replica" with an empty cert dir: same CA,
	// same certificate, no write to the Secret.
	opts2 := opts
	opts2.CertDir = t.TempDir()
	g.Expect(EnsureCerts(ctx, c, opts2)).To(Succeed())
	s2 := getSecret(g, c, opts)
	g.Expect(s2.ResourceVersion).To(Equal(s.ResourceVersion))
	g.Expect(os.ReadFile(filepath.Join(opts2.CertDir, "tls.crt"))).To(Equal(s.Data["tls.crt"]))

	// A host the certificate does not cover: same CA, new certificate.
	opts3 := opts
	opts3.Hosts = append(append([]string(nil), opts.Hosts...), "meshkeeper-webhook."+opts.Namespace+".svc.cluster.local")
	g.Expect(EnsureCerts(ctx, c, opts3)).To(Succeed())
	s3 := getSecret(g, c, opts)
	g.Expect(s3.Data["ca.crt"]).To(Equal(s.Data["ca.crt"]))
	g.Expect(s3.Data["tls.crt"]).NotTo(Equal(s.Data["tls.crt"]))
	expectServes(g, opts3, s3.Data["ca.crt"])
}

func TestEnsureCertsRotatesBeforeExpiry(t *testing.T) {
	_, _, c := testAPIServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	opts := certFixture(t, c, "certs-rotate")

	// A bundle issued 300 of 365 days ago: less than a third left.
	old, err := issue(nil, opts, time.Now().Add(-300*24*time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(c.Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: opts.Namespace, Name: opts.SecretName},
		Type:       corev1.SecretTypeTLS,
		Data:       old.data(),
	})).To(Succeed())

	g.Expect(EnsureCerts(ctx, c, opts)).To(Succeed())
	s := getSecret(g, c, opts)
	g.Expect(s.Data["ca.crt"]).NotTo(Equal(old.caPEM), "the CA is renewed")
	g.Expect(s.Data["tls.crt"]).NotTo(Equal(old.certPEM), "the serving certificate is renewed")
	g.Expect(s.Data["ca-previous.crt"]).To(Equal(old.caPEM), "the old CA is kept")
	g.Expect(mustCert(g, s.Data["tls.crt"]).NotAfter).To(BeTemporally(">", time.Now().Add(300*24*time.Hour)))
	expectServes(g, opts, s.Data["ca.crt"])

	// The webhook trusts both CAs until the old one expires, so replicas
	// still serving the old certificate keep working.
	for _, b := range caBundles(g, c, opts.WebhookConfigName) {
		g.Expect(b).To(Equal(append(append([]byte(nil), s.Data["ca.crt"]...), old.caPEM...)))
		g.Expect(countPEM(b)).To(Equal(2))
	}

	// And once rotated, it stays put.
	g.Expect(EnsureCerts(ctx, c, opts)).To(Succeed())
	g.Expect(getSecret(g, c, opts).ResourceVersion).To(Equal(s.ResourceVersion))
}

func TestEnsureCertsRacingReplicas(t *testing.T) {
	_, _, c := testAPIServer(t)
	g := NewWithT(t)
	opts := certFixture(t, c, "certs-race")

	const replicas = 4
	dirs := make([]string, replicas)
	errs := make([]error, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		dirs[i] = t.TempDir()
		o := opts
		o.CertDir = dirs[i]
		wg.Go(func() { errs[i] = EnsureCerts(context.Background(), c, o) })
	}
	wg.Wait()
	for i, err := range errs {
		g.Expect(err).NotTo(HaveOccurred(), "replica %d", i)
	}
	s := getSecret(g, c, opts)
	for i, d := range dirs {
		g.Expect(os.ReadFile(filepath.Join(d, "tls.crt"))).To(Equal(s.Data["tls.crt"]), "replica %d serves the certificate in the Secret", i)
	}
}

func TestEnsureCertsErrors(t *testing.T) {
	_, _, c := testAPIServer(t)
	g := NewWithT(t)
	opts := certFixture(t, c, "certs-errors")

	missing := opts
	missing.WebhookConfigName = "no-such-webhook-config"
	err := EnsureCerts(context.Background(), c, missing)
	g.Expect(err).To(MatchError(ContainSubstring(`ValidatingWebhookConfiguration "no-such-webhook-config" not found`)))

	g.Expect(EnsureCerts(context.Background(), c, CertOptions{})).To(MatchError(ContainSubstring("Namespace SecretName WebhookConfigName CertDir Hosts")))
}

func TestCertRefresherRunsOnEveryReplica(t *testing.T) {
	g := NewWithT(t)
	r := NewCertRefresher(nil, CertOptions{}, 0)
	le, ok := r.(manager.LeaderElectionRunnable)
	g.Expect(ok).To(BeTrue())
	g.Expect(le.NeedLeaderElection()).To(BeFalse())

	// It stops with its context.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Start(ctx) }()
	cancel()
	g.Eventually(done).Should(Receive(BeNil()))
}

func TestCertRefresherRefreshes(t *testing.T) {
	_, _, c := testAPIServer(t)
	g := NewWithT(t)
	opts := certFixture(t, c, "certs-refresh")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = NewCertRefresher(c, opts, 100*time.Millisecond).Start(ctx) }()
	g.Eventually(func() error {
		_, err := os.Stat(filepath.Join(opts.CertDir, "tls.crt"))
		return err
	}).WithTimeout(10 * time.Second).Should(Succeed())
}

func countPEM(b []byte) int {
	n := 0
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return n
		}
		n++
	}
}

func TestCABundleDropsExpiredPreviousCA(t *testing.T) {
	g := NewWithT(t)
	opts, err := CertOptions{Namespace: "n", SecretName: "s", WebhookConfigName: "w", CertDir: "d", Hosts: []string{"h"}}.withDefaults()
	g.Expect(err).NotTo(HaveOccurred())
	old, err := issue(nil, opts, time.Now().Add(-400*24*time.Hour)) // expired
	g.Expect(err).NotTo(HaveOccurred())
	cur, err := issue(old, opts, time.Now())
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(cur.caPEM).NotTo(Equal(old.caPEM))
	g.Expect(cur.previousCAPEM).To(BeEmpty(), "an expired CA is not worth trusting")
	g.Expect(bytes.Count(cur.caBundle(time.Now()), []byte("BEGIN CERTIFICATE"))).To(Equal(1))
	g.Expect(fmt.Sprint(renewalReason(cur, opts.Hosts, time.Now()))).To(BeEmpty())
}
