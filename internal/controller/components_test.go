package controller

import (
	"context"
	"maps"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestComponentsLifecycle walks one Mesh through what a platform team does
// over its life: install, upgrade, a typo in the version, mode switches,
// someone editing what meshkeeper manages, and deletion.
func TestComponentsLifecycle(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(slow)
	g.SetDefaultEventuallyPollingInterval(200 * time.Millisecond)

	// Its own selector label keeps this Mesh away from other tests' namespaces.
	mkNS(g, "cl-app", map[string]string{"cl-mesh": "on"})
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"cl-mesh": "on"}}},
			Identity:   meshv1.IdentitySpec{Spire: &meshv1.SpireSpec{Enabled: true, TrustDomain: "example.org"}},
			// No Prometheus and no bake: upgrades move their waves at once.
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}}, RetireAfter: &metav1.Duration{}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })

	t.Run("fresh install puts every component on the right nodes", func(t *testing.T) {
		g := NewWithT(t)
		start := time.Now()
		g.Eventually(meshReady).WithTimeout(slow).ShouldNot(BeNil())
		t.Logf("fresh install of 1.26.4 (7 components) Ready in %s", time.Since(start).Round(time.Millisecond))
		m := readyMesh()
		g.Expect(m.Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.26.4", Target: "1.26.4"}))
		g.Expect(componentNames(m)).To(ConsistOf("crds", "spire-server", "spire-agent", "istiod", "ztunnel", "node-agent", "istio-cni"))
		for _, c := range m.Status.Components {
			g.Expect(c.Ready).To(BeTrue(), "%s: %s", c.Name, c.Message)
			g.Expect(c.Version).To(Equal("1.26.4"))
		}
		g.Expect(podNodes(g, "ztunnel")).To(ConsistOf("node-new", "node-mid", "node-old"))
		g.Expect(podNodes(g, "spire-agent")).To(ConsistOf("node-new", "node-mid", "node-old"))
		g.Expect(podNodes(g, "node-agent")).To(ConsistOf("node-new", "node-mid"), "eBPF only where the kernel allows")
		g.Expect(podNodes(g, "istio-cni")).To(ConsistOf("node-old"), "iptables fallback on the 5.4 node")
		g.Expect(podNodes(g, "istiod")).NotTo(BeEmpty())
		g.Expect(m.Status.Nodes).To(Equal(meshv1.NodeCounts{Total: 3, Eligible: 2, Fallback: 1}))
		pf := meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionPreflightPassed)
		g.Expect(pf).NotTo(BeNil())
		g.Expect(pf.Status).To(Equal(metav1.ConditionFalse))
		g.Expect(pf.Message).To(ContainSubstring("node-old: kernel 5.4.0 < 5.10.0 required (iptables)"))
		g.Expect(labelsOf("cl-app")).To(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
		g.Expect(nodeLabel(g, "node-old")).To(Equal("iptables"))
		g.Expect(nodeLabel(g, "node-new")).To(Equal("ebpf"))
	})

	t.Run("a minor upgrade moves every component and retires the old control plane", func(t *testing.T) {
		g := NewWithT(t)
		before := revisionOf(g, "ztunnel")
		start := time.Now()
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
		g.Eventually(func() string {
			if m := readyMesh(); m != nil {
				return m.Status.Version.Installed
			}
			return ""
		}).Should(Equal("1.27.3"))
		t.Logf("in-place upgrade 1.26.4 → 1.27.3 Ready in %s", time.Since(start).Round(time.Millisecond))
		g.Expect(revisionOf(g, "ztunnel")).To(BeNumerically(">", before), "Helm history shows the upgrade")
		history, err := helmClient.History(context.Background(), "ztunnel")
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(len(history)).To(BeNumerically(">=", 2))
		g.Expect(releaseNames(g)).To(ContainElement("istiod-1-27-3"))
		g.Expect(releaseNames(g)).NotTo(ContainElement("istiod-1-26-4"))
		g.Expect(k8s.Get(context.Background(), client.ObjectKey{Namespace: componentsNamespace, Name: "istiod-1-26-4"}, &appsv1.Deployment{})).
			To(Satisfy(apierrors.IsNotFound))
	})

	t.Run("an unknown version stalls with the known versions and changes nothing", func(t *testing.T) {
		g := NewWithT(t)
		revisions := releaseRevisions(g)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.29" })
		g.Eventually(func() *metav1.Condition {
			return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionStalled)
		}).Should(And(Not(BeNil()), HaveField("Message", And(ContainSubstring("1.29"), ContainSubstring("1.26.4, 1.27.2, 1.27.3, 1.28.2")))))
		g.Consistently(releaseRevisions).WithTimeout(2 * time.Second).Should(Equal(revisions))
		g.Expect(getMesh().Status.Version.Installed).To(Equal("1.27.3"))
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27.3" })
		g.Eventually(readyMesh).ShouldNot(BeNil())
	})

	t.Run("Ambient to Sidecar and back: components and labels follow", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeSidecar })
		g.Eventually(func() []string { return componentNames(readyMesh()) }).
			Should(ConsistOf("crds", "spire-server", "spire-agent", "istiod"))
		g.Eventually(releaseNames).ShouldNot(ContainElements("ztunnel", "node-agent", "istio-cni"))
		g.Expect(eventReasons(g)).To(ContainElement("DatapathRemoved"),
			"the node agent's cleanup phase ran on every node before its release went")
		g.Expect(labelsOf("cl-app")).To(And(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"), Not(HaveKey(meshv1.LabelDataplaneMode))))
		g.Expect(nodeLabel(g, "node-new")).To(BeEmpty(), "no redirection label in Sidecar mode")
		g.Expect(podNodes(g, "ztunnel")).To(BeEmpty())

		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Dataplane.Mode = meshv1.ModeAmbient })
		g.Eventually(func() []string { return componentNames(readyMesh()) }).Should(ContainElements("ztunnel", "node-agent", "istio-cni"))
		g.Expect(labelsOf("cl-app")).To(And(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"), HaveKeyWithValue(meshv1.LabelRevision, "1-27-3")))
		g.Expect(podNodes(g, "ztunnel")).To(HaveLen(3))
	})

	t.Run("drift is repaired, ignored objects are left alone and reported", func(t *testing.T) {
		g := NewWithT(t)
		ds := &appsv1.DaemonSet{}
		g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: componentsNamespace, Name: "ztunnel"}, ds)).To(Succeed())
		oldUID := ds.UID
		g.Expect(k8s.Delete(ctx, ds)).To(Succeed())
		g.Eventually(func() bool {
			fresh := &appsv1.DaemonSet{}
			return k8s.Get(ctx, client.ObjectKeyFromObject(ds), fresh) == nil && fresh.UID != oldUID
		}).WithTimeout(30*time.Second).Should(BeTrue(), "deleted DaemonSet restored")

		cms := managedConfigMaps(g)
		g.Expect(len(cms)).To(BeNumerically(">=", 2), "need two managed ConfigMaps to edit")
		edited, ignored := cms[0], cms[1]
		want := edited.Data
		edited.Data = map[string]string{"tampered": "yes"}
		g.Expect(k8s.Update(ctx, &edited)).To(Succeed())
		// Every key the chart renders comes back with its value; a key
		// someone added is theirs (server-side apply semantics), not drift.
		liveData := func() map[string]string {
			cm := &corev1.ConfigMap{}
			_ = k8s.Get(ctx, client.ObjectKeyFromObject(&edited), cm)
			return cm.Data
		}
		g.Eventually(func() map[string]string {
			d := liveData()
			maps.DeleteFunc(d, func(k, _ string) bool { _, ok := want[k]; return !ok })
			return d
		}).WithTimeout(30*time.Second).Should(Equal(want), "edited ConfigMap restored")
		g.Expect(liveData()).To(HaveKeyWithValue("tampered", "yes"))

		if ignored.Annotations == nil {
			ignored.Annotations = map[string]string{}
		}
		ignored.Annotations[meshv1.AnnotationIgnore] = "true"
		ignored.Data = map[string]string{"hand-tuned": "yes"}
		g.Expect(k8s.Update(ctx, &ignored)).To(Succeed())
		ref := "ConfigMap/" + componentsNamespace + "/" + ignored.Name
		g.Eventually(func() []string { return getMesh().Status.Ignored }).WithTimeout(30 * time.Second).Should(ContainElement(ref))
		g.Consistently(func() map[string]string {
			cm := &corev1.ConfigMap{}
			_ = k8s.Get(ctx, client.ObjectKeyFromObject(&ignored), cm)
			return cm.Data
		}).WithTimeout(3 * time.Second).Should(Equal(map[string]string{"hand-tuned": "yes"}))
	})

	t.Run("deleting the Mesh leaves no release, managed object or label", func(t *testing.T) {
		g := NewWithT(t)
		start := time.Now()
		deleteMeshAndWait(t)
		t.Logf("uninstall finished in %s", time.Since(start).Round(time.Millisecond))
		g.Expect(releaseNames(g)).To(BeEmpty())
		for _, list := range []client.ObjectList{&appsv1.DeploymentList{}, &appsv1.DaemonSetList{}, &appsv1.StatefulSetList{},
			&corev1.ConfigMapList{}, &corev1.ServiceList{}, &corev1.ServiceAccountList{}} {
			g.Expect(k8s.List(ctx, list, client.HasLabels{meshv1.LabelComponent})).To(Succeed())
			g.Expect(meta.LenList(list)).To(BeZero(), "%T", list)
		}
		g.Expect(nodeLabel(g, "node-old")).To(BeEmpty())
		g.Expect(labelsOf("cl-app")).NotTo(HaveKey(meshv1.LabelDataplaneMode))
	})
}

func deleteMeshAndWait(t *testing.T) {
	g := NewWithT(t)
	m := getMesh()
	if m == nil {
		return
	}
	g.Expect(client.IgnoreNotFound(k8s.Delete(context.Background(), m))).To(Succeed())
	g.Eventually(getMesh).WithTimeout(slow).Should(BeNil())
}

func componentNames(m *meshv1.Mesh) []string {
	if m == nil {
		return nil
	}
	var names []string
	for _, c := range m.Status.Components {
		names = append(names, c.Name)
	}
	return names
}

// podNodes returns the nodes of the Running pods of a component.
func podNodes(g Gomega, component string) []string {
	var pods corev1.PodList
	g.Expect(k8s.List(context.Background(), &pods, client.InNamespace(componentsNamespace),
		client.MatchingLabels{meshv1.LabelComponent: component})).To(Succeed())
	var nodes []string
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
			nodes = append(nodes, p.Spec.NodeName)
		}
	}
	return nodes
}

func nodeLabel(g Gomega, name string) string {
	n := &corev1.Node{}
	g.Expect(k8s.Get(context.Background(), client.ObjectKey{Name: name}, n)).To(Succeed())
	return n.Labels[meshv1.LabelRedirection]
}

func releaseNames(g Gomega) []string {
	rels, err := helmClient.List(context.Background())
	g.Expect(err).NotTo(HaveOccurred())
	var names []string
	for _, r := range rels {
		names = append(names, r.Name)
	}
	slices.Sort(names)
	return names
}

func releaseRevisions(g Gomega) map[string]int {
	rels, err := helmClient.List(context.Background())
	g.Expect(err).NotTo(HaveOccurred())
	out := map[string]int{}
	for _, r := range rels {
		out[r.Name] = r.Revision
	}
	return out
}

func revisionOf(g Gomega, release string) int {
	st, err := helmClient.Get(context.Background(), release)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(st).NotTo(BeNil(), release)
	return st.Revision
}

func managedConfigMaps(g Gomega) []corev1.ConfigMap {
	var cms corev1.ConfigMapList
	g.Expect(k8s.List(context.Background(), &cms, client.InNamespace(componentsNamespace),
		client.HasLabels{meshv1.LabelComponent})).To(Succeed())
	slices.SortFunc(cms.Items, func(a, b corev1.ConfigMap) int {
		if a.Name < b.Name {
			return -1
		}
		return 1
	})
	return cms.Items
}

// eventReasons lists the reasons of the events recorded for mesh/default.
func eventReasons(g Gomega) []string {
	var events eventsv1.EventList
	g.Expect(k8s.List(context.Background(), &events)).To(Succeed())
	var reasons []string
	for _, e := range events.Items {
		if e.Regarding.Kind == "Mesh" && e.Regarding.Name == "default" {
			reasons = append(reasons, e.Reason)
		}
	}
	return reasons
}
