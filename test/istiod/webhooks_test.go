//go:build linux

package istiod

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/controller"
	"github.com/meshkeeper/meshkeeper/internal/helm"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

const (
	revision  = "1-28-2"
	injector  = "istio-sidecar-injector-" + revision
	validator = "istio-validator-" + revision + "-istio-system"
)

// TestWebhooksOfARealIstiod: meshkeeper installs the 1.28.2 bundle with the
// istiod chart's webhooks pointed at a real istiod of that revision running
// on 127.0.0.1 (chart value webhooks.url, as for any istiod outside the
// cluster), and the API server calls istiod for what meshkeeper labelled
// and wrote:
//   - Sidecar mode: pods created in a namespace meshkeeper labelled get
//     istiod's sidecar; pods elsewhere do not;
//   - switched to Ambient: meshkeeper relabels the namespace and its new
//     pods get none;
//   - back to Sidecar (the way back): injected again, while a namespace
//     carrying meshkeeper's Ambient labels is still not, though the
//     injector of its revision serves the cluster;
//   - istiod's config validation accepts the mesh-wide STRICT
//     PeerAuthentication and every Istio object the bundles render, and
//     refuses bad ones with its own reasons.
func TestWebhooksOfARealIstiod(t *testing.T) {
	g, ctx, cancel, kc := startCluster(t)
	k8s := kc.Client
	ports, err := cluster.FreePorts(1)
	g.Expect(err).NotTo(HaveOccurred())
	webhookPort := ports[0]
	catalog, err := bundle.Default().WithValues(bundle.Istiod, map[string]any{
		"webhooks": map[string]any{"url": WebhookURL(webhookPort)},
	})
	g.Expect(err).NotTo(HaveOccurred())

	g.Expect(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "meshkeeper-system"}})).To(Succeed())
	hc, err := helm.New(kc.Config, "meshkeeper-system", ctrl.Log.WithName("helm"))
	g.Expect(err).NotTo(HaveOccurred())
	mgr, err := ctrl.NewManager(kc.Config, ctrl.Options{Scheme: kc.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		// Each test of the package runs its own manager in this process.
		Controller: config.Controller{SkipNameValidation: new(true)}})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect((&controller.MeshReconciler{
		Client: mgr.GetClient(), Helm: hc, Catalog: catalog, ComponentsNamespace: "istio-system",
	}).SetupWithManager(mgr)).To(Succeed())
	mgrDone := make(chan struct{})
	go func() { _ = mgr.Start(ctx); close(mgrDone) }()
	t.Cleanup(func() { cancel(); <-mgrDone })

	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"mesh": "on"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "outside"}},
	} {
		g.Expect(k8s.Create(ctx, ns)).To(Succeed())
	}
	noBake := &metav1.Duration{}
	g.Expect(k8s.Create(ctx, &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28.2",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes:      meshv1.NodeRolloutSpec{Bake: noBake},
				Namespaces: meshv1.NamespaceRolloutSpec{Bake: noBake},
			},
		},
	})).To(Succeed())

	// meshkeeper labels shop for its revision once istiod's release is
	// installed; then the istiod of that revision starts and patches its CA
	// into both webhook configurations of the release.
	g.Eventually(nsLabels).WithArguments(ctx, k8s, "shop").Should(HaveKeyWithValue(meshv1.LabelRevision, revision))
	d, err := Start(ctx, t, kc, Options{Revision: revision, WebhookPort: webhookPort})
	g.Expect(err).NotTo(HaveOccurred())
	g.Eventually(mutatingCABundles).WithArguments(ctx, k8s).Should(And(Not(BeEmpty()), HaveEach(Not(BeEmpty()))),
		"istiod patches its CA into %s", injector)

	t.Run("Sidecar: istiod injects pods in the namespace meshkeeper labelled, and only there", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(time.Minute)
		// Until the API server has the patched CA, the injector fails closed.
		g.Eventually(dryRunPod).WithArguments(ctx, k8s, "shop").Should(Succeed())
		pod := createPod(g, ctx, k8s, "shop", "app-1")
		g.Expect(injected(pod)).To(BeTrue(), "pod %s has istiod's sidecar: %s", pod.Name, containerNames(pod))
		g.Expect(pod.Annotations).To(HaveKey("sidecar.istio.io/status"))
		g.Expect(containerImages(pod)).To(ContainElement("docker.io/istio/proxyv2:1.28.2"), "the bundle's proxy image")

		optOut := newPod("shop", "opted-out")
		optOut.Labels = map[string]string{"sidecar.istio.io/inject": "false"}
		g.Expect(k8s.Create(ctx, optOut)).To(Succeed())
		g.Expect(injected(optOut)).To(BeFalse(), "a pod opting out is left alone")

		other := createPod(g, ctx, k8s, "outside", "app-1")
		g.Expect(injected(other)).To(BeFalse(), "a namespace meshkeeper did not label is not injected")
		g.Expect(d.Metric("sidecar_injection_success_total", nil)).To(BeNumerically(">=", 1), "istiod counted its injections")
	})

	var ambientLabels map[string]string
	t.Run("switched to Ambient: meshkeeper relabels the namespace and its new pods get no sidecar", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(3 * time.Minute)
		updateSpec(g, ctx, k8s, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeAmbient })
		g.Eventually(nsLabels).WithArguments(ctx, k8s, "shop").Should(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
		ambientLabels = labelsOwnedBy(ctx, k8s, "shop", meshv1.FieldManager)
		t.Logf("meshkeeper's Ambient labels on shop: %v", ambientLabels)
		g.Expect(ambientLabels).To(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
		g.Eventually(func() bool {
			p, err := dryRunPodResult(ctx, k8s, "shop")
			return err == nil && !injected(p)
		}).Should(BeTrue(), "new pods in shop get no sidecar")
		pod := createPod(g, ctx, k8s, "shop", "app-2")
		g.Expect(injected(pod)).To(BeFalse(), "pod %s: %s", pod.Name, containerNames(pod))
	})

	t.Run("back to Sidecar: injected again, but not where meshkeeper's Ambient labels are", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(3 * time.Minute)
		g.Expect(ambientLabels).NotTo(BeEmpty())
		// A namespace with exactly the labels meshkeeper writes for Ambient,
		// as one still waiting for its wave back to Sidecar carries them.
		g.Expect(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "still-ambient", Labels: ambientLabels}})).To(Succeed())
		updateSpec(g, ctx, k8s, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeSidecar })
		g.Eventually(nsLabels).WithArguments(ctx, k8s, "shop").Should(And(
			HaveKeyWithValue(meshv1.LabelRevision, revision), Not(HaveKey(meshv1.LabelDataplaneMode))))
		g.Eventually(mutatingCABundles).WithArguments(ctx, k8s).Should(And(Not(BeEmpty()), HaveEach(Not(BeEmpty()))))
		g.Eventually(func() bool {
			p, err := dryRunPodResult(ctx, k8s, "shop")
			return err == nil && injected(p)
		}).Should(BeTrue(), "new pods in shop get their sidecar back")
		pod := createPod(g, ctx, k8s, "shop", "app-3")
		g.Expect(injected(pod)).To(BeTrue())

		moved := createPod(g, ctx, k8s, "still-ambient", "app-1")
		g.Expect(injected(moved)).To(BeFalse(), "ztunnel's pods get no sidecar from the injector of their revision: %s", containerNames(moved))
	})

	t.Run("istiod's validation accepts what meshkeeper and the bundles write, and refuses bad config", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(time.Minute)
		g.Eventually(validatingCABundles).WithArguments(ctx, k8s).Should(And(HaveLen(2), HaveEach(Not(BeEmpty()))),
			"istiod patches its CA into both webhooks of %s", validator)
		vwc := &admissionv1.ValidatingWebhookConfiguration{}
		g.Expect(k8s.Get(ctx, client.ObjectKey{Name: validator}, vwc)).To(Succeed())
		for _, wh := range vwc.Webhooks {
			g.Expect(*wh.FailurePolicy).To(Equal(admissionv1.Fail), "%s fails closed", wh.Name)
		}

		// A mistake only istiod catches (the CRDs' schemas are permissive):
		// port-level mTLS on a mesh-wide policy.
		bad := peerAuthentication("istio-system", "port-level", nil)
		_ = unstructured.SetNestedField(bad.Object, map[string]any{"8080": map[string]any{"mode": "DISABLE"}}, "spec", "portLevelMtls")
		g.Eventually(func() error { return k8s.Create(ctx, bad, client.DryRunAll) }).Should(MatchError(And(
			ContainSubstring(`admission webhook "validation.istio.io" denied the request`),
			ContainSubstring("mesh/namespace peer authentication cannot have port level mTLS"))))
		// Config of the revision goes through the other webhook.
		badGateway := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
			"metadata": map[string]any{"namespace": "shop", "name": "no-servers", "labels": map[string]any{meshv1.LabelRevision: revision}},
			"spec":     map[string]any{"selector": map[string]any{"istio": "ingressgateway"}},
		}}
		g.Expect(k8s.Create(ctx, badGateway, client.DryRunAll)).To(MatchError(And(
			ContainSubstring(`admission webhook "rev.validation.istio.io" denied the request`),
			ContainSubstring("gateway must have at least one server"))))

		// The mesh-wide STRICT policy meshkeeper writes for spec.security.mtls: Strict.
		passed := d.Metric("galley_validation_passed", map[string]string{"resource": "peerauthentications"})
		strict := controller.MeshWidePeerAuthentication("istio-system")
		g.Expect(k8s.Create(ctx, strict)).To(Succeed())
		g.Expect(d.Metric("galley_validation_passed", map[string]string{"resource": "peerauthentications"})).To(BeNumerically(">", passed),
			"istiod itself validated and passed it")

		// Every Istio object any bundle renders, for every version and mode.
		objs := bundleIstioObjects(g)
		t.Logf("Istio config objects rendered by the bundles (all versions, all modes): %d", len(objs))
		for _, o := range objs {
			err := k8s.Create(ctx, o, client.DryRunAll)
			g.Expect(err).NotTo(HaveOccurred(), "%s %s/%s refused by istiod", o.GetKind(), o.GetNamespace(), o.GetName())
		}
	})
}

// bundleIstioObjects renders every component of every bundle in every
// mode (as test/charts does) and returns the objects of Istio's config
// groups, which istiod's validation webhook is called for.
func bundleIstioObjects(g Gomega) []*unstructured.Unstructured {
	catalog := bundle.Default()
	const ns = "istio-system"
	modes := []bundle.Inputs{
		{Mode: "Ambient", Redirection: "EBPF", Namespace: ns, TrustDomain: "example.org", SVIDTTL: "12h0m0s"},
		{Mode: "Ambient", Redirection: "IPTables", Namespace: ns},
		{Mode: "Sidecar", Namespace: ns, TrustDomain: "example.org"},
		{Mode: "Sidecar", Namespace: ns, Spire: true},
	}
	var out []*unstructured.Unstructured
	for _, v := range catalog.Versions() {
		b, err := catalog.Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		for _, in := range modes {
			for _, c := range bundle.Components(in.Mode, in.Redirection, true) {
				chart, err := b.Chart(c)
				g.Expect(err).NotTo(HaveOccurred())
				objs, err := helm.Render(chart, string(c), ns, b.Values(c, in), helm.ManagedLabels(string(c), b.Revision()))
				g.Expect(err).NotTo(HaveOccurred(), "render %s %s", v, c)
				for _, o := range objs {
					switch o.GroupVersionKind().Group {
					case "networking.istio.io", "security.istio.io", "telemetry.istio.io", "extensions.istio.io":
						out = append(out, o)
					}
				}
			}
		}
	}
	return out
}

func peerAuthentication(namespace, name string, mtls map[string]any) *unstructured.Unstructured {
	spec := map[string]any{}
	if mtls != nil {
		spec["mtls"] = mtls
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
		"metadata": map[string]any{"namespace": namespace, "name": name},
		"spec":     spec,
	}}
}

func newPod(namespace, name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{
			// No node: admission happens at create, nothing needs to run.
			NodeSelector: map[string]string{"meshkeeper.dev/test": "no-such-node"},
			Containers:   []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}},
		},
	}
}

func createPod(g Gomega, ctx context.Context, c client.Client, namespace, name string) *corev1.Pod {
	p := newPod(namespace, name)
	g.Expect(c.Create(ctx, p)).To(Succeed(), "create pod %s/%s", namespace, name)
	return p
}

func dryRunPodResult(ctx context.Context, c client.Client, namespace string) (*corev1.Pod, error) {
	p := newPod(namespace, "probe")
	return p, c.Create(ctx, p, client.DryRunAll)
}

func dryRunPod(ctx context.Context, c client.Client, namespace string) error {
	_, err := dryRunPodResult(ctx, c, namespace)
	return err
}

// injected: istiod's sidecar (the chart's template: istio-proxy beside the
// app, istio-init setting up redirection) is in the pod.
func injected(p *corev1.Pod) bool {
	names := containerNames(p)
	return strings.Contains(names, "istio-proxy") && strings.Contains(names, "istio-init")
}

func containerNames(p *corev1.Pod) string {
	var names []string
	for _, c := range p.Spec.InitContainers {
		names = append(names, "init:"+c.Name)
	}
	for _, c := range p.Spec.Containers {
		names = append(names, c.Name)
	}
	return strings.Join(names, ",")
}

func containerImages(p *corev1.Pod) []string {
	var out []string
	for _, c := range append(append([]corev1.Container{}, p.Spec.InitContainers...), p.Spec.Containers...) {
		out = append(out, c.Image)
	}
	return out
}

func mutatingCABundles(ctx context.Context, c client.Client) [][]byte {
	m := &admissionv1.MutatingWebhookConfiguration{}
	if err := c.Get(ctx, client.ObjectKey{Name: injector}, m); err != nil {
		return nil
	}
	var out [][]byte
	for _, wh := range m.Webhooks {
		out = append(out, wh.ClientConfig.CABundle)
	}
	return out
}

func validatingCABundles(ctx context.Context, c client.Client) [][]byte {
	v := &admissionv1.ValidatingWebhookConfiguration{}
	if err := c.Get(ctx, client.ObjectKey{Name: validator}, v); err != nil {
		return nil
	}
	var out [][]byte
	for _, wh := range v.Webhooks {
		out = append(out, wh.ClientConfig.CABundle)
	}
	return out
}

// labelsOwnedBy is the labels of namespace name that field manager
// manager set with server-side apply (what meshkeeper wrote there).
func labelsOwnedBy(ctx context.Context, c client.Client, name, manager string) map[string]string {
	ns := &corev1.Namespace{}
	if err := c.Get(ctx, client.ObjectKey{Name: name}, ns); err != nil {
		return nil
	}
	out := map[string]string{}
	for _, mf := range ns.ManagedFields {
		if mf.Manager != manager || mf.Operation != metav1.ManagedFieldsOperationApply || mf.FieldsV1 == nil {
			continue
		}
		var fields struct {
			Metadata struct {
				Labels map[string]json.RawMessage `json:"f:labels"`
			} `json:"f:metadata"`
		}
		if err := json.Unmarshal(mf.FieldsV1.Raw, &fields); err != nil {
			return nil
		}
		for k := range fields.Metadata.Labels {
			if key, ok := strings.CutPrefix(k, "f:"); ok {
				out[key] = ns.Labels[key]
			}
		}
	}
	return out
}
