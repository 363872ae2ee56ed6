package gatewayapi

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	. "github.com/onsi/gomega"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

func crd(version, channel string, ours bool) *apiextensionsv1.CustomResourceDefinition {
	c := &apiextensionsv1.CustomResourceDefinition{ObjectMeta: metav1.ObjectMeta{Name: "gateways.gateway.networking.k8s.io", Annotations: map[string]string{}}}
	if version != "" {
		c.Annotations["gateway.networking.k8s.io/bundle-version"] = version
	}
	if channel != "" {
		c.Annotations["gateway.networking.k8s.io/channel"] = channel
	}
	if ours {
		c.Labels = map[string]string{ownerLabel: Label}
	}
	return c
}

func TestDecide(t *testing.T) {
	for _, tc := range []struct {
		name     string
		existing *apiextensionsv1.CustomResourceDefinition
		want     Action
		reason   string
	}{
		{"missing", nil, Installed, ""},
		{"older standard", crd("v1.3.0", "standard", false), Upgraded, ""},
		{"older, no channel", crd("v1.0.0", "", false), Upgraded, ""},
		{"same, ours", crd(BundleVersion, "standard", true), Current, ""},
		{"same, someone else's", crd(BundleVersion, "standard", false), Present, ""},
		{"newer", crd("v9.0.0", "standard", false), Kept, "v9.0.0 is newer than " + BundleVersion},
		{"newer, even one we wrote once", crd("v9.0.0", "standard", true), Kept, "newer"},
		{"experimental", crd("v1.3.0", "experimental", false), Kept, "experimental channel"},
		{"no version", crd("", "", false), Kept, "version is unknown"},
		{"garbage version", crd("latest", "standard", false), Kept, "version is unknown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			got := Decide(tc.existing)
			g.Expect(got.Action).To(Equal(tc.want))
			g.Expect(got.Reason).To(ContainSubstring(tc.reason))
		})
	}
}

func TestEmbeddedCRDsAreTheStandardChannelOfThePinnedModule(t *testing.T) {
	g := NewWithT(t)
	crds, err := CRDs()
	g.Expect(err).NotTo(HaveOccurred())
	names := []string{}
	for _, c := range crds {
		g.Expect(c.GetAnnotations()).To(HaveKeyWithValue("gateway.networking.k8s.io/bundle-version", BundleVersion),
			"bundles/gateway-api must come from the go.mod version: run make manifests")
		g.Expect(c.GetAnnotations()).To(HaveKeyWithValue("gateway.networking.k8s.io/channel", "standard"))
		names = append(names, c.GetName())
	}
	g.Expect(names).To(ContainElements("gatewayclasses.gateway.networking.k8s.io", "gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io"))
}

// On a real API server: a missing CRD is installed with its real schema
// (a Gateway without listeners is refused), an older copy is upgraded, a
// newer one is left byte for byte.
func TestEnsureOnAnAPIServer(t *testing.T) {
	g := NewWithT(t)
	// plain knows only the built-in kinds, like the manager's scheme.
	c, plain := apiServer(t)
	ctx := context.Background()

	// An older, permissive copy of gateways (as meshkeeper's crds chart
	// installed before), and a newer copy of httproutes someone else owns.
	older := permissive("gateways", "Gateway", "v1.3.0")
	newer := permissive("httproutes", "HTTPRoute", "v9.9.0")
	g.Expect(c.Create(ctx, older)).To(Succeed())
	g.Expect(c.Create(ctx, newer)).To(Succeed())
	g.Eventually(func() (bool, error) {
		return Established(ctx, c, []Result{{Name: older.Name, Action: Installed}, {Name: newer.Name, Action: Installed}})
	}).Should(BeTrue())
	before := &apiextensionsv1.CustomResourceDefinition{}
	g.Expect(c.Get(ctx, client.ObjectKeyFromObject(newer), before)).To(Succeed())

	res, err := Ensure(ctx, plain, "meshkeeper")
	g.Expect(err).NotTo(HaveOccurred())
	by := map[string]Result{}
	for _, r := range res {
		by[r.Name] = r
	}
	g.Expect(by["gateways.gateway.networking.k8s.io"].Action).To(Equal(Upgraded))
	g.Expect(by["httproutes.gateway.networking.k8s.io"]).To(And(
		HaveField("Action", Kept), HaveField("Reason", ContainSubstring("v9.9.0 is newer"))))
	g.Expect(by["gatewayclasses.gateway.networking.k8s.io"].Action).To(Equal(Installed))

	after := &apiextensionsv1.CustomResourceDefinition{}
	g.Expect(c.Get(ctx, client.ObjectKeyFromObject(newer), after)).To(Succeed())
	g.Expect(after.ResourceVersion).To(Equal(before.ResourceVersion), "a newer CRD is never written to")

	g.Eventually(func() (bool, error) { return Established(ctx, plain, res) }).Should(BeTrue())
	// The real schema is in force: a Gateway without listeners is refused.
	gw := &gatewayv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "bad", Namespace: "default"},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint"}}
	err = c.Create(ctx, gw)
	g.Expect(err).To(MatchError(ContainSubstring("spec.listeners")))

	// Applying again changes nothing meshkeeper now owns.
	res, err = Ensure(ctx, plain, "meshkeeper")
	g.Expect(err).NotTo(HaveOccurred())
	for _, r := range res {
		g.Expect(r.Action).To(BeElementOf(Current, Kept), r.Name)
	}
}

func permissive(plural, kind, version string) *apiextensionsv1.CustomResourceDefinition {
	return &apiextensionsv1.CustomResourceDefinition{
		ObjectMeta: metav1.ObjectMeta{
			Name: plural + ".gateway.networking.k8s.io",
			Annotations: map[string]string{
				"api-approved.kubernetes.io":               "https://github.com/kubernetes-sigs/gateway-api/pull/3328",
				"gateway.networking.k8s.io/bundle-version": version,
				"gateway.networking.k8s.io/channel":        "standard",
			},
		},
		Spec: apiextensionsv1.CustomResourceDefinitionSpec{
			Group: "gateway.networking.k8s.io",
			Scope: apiextensionsv1.NamespaceScoped,
			Names: apiextensionsv1.CustomResourceDefinitionNames{Plural: plural, Kind: kind, ListKind: kind + "List"},
			Versions: []apiextensionsv1.CustomResourceDefinitionVersion{{
				Name: "v1", Served: true, Storage: true,
				Schema: &apiextensionsv1.CustomResourceValidation{OpenAPIV3Schema: &apiextensionsv1.JSONSchemaProps{
					Type: "object", XPreserveUnknownFields: ptrTo(true),
				}},
			}},
		},
	}
}

func ptrTo[T any](v T) *T { return &v }

// apiServer starts etcd and kube-apiserver from $KUBEBUILDER_ASSETS or
// <repo>/bin/cluster (hack/cluster-bins.sh) for this test; it skips when they
// are missing, and fails then with MESHKEEPER_REQUIRE_CLUSTER=1.
func apiServer(t *testing.T) (client.Client, client.Client) {
	t.Helper()
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		dir, _ = filepath.Abs(filepath.Join("..", "..", "bin", "cluster"))
	}
	if _, err := os.Stat(filepath.Join(dir, "kube-apiserver")); err != nil {
		msg := "needs etcd and kube-apiserver in " + dir + ": run hack/cluster-bins.sh or set KUBEBUILDER_ASSETS"
		if os.Getenv("MESHKEEPER_REQUIRE_CLUSTER") == "1" {
			t.Fatal(msg + " (MESHKEEPER_REQUIRE_CLUSTER=1)")
		}
		t.Skip(msg + "; set MESHKEEPER_REQUIRE_CLUSTER=1 to fail instead")
	}
	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(apiextensionsv1.AddToScheme(scheme))
	utilruntime.Must(gatewayv1.Install(scheme))
	env := &envtest.Environment{BinaryAssetsDirectory: dir, Scheme: scheme}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start API server: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	plain, err := client.New(cfg, client.Options{Scheme: clientgoscheme.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c, plain
}
