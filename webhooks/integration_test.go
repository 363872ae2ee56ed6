package webhooks

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestWebhookAgainstAPIServer runs the webhook in a manager, as the operator
// does, behind a real kube-apiserver that calls it over TLS with the CA
// EnsureCerts put into the webhook configuration, and checks what a user of
// kubectl would see.
func TestWebhookAgainstAPIServer(t *testing.T) {
	env, cfg, c := testAPIServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	wio := &env.WebhookInstallOptions

	// Serving certificates the way the operator gets them: EnsureCerts
	// replaces the CA envtest installed with its own.
	g := NewWithT(t)
	const ns = "meshkeeper-system"
	g.Expect(client.IgnoreAlreadyExists(c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}))).To(Succeed())
	certOpts := CertOptions{
		Namespace: ns, SecretName: "meshkeeper-webhook-certs", WebhookConfigName: testWebhookConfigName,
		CertDir: t.TempDir(), Hosts: []string{"localhost", wio.LocalServingHost},
	}
	g.Expect(EnsureCerts(ctx, c, certOpts)).To(Succeed())

	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 testScheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		WebhookServer: webhook.NewServer(webhook.Options{
			Host: wio.LocalServingHost, Port: wio.LocalServingPort, CertDir: certOpts.CertDir,
		}),
	})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(SetupWithManager(mgr)).To(Succeed())
	g.Expect(mgr.Add(NewCertRefresher(c, certOpts, time.Hour))).To(Succeed())
	mgrDone := make(chan error, 1)
	go func() { mgrDone <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-mgrDone
	})

	// Wait until the API server reaches the webhook: a dry-run create with a
	// bad cron is refused by the webhook, not by a TLS or connection error.
	g.Eventually(func() string {
		m := validMesh("probe")
		m.Spec.Upgrade.Windows[0].Cron = "0 25 * * 6"
		err := c.Create(ctx, m, client.DryRunAll)
		if err == nil {
			return "accepted"
		}
		return err.Error()
	}).WithTimeout(30 * time.Second).WithPolling(200 * time.Millisecond).
		Should(ContainSubstring(`admission webhook "vmesh.meshkeeper.dev" denied the request`))

	mesh := validMesh("default")
	t.Run("a valid Mesh is accepted", func(t *testing.T) {
		g := NewWithT(t)
		g.Expect(c.Create(ctx, mesh)).To(Succeed())
	})

	t.Run("a second Mesh is refused by the webhook", func(t *testing.T) {
		err := c.Create(ctx, validMesh("another"))
		expectRefused(t, err, "webhook", "metadata.name",
			`only one Mesh per cluster: mesh/default already exists; edit it instead of creating another`)
	})

	// The rest change spec of mesh/default and expect a refusal.
	refusedUpdate := func(t *testing.T, mutate func(*v1alpha1.Mesh)) error {
		t.Helper()
		var m v1alpha1.Mesh
		if err := c.Get(ctx, client.ObjectKeyFromObject(mesh), &m); err != nil {
			t.Fatalf("get mesh/default: %v", err)
		}
		mutate(&m)
		return c.Update(ctx, &m)
	}

	t.Run("decreasing waves are refused by the CRD's CEL rule", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Rollout.Namespaces.Waves = []string{"50%", "10%"} })
		expectRefused(t, err, "schema", "spec.rollout.namespaces.waves", "must be strictly increasing")
	})

	t.Run("redirection with mode Sidecar is refused by the CRD's CEL rule", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) {
			m.Spec.Dataplane = v1alpha1.DataplaneSpec{Mode: v1alpha1.ModeSidecar, Redirection: v1alpha1.RedirectionEBPF}
		})
		expectRefused(t, err, "schema", "spec.dataplane.redirection", "only valid with mode Ambient")
	})

	t.Run("an mtls mode in Istio's spelling is refused by the CRD schema", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Security.MTLS = "STRICT" })
		expectRefused(t, err, "schema", "spec.security.mtls", `Unsupported value: "STRICT"`, `"Permissive"`, `"Strict"`)
	})

	t.Run("spec.security without mtls reads back as Permissive (the CRD default)", func(t *testing.T) {
		g := NewWithT(t)
		// An empty security object is dropped by omitempty; send it raw.
		var m v1alpha1.Mesh
		g.Expect(c.Get(ctx, client.ObjectKeyFromObject(mesh), &m)).To(Succeed())
		g.Expect(c.Patch(ctx, &m, client.RawPatch(types.MergePatchType, []byte(`{"spec":{"security":{}}}`)))).To(Succeed())
		g.Expect(m.Spec.Security.MTLS).To(Equal(v1alpha1.MTLSPermissive))
	})

	t.Run("better without maxDegradation is refused by the CRD's CEL rule", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Analysis.SLOs[0].Better = v1alpha1.BetterLower })
		expectRefused(t, err, "schema", "spec.analysis.slos[0].better", "only applies with maxDegradation")
	})

	t.Run("maxDegradation that is not a percentage is refused by the CRD schema", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Analysis.SLOs[0].MaxDegradation = ptr.To("0.01") })
		expectRefused(t, err, "schema", "spec.analysis.slos[0].maxDegradation")
	})

	t.Run("an unparsable PromQL query is refused by the webhook", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) {
			m.Spec.Analysis.SLOs[0].Query = `sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[1m]) /`
		})
		expectRefused(t, err, "webhook", "spec.analysis.slos[0].query", "not valid PromQL", "parse error")
	})

	t.Run("a bad cron is refused by the webhook", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Upgrade.Windows[0].Cron = "0 25 * * 6" })
		expectRefused(t, err, "webhook", "spec.upgrade.windows[0].cron", `hour field "25"`)
	})

	t.Run("a downgrade of two minors below the installed version is refused by the webhook", func(t *testing.T) {
		g := NewWithT(t)
		setInstalled(t, c, mesh.Name, "1.27.3")
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Version = "1.25.0" })
		expectRefused(t, err, "webhook", "spec.version",
			`spec.version: Invalid value: "1.25.0": 1.25.0 is 2 minors below installed 1.27.3: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.26 first, then 1.25.0`)
		// One minor back is fine.
		g.Expect(refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Version = "1.26" })).To(Succeed())
	})

	t.Run("waypoints: kube-system and the mesh's own namespaces are refused by the webhook", func(t *testing.T) {
		for _, ns := range []string{"kube-system", "istio-system", "meshkeeper-system"} {
			err := refusedUpdate(t, func(m *v1alpha1.Mesh) {
				m.Spec.Waypoints = append(m.Spec.Waypoints, v1alpha1.WaypointSpec{Namespace: ns, Name: "waypoint"})
			})
			expectRefused(t, err, "webhook", "spec.waypoints[1].namespace", `"`+ns+`" is `, "move the waypoint to")
		}
	})

	t.Run("waypoints: a namespace outside spec.namespaces.selector is refused by the webhook", func(t *testing.T) {
		g := NewWithT(t)
		g.Expect(client.IgnoreAlreadyExists(c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "outside", Labels: map[string]string{"mesh": "off"}}}))).To(Succeed())
		g.Expect(client.IgnoreAlreadyExists(c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "inside", Labels: map[string]string{"mesh": "on"}}}))).To(Succeed())
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) {
			m.Spec.Waypoints = append(m.Spec.Waypoints, v1alpha1.WaypointSpec{Namespace: "outside", Name: "waypoint"})
		})
		expectRefused(t, err, "webhook", "spec.waypoints[1].namespace",
			"namespace outside is not in the mesh: spec.namespaces.selector (mesh=on) does not select its labels; label the namespace into the mesh or remove the waypoint")
		// A selected namespace is fine, and so is one that does not exist
		// yet (the reconciler waits for it).
		g.Expect(refusedUpdate(t, func(m *v1alpha1.Mesh) {
			m.Spec.Waypoints = append(m.Spec.Waypoints, v1alpha1.WaypointSpec{Namespace: "inside", Name: "waypoint", For: v1alpha1.WaypointForAll})
		})).To(Succeed())
		// Once accepted, a namespace relabelled out of the mesh does not
		// block unrelated edits (the reconciler reports it instead).
		inside := &corev1.Namespace{}
		g.Expect(c.Get(ctx, client.ObjectKey{Name: "inside"}, inside)).To(Succeed())
		inside.Labels["mesh"] = "off"
		g.Expect(c.Update(ctx, inside)).To(Succeed())
		g.Expect(refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Paused = !m.Spec.Paused })).To(Succeed())
		g.Expect(refusedUpdate(t, func(m *v1alpha1.Mesh) { m.Spec.Waypoints = m.Spec.Waypoints[:1] })).To(Succeed())
	})

	t.Run("several bad fields are all reported at once", func(t *testing.T) {
		err := refusedUpdate(t, func(m *v1alpha1.Mesh) {
			m.Spec.Upgrade.Windows[0].Cron = "0 2 * * 8"
			m.Spec.Analysis.SLOs[0].Query = "up[5m]"
		})
		expectRefused(t, err, "webhook", "spec.upgrade.windows[0].cron", "spec.analysis.slos[0].query")
		var status apierrors.APIStatus
		g := NewWithT(t)
		g.Expect(err).To(BeAssignableToTypeOf(&apierrors.StatusError{}))
		status = err.(*apierrors.StatusError)
		g.Expect(status.Status().Details).NotTo(BeNil())
		var fields []string
		for _, cause := range status.Status().Details.Causes {
			fields = append(fields, cause.Field)
		}
		g.Expect(fields).To(ConsistOf("spec.upgrade.windows[0].cron", "spec.analysis.slos[0].query"))
	})

	t.Run("status-only and metadata-only updates are never refused", func(t *testing.T) {
		g := NewWithT(t)
		// A Mesh whose spec the webhook would refuse today: spec.version two
		// minors below the installed version (installed after the spec was
		// written). Only one Mesh may exist, so replace mesh/default.
		g.Expect(c.Delete(ctx, mesh)).To(Succeed())
		g.Eventually(func() bool {
			return apierrors.IsNotFound(c.Get(ctx, client.ObjectKeyFromObject(mesh), &v1alpha1.Mesh{}))
		}).Should(BeTrue())
		legacy := validMesh("legacy")
		legacy.Spec.Version = "1.25"
		g.Expect(c.Create(ctx, legacy)).To(Succeed())
		setInstalled(t, c, legacy.Name, "1.27.3")
		var m v1alpha1.Mesh
		g.Expect(c.Get(ctx, client.ObjectKeyFromObject(legacy), &m)).To(Succeed())
		g.Expect(ValidateDowngrade(m.Spec.Version, m.Status.Version.Installed)).NotTo(BeNil(), "the stored spec would be refused if it changed")

		// Status through the status subresource.
		m.Status.Conditions = []metav1.Condition{{
			Type: v1alpha1.ConditionStalled, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonInvalidSpec,
			Message: "spec.version 1.25 is a downgrade", LastTransitionTime: metav1.Now(),
		}}
		g.Expect(c.Status().Update(ctx, &m)).To(Succeed())
		// Labels and a finalizer through the main resource.
		m.Labels = map[string]string{"team": "platform"}
		controllerutil.AddFinalizer(&m, v1alpha1.Finalizer)
		g.Expect(c.Update(ctx, &m)).To(Succeed())
		// Delete, then remove the finalizer as the controller does on cleanup.
		g.Expect(c.Delete(ctx, &m)).To(Succeed())
		g.Expect(c.Get(ctx, client.ObjectKeyFromObject(legacy), &m)).To(Succeed())
		g.Expect(m.DeletionTimestamp).NotTo(BeNil())
		m.Status.Version.Target = ""
		g.Expect(c.Status().Update(ctx, &m)).To(Succeed(), "status update while deleting")
		controllerutil.RemoveFinalizer(&m, v1alpha1.Finalizer)
		g.Expect(c.Update(ctx, &m)).To(Succeed(), "finalizer removal")
		g.Eventually(func() bool {
			return apierrors.IsNotFound(c.Get(ctx, client.ObjectKeyFromObject(legacy), &v1alpha1.Mesh{}))
		}).Should(BeTrue())
	})

	t.Run("the webhook server presents the certificate from the Secret", func(t *testing.T) {
		g := NewWithT(t)
		var s corev1.Secret
		g.Expect(c.Get(ctx, client.ObjectKey{Namespace: ns, Name: certOpts.SecretName}, &s)).To(Succeed())
		pool := x509.NewCertPool()
		g.Expect(pool.AppendCertsFromPEM(s.Data["ca.crt"])).To(BeTrue())
		addr := net.JoinHostPort(wio.LocalServingHost, strconv.Itoa(wio.LocalServingPort))
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12})
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(conn.ConnectionState().PeerCertificates[0].Raw).To(Equal(mustCert(g, s.Data["tls.crt"]).Raw))
		_ = conn.Close()
	})
}

// expectRefused checks the API server refused the request with a message that
// names every given field or detail, and whether the refusal came from the
// CRD schema or from the webhook.
func expectRefused(t *testing.T, err error, by string, want ...string) {
	t.Helper()
	g := NewWithT(t)
	g.Expect(err).To(HaveOccurred())
	t.Logf("API server: %v", err)
	g.Expect(apierrors.IsInvalid(err)).To(BeTrue(), "want 422 Invalid, got %v", err)
	msg := err.Error()
	fromWebhook := strings.Contains(msg, `admission webhook "vmesh.meshkeeper.dev" denied the request`)
	switch by {
	case "webhook":
		g.Expect(fromWebhook).To(BeTrue(), "want a refusal by the webhook: %s", msg)
		g.Expect(msg).To(ContainSubstring(`Mesh.meshkeeper.dev`))
	case "schema":
		g.Expect(fromWebhook).To(BeFalse(), "want a refusal by the CRD schema: %s", msg)
	}
	for _, w := range want {
		g.Expect(msg).To(ContainSubstring(w))
	}
}

func setInstalled(t *testing.T, c client.Client, name, installed string) {
	t.Helper()
	var m v1alpha1.Mesh
	if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &m); err != nil {
		t.Fatalf("get mesh/%s: %v", name, err)
	}
	m.Status.Version.Installed = installed
	if err := c.Status().Update(context.Background(), &m); err != nil {
		t.Fatalf("set status.version.installed of mesh/%s: %v", name, err)
	}
}

func validMesh(name string) *v1alpha1.Mesh {
	return &v1alpha1.Mesh{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: *exampleSpec()}
}
