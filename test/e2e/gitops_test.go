package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// ArgoCDFieldManager is the field manager Argo CD's application controller
// applies with when server-side apply is on.
const ArgoCDFieldManager = "argocd-controller"

// ArgoCDFixturesEnv names a directory that receives the Mesh at each stage
// below, one YAML file per stage; test/argocd runs Argo CD's Lua health
// engine on them (make test sets it to .tmp/argocd-fixtures; pointing it at
// config/argocd/testdata refreshes the committed fixtures).
const ArgoCDFixturesEnv = "MESHKEEPER_ARGOCD_FIXTURES"

// The Mesh as Argo CD applies it: server-side, field manager
// argocd-controller, the whole spec every time. Through an install, a canary
// upgrade, a pause, an unknown version, a rollback and a revert, the spec
// stays exactly what was applied and no field manager but argocd-controller
// owns a spec field: the operator never writes spec, so Argo CD never sees
// the Mesh out of sync. Every stage is captured for the Argo CD health test.
var _ = Describe("A Mesh applied by Argo CD (server-side apply)", Ordered, func() {
	const selector = "gitops-e2e"
	namespaces := []string{"go-canary", "go-a", "go-b"}
	var (
		workload *prom.Workload
		srv      *prom.Server
		meshes   *recorder[meshv1.Mesh]
		stop     context.CancelFunc = func() {}
		// applied is the spec each apply returned, by generation: as the
		// API server sent it (raw) and as the typed client reads it.
		applied      = map[int64]string{}
		appliedTyped = map[int64]string{}
	)

	spec := func(version string, extra string) string {
		return fmt.Sprintf(`apiVersion: meshkeeper.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  version: %q
  namespaces: {selector: {matchLabels: {%s: "on"}}}
  rollout:
    nodes: {canary: {matchLabels: {pool: canary}}, maxUnavailable: 2, bake: 5s}
    namespaces: {canary: [go-canary], waves: ["50%%", "100%%"], bake: 5s}
    retireAfter: 1s
  analysis:
    prometheus: {address: %q}
    interval: 5s
    failureLimit: 0
    slos:
    - name: l4-success
      query: 'sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}",result="ok"}[5s])) / sum(rate(meshkeeper_agent_connections_total{workload_namespace=~"{{ .Namespaces }}"}[5s]))'
      min: "0.95"
%s`, version, selector, srv.URL, extra)
	}
	// argoApply applies manifest as Argo CD does and remembers the spec the
	// API server returned for the new generation.
	argoApply := func(ctx context.Context, manifest string) int64 {
		GinkgoHelper()
		u := &unstructured.Unstructured{}
		Expect(yaml.Unmarshal([]byte(manifest), &u.Object)).To(Succeed())
		Expect(kc.Client.Apply(ctx, client.ApplyConfigurationFromUnstructured(u),
			client.FieldOwner(ArgoCDFieldManager), client.ForceOwnership)).To(Succeed())
		raw, err := json.Marshal(u.Object["spec"])
		Expect(err).NotTo(HaveOccurred())
		applied[u.GetGeneration()] = string(raw)
		var typed meshv1.Mesh
		Expect(runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &typed)).To(Succeed())
		appliedTyped[u.GetGeneration()] = specJSON(typed)
		return u.GetGeneration()
	}
	getMesh := func(ctx context.Context) *meshv1.Mesh {
		m := &meshv1.Mesh{}
		if err := kc.Client.Get(ctx, client.ObjectKey{Name: "default"}, m); err != nil {
			return nil
		}
		return m
	}
	// settledAt waits until meshkeeper reached a settled result for
	// generation gen (status.observedGeneration) and returns that Mesh.
	settledAt := func(ctx context.Context, gen int64, what string) *meshv1.Mesh {
		GinkgoHelper()
		var m *meshv1.Mesh
		Eventually(func() int64 {
			if m = getMesh(ctx); m == nil {
				return 0
			}
			return m.Status.ObservedGeneration
		}).WithContext(ctx).WithTimeout(180*time.Second).WithPolling(100*time.Millisecond).Should(Equal(gen), what)
		return m
	}
	ready := func(m *meshv1.Mesh) bool {
		return m != nil && meta.IsStatusConditionTrue(m.Status.Conditions, meshv1.ConditionReady) &&
			m.Status.ObservedGeneration == m.Generation && m.Status.Rollout == nil
	}
	// seen is the first Mesh the watch delivered that matches.
	seen := func(what string, match func(m *meshv1.Mesh) bool) *meshv1.Mesh {
		GinkgoHelper()
		var found *meshv1.Mesh
		Eventually(func() bool {
			all := meshes.all()
			if i := slices.IndexFunc(all, func(m meshv1.Mesh) bool { return match(&m) }); i >= 0 {
				found = &all[i]
				return true
			}
			return false
		}).WithTimeout(120*time.Second).WithPolling(20*time.Millisecond).Should(BeTrue(), what)
		return found
	}

	BeforeAll(func(ctx SpecContext) {
		t := GinkgoTB()
		prom.SkipIfUnavailable(t)
		workload = prom.NewWorkload(t)
		for _, ns := range namespaces {
			kubectl(ctx, "create", "ns", ns)
			kubectl(ctx, "label", "ns", ns, selector+"=on")
			workload.SetRatio(ns, 1)
		}
		var err error
		srv, err = prom.Start(ctx, t, workload.Addr)
		Expect(err).NotTo(HaveOccurred())
		_, err = srv.WaitForScrapes(ctx, 30*time.Second)
		Expect(err).NotTo(HaveOccurred())
		var wctx context.Context
		wctx, stop = context.WithCancel(context.Background())
		meshes = record[meshv1.Mesh](wctx, &meshv1.MeshList{}, &client.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("metadata.name", "default")})
	})

	It("installs, upgrades by canary, pauses and stalls, each with the status Argo CD reads", func(ctx SpecContext) {
		gen := argoApply(ctx, spec("1.26", ""))
		captureFixture("not-observed", seen("the created Mesh", func(m *meshv1.Mesh) bool {
			return m.Generation == gen && len(m.Status.Conditions) == 0
		}))
		// (On kwok nodes an install often settles in the first reconcile that
		// writes status, so there may be no "installing" status to capture.)
		m := settledAt(ctx, gen, "the install settles")
		Expect(ready(m)).To(BeTrue(), "Ready after the install: %v", m.Status.Conditions)
		captureFixture("ready", m)

		gen = argoApply(ctx, spec("1.27", ""))
		captureFixture("upgrade-observed", seen("the Mesh right after spec.version changed", func(m *meshv1.Mesh) bool {
			return m.Generation == gen && m.Status.ObservedGeneration < gen && m.Status.Rollout == nil
		}))
		captureFixture("rolling-out", seen("the canary namespace wave", func(m *meshv1.Mesh) bool {
			ro := m.Status.Rollout
			return m.Generation == gen && ro != nil && ro.Step == meshv1.RolloutStepNamespaces && ro.Wave == 1
		}))
		Eventually(func() bool { return ready(getMesh(ctx)) }).WithContext(ctx).WithTimeout(180*time.Second).
			Should(BeTrue(), "Ready on 1.27.3")
		m = getMesh(ctx)
		Expect(m.Status.Version.Installed).To(Equal("1.27.3"))
		captureFixture("upgraded", m)

		gen = argoApply(ctx, spec("1.27", "  paused: true\n"))
		m = settledAt(ctx, gen, "the pause is observed")
		Expect(meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)).To(HaveField("Reason", meshv1.ReasonPaused))
		captureFixture("paused", m)

		gen = argoApply(ctx, spec("1.99", ""))
		m = settledAt(ctx, gen, "the unknown version is observed")
		Expect(meta.IsStatusConditionTrue(m.Status.Conditions, meshv1.ConditionStalled)).To(BeTrue(), "Stalled on 1.99: %v", m.Status.Conditions)
		captureFixture("unknown-version", m)

		gen = argoApply(ctx, spec("1.27", ""))
		m = settledAt(ctx, gen, "back on 1.27")
		Expect(ready(m)).To(BeTrue(), "Ready again on 1.27: %v", m.Status.Conditions)
	})

	It("rolls back a broken upgrade and says so", func(ctx SpecContext) {
		workload.SetRatio("go-canary", 0.9)
		gen := argoApply(ctx, spec("1.28", ""))
		captureFixture("rolling-back", seen("the rollback of 1.28.2", func(m *meshv1.Mesh) bool {
			ro := m.Status.Rollout
			return m.Generation == gen && ro != nil && ro.Step == meshv1.RolloutStepRollingBack
		}))
		m := settledAt(ctx, gen, "the rollback settles")
		Expect(m.Status.Rollout).To(BeNil())
		Expect(meta.IsStatusConditionTrue(m.Status.Conditions, meshv1.ConditionRolledBack)).To(BeTrue(), "%v", m.Status.Conditions)
		Expect(m.Status.Version.Installed).To(Equal("1.27.3"))
		captureFixture("rolled-back", m)

		workload.SetRatio("go-canary", 1)
		gen = argoApply(ctx, spec("1.27", ""))
		m = settledAt(ctx, gen, "the revert to 1.27 settles")
		Expect(ready(m)).To(BeTrue(), "Ready on 1.27.3 after the revert: %v", m.Status.Conditions)
		captureFixture("reverted", m)
	})

	It("never changes the applied spec, and no one but Argo CD owns a spec field", func(ctx SpecContext) {
		all := meshes.all()
		Expect(len(all)).To(BeNumerically(">", 20), "the watch saw the whole run")
		for _, m := range all {
			want, ok := appliedTyped[m.Generation]
			Expect(ok).To(BeTrue(), "generation %d was not made by an apply: someone else changed spec", m.Generation)
			Expect(specJSON(m)).To(MatchJSON(want), "spec at generation %d (resourceVersion %s) is what Argo CD applied", m.Generation, m.ResourceVersion)
		}
		live := &unstructured.Unstructured{}
		live.SetGroupVersionKind(meshv1.GroupVersion.WithKind("Mesh"))
		Expect(kc.Client.Get(ctx, client.ObjectKey{Name: "default"}, live)).To(Succeed())
		raw, err := json.Marshal(live.Object["spec"])
		Expect(err).NotTo(HaveOccurred())
		Expect(string(raw)).To(Equal(applied[live.GetGeneration()]), "the live spec is byte for byte the last apply's")

		var argo bool
		for _, mf := range live.GetManagedFields() {
			fieldsOwned := map[string]any{}
			if mf.FieldsV1 != nil {
				Expect(json.Unmarshal(mf.FieldsV1.Raw, &fieldsOwned)).To(Succeed())
			}
			_, ownsSpec := fieldsOwned["f:spec"]
			if mf.Manager == ArgoCDFieldManager && mf.Subresource == "" {
				argo = ownsSpec
				continue
			}
			Expect(ownsSpec).To(BeFalse(), "field manager %q (%s, subresource %q) owns spec fields: %s",
				mf.Manager, mf.Operation, mf.Subresource, mf.FieldsV1.Raw)
		}
		Expect(argo).To(BeTrue(), "argocd-controller owns the spec it applied")
	})

	AfterAll(func(ctx SpecContext) {
		stop()
		if CurrentSpecReport().Failed() {
			GinkgoWriter.Printf("manager log tail:\n%s\n", manager.LogTail(80))
			if m := getMesh(ctx); m != nil {
				out, _ := yaml.Marshal(m.Status)
				GinkgoWriter.Printf("mesh/default status:\n%s\n", out)
			}
		}
		_, _, _ = kc.Kubectl(ctx, "delete", "mesh", "default", "--wait", "--timeout=180s", "--ignore-not-found")
		for _, ns := range namespaces {
			_, _, _ = kc.Kubectl(ctx, "label", "ns", ns, selector+"-")
		}
	})
})

func specJSON(m meshv1.Mesh) string {
	GinkgoHelper()
	raw, err := json.Marshal(m.Spec)
	Expect(err).NotTo(HaveOccurred())
	return string(raw)
}

// captureFixture writes m as stage.yaml into $MESHKEEPER_ARGOCD_FIXTURES
// (when set), as Argo CD would read it from the API server.
func captureFixture(stage string, m *meshv1.Mesh) {
	GinkgoHelper()
	GinkgoWriter.Printf("stage %s: generation %d, observed %d, conditions %v\n", stage, m.Generation, m.Status.ObservedGeneration, conditionSummary(m))
	dir := os.Getenv(ArgoCDFixturesEnv)
	if dir == "" {
		return
	}
	obj := m.DeepCopy()
	obj.APIVersion, obj.Kind = meshv1.GroupVersion.String(), "Mesh"
	out, err := yaml.Marshal(obj)
	Expect(err).NotTo(HaveOccurred())
	Expect(os.MkdirAll(dir, 0o755)).To(Succeed())
	Expect(os.WriteFile(filepath.Join(dir, stage+".yaml"), out, 0o644)).To(Succeed())
}

func conditionSummary(m *meshv1.Mesh) []string {
	var out []string
	for _, c := range m.Status.Conditions {
		out = append(out, fmt.Sprintf("%s=%s(%s,gen %d)", c.Type, c.Status, c.Reason, c.ObservedGeneration))
	}
	return out
}
