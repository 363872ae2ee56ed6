package controller

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func names(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%04d", prefix, i)
	}
	return out
}

// overCaps is a status with one item more than the cap in every capped list.
func overCaps() meshv1.MeshStatus {
	st := meshv1.MeshStatus{
		Ignored:   names("ConfigMap/istio-system/ignored", maxIgnored+1),
		Dataplane: meshv1.DataplaneStatus{Conflicts: names("conflict", maxConflicts+1)},
		Rollout: &meshv1.RolloutStatus{Step: meshv1.RolloutStepNamespaces, From: "1.27.3", To: "1.28.2", Wave: 2, Waves: 2,
			WaveNamespaces: names("ns", maxWaveMembers+1), WaveNodes: names("node", maxWaveMembers+1)},
	}
	for i := range maxHistory + 1 {
		st.History = append(st.History, meshv1.HistoryEntry{Version: fmt.Sprintf("1.28.%d", i), Outcome: meshv1.OutcomeSucceeded})
	}
	st.Catalog = &meshv1.CatalogStatus{}
	for i := range maxCatalog + 1 {
		st.Catalog.Bundles = append(st.Catalog.Bundles, meshv1.CatalogBundle{Version: fmt.Sprintf("1.%d.0", i), From: "embedded"})
	}
	return st
}

func TestBoundStatus(t *testing.T) {
	g := NewWithT(t)
	st := overCaps()
	boundStatus(&st)
	g.Expect(st.Ignored).To(Equal(names("ConfigMap/istio-system/ignored", maxIgnored)))
	g.Expect(st.IgnoredOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Dataplane.Conflicts).To(Equal(names("conflict", maxConflicts)))
	g.Expect(st.Dataplane.ConflictsOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Rollout.WaveNamespaces).To(Equal(names("ns", maxWaveMembers)))
	g.Expect(st.Rollout.WaveNamespacesOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Rollout.WaveNodes).To(Equal(names("node", maxWaveMembers)))
	g.Expect(st.Rollout.WaveNodesOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Catalog.Bundles).To(HaveLen(maxCatalog))
	g.Expect(st.Catalog.Bundles[0].Version).To(Equal("1.1.0"), "the oldest release is left out")
	g.Expect(st.Catalog.BundlesOmitted).To(BeEquivalentTo(1))
	g.Expect(st.History).To(HaveLen(maxHistory))
	g.Expect(st.History[0].Version).To(Equal("1.28.1"), "the oldest entry goes")
	g.Expect(st.HistoryOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Catalog.Bundles).To(HaveLen(maxCatalog))
	g.Expect(st.Catalog.BundlesOmitted).To(BeEquivalentTo(1))

	// Bounded again (the next reconcile, from the status it wrote): nothing
	// changes, the counts stay.
	again := *st.DeepCopy()
	boundStatus(&again)
	g.Expect(again).To(Equal(st))

	// The next entry of history drops one more.
	again.History = append(again.History, meshv1.HistoryEntry{Version: "1.29.0", Outcome: meshv1.OutcomeSucceeded})
	boundStatus(&again)
	g.Expect(again.History).To(HaveLen(maxHistory))
	g.Expect(again.HistoryOmitted).To(BeEquivalentTo(2))

	// At the caps nothing is cut.
	at := meshv1.MeshStatus{Ignored: names("i", maxIgnored), Rollout: &meshv1.RolloutStatus{WaveNamespaces: names("ns", maxWaveMembers)}}
	boundStatus(&at)
	g.Expect(at.Ignored).To(HaveLen(maxIgnored))
	g.Expect(at.IgnoredOmitted).To(BeZero())
	g.Expect(at.Rollout.WaveNamespaces).To(HaveLen(maxWaveMembers))
	g.Expect(at.Rollout.WaveNamespacesOmitted).To(BeZero())

	// A new wave within the cap clears the count of the last one.
	ro := &meshv1.RolloutStatus{}
	setWaveNamespaces(ro, names("ns", maxWaveMembers+75))
	g.Expect(ro.WaveNamespacesOmitted).To(BeEquivalentTo(75))
	setWaveNamespaces(ro, names("ns", 3))
	g.Expect(ro.WaveNamespaces).To(HaveLen(3))
	g.Expect(ro.WaveNamespacesOmitted).To(BeZero())
}

func TestNameList(t *testing.T) {
	g := NewWithT(t)
	// A condition message is at most 32 KiB: thousands of conflicting
	// namespaces are named ten at a time.
	mesh := &meshv1.Mesh{}
	applyStatus(mesh, &observation{namespacesObserved: true, conflicts: names("conflict-with-a-long-name: istio.io/rev=other", 5000)}, nil)
	degraded := meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionDegraded)
	g.Expect(degraded).NotTo(BeNil())
	g.Expect(degraded.Message).To(ContainSubstring("and 4990 more"))
	g.Expect(len(degraded.Message)).To(BeNumerically("<", 1024))
	g.Expect(mesh.Status.Dataplane.Conflicts).To(HaveLen(maxConflicts))
	g.Expect(mesh.Status.Dataplane.ConflictsOmitted).To(BeEquivalentTo(5000 - maxConflicts))

	g.Expect(nameList([]string{"a", "b"})).To(Equal("a, b"))
	g.Expect(nameList(names("ns", 1100))).To(Equal(strings.Join(names("ns", 10), ", ") + " and 1090 more"))
}

// TestStatusCapsMatchTheCRD: the caps boundStatus truncates to are the
// generated CRD's maxItems, so a cap changed in api/ without the controller
// (or the other way round) fails here.
func TestStatusCapsMatchTheCRD(t *testing.T) {
	g := NewWithT(t)
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "crd", "bases", "meshkeeper.dev_meshes.yaml"))
	g.Expect(err).NotTo(HaveOccurred())
	var crd apiextensionsv1.CustomResourceDefinition
	g.Expect(yaml.Unmarshal(raw, &crd)).To(Succeed())
	status := crd.Spec.Versions[0].Schema.OpenAPIV3Schema.Properties["status"]
	maxItems := func(path ...string) int64 {
		p := status
		for _, name := range path {
			p = p.Properties[name]
		}
		g.Expect(p.MaxItems).NotTo(BeNil(), "status.%s has no maxItems", strings.Join(path, "."))
		return *p.MaxItems
	}
	g.Expect(maxItems("dataplane", "conflicts")).To(BeEquivalentTo(maxConflicts))
	g.Expect(maxItems("ignored")).To(BeEquivalentTo(maxIgnored))
	g.Expect(maxItems("history")).To(BeEquivalentTo(maxHistory))
	g.Expect(maxItems("rollout", "waveNamespaces")).To(BeEquivalentTo(maxWaveMembers))
	g.Expect(maxItems("rollout", "waveNodes")).To(BeEquivalentTo(maxWaveMembers))
	g.Expect(maxItems("catalog", "bundles")).To(BeEquivalentTo(maxCatalog))
	g.Expect(maxItems("identity", "dryRun", "actions")).To(BeEquivalentTo(maxDryRunItems))
	g.Expect(maxItems("identity", "dryRun", "conflicts")).To(BeEquivalentTo(maxDryRunItems))
	g.Expect(maxItems("waypoints", "items")).To(BeEquivalentTo(maxWaypointItems))
	g.Expect(maxItems("waypoints", "conflicts")).To(BeEquivalentTo(maxWaypointConflicts))
	g.Expect(maxItems("waypoints", "gatewayAPI", "kept")).To(BeEquivalentTo(maxGatewayAPIKept))
	g.Expect(maxItems("security", "conflicts")).To(BeEquivalentTo(maxMTLSConflicts))
	g.Expect(maxItems("security", "optOuts")).To(BeEquivalentTo(maxMTLSOptOuts))

	// Every other capped status list would need a cap here too.
	var capped []string
	var walk func(prefix string, p apiextensionsv1.JSONSchemaProps)
	walk = func(prefix string, p apiextensionsv1.JSONSchemaProps) {
		if p.MaxItems != nil {
			capped = append(capped, prefix)
		}
		for name, c := range p.Properties {
			walk(prefix+"."+name, c)
		}
		if p.Items != nil && p.Items.Schema != nil {
			walk(prefix+"[]", *p.Items.Schema)
		}
	}
	walk("status", status)
	g.Expect(capped).To(ConsistOf("status.dataplane.conflicts", "status.ignored", "status.history",
		"status.rollout.waveNamespaces", "status.rollout.waveNodes", "status.catalog.bundles",
		"status.identity.dryRun.actions", "status.identity.dryRun.conflicts",
		"status.waypoints.items", "status.waypoints.conflicts", "status.waypoints.gatewayAPI.kept",
		"status.security.conflicts", "status.security.optOuts"))
}

// TestStatusAtTheCapsOnTheAPIServer: a status one item over every cap is
// refused by the real API server (so is every status patch after it: the
// rollout would freeze), and accepted once boundStatus truncated it.
func TestStatusAtTheCapsOnTheAPIServer(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		// Paused and selecting nothing: the reconciler installs nothing and
		// does not write this status over (status writes do not wake it).
		Spec: meshv1.MeshSpec{Version: "1.28", Paused: true,
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"caps-mesh": "none"}}}},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	g.Eventually(func() []meshv1.PlanStep { return getMesh().Status.Plan }).ShouldNot(BeEmpty(), "the reconciler has seen it")

	write := func(bound bool) error {
		m := getMesh()
		m.Status = overCaps()
		if bound {
			boundStatus(&m.Status)
		}
		return k8s.Status().Update(ctx, m)
	}
	err := write(false)
	g.Expect(err).To(HaveOccurred())
	for _, field := range []string{"status.ignored", "status.dataplane.conflicts", "status.history", "status.rollout.waveNamespaces", "status.rollout.waveNodes", "status.catalog.bundles"} {
		g.Expect(err.Error()).To(ContainSubstring(field+": Too many"), "the API server enforces the cap on %s", field)
	}
	g.Eventually(func() error { return write(true) }).Should(Succeed())

	st := getMesh().Status
	g.Expect(st.Ignored).To(HaveLen(maxIgnored))
	g.Expect(st.IgnoredOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Dataplane.Conflicts).To(HaveLen(maxConflicts))
	g.Expect(st.Dataplane.ConflictsOmitted).To(BeEquivalentTo(1))
	g.Expect(st.History).To(HaveLen(maxHistory))
	g.Expect(st.HistoryOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Rollout.WaveNamespaces).To(HaveLen(maxWaveMembers))
	g.Expect(st.Rollout.WaveNamespacesOmitted).To(BeEquivalentTo(1))
	g.Expect(st.Rollout.WaveNodes).To(HaveLen(maxWaveMembers))
	g.Expect(st.Rollout.WaveNodesOmitted).To(BeEquivalentTo(1))
}

// TestWaveOverTheCapMovesInFull: a namespace wave of 1,099 namespaces
// (1,100 selected, one of them the canary), more than
// status.rollout.waveNamespaces holds, is recorded truncated with a count
// and still moves in full: the rollout does not freeze on a refused status
// patch, and every namespace ends on the new revision.
func TestWaveOverTheCapMovesInFull(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	const total = 1100
	all := names("bw", total)
	sel := map[string]string{"bw-mesh": "on"}
	createAll := func(list []string) {
		var wg sync.WaitGroup
		errs := make(chan error, len(list))
		work := make(chan string)
		for range 4 {
			wg.Go(func() {
				for ns := range work {
					errs <- k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: sel}}, client.FieldOwner("platform-team"))
				}
			})
		}
		for _, ns := range list {
			work <- ns
		}
		close(work)
		wg.Wait()
		close(errs)
		for err := range errs {
			g.Expect(err).NotTo(HaveOccurred())
		}
	}
	createAll(all)
	t.Cleanup(func() {
		for _, ns := range all {
			_ = k8s.Delete(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
		}
	})
	revisions := func() map[string]int {
		var list corev1.NamespaceList
		g.Expect(k8s.List(ctx, &list, client.MatchingLabels(sel))).To(Succeed())
		out := map[string]int{}
		for _, ns := range list.Items {
			out[ns.Labels[meshv1.LabelRevision]]++
		}
		return out
	}

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.27",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: sel}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{all[0]}, Waves: []string{"100%"}, Bake: &metav1.Duration{},
			}, RetireAfter: &metav1.Duration{}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).WithTimeout(3 * slow).ShouldNot(BeNil())
	g.Expect(revisions()).To(Equal(map[string]int{"1-27-3": total}))
	before := len(getMesh().Status.History)

	rec := recordMesh(t)
	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28" })
	g.Eventually(func() []string { return outcomes(getMesh().Status.History[before:]) }).WithTimeout(3 * slow).
		Should(Equal([]string{"1.28.2 Succeeded"}))
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(revisions()).To(Equal(map[string]int{"1-28-2": total}), "every namespace moved, the 75 left out of the status too")

	var big *meshv1.RolloutStatus
	for _, s := range rec.stop() {
		if ro := s.Status.Rollout; ro != nil && ro.Step == meshv1.RolloutStepNamespaces && ro.Wave == 2 {
			big = ro
			break
		}
	}
	g.Expect(big).NotTo(BeNil(), "wave 2 was recorded in status.rollout")
	g.Expect(big.WaveNamespaces).To(HaveLen(maxWaveMembers))
	g.Expect(all[1:]).To(ContainElements(big.WaveNamespaces))
	g.Expect(big.WaveNamespacesOmitted).To(BeEquivalentTo(total - 1 - maxWaveMembers))
	g.Expect(big.Message).To(ContainSubstring("and 1089 more"))
}
