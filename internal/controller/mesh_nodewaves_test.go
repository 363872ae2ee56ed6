package controller

import (
	"testing"

	. "github.com/onsi/gomega"
)

// TestReplacePods: which pods of a node component's DaemonSet a node wave
// deletes, and when the wave has moved.
func TestReplacePods(t *testing.T) {
	old := func(node string) podState {
		return podState{name: "zt-" + node, node: node, ready: true}
	}
	cur := func(node string) podState {
		return podState{name: "zt-" + node + "-new", node: node, current: true, ready: true}
	}
	set := nodeSet
	for _, tc := range []struct {
		name    string
		pods    []podState
		moved   map[string]bool
		batch   int
		desired int
		delete  []string
		done    bool
		waiting []string
	}{
		{name: "the moved nodes' old pods go, in node order, nothing else",
			pods:  []podState{old("c"), old("a"), old("b"), old("d")},
			moved: set("a", "c"), batch: 2, desired: 4,
			delete: []string{"zt-a", "zt-c"}, waiting: []string{"a: still on the old template", "c: still on the old template"}},
		{name: "at most batch pods unavailable at once",
			pods:  []podState{old("a"), old("b"), old("c")},
			moved: set("a", "b", "c"), batch: 1, desired: 3,
			delete: []string{"zt-a"}, waiting: []string{"a: still on the old template", "b: still on the old template", "c: still on the old template"}},
		{name: "a pod being replaced uses up the budget",
			pods:  []podState{{name: "zt-a", node: "a", terminating: true, ready: true}, old("b")},
			moved: set("a", "b"), batch: 1, desired: 2,
			waiting: []string{"a: replacing", "b: still on the old template"}},
		{name: "an unready pod elsewhere uses up the budget too",
			pods:  []podState{old("a"), {name: "zt-x", node: "x", current: false}},
			moved: set("a"), batch: 1, desired: 2,
			waiting: []string{"a: still on the old template"}},
		{name: "a replacement that is not ready yet holds the wave",
			pods:  []podState{{name: "zt-a-new", node: "a", current: true}, old("b")},
			moved: set("a"), batch: 1, desired: 2,
			waiting: []string{"a: not ready"}},
		{name: "a deleted pod whose replacement does not exist yet holds the wave",
			pods:  []podState{old("b")},
			moved: set("a"), batch: 1, desired: 2,
			waiting: []string{"1 of 2 pods"}},
		{name: "moved: every pod on a moved node is new and ready",
			pods:  []podState{cur("a"), old("b"), old("c")},
			moved: set("a"), batch: 1, desired: 3, done: true},
		{name: "a moved node without a pod of this DaemonSet is fine (istio-cni on an eBPF node)",
			pods:  []podState{old("b")},
			moved: set("a"), batch: 1, desired: 1, done: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			got := replacePods(tc.pods, tc.moved, tc.batch, tc.desired)
			g.Expect(got.delete).To(Equal(tc.delete))
			g.Expect(got.done).To(Equal(tc.done))
			g.Expect(got.waiting).To(Equal(tc.waiting))
		})
	}
}

// nodeSet is the set of the named nodes.
func nodeSet(nodes ...string) map[string]bool {
	m := map[string]bool{}
	for _, n := range nodes {
		m[n] = true
	}
	return m
}
