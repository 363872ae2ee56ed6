package charts

import (
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"testing/fstest"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/meshkeeper/meshkeeper/bundles"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// TestDNSCaptureComesFromTheBundle: for every bundle, ztunnel's DNS proxy
// (ISTIO_META_DNS_CAPTURE), the node agent's redirection of pods' DNS to it
// (--dns-capture) and istio-cni's (AMBIENT_DNS_CAPTURE, fallback nodes) are
// rendered from the bundle's one dnsCapture field: all on as the catalog
// ships them, and all off in the same catalog with dnsCapture: false.
func TestDNSCaptureComesFromTheBundle(t *testing.T) {
	shipped := bundle.Default()
	off := catalogWithDNSCapture(t, false)
	for _, tc := range []struct {
		name    string
		catalog *bundle.Catalog
		want    bool
	}{{"as shipped", shipped, true}, {"dnsCapture false", off, false}} {
		for _, v := range tc.catalog.Versions() {
			t.Run(tc.name+"/"+v, func(t *testing.T) {
				g := NewWithT(t)
				b, err := tc.catalog.Resolve(v)
				g.Expect(err).NotTo(HaveOccurred())
				g.Expect(b.DNSCapture).To(Equal(tc.want))
				in := bundle.Inputs{Mode: "Ambient", Redirection: "EBPF", Namespace: "istio-system"}

				zt := daemonSetOf(g, render(g, b, bundle.Ztunnel, in), "ztunnel")
				g.Expect(envOf(zt, "istio-proxy", "ISTIO_META_DNS_CAPTURE")).To(Equal(fmt.Sprint(tc.want)), "ztunnel's DNS proxy")

				agent := daemonSetOf(g, render(g, b, bundle.NodeAgent, in), "meshkeeper-node-agent")
				args := agent.Spec.Template.Spec.Containers[0].Args
				g.Expect(slices.Contains(args, "--dns-capture")).To(Equal(tc.want), "node agent args %v", args)

				cm := objectOf(g, render(g, b, bundle.CNI, bundle.Inputs{Mode: "Ambient", Redirection: "IPTables", Namespace: "istio-system"}), "ConfigMap", "istio-cni-config")
				got, _, _ := unstructured.NestedString(cm.Object, "data", "AMBIENT_DNS_CAPTURE")
				g.Expect(got).To(Equal(fmt.Sprint(tc.want)), "istio-cni on fallback nodes")

				// The cleanup phase runs no agent: nothing to pass.
				in.NodeAgentCleanup = true
				clean := daemonSetOf(g, render(g, b, bundle.NodeAgent, in), "meshkeeper-node-agent")
				for _, c := range clean.Spec.Template.Spec.Containers {
					g.Expect(c.Args).NotTo(ContainElement("--dns-capture"))
				}
			})
		}
	}
}

// catalogWithDNSCapture is the embedded catalog with every manifest's
// dnsCapture set to on.
func catalogWithDNSCapture(t *testing.T, on bool) *bundle.Catalog {
	t.Helper()
	g := NewWithT(t)
	fsys := fstest.MapFS{}
	g.Expect(fs.WalkDir(bundles.FS, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		raw, err := fs.ReadFile(bundles.FS, p)
		if err != nil {
			return err
		}
		if strings.HasPrefix(p, "catalog/") {
			s := string(raw)
			if !strings.Contains(s, "\ndnsCapture: true\n") {
				return fmt.Errorf("%s: no top-level dnsCapture: true", p)
			}
			raw = []byte(strings.Replace(s, "\ndnsCapture: true\n", fmt.Sprintf("\ndnsCapture: %v\n", on), 1))
		}
		fsys[p] = &fstest.MapFile{Data: raw}
		return nil
	})).To(Succeed())
	c, err := bundle.Load(fsys)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(c.Versions()).To(Equal(bundle.Default().Versions()))
	return c
}

func objectOf(g Gomega, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	g.Expect(fmt.Errorf("no %s %s rendered", kind, name)).NotTo(HaveOccurred())
	return nil
}

func daemonSetOf(g Gomega, objs []*unstructured.Unstructured, name string) *appsv1.DaemonSet {
	var ds appsv1.DaemonSet
	g.Expect(runtime.DefaultUnstructuredConverter.FromUnstructured(objectOf(g, objs, "DaemonSet", name).Object, &ds)).To(Succeed())
	return &ds
}

func envOf(ds *appsv1.DaemonSet, container, name string) string {
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != container {
			continue
		}
		for _, e := range c.Env {
			if e.Name == name {
				return e.Value
			}
		}
	}
	return "<unset>"
}
