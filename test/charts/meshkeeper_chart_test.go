package charts

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/prometheus/prometheus/promql/parser"

	"github.com/meshkeeper/meshkeeper/internal/helm"
)

// The operator's own chart, charts/meshkeeper: Helm's linter, a render with
// default and with custom values, the same CRDs and RBAC as kustomize
// (config/), and every object accepted by the API server (server-side dry
// run).

var chartDir = filepath.Join("..", "..", "charts", "meshkeeper")

func renderMeshkeeper(g Gomega, namespace string, values map[string]any) map[string]*unstructured.Unstructured {
	objs, err := helm.Render(os.DirFS(chartDir), "meshkeeper", namespace, values, nil)
	g.Expect(err).NotTo(HaveOccurred())
	out := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		key := o.GetKind() + " " + o.GetNamespace() + "/" + o.GetName()
		g.Expect(out).NotTo(HaveKey(key), "rendered twice")
		out[key] = o
	}
	return out
}

func as[T any](g Gomega, o *unstructured.Unstructured) *T {
	g.Expect(o).NotTo(BeNil())
	var t T
	g.Expect(runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &t)).To(Succeed())
	return &t
}

func TestMeshkeeperChartLints(t *testing.T) {
	for name, values := range map[string]map[string]any{
		"defaults": nil,
		"everything on": {"agent": map[string]any{"image": "registry.example.com/meshkeeper/agent:v0.1.0"},
			"prometheusRule": map[string]any{"enabled": true}, "manager": map[string]any{"replicas": 1}},
	} {
		t.Run(name, func(t *testing.T) {
			notes, err := helm.Lint(chartDir, values, "meshkeeper-system")
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range notes {
				t.Log(n)
			}
		})
	}
}

func TestMeshkeeperChartIsTheKustomizeInstall(t *testing.T) {
	g := NewWithT(t)
	objs := renderMeshkeeper(g, "meshkeeper-system", nil)

	// The CRDs are config/crd/bases, byte for byte (make manifests copies them).
	bases, err := filepath.Glob(filepath.Join("..", "..", "config", "crd", "bases", "*.yaml"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(bases).NotTo(BeEmpty())
	inChart, err := filepath.Glob(filepath.Join(chartDir, "crds", "*.yaml"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(len(inChart)).To(Equal(len(bases)), "charts/meshkeeper/crds has the CRDs of config/crd/bases: run make manifests")
	for _, b := range bases {
		want, _ := os.ReadFile(b)
		got, err := os.ReadFile(filepath.Join(chartDir, "crds", filepath.Base(b)))
		g.Expect(err).NotTo(HaveOccurred(), "run make manifests")
		g.Expect(string(got)).To(Equal(string(want)), "%s is stale: run make manifests", filepath.Base(b))
	}

	// The RBAC is config/rbac's, rule for rule.
	kustomized := map[string][]rbacv1.PolicyRule{}
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "rbac", "role.yaml"))
	g.Expect(err).NotTo(HaveOccurred())
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		var r rbacv1.Role // a ClusterRole has the same shape
		g.Expect(yaml.Unmarshal([]byte(doc), &r)).To(Succeed())
		if r.Kind != "" {
			kustomized[r.Kind+" "+r.Namespace+"/"+r.Name] = r.Rules
		}
	}
	g.Expect(kustomized).To(HaveLen(3), "a ClusterRole and Roles in istio-system and meshkeeper-system")
	for key, rules := range kustomized {
		o := objs[key]
		g.Expect(o).NotTo(BeNil(), "the chart renders %s", key)
		g.Expect(as[rbacv1.Role](g, o).Rules).To(Equal(rules), "%s has config/rbac's rules", key)
	}
	for _, key := range []string{"ClusterRoleBinding /meshkeeper-manager", "RoleBinding meshkeeper-system/meshkeeper-manager",
		"RoleBinding istio-system/meshkeeper-manager", "ServiceAccount meshkeeper-system/meshkeeper-manager",
		"Namespace /istio-system", "ValidatingWebhookConfiguration /meshkeeper-validating-webhook",
		"Service meshkeeper-system/meshkeeper-webhook", "Service meshkeeper-system/meshkeeper-metrics",
		"PodDisruptionBudget meshkeeper-system/meshkeeper-manager"} {
		g.Expect(objs).To(HaveKey(key))
	}
	g.Expect(objs["Namespace /istio-system"].GetAnnotations()).To(HaveKeyWithValue("helm.sh/resource-policy", "keep"),
		"uninstalling the operator never deletes the mesh's namespace")
	g.Expect(slices.ContainsFunc(keysOf(objs), func(k string) bool { return strings.HasPrefix(k, "PrometheusRule") })).To(BeFalse(), "off by default")

	// The Deployment matches config/manager's, with the chart's image.
	dep := as[appsv1.Deployment](g, objs["Deployment meshkeeper-system/meshkeeper-manager"])
	var kdep appsv1.Deployment
	raw, err = os.ReadFile(filepath.Join("..", "..", "config", "manager", "manager.yaml"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(yaml.Unmarshal([]byte(strings.Split(string(raw), "\n---\n")[0]), &kdep)).To(Succeed())
	c, kc := dep.Spec.Template.Spec.Containers[0], kdep.Spec.Template.Spec.Containers[0]
	g.Expect(c.Image).To(Equal("ghcr.io/meshkeeper/manager:0.1.0"))
	g.Expect(*dep.Spec.Replicas).To(Equal(*kdep.Spec.Replicas))
	g.Expect(c.Resources).To(Equal(kc.Resources))
	g.Expect(c.SecurityContext).To(Equal(kc.SecurityContext))
	g.Expect(dep.Spec.Template.Spec.SecurityContext).To(Equal(kdep.Spec.Template.Spec.SecurityContext))
	g.Expect(dep.Spec.Template.Spec.ServiceAccountName).To(Equal("meshkeeper-manager"))
	for _, a := range kc.Args {
		g.Expect(c.Args).To(ContainElement(a), "the chart passes config/manager's flag %s", a)
	}
	g.Expect(c.Args).To(ContainElement("--components-namespace=istio-system"))
	g.Expect(c.Args).NotTo(ContainElement(HavePrefix("--agent-image")), "the bundles' own agent image by default")
}

func TestMeshkeeperChartValues(t *testing.T) {
	g := NewWithT(t)
	objs := renderMeshkeeper(g, "ops", map[string]any{
		"manager": map[string]any{
			"image":     map[string]any{"repository": "registry.example.com/meshkeeper/manager", "tag": "v0.2.0"},
			"replicas":  1,
			"resources": map[string]any{"requests": map[string]any{"cpu": "200m", "memory": "128Mi"}},
		},
		"agent":               map[string]any{"image": "registry.example.com/meshkeeper/agent:v0.2.0"},
		"componentsNamespace": map[string]any{"name": "mesh-system", "create": false},
		"webhook":             map[string]any{"port": 10443, "failurePolicy": "Ignore"},
		"metrics":             map[string]any{"enabled": false},
		"prometheusRule":      map[string]any{"enabled": true, "labels": map[string]any{"release": "kube-prometheus"}},
		"spire":               map[string]any{"registration": true},
	})
	dep := as[appsv1.Deployment](g, objs["Deployment ops/meshkeeper-manager"])
	c := dep.Spec.Template.Spec.Containers[0]
	g.Expect(c.Image).To(Equal("registry.example.com/meshkeeper/manager:v0.2.0"))
	g.Expect(*dep.Spec.Replicas).To(BeEquivalentTo(1))
	g.Expect(c.Resources.Requests.Cpu().String()).To(Equal("200m"))
	g.Expect(c.Args).To(ContainElements(
		"--agent-image=registry.example.com/meshkeeper/agent:v0.2.0",
		"--components-namespace=mesh-system",
		"--webhook-port=10443",
		"--metrics-bind-address=0",
		"--webhook-hosts=meshkeeper-webhook.ops.svc,meshkeeper-webhook.ops.svc.cluster.local",
		// SPIRE registration through the relay, which runs the manager's own image.
		"--spire-server-address=spire-server.mesh-system.svc:8082",
		"--spire-relay-image=registry.example.com/meshkeeper/manager:v0.2.0"))
	g.Expect(c.Ports).To(ContainElement(HaveField("ContainerPort", BeEquivalentTo(10443))))
	g.Expect(objs).NotTo(HaveKey("PodDisruptionBudget ops/meshkeeper-manager"), "no PDB for one replica")
	g.Expect(objs).NotTo(HaveKey("Service ops/meshkeeper-metrics"))
	g.Expect(objs).NotTo(HaveKey("Namespace /mesh-system"))
	g.Expect(objs).To(HaveKey("Role mesh-system/meshkeeper-manager"), "the components' Role follows componentsNamespace")
	g.Expect(objs).To(HaveKey("RoleBinding mesh-system/meshkeeper-manager"))
	g.Expect(objs).To(HaveKey("Role ops/meshkeeper-manager"), "the manager's own Role is in the release namespace")
	crb := as[rbacv1.ClusterRoleBinding](g, objs["ClusterRoleBinding /meshkeeper-manager"])
	g.Expect(crb.Subjects).To(ConsistOf(rbacv1.Subject{Kind: "ServiceAccount", Name: "meshkeeper-manager", Namespace: "ops"}))
	vwc := objs["ValidatingWebhookConfiguration /meshkeeper-validating-webhook"]
	hooks, _, _ := unstructured.NestedSlice(vwc.Object, "webhooks")
	g.Expect(hooks).To(HaveLen(1))
	g.Expect(hooks[0]).To(HaveKeyWithValue("failurePolicy", "Ignore"))
	svc, _, _ := unstructured.NestedString(hooks[0].(map[string]any), "clientConfig", "service", "namespace")
	g.Expect(svc).To(Equal("ops"))

	rule := objs["PrometheusRule ops/meshkeeper"]
	g.Expect(rule).NotTo(BeNil())
	g.Expect(rule.GetLabels()).To(HaveKeyWithValue("release", "kube-prometheus"))
	groups, _, _ := unstructured.NestedSlice(rule.Object, "spec", "groups")
	g.Expect(groups).NotTo(BeEmpty())
	var alerts []string
	for _, gr := range groups {
		rules, _, _ := unstructured.NestedSlice(gr.(map[string]any), "rules")
		for _, r := range rules {
			alerts = append(alerts, fmt.Sprint(r.(map[string]any)["alert"]))
		}
	}
	// The operator's own alerts and the rollout alerts of config/prometheus.
	g.Expect(alerts).To(ContainElements("MeshkeeperReconcileErrors", "MeshkeeperRolloutStuck", "MeshkeeperRepeatedRollbacks"))
	for _, gr := range groups {
		rules, _, _ := unstructured.NestedSlice(gr.(map[string]any), "rules")
		g.Expect(rules).NotTo(BeEmpty())
		for _, r := range rules {
			expr, _, _ := unstructured.NestedString(r.(map[string]any), "expr")
			_, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
			g.Expect(err).NotTo(HaveOccurred(), "alert %v: %q is not PromQL", r.(map[string]any)["alert"], expr)
		}
	}
}

// Every object of the chart is accepted by the real API server (PrometheusRule
// aside: prometheus-operator's CRD is not installed here).
func TestMeshkeeperChartIsAcceptedByTheAPIServer(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	const ns = "meshkeeper-chart"
	g.Expect(client.IgnoreAlreadyExists(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}))).To(Succeed())
	objs := renderMeshkeeper(g, ns, map[string]any{
		"componentsNamespace": map[string]any{"name": "meshkeeper-chart-components"},
		"agent":               map[string]any{"image": "registry.example.com/meshkeeper/agent:v0.2.0"},
	})
	// Namespaces first, as Helm orders them.
	for _, o := range objs {
		if o.GetKind() == "Namespace" {
			g.Expect(k8s.Apply(ctx, client.ApplyConfigurationFromUnstructured(o), client.FieldOwner("chart-check"), client.ForceOwnership)).To(Succeed())
		}
	}
	for key, o := range objs {
		if o.GetKind() == "Namespace" || o.GetKind() == "CustomResourceDefinition" {
			continue // the CRDs are installed by the suite already
		}
		err := k8s.Apply(ctx, client.ApplyConfigurationFromUnstructured(o), client.DryRunAll, client.FieldOwner("chart-check"), client.ForceOwnership)
		g.Expect(err).NotTo(HaveOccurred(), "%s refused by the API server", key)
	}
}

func keysOf[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
