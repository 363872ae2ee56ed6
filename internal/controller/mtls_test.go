package controller

import (
	"context"
	"fmt"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestStrictMTLS drives spec.security.mtls: Strict on the real API server
// through what a platform team sees: STRICT once the fresh install is
// Ready; users' opt-outs listed and left alone; drift repaired; a rollout
// removes STRICT before its first namespace moves and writes it again only
// after the last wave; a rollback (spec.version set back, which moves the
// namespaces back at once) keeps it away until every namespace is back; a
// foreign mesh-wide PeerAuthentication is left alone and reported;
// Permissive and the Mesh's deletion remove it. Sidecar mode: no node
// waves, so the namespace waves start as soon as the new istiod serves.
// test/istiod has a real istiod accept the object.
func TestStrictMTLS(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(slow)
	dumpMeshOnFailure(t)
	// Without istiod's config validator (no istiod runs here) the API
	// server's own schema is what admits the PeerAuthentication; test/istiod
	// has a real istiod validate meshkeeper's object.
	withoutIstiodWebhooks(t, g)

	namespaces := []string{"mt-canary", "mt-a", "mt-b"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"mt-mesh": "on"})
	}
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.27",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Security:   meshv1.SecuritySpec{MTLS: meshv1.MTLSStrict},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mt-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"mt-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{Duration: 2 * time.Second},
			}, RetireAfter: &metav1.Duration{Duration: time.Second}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })

	t.Run("a fresh install gets the mesh-wide STRICT policy once it is Ready", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(meshReady).ShouldNot(BeNil())
		pa := meshkeepersPA(g)
		g.Expect(pa).NotTo(BeNil())
		g.Expect(pa.GetLabels()).To(And(HaveKeyWithValue(meshv1.LabelComponent, "mtls"), HaveKeyWithValue("app.kubernetes.io/managed-by", "meshkeeper")))
		g.Expect(paMode(pa)).To(Equal("STRICT"))
		g.Expect(pa.Object["spec"]).NotTo(HaveKey("selector"), "mesh-wide: no workload selector")
		g.Eventually(func() *meshv1.SecurityStatus { return getMesh().Status.Security }).Should(HaveValue(And(
			HaveField("MTLS", meshv1.MTLSStrict), HaveField("PeerAuthentication", "istio-system/meshkeeper-mesh-mtls"), HaveField("Message", ""))))
		g.Expect(eventReasons(g)).To(ContainElement("MTLSStrict"))
	})

	// Users' opt-outs, which meshkeeper never touches.
	legacy := newPA("mt-a", "legacy", map[string]any{"mtls": map[string]any{"mode": "PERMISSIVE"}})
	db := newPA("mt-b", "db", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "db"}},
		"mtls":     map[string]any{"mode": "DISABLE"},
	})
	for _, pa := range []*unstructured.Unstructured{legacy, db} {
		g.Expect(k8s.Create(ctx, pa, client.FieldOwner("platform-team"))).To(Succeed())
		t.Cleanup(func() { _ = client.IgnoreNotFound(k8s.Delete(context.Background(), pa)) })
	}

	t.Run("users' opt-outs are listed in status and left alone", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(func() []string { return getMesh().Status.Security.OptOuts }).WithTimeout(30 * time.Second).Should(ConsistOf(
			"mt-a/legacy: PERMISSIVE", "mt-b/db: DISABLE (workload selector)"))
	})

	t.Run("drift on meshkeeper's policy is repaired", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(func() error {
			pa := meshkeepersPA(g)
			g.Expect(unstructured.SetNestedField(pa.Object, "PERMISSIVE", "spec", "mtls", "mode")).To(Succeed())
			return k8s.Update(ctx, pa, client.FieldOwner("someone"))
		}).Should(Succeed())
		g.Eventually(func() string { return paMode(meshkeepersPA(g)) }).WithTimeout(30 * time.Second).Should(Equal("STRICT"))
	})

	t.Run("a rollout removes STRICT before its first namespace moves, and writes it again after the last wave", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28" })
		var mixed, polls int
		var violations []string
		g.Eventually(func(g Gomega) {
			polls++
			// Namespaces first, then the policy: a policy seen after a
			// namespace has moved was there while it moved.
			revs := namespaceRevisions(namespaces)
			pa := meshkeepersPA(g)
			if revs["1-28-2"] > 0 && revs["1-27-3"] > 0 {
				mixed++
				if pa != nil {
					violations = append(violations, fmt.Sprintf("STRICT in place with namespaces on %v", revs))
				}
			}
			done := lastHistory().Version == "1.28.2" && lastHistory().Outcome == meshv1.OutcomeSucceeded
			g.Expect(done).To(BeTrue(), "1.28.2 rolled out")
			g.Expect(pa).NotTo(BeNil(), "written again once the rollout has ended")
		}).WithTimeout(3 * time.Minute).WithPolling(50 * time.Millisecond).Should(Succeed())
		g.Expect(violations).To(BeEmpty(), "namespaces moved with the mesh-wide STRICT policy in place")
		g.Expect(mixed).To(BeNumerically(">", 0), "polled while the waves ran (%d polls)", polls)
		t.Logf("%d polls, %d of them with the namespaces on two revisions, none with STRICT in place after a namespace moved", polls, mixed)
		g.Expect(eventReasons(g)).To(ContainElement("MTLSRelaxed"))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), ns)
		}
		g.Expect(paMode(meshkeepersPA(g))).To(Equal("STRICT"))
	})

	t.Run("a rollback keeps STRICT away until every namespace is back", func(t *testing.T) {
		g := NewWithT(t)
		// A long bake keeps the canary wave in flight until the test turns
		// the rollout around by setting spec.version back.
		updateMesh(g, func(m *meshv1.Mesh) {
			m.Spec.Version = "1.27"
			m.Spec.Rollout.Namespaces.Bake = &metav1.Duration{Duration: time.Hour}
		})
		// 1.27 is one minor back from 1.28.2: a canary rollout too.
		var violations []string
		g.Eventually(func(g Gomega) {
			revs := namespaceRevisions(namespaces)
			if pa := meshkeepersPA(g); revs["1-27-3"] > 0 && pa != nil {
				violations = append(violations, fmt.Sprintf("STRICT in place with namespaces on %v", revs))
			}
			g.Expect(revs["1-27-3"]).To(Equal(1), "the canary has moved")
		}).WithPolling(50 * time.Millisecond).Should(Succeed())
		g.Consistently(func(g Gomega) {
			revs := namespaceRevisions(namespaces)
			if pa := meshkeepersPA(g); revs["1-27-3"] > 0 && pa != nil {
				violations = append(violations, fmt.Sprintf("STRICT in place with namespaces on %v", revs))
			}
		}).WithTimeout(2 * time.Second).WithPolling(50 * time.Millisecond).Should(Succeed())
		g.Expect(getMesh().Status.Security).To(HaveValue(And(HaveField("MTLS", meshv1.MTLSPermissive),
			HaveField("Message", ContainSubstring("STRICT is held back while the rollout to 1.27.3 runs")))))

		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28.2" })
		g.Eventually(func(g Gomega) {
			revs := namespaceRevisions(namespaces)
			pa := meshkeepersPA(g)
			if revs["1-27-3"] > 0 && pa != nil {
				violations = append(violations, fmt.Sprintf("STRICT in place while moving back, namespaces on %v", revs))
			}
			g.Expect(lastHistory()).To(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeRolledBack)))
			g.Expect(pa).NotTo(BeNil(), "written again once everything is back")
		}).WithTimeout(2 * time.Minute).WithPolling(50 * time.Millisecond).Should(Succeed())
		g.Expect(violations).To(BeEmpty())
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), ns)
		}
		// A spec change ends the rolled-back state (Degraded, Stalled).
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Rollout.Namespaces.Bake = &metav1.Duration{Duration: 2 * time.Second} })
		g.Eventually(meshReady).ShouldNot(BeNil())
		g.Expect(paMode(meshkeepersPA(g))).To(Equal("STRICT"))
	})

	t.Run("a foreign mesh-wide policy is left alone and reported; the Mesh is Degraded", func(t *testing.T) {
		g := NewWithT(t)
		foreign := newPA(componentsNamespace, "default", map[string]any{"mtls": map[string]any{"mode": "PERMISSIVE"}})
		g.Expect(k8s.Create(ctx, foreign, client.FieldOwner("platform-team"))).To(Succeed())
		t.Cleanup(func() { _ = client.IgnoreNotFound(k8s.Delete(context.Background(), foreign)) })
		g.Eventually(func() *metav1.Condition {
			return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionDegraded)
		}).WithTimeout(30 * time.Second).Should(And(Not(BeNil()), HaveField("Reason", meshv1.ReasonMTLSConflict),
			HaveField("Message", ContainSubstring("istio-system/default: mesh-wide PERMISSIVE, not written by meshkeeper"))))
		g.Expect(getMesh().Status.Security.Conflicts).To(ConsistOf(ContainSubstring("istio-system/default")))
		got := getPA(g, componentsNamespace, "default")
		g.Expect(got.GetResourceVersion()).To(Equal(foreign.GetResourceVersion()), "meshkeeper never writes a PeerAuthentication it did not create")
		g.Expect(meshkeepersPA(g)).NotTo(BeNil(), "its own, the older one, is kept")
		g.Expect(eventReasons(g)).To(ContainElement(meshv1.ReasonMTLSConflict))

		g.Expect(k8s.Delete(ctx, foreign)).To(Succeed())
		g.Eventually(func() *metav1.Condition {
			return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionDegraded)
		}).WithTimeout(30 * time.Second).Should(BeNil())
	})

	t.Run("Permissive removes it; the opt-outs stay", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Security.MTLS = meshv1.MTLSPermissive })
		g.Eventually(func() *unstructured.Unstructured { return meshkeepersPA(g) }).Should(BeNil())
		g.Eventually(func() *meshv1.SecurityStatus { return getMesh().Status.Security }).Should(HaveValue(Equal(meshv1.SecurityStatus{MTLS: meshv1.MTLSPermissive})))
		g.Expect(getPA(g, "mt-a", "legacy").GetResourceVersion()).To(Equal(legacy.GetResourceVersion()))
		g.Expect(getPA(g, "mt-b", "db").GetResourceVersion()).To(Equal(db.GetResourceVersion()))
	})

	t.Run("deleting the Mesh removes it; the opt-outs stay", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Security.MTLS = meshv1.MTLSStrict })
		g.Eventually(func() *unstructured.Unstructured { return meshkeepersPA(g) }).ShouldNot(BeNil())
		deleteMeshAndWait(t)
		g.Expect(meshkeepersPA(g)).To(BeNil())
		g.Expect(getPA(g, "mt-a", "legacy").GetResourceVersion()).To(Equal(legacy.GetResourceVersion()))
	})
}

func newPA(ns, name string, spec map[string]any) *unstructured.Unstructured {
	pa := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
	pa.SetGroupVersionKind(peerAuthenticationGVK)
	pa.SetNamespace(ns)
	pa.SetName(name)
	return pa
}

// meshkeepersPA is meshkeeper's mesh-wide PeerAuthentication, nil when
// there is none.
func meshkeepersPA(g Gomega) *unstructured.Unstructured {
	pa := newPA(componentsNamespace, mtlsPeerAuthenticationName, nil)
	err := k8s.Get(context.Background(), client.ObjectKeyFromObject(pa), pa)
	if apierrors.IsNotFound(err) {
		return nil
	}
	g.Expect(err).NotTo(HaveOccurred())
	return pa
}

func getPA(g Gomega, ns, name string) *unstructured.Unstructured {
	pa := newPA(ns, name, nil)
	g.Expect(k8s.Get(context.Background(), client.ObjectKeyFromObject(pa), pa)).To(Succeed(), "PeerAuthentication %s/%s", ns, name)
	return pa
}

func paMode(pa *unstructured.Unstructured) string {
	if pa == nil {
		return "<none>"
	}
	mode, _, _ := unstructured.NestedString(pa.Object, "spec", "mtls", "mode")
	return mode
}

// namespaceRevisions counts the namespaces by their istio.io/rev.
func namespaceRevisions(namespaces []string) map[string]int {
	revs := map[string]int{}
	for _, ns := range namespaces {
		revs[fmt.Sprint(labelsOf(ns)[meshv1.LabelRevision])]++
	}
	return revs
}
