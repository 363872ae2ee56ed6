package controller

import (
	"strings"
	"testing"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestSurgePods: how a ztunnel node wave moves make-before-break: a new pod
// beside the old one first, the old one only once the new one is ready, the
// surge pod only once the DaemonSet's own new pod is ready, at most batch
// nodes in flight.
func TestSurgePods(t *testing.T) {
	old := func(node string) podState { return podState{name: "zt-" + node, node: node, ready: true} }
	cur := func(node string) podState {
		return podState{name: "zt-" + node + "-new", node: node, current: true, ready: true}
	}
	surge := func(node string, ready bool) podState {
		return podState{name: "zt-surge-" + node, node: node, ready: ready}
	}
	set := nodeSet
	for _, tc := range []struct {
		name           string
		pods           []podState
		surges         []podState
		moved          map[string]bool
		batch, desired int
		create         []string
		delete         []string
		deleteSurges   []string
		done           bool
		waiting        []string
	}{
		{name: "a new pod starts beside each old one on the moved nodes, in node order, nothing is deleted yet",
			pods:  []podState{old("c"), old("a"), old("b")},
			moved: set("a", "c"), batch: 2, desired: 3,
			create:  []string{"a", "c"},
			waiting: []string{"a: still on the old template", "c: still on the old template"}},
		{name: "at most batch nodes in flight",
			pods:  []podState{old("a"), old("b"), old("c")},
			moved: set("a", "b", "c"), batch: 1, desired: 3,
			create:  []string{"a"},
			waiting: []string{"a: still on the old template", "b: still on the old template", "c: still on the old template"}},
		{name: "a surge pod that is not ready keeps the old pod and uses up the budget",
			pods: []podState{old("a"), old("b")}, surges: []podState{surge("a", false)},
			moved: set("a", "b"), batch: 1, desired: 2,
			waiting: []string{"a: starting the new pod beside the old one", "b: still on the old template"}},
		{name: "once the surge pod is ready the old pod goes",
			pods: []podState{old("a")}, surges: []podState{surge("a", true)},
			moved: set("a"), batch: 1, desired: 1,
			delete:  []string{"zt-a"},
			waiting: []string{"a: replacing"}},
		{name: "the old pod draining, its replacement not created yet: the surge pod stays",
			pods:   []podState{{name: "zt-a", node: "a", ready: true, terminating: true}, old("b")},
			surges: []podState{surge("a", true)}, moved: set("a", "b"), batch: 1, desired: 2,
			waiting: []string{"a: replacing", "b: still on the old template"}},
		{name: "the replacement not ready: the surge pod stays",
			pods:   []podState{{name: "zt-a-new", node: "a", current: true}},
			surges: []podState{surge("a", true)}, moved: set("a"), batch: 1, desired: 1,
			waiting: []string{"a: not ready"}},
		{name: "the replacement ready: the surge pod goes and the node has moved",
			pods:   []podState{cur("a"), old("b")},
			surges: []podState{surge("a", true)}, moved: set("a"), batch: 1, desired: 2,
			deleteSurges: []string{"zt-surge-a"}, done: true},
		{name: "a surge pod draining does not hold the wave nor use the budget",
			pods:   []podState{cur("a"), old("b")},
			surges: []podState{{name: "zt-surge-a", node: "a", ready: true, terminating: true}}, moved: set("a", "b"), batch: 1, desired: 2,
			create: []string{"b"}, waiting: []string{"b: still on the old template"}},
		{name: "an unready pod elsewhere uses up the budget",
			pods:  []podState{old("a"), {name: "zt-x", node: "x"}},
			moved: set("a"), batch: 1, desired: 2,
			waiting: []string{"a: still on the old template"}},
		{name: "a surge pod left on a node that did not move (a rollback) goes once its pod is ready",
			pods:   []podState{old("a"), old("b")},
			surges: []podState{surge("b", true)}, moved: set(), batch: 1, desired: 2,
			deleteSurges: []string{"zt-surge-b"}, done: true},
		{name: "a moved node without a pod of the DaemonSet is fine",
			pods:  []podState{old("b")},
			moved: set("a"), batch: 1, desired: 1, done: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			got := surgePods(tc.pods, tc.surges, tc.moved, tc.batch, tc.desired)
			g.Expect(got.create).To(Equal(tc.create), "surge pods to start")
			g.Expect(got.delete).To(Equal(tc.delete), "old pods to delete")
			g.Expect(got.deleteSurges).To(Equal(tc.deleteSurges), "surge pods to delete")
			g.Expect(got.done).To(Equal(tc.done))
			g.Expect(got.waiting).To(Equal(tc.waiting))
		})
	}
}

// TestSurgePod: the surge pod is the DaemonSet's template bound to its node,
// without the selector's labels (the DaemonSet never adopts it), owned but
// not controlled by the DaemonSet, with a name that fits.
func TestSurgePod(t *testing.T) {
	g := NewWithT(t)
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel", Namespace: "istio-system", UID: types.UID("ds-uid")},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "ztunnel"}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{
					Labels:      map[string]string{"app": "ztunnel", "meshkeeper.dev/component": "ztunnel", "meshkeeper.dev/revision": "1-28-2"},
					Annotations: map[string]string{"prometheus.io/scrape": "true"},
				},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "istio-proxy", Image: "ztunnel:1.28.2"}}},
			},
		},
	}
	p := surgePod(ds, "node-a")
	g.Expect(p.Name).To(Equal("ztunnel-surge-node-a"))
	g.Expect(p.Namespace).To(Equal("istio-system"))
	g.Expect(p.Spec.NodeName).To(Equal("node-a"))
	g.Expect(p.Spec.Containers).To(Equal(ds.Spec.Template.Spec.Containers))
	g.Expect(p.Labels).To(Equal(map[string]string{"meshkeeper.dev/component": "ztunnel", "meshkeeper.dev/revision": "1-28-2", labelSurgeOf: "ztunnel"}))
	g.Expect(p.Annotations).To(HaveKeyWithValue("prometheus.io/scrape", "true"))
	g.Expect(p.OwnerReferences).To(HaveLen(1))
	g.Expect(p.OwnerReferences[0].UID).To(Equal(ds.UID))
	g.Expect(*p.OwnerReferences[0].Controller).To(BeFalse(), "owned, not controlled: the DaemonSet controller leaves it alone")
	g.Expect(ds.Spec.Template.Spec.NodeName).To(BeEmpty(), "the DaemonSet's template is not changed")

	long := strings.Repeat("n", 250)
	name := surgePodName("ztunnel", long)
	g.Expect(len(name)).To(Equal(253))
	g.Expect(name).NotTo(Equal(surgePodName("ztunnel", long+"x")), "distinct nodes, distinct names")
}
