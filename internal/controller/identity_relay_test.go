package controller

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/test/spire"
)

// relayManagerSecret is the manager's relay Secret in the suite (the
// manager's --spire-relay-secret default).
const relayManagerSecret = "meshkeeper-spire-relay"

func secretData(key client.ObjectKey) func(context.Context) (map[string][]byte, error) {
	return func(ctx context.Context) (map[string][]byte, error) {
		var s corev1.Secret
		if err := k8s.Get(ctx, key, &s); err != nil {
			return nil, err
		}
		return s.Data, nil
	}
}

// mirrorSecret copies a Secret's keys into dir as the kubelet does for a
// Secret volume (only what changed, atomically), until ctx ends. It reports
// once the files first exist.
func mirrorSecret(ctx context.Context, t *testing.T, key client.ObjectKey, dir string) <-chan struct{} {
	ready := make(chan struct{})
	go func() {
		once := false
		for ctx.Err() == nil {
			data, err := secretData(key)(ctx)
			if err == nil {
				for k, v := range data {
					p := filepath.Join(dir, k)
					if old, err := os.ReadFile(p); err == nil && string(old) == string(v) {
						continue
					}
					tmp := p + ".tmp"
					if os.WriteFile(tmp, v, 0o600) == nil {
						_ = os.Rename(tmp, p)
					}
				}
				if !once {
					once = true
					close(ready)
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return ready
}

// TestIdentityRelay runs registration the way a real cluster does with the
// manager in its own pod: through the relay of the admin API over mutual
// TLS, with the certificates meshkeeper writes into its Secrets. The SPIRE
// server is the real spire-server v1.13.3 (a host process: the relay is the
// same code the relay container runs, identity.RunRelay, serving the
// server's admin socket; the relay's Secret reaches it as the kubelet's
// Secret volume would, mirrored into its directory). A Secret of the relay's
// name that meshkeeper did not make is left alone; a client without a
// certificate of meshkeeper's CA is refused; deleting the Mesh removes
// meshkeeper's entries and both Secrets.
func TestIdentityRelay(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(slow)
	g.SetDefaultEventuallyPollingInterval(100 * time.Millisecond)

	s := spire.StartServer(t, spire.ServerOptions{})
	addr, err := freeLoopbackAddr()
	g.Expect(err).NotTo(HaveOccurred())
	relayKey := client.ObjectKey{Namespace: componentsNamespace, Name: SpireRelaySecret}
	mgrKey := client.ObjectKey{Namespace: operatorNamespace, Name: relayManagerSecret}

	// Someone else's Secret under the relay's name, before meshkeeper.
	foreign := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: componentsNamespace, Name: SpireRelaySecret},
		Data: map[string][]byte{"tls.crt": []byte("not meshkeeper's")}}
	g.Expect(client.IgnoreAlreadyExists(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: componentsNamespace}}))).To(Succeed())
	g.Expect(k8s.Create(ctx, foreign)).To(Succeed())
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), &corev1.Secret{ObjectMeta: foreign.ObjectMeta}) })

	testSpire.setRelay(addr, SpireRelayHosts(componentsNamespace)[0], &SpireRelay{
		Image: "meshkeeper.test/manager:dev", ManageCerts: true, Namespace: operatorNamespace, Secret: relayManagerSecret,
	})
	t.Cleanup(func() { testSpire.setRelay("", "", nil) })

	// The relay runs until after the Mesh is gone (its deletion removes the
	// entries through it).
	tlsDir := spire.ShortTempDir(t, "mkt")
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	started := false
	t.Cleanup(func() {
		stop()
		if started {
			<-done
		}
	})
	mkNS(g, "rl-shop", map[string]string{"rl-mesh": "on"})
	mkSA(g, "rl-shop", "cart")
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"rl-mesh": "on"}}},
			Identity:   meshv1.IdentitySpec{Spire: &meshv1.SpireSpec{Enabled: true, TrustDomain: "example.org"}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })

	t.Run("a Secret meshkeeper did not make is not overwritten", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(func() string {
			if m := getMesh(); m != nil {
				if c := findComponent(m.Status.Components, "spire-server"); c != nil {
					return c.Message
				}
			}
			return ""
		}).Should(And(ContainSubstring("Secret istio-system/spire-relay-tls exists and was not made by meshkeeper"), ContainSubstring("delete or rename it")))
		var got corev1.Secret
		g.Consistently(func() map[string][]byte {
			g.Expect(k8s.Get(ctx, relayKey, &got)).To(Succeed())
			return got.Data
		}).Should(Equal(foreign.Data))
		g.Expect(serverEntries(g, s)).To(BeEmpty(), "nothing is registered without the relay's certificates")
		g.Expect(k8s.Delete(ctx, &got)).To(Succeed())
	})

	t.Run("meshkeeper writes both Secrets and registers through the relay", func(t *testing.T) {
		g := NewWithT(t)
		ready := mirrorSecret(rctx, t, relayKey, tlsDir)
		select {
		case <-ready:
		case <-time.After(slow):
			t.Fatal("meshkeeper wrote no Secret istio-system/spire-relay-tls")
		}
		started = true
		go func() {
			done <- identity.RunRelay(rctx, identity.RelayOptions{Listen: addr, Socket: s.Socket, TLSDir: tlsDir})
		}()

		var relaySecret, mgrSecret corev1.Secret
		g.Expect(k8s.Get(ctx, relayKey, &relaySecret)).To(Succeed())
		g.Expect(slices.Sorted(maps.Keys(relaySecret.Data))).To(Equal([]string{"ca.crt", "tls.crt", "tls.key"}),
			"the relay's Secret holds no CA key and no client key")
		g.Expect(relaySecret.Labels).To(HaveKeyWithValue("meshkeeper.dev/spire-relay", "true"))
		g.Expect(k8s.Get(ctx, mgrKey, &mgrSecret)).To(Succeed())
		g.Expect(mgrSecret.Data).To(HaveKey(identity.RelayKeyCAKey))

		g.Eventually(func() []string { return serverEntries(g, s) }).Should(ConsistOf(
			"spiffe://example.org/meshkeeper/cluster/meshkeeper",
			"spiffe://example.org/ns/rl-shop/sa/cart",
			"spiffe://example.org/ns/rl-shop/sa/default",
		))
		g.Eventually(identityStatus).Should(And(Not(BeNil()), HaveField("Registration", meshv1.RegistrationActive),
			HaveField("Entries", meshv1.EntryCounts{Own: 3})))

		// The chart runs the relay beside spire-server and the Service
		// exposes it.
		var sts appsv1.StatefulSet
		g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: componentsNamespace, Name: "spire-server"}, &sts)).To(Succeed())
		var relayC *corev1.Container
		for i, c := range sts.Spec.Template.Spec.Containers {
			if c.Name == "spire-relay" {
				relayC = &sts.Spec.Template.Spec.Containers[i]
			}
		}
		g.Expect(relayC).NotTo(BeNil())
		g.Expect(relayC.Image).To(Equal("meshkeeper.test/manager:dev"))
		g.Expect(relayC.Args).To(ContainElement("spire-relay"))
		g.Expect(relayC.ReadinessProbe).NotTo(BeNil())
		var svc corev1.Service
		g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: componentsNamespace, Name: "spire-server"}, &svc)).To(Succeed())
		g.Expect(svc.Spec.Ports).To(ContainElement(HaveField("Name", "admin-relay")))

		// A new service account is registered through the relay too.
		start := time.Now()
		mkSA(g, "rl-shop", "search")
		g.Eventually(func() []string { return serverEntries(g, s) }).WithTimeout(10 * time.Second).Should(ContainElement("spiffe://example.org/ns/rl-shop/sa/search"))
		t.Logf("MEASURE new service account until its entry exists, through the relay: %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("a client without a certificate of meshkeeper's CA is refused", func(t *testing.T) {
		g := NewWithT(t)
		other, _, err := identity.EnsureRelayCerts(nil, nil, SpireRelayHosts(componentsNamespace), time.Now())
		g.Expect(err).NotTo(HaveOccurred())
		var mgrSecret corev1.Secret
		g.Expect(k8s.Get(ctx, mgrKey, &mgrSecret)).To(Succeed())
		// It trusts the relay (meshkeeper's CA) but its own certificate is
		// of another CA.
		stranger := map[string][]byte{"ca.crt": mgrSecret.Data["ca.crt"], "tls.crt": other.Manager["tls.crt"], "tls.key": other.Manager["tls.key"]}
		srv, err := identity.SecretConnector(addr, SpireRelayHosts(componentsNamespace)[0],
			func(context.Context) (map[string][]byte, error) { return stranger, nil })(ctx)
		g.Expect(err).NotTo(HaveOccurred())
		defer srv.Close()
		sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		_, err = srv.ListEntries(sctx)
		g.Expect(err).To(HaveOccurred())
		// And meshkeeper's own, for contrast, is let in.
		own, err := identity.SecretConnector(addr, SpireRelayHosts(componentsNamespace)[0], secretData(mgrKey))(ctx)
		g.Expect(err).NotTo(HaveOccurred())
		defer own.Close()
		_, err = own.ListEntries(sctx)
		g.Expect(err).NotTo(HaveOccurred())
	})

	t.Run("deleting the Mesh removes meshkeeper's entries and both Secrets", func(t *testing.T) {
		g := NewWithT(t)
		deleteMeshAndWait(t)
		g.Expect(serverEntries(g, s)).To(BeEmpty())
		for _, key := range []client.ObjectKey{relayKey, mgrKey} {
			err := k8s.Get(ctx, key, &corev1.Secret{})
			g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "%s: %v", key, err)
		}
	})
}
