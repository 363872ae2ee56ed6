// Package argocd checks config/argocd/health.lua with Argo CD's own code:
// the argocd-cm snippet is read by Argo CD's settings manager (so the key
// resource.customizations.health.meshkeeper.dev_Mesh must be one Argo CD
// understands), and the script it yields runs in Argo CD's Lua VM on Mesh
// objects captured from the e2e suite at each stage of a rollout.
package argocd

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/argoproj/argo-cd/v3/common"
	appv1 "github.com/argoproj/argo-cd/v3/pkg/apis/application/v1alpha1"
	"github.com/argoproj/argo-cd/v3/util/lua"
	"github.com/argoproj/argo-cd/v3/util/settings"
	"github.com/argoproj/gitops-engine/pkg/health"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"
)

// FixturesEnv names a directory of Mesh objects the e2e suite just captured
// (make test sets it); they are checked as well as the committed ones.
const FixturesEnv = "MESHKEEPER_ARGOCD_FIXTURES"

// stages are the fixtures the e2e suite writes (test/e2e/gitops_test.go),
// one Mesh per file, and the health Argo CD must show for each.
var stages = map[string]health.HealthStatusCode{
	"not-observed":     health.HealthStatusProgressing, // created, meshkeeper has not reconciled it yet
	"ready":            health.HealthStatusHealthy,     // Ready at the current generation
	"upgrade-observed": health.HealthStatusProgressing, // spec.version changed, status still of the old generation
	"rolling-out":      health.HealthStatusProgressing, // a canary rollout in a wave
	"upgraded":         health.HealthStatusHealthy,     // the rollout succeeded
	"paused":           health.HealthStatusSuspended,   // spec.paused: true, observed
	"unknown-version":  health.HealthStatusDegraded,    // Stalled: the version is not in the catalog
	"rolling-back":     health.HealthStatusDegraded,    // an SLO broke, the rollback runs
	"rolled-back":      health.HealthStatusDegraded,    // RolledBack and Stalled until the spec changes
	"reverted":         health.HealthStatusHealthy,     // spec.version set back to what runs: Ready again
}

// loadOverrides reads config/argocd/argocd-cm.yaml through Argo CD's
// settings manager, as Argo CD's application controller does, and returns a
// Lua VM with the resource overrides it yields.
func loadOverrides(t *testing.T) lua.VM {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "argocd", "argocd-cm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cm := &corev1.ConfigMap{}
	if err := yaml.Unmarshal(raw, cm); err != nil {
		t.Fatalf("config/argocd/argocd-cm.yaml: %v", err)
	}
	if cm.Name != common.ArgoCDConfigMapName {
		t.Fatalf("config/argocd/argocd-cm.yaml is ConfigMap %q, Argo CD reads %q", cm.Name, common.ArgoCDConfigMapName)
	}
	script, err := os.ReadFile(filepath.Join("..", "..", "config", "argocd", "health.lua"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cm.Data["resource.customizations.health.meshkeeper.dev_Mesh"]; got != string(script) {
		t.Fatalf("argocd-cm.yaml's resource.customizations.health.meshkeeper.dev_Mesh differs from health.lua: regenerate the snippet from the script")
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: common.ArgoCDSecretName, Namespace: cm.Namespace,
		Labels: map[string]string{"app.kubernetes.io/part-of": "argocd"}}}
	mgr := settings.NewSettingsManager(context.Background(), fake.NewClientset(cm, secret), cm.Namespace)
	ro, err := mgr.GetResourceOverrides()
	if err != nil {
		t.Fatalf("Argo CD's settings manager refuses argocd-cm.yaml: %v", err)
	}
	if ro["meshkeeper.dev/Mesh"].HealthLua != string(script) {
		t.Fatalf("Argo CD reads no health script for meshkeeper.dev/Mesh from argocd-cm.yaml (overrides: %v)", keys(ro))
	}
	return lua.VM{ResourceOverrides: ro}
}

func TestHealthOfCapturedMeshes(t *testing.T) {
	vm := loadOverrides(t)
	dirs := []string{filepath.Join("..", "..", "config", "argocd", "testdata")}
	if d := os.Getenv(FixturesEnv); d != "" {
		dirs = append(dirs, d)
	}
	for _, dir := range dirs {
		for stage, want := range stages {
			t.Run(filepath.Base(dir)+"/"+stage, func(t *testing.T) {
				path := filepath.Join(dir, stage+".yaml")
				raw, err := os.ReadFile(path)
				if err != nil {
					t.Fatalf("fixture %s missing (the e2e suite writes it with %s=<dir>): %v", path, FixturesEnv, err)
				}
				obj := &unstructured.Unstructured{}
				if err := yaml.Unmarshal(raw, &obj.Object); err != nil {
					t.Fatalf("%s: %v", path, err)
				}
				if obj.GroupVersionKind().GroupKind().String() != "Mesh.meshkeeper.dev" {
					t.Fatalf("%s is a %s, not a Mesh", path, obj.GroupVersionKind())
				}
				got := evaluate(t, vm, obj)
				if got.Status != want {
					t.Errorf("%s: Argo CD shows %s (%q), want %s", path, got.Status, got.Message, want)
				}
				if got.Message == "" {
					t.Errorf("%s: health %s carries no message", path, got.Status)
				}
				t.Logf("%s: %s: %s", stage, got.Status, got.Message)
			})
		}
	}
}

// Variations of captured Meshes for what the e2e does not produce on its own.
func TestHealthOfVariations(t *testing.T) {
	vm := loadOverrides(t)
	load := func(t *testing.T, stage string) *unstructured.Unstructured {
		t.Helper()
		raw, err := os.ReadFile(filepath.Join("..", "..", "config", "argocd", "testdata", stage+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		obj := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(raw, &obj.Object); err != nil {
			t.Fatal(err)
		}
		return obj
	}
	// generation reads metadata.generation as JSON decoding leaves it (a
	// float64, which GetGeneration does not read).
	generation := func(obj *unstructured.Unstructured) int64 {
		v, _, _ := unstructured.NestedFieldNoCopy(obj.Object, "metadata", "generation")
		f, ok := v.(float64)
		if !ok || f < 1 {
			t.Fatalf("metadata.generation is %v", v)
		}
		return int64(f)
	}
	t.Run("a Ready Mesh whose spec changed since is Progressing, not Healthy", func(t *testing.T) {
		obj := load(t, "ready")
		obj.SetGeneration(generation(obj) + 1)
		if got := evaluate(t, vm, obj); got.Status != health.HealthStatusProgressing {
			t.Errorf("got %s (%q), want Progressing", got.Status, got.Message)
		}
	})
	t.Run("a rollout held on inconclusive analysis (Degraded=True) is Degraded", func(t *testing.T) {
		obj := load(t, "rolling-out")
		conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
		conds = append(conds, map[string]any{"type": "Degraded", "status": "True", "reason": "AnalysisInconclusive",
			"message": "Prometheus returned no data", "observedGeneration": generation(obj),
			"lastTransitionTime": "2026-12-01T00:00:00Z"})
		if err := unstructured.SetNestedSlice(obj.Object, conds, "status", "conditions"); err != nil {
			t.Fatal(err)
		}
		if got := evaluate(t, vm, obj); got.Status != health.HealthStatusDegraded || !strings.Contains(got.Message, "Prometheus returned no data") {
			t.Errorf("got %s (%q), want Degraded naming the reason", got.Status, got.Message)
		}
	})
	t.Run("a Mesh without status is Progressing", func(t *testing.T) {
		obj := load(t, "ready")
		delete(obj.Object, "status")
		if got := evaluate(t, vm, obj); got.Status != health.HealthStatusProgressing {
			t.Errorf("got %s (%q), want Progressing", got.Status, got.Message)
		}
	})
}

// evaluate runs the script Argo CD picks for obj, as the controller does.
func evaluate(t *testing.T, vm lua.VM, obj *unstructured.Unstructured) *health.HealthStatus {
	t.Helper()
	script, useOpenLibs, err := vm.GetHealthScript(obj)
	if err != nil {
		t.Fatalf("GetHealthScript: %v", err)
	}
	if script == "" {
		t.Fatal("Argo CD has no health script for meshkeeper.dev/Mesh")
	}
	vm.UseOpenLibs = useOpenLibs
	hs, err := vm.ExecuteHealthLua(obj, script)
	if err != nil {
		t.Fatalf("Argo CD's Lua VM fails on health.lua: %v", err)
	}
	return hs
}

func keys[V any](m map[string]V) string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return strings.Join(out, ", ")
}

// parseApplications reads YAML documents as Argo CD's own Application type.
func parseApplications(t *testing.T, what, raw string) []appv1.Application {
	t.Helper()
	var apps []appv1.Application
	for _, doc := range strings.Split(raw, "\n---\n") {
		var app appv1.Application
		if err := yaml.UnmarshalStrict([]byte(doc), &app); err != nil {
			t.Fatalf("%s: not an Argo CD Application: %v", what, err)
		}
		apps = append(apps, app)
	}
	return apps
}

// The example Applications parse as Argo CD's own types, in their waves,
// pointing at directories this repository has; the README shows the same.
func TestApplicationsExample(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "argocd", "applications.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	apps := parseApplications(t, "config/argocd/applications.yaml", string(raw))
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "## Install with Argo CD\n")
	_, block, ok2 := strings.Cut(section, "```yaml\n")
	block, _, ok3 := strings.Cut(block, "```")
	if !ok || !ok2 || !ok3 {
		t.Fatal("README.md has no yaml block under \"## Install with Argo CD\"")
	}
	if got := parseApplications(t, "README.md's Argo CD example", block); !reflect.DeepEqual(got, apps) {
		t.Errorf("README.md's Argo CD example differs from config/argocd/applications.yaml:\nREADME: %+v\nfile:   %+v", got, apps)
	}
	var waves []string
	for _, app := range apps {
		if app.Kind != "Application" || app.Spec.Source == nil || app.Spec.Source.Path == "" {
			t.Fatalf("Application %q has no source path", app.Name)
		}
		if app.Spec.Source.RepoURL == "https://github.com/meshkeeper/meshkeeper" {
			if _, err := os.Stat(filepath.Join("..", "..", app.Spec.Source.Path)); err != nil {
				t.Errorf("Application %s points at %s, which this repository does not have", app.Name, app.Spec.Source.Path)
			}
		}
		waves = append(waves, app.Name+"@"+app.Annotations["argocd.argoproj.io/sync-wave"])
		if !app.Spec.SyncPolicy.SyncOptions.HasOption("ServerSideApply=true") {
			t.Errorf("Application %s does not apply server-side", app.Name)
		}
	}
	if got := strings.Join(waves, " "); got != "meshkeeper-crds@-1 meshkeeper@0 mesh@1" {
		t.Errorf("sync waves are %s, want the CRDs, then the operator, then the Mesh", got)
	}
}
