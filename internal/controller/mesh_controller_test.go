package controller

import (
	"context"
	"fmt"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestNamespaceLabelling(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(60 * time.Second)
	g.SetDefaultEventuallyPollingInterval(100 * time.Millisecond)

	// a and b are selected; b carries a user label meshkeeper must keep; c is
	// not selected; d opted out with Istio's own label set by its owner; e's
	// owner already set the same label meshkeeper wants.
	mkNS(g, "nl-a", map[string]string{"mesh": "on"})
	mkNS(g, "nl-b", map[string]string{"mesh": "on", "team": "payments"})
	mkNS(g, "nl-c", nil)
	mkNS(g, "nl-d", map[string]string{"mesh": "on", meshv1.LabelDataplaneMode: "none"})
	mkNS(g, "nl-e", map[string]string{"mesh": "on", meshv1.LabelDataplaneMode: "ambient"})

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28.2",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mesh": "on"}}},
			// The switch to Sidecar below moves in waves; no bake keeps it short.
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())

	t.Run("selected namespaces are enrolled, others untouched", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(60 * time.Second)
		g.Eventually(labelsOf).WithArguments("nl-a").Should(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
		g.Eventually(labelsOf).WithArguments("nl-b").Should(And(
			HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"), HaveKeyWithValue("team", "payments")))
		g.Eventually(readyMesh).Should(HaveField("Status.Dataplane.Namespaces", BeEquivalentTo(3)))
		g.Expect(labelsOf("nl-c")).NotTo(HaveKey(meshv1.LabelDataplaneMode))
		g.Expect(labelsOf("nl-d")).To(HaveKeyWithValue(meshv1.LabelDataplaneMode, "none"), "an opt-out set by its owner is never overwritten")

		m := readyMesh()
		g.Expect(m.Status.Dataplane.Mode).To(Equal(meshv1.ModeAmbient))
		g.Expect(m.Status.Dataplane.Conflicts).To(ConsistOf(ContainSubstring("nl-d")))
		g.Expect(meta.IsStatusConditionTrue(m.Status.Conditions, meshv1.ConditionDegraded)).To(BeTrue())
		g.Expect(m.Status.ObservedGeneration).To(Equal(m.Generation))
		g.Expect(m.Finalizers).To(ContainElement(meshv1.Finalizer))
	})

	t.Run("a namespace that leaves the selection loses only meshkeeper's label", func(t *testing.T) {
		g := NewWithT(t)
		setLabel(g, "nl-b", "mesh", "off")
		g.Eventually(labelsOf).WithArguments("nl-b").ShouldNot(HaveKey(meshv1.LabelDataplaneMode))
		g.Expect(labelsOf("nl-b")).To(HaveKeyWithValue("team", "payments"))
		g.Eventually(readyMesh).Should(HaveField("Status.Dataplane.Namespaces", BeEquivalentTo(2)))

		setLabel(g, "nl-e", "mesh", "off")
		g.Consistently(labelsOf).WithArguments("nl-e").WithTimeout(time.Second).
			Should(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"), "a label its owner set too stays")

		setLabel(g, "nl-b", "mesh", "on")
		g.Eventually(labelsOf).WithArguments("nl-b").Should(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
	})

	t.Run("switching to Sidecar swaps the labels", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeSidecar })
		for _, ns := range []string{"nl-a", "nl-b"} {
			g.Eventually(labelsOf).WithArguments(ns).Should(And(
				HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), Not(HaveKey(meshv1.LabelDataplaneMode))))
		}
		g.Eventually(readyMesh).Should(HaveField("Status.Dataplane.Mode", meshv1.ModeSidecar))
	})

	t.Run("a bad spec that slipped past admission stalls without a hot loop", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) {
			m.Spec.Analysis = &meshv1.AnalysisSpec{
				Prometheus: &meshv1.PrometheusSpec{Address: "http://prom:9090"},
				SLOs:       []meshv1.SLO{{Name: "broken", Query: "sum(rate(x[1m]", Min: ptr("0.99")}},
			}
		})
		var stalled *meshv1.Mesh
		g.Eventually(func() *metav1.Condition {
			stalled = getMesh()
			return meta.FindStatusCondition(stalled.Status.Conditions, meshv1.ConditionStalled)
		}).Should(And(Not(BeNil()),
			HaveField("Reason", meshv1.ReasonInvalidSpec),
			HaveField("Message", ContainSubstring("spec.analysis.slos[0].query"))))
		g.Expect(meta.IsStatusConditionFalse(stalled.Status.Conditions, meshv1.ConditionReady)).To(BeTrue())
		g.Expect(stalled.Status.ObservedGeneration).To(Equal(stalled.Generation))
		rv := stalled.ResourceVersion
		g.Consistently(func() string { return getMesh().ResourceVersion }).WithTimeout(2*time.Second).Should(Equal(rv),
			"no further writes while the spec stays bad")
		// Labels already in place are kept while stalled.
		g.Expect(labelsOf("nl-a")).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"))

		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Analysis = nil })
		g.Eventually(readyMesh).ShouldNot(BeNil())
		g.Expect(meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionStalled)).To(BeNil())
	})

	t.Run("deleting the Mesh removes every label meshkeeper set", func(t *testing.T) {
		g := NewWithT(t)
		g.Expect(k8s.Delete(ctx, getMesh())).To(Succeed())
		g.Eventually(func() bool {
			return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKey{Name: "default"}, &meshv1.Mesh{}))
		}).Should(BeTrue())
		for _, ns := range []string{"nl-a", "nl-b"} {
			g.Expect(labelsOf(ns)).NotTo(HaveKey(meshv1.LabelRevision), ns)
			g.Expect(labelsOf(ns)).NotTo(HaveKey(meshv1.LabelDataplaneMode), ns)
		}
		g.Expect(labelsOf("nl-b")).To(HaveKeyWithValue("team", "payments"))
		g.Expect(labelsOf("nl-d")).To(HaveKeyWithValue(meshv1.LabelDataplaneMode, "none"))
		g.Expect(labelsOf("nl-e")).To(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
	})
}

func mkNS(g Gomega, name string, labels map[string]string) {
	g.Expect(k8s.Create(context.Background(), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, client.FieldOwner("platform-team"))).To(Succeed())
}

func setLabel(g Gomega, ns, k, v string) {
	g.Eventually(func() error {
		obj := &corev1.Namespace{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Name: ns}, obj); err != nil {
			return err
		}
		obj.Labels[k] = v
		return k8s.Update(context.Background(), obj, client.FieldOwner("platform-team"))
	}).Should(Succeed())
}

func labelsOf(ns string) map[string]string {
	obj := &corev1.Namespace{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: ns}, obj); err != nil {
		return nil
	}
	return obj.Labels
}

func getMesh() *meshv1.Mesh {
	m := &meshv1.Mesh{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: "default"}, m); err != nil {
		return nil
	}
	return m
}

// readyMesh returns the Mesh once it is Ready for its current generation.
func readyMesh() *meshv1.Mesh {
	m, _ := meshReady()
	return m
}

// meshReady is readyMesh with the reason it is not ready yet, so that a
// timed-out Eventually says what the Mesh was waiting for.
func meshReady() (*meshv1.Mesh, error) {
	m := getMesh()
	if m == nil {
		return nil, fmt.Errorf("mesh/default not found")
	}
	ready := meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionReady)
	switch {
	case ready == nil:
		return nil, fmt.Errorf("no Ready condition yet")
	case ready.Status != metav1.ConditionTrue:
		return nil, fmt.Errorf("Ready=%s %s: %s", ready.Status, ready.Reason, ready.Message)
	case m.Status.ObservedGeneration != m.Generation:
		return nil, fmt.Errorf("observedGeneration %d, generation %d", m.Status.ObservedGeneration, m.Generation)
	}
	return m, nil
}

func updateMesh(g Gomega, mutate func(*meshv1.Mesh)) {
	g.Eventually(func() error {
		m := getMesh()
		if m == nil {
			return fmt.Errorf("mesh not found")
		}
		mutate(m)
		return k8s.Update(context.Background(), m)
	}).Should(Succeed())
}
