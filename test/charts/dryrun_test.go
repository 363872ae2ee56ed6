// Package charts checks every bundle's charts against a real API server:
// each component of each bundle, in each mode, is rendered and sent as a
// server-side dry-run apply, so schema errors in a chart fail CI.
package charts

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

var k8s client.Client

func TestMain(m *testing.M) {
	assets, err := cluster.Available()
	if err != nil {
		fmt.Println(err)
		os.Exit(cluster.ExitCodeUnavailable())
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
	}
	cfg, err := env.Start()
	if err != nil {
		fmt.Println("start envtest:", err)
		os.Exit(1)
	}
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = apiextensionsv1.AddToScheme(scheme)
	_ = meshv1.AddToScheme(scheme)
	k8s, err = client.New(cfg, client.Options{Scheme: scheme})
	code := 1
	if err == nil {
		code = m.Run()
	} else {
		fmt.Println("client:", err)
	}
	_ = env.Stop()
	os.Exit(code)
}

func TestEveryBundleIsAcceptedByTheAPIServer(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	const ns = "istio-system"
	g.Expect(client.IgnoreAlreadyExists(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}))).To(Succeed())

	catalog := bundle.Default()
	g.Expect(catalog.Versions()).To(HaveLen(4))
	modes := []bundle.Inputs{
		{Mode: "Ambient", Redirection: "EBPF", Namespace: ns, TrustDomain: "example.org", SVIDTTL: "12h0m0s", MaxUnavailable: "10%"},
		{Mode: "Ambient", Redirection: "IPTables", Namespace: ns, TrustDomain: "example.org"},
		{Mode: "Sidecar", Namespace: ns, TrustDomain: "example.org"},
		// During node waves the node components' DaemonSets are OnDelete.
		{Mode: "Ambient", Redirection: "EBPF", Namespace: ns, NodeWaves: true},
		// The SPIRE server with its admin API relay (manager --spire-server-address host:port).
		{Mode: "Sidecar", Namespace: ns, TrustDomain: "example.org", SpireRelayImage: "ghcr.io/meshkeeper/manager:0.1.0"},
	}
	for _, v := range catalog.Versions() {
		b, err := catalog.Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		for _, in := range modes {
			// The CRDs must exist for the other charts' custom resources.
			installCRDs(g, b, in)
			variant := in.Mode + "-" + in.Redirection
			if in.NodeWaves {
				variant += "-nodewaves"
			}
			if in.SpireRelayImage != "" {
				variant += "-spirerelay"
			}
			for _, c := range bundle.Components(in.Mode, in.Redirection, true) {
				t.Run(fmt.Sprintf("%s/%s/%s", v, variant, c), func(t *testing.T) {
					g := NewWithT(t)
					objs := render(g, b, c, in)
					g.Expect(objs).NotTo(BeEmpty())
					for _, o := range objs {
						g.Expect(o.GetLabels()).To(And(
							HaveKeyWithValue(meshv1.LabelComponent, string(c)),
							HaveKeyWithValue(meshv1.LabelControlPlaneRevision, b.Revision())), describe(o))
						err := k8s.Apply(ctx, client.ApplyConfigurationFromUnstructured(o),
							client.DryRunAll, client.FieldOwner("chart-check"), client.ForceOwnership)
						g.Expect(err).NotTo(HaveOccurred(), "%s refused by the API server", describe(o))
					}
				})
			}
		}
	}
}

func render(g Gomega, b *bundle.Bundle, c bundle.Component, in bundle.Inputs) []*unstructured.Unstructured {
	chart, err := b.Chart(c)
	g.Expect(err).NotTo(HaveOccurred())
	objs, err := helm.Render(chart, string(c), in.Namespace, b.Values(c, in), helm.ManagedLabels(string(c), b.Revision()))
	g.Expect(err).NotTo(HaveOccurred(), "render %s %s", b.Version, c)
	return objs
}

func installCRDs(g Gomega, b *bundle.Bundle, in bundle.Inputs) {
	for _, o := range render(g, b, bundle.CRDs, in) {
		err := k8s.Apply(context.Background(), client.ApplyConfigurationFromUnstructured(o), client.FieldOwner("chart-check"), client.ForceOwnership)
		g.Expect(err).NotTo(HaveOccurred(), describe(o))
		g.Eventually(func() bool {
			crd := &apiextensionsv1.CustomResourceDefinition{}
			if err := k8s.Get(context.Background(), client.ObjectKey{Name: o.GetName()}, crd); err != nil {
				return false
			}
			for _, c := range crd.Status.Conditions {
				if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
					return true
				}
			}
			return false
		}).WithTimeout(20*time.Second).Should(BeTrue(), "CRD %s established", o.GetName())
	}
}

func describe(o *unstructured.Unstructured) string {
	return fmt.Sprintf("%s %s/%s", o.GetKind(), o.GetNamespace(), o.GetName())
}
