package plan

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func names(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%02d", prefix, i)
	}
	return out
}

func sizes(waves [][]string) []int {
	out := make([]int, len(waves))
	for i, w := range waves {
		out[i] = len(w)
	}
	return out
}

func TestNamespaceWavesCumulative(t *testing.T) {
	g := NewWithT(t)
	waves := NamespaceWaves(names("ns", 20), meshv1.NamespaceRolloutSpec{Waves: []string{"10%", "50%", "100%"}})
	g.Expect(sizes(waves)).To(Equal([]int{2, 8, 10}), "ceil(10%)=2, then up to 10, then all 20")
	g.Expect(waves[0]).To(Equal([]string{"ns-00", "ns-01"}))
	g.Expect(waves[1]).To(Equal(names("ns", 10)[2:]))
}

// TestNamespaceWavesFifty: canary namespaces first in their given order,
// then cumulative waves of the rest sorted by name, whatever the input order.
func TestNamespaceWavesFifty(t *testing.T) {
	g := NewWithT(t)
	all := names("ns", 50)
	spec := meshv1.NamespaceRolloutSpec{
		Canary: []string{"ns-42", "ns-07", "not-selected"},
		Waves:  []string{"10%", "50%", "100%"},
	}
	want := NamespaceWaves(all, spec)
	g.Expect(want[0]).To(Equal([]string{"ns-42", "ns-07"}), "canary order kept, unselected canary skipped")
	// 48 left: ceil(4.8)=5, ceil(24)=24, 48.
	g.Expect(sizes(want)).To(Equal([]int{2, 5, 19, 24}))
	var rest []string
	for _, w := range want[1:] {
		rest = append(rest, w...)
	}
	g.Expect(slices.IsSorted(rest)).To(BeTrue())
	g.Expect(rest).NotTo(ContainElements("ns-42", "ns-07"))
	g.Expect(rest).To(HaveLen(48))

	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		shuffled := slices.Clone(all)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		g.Expect(NamespaceWaves(shuffled, spec)).To(Equal(want), "stable whatever the input order")
	}
}

func TestNamespaceWavesEdges(t *testing.T) {
	cases := []struct {
		name     string
		selected []string
		spec     meshv1.NamespaceRolloutSpec
		want     [][]string
	}{
		{name: "nothing selected", selected: nil, spec: meshv1.NamespaceRolloutSpec{Canary: []string{"a"}}, want: nil},
		{name: "default is one wave", selected: []string{"c", "a", "b"}, want: [][]string{{"a", "b", "c"}}},
		{name: "one namespace, three waves: no empty waves", selected: []string{"a"},
			spec: meshv1.NamespaceRolloutSpec{Waves: []string{"10%", "50%", "100%"}}, want: [][]string{{"a"}}},
		{name: "waves that round to the same count merge", selected: []string{"a", "b", "c"},
			spec: meshv1.NamespaceRolloutSpec{Waves: []string{"10%", "20%", "100%"}}, want: [][]string{{"a"}, {"b", "c"}}},
		{name: "only canaries", selected: []string{"b", "a"},
			spec: meshv1.NamespaceRolloutSpec{Canary: []string{"b", "a"}, Waves: []string{"50%", "100%"}}, want: [][]string{{"b", "a"}}},
		{name: "duplicates count once", selected: []string{"a", "b", "a", "c"},
			spec: meshv1.NamespaceRolloutSpec{Canary: []string{"c", "c"}}, want: [][]string{{"c"}, {"a", "b"}}},
		{name: "waves not ending at 100% still move everything", selected: []string{"a", "b", "c", "d"},
			spec: meshv1.NamespaceRolloutSpec{Waves: []string{"25%", "50%"}}, want: [][]string{{"a"}, {"b"}, {"c", "d"}}},
		{name: "an unparsable wave is skipped", selected: []string{"a", "b", "c", "d"},
			spec: meshv1.NamespaceRolloutSpec{Waves: []string{"half", "50%", "100%"}}, want: [][]string{{"a", "b"}, {"c", "d"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			g.Expect(NamespaceWaves(tc.selected, tc.spec)).To(Equal(tc.want))
		})
	}
}

func nodes(n int, canary ...int) []NodeInfo {
	out := make([]NodeInfo, 0, n)
	for i := n - 1; i >= 0; i-- {
		node := NodeInfo{Name: fmt.Sprintf("node-%02d", i), Labels: map[string]string{"zone": "a"}}
		if slices.Contains(canary, i) {
			node.Labels["pool"] = "canary"
		}
		out = append(out, node)
	}
	return out
}

var canaryPool = &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}}

func TestNodeWaves(t *testing.T) {
	cases := []struct {
		name  string
		nodes []NodeInfo
		spec  meshv1.NodeRolloutSpec
		want  [][]string
	}{
		{name: "canary, then batches of a count", nodes: nodes(10, 4, 8),
			spec: meshv1.NodeRolloutSpec{Canary: canaryPool, MaxUnavailable: ptr.To(intstr.FromInt32(3))},
			want: [][]string{{"node-04", "node-08"}, {"node-00", "node-01", "node-02"}, {"node-03", "node-05", "node-06"}, {"node-07", "node-09"}}},
		{name: "percentage of all nodes, rounded up", nodes: nodes(10, 0),
			spec: meshv1.NodeRolloutSpec{Canary: canaryPool, MaxUnavailable: ptr.To(intstr.FromString("25%"))},
			want: [][]string{{"node-00"}, {"node-01", "node-02", "node-03"}, {"node-04", "node-05", "node-06"}, {"node-07", "node-08", "node-09"}}},
		{name: "a small percentage is at least one node", nodes: nodes(3),
			spec: meshv1.NodeRolloutSpec{MaxUnavailable: ptr.To(intstr.FromString("5%"))},
			want: [][]string{{"node-00"}, {"node-01"}, {"node-02"}}},
		{name: "default 10% of 20 nodes is 2", nodes: nodes(20),
			want: [][]string{{"node-00", "node-01"}, {"node-02", "node-03"}, {"node-04", "node-05"}, {"node-06", "node-07"}, {"node-08", "node-09"},
				{"node-10", "node-11"}, {"node-12", "node-13"}, {"node-14", "node-15"}, {"node-16", "node-17"}, {"node-18", "node-19"}}},
		{name: "a canary selector matching nothing adds no wave", nodes: nodes(4),
			spec: meshv1.NodeRolloutSpec{Canary: canaryPool, MaxUnavailable: ptr.To(intstr.FromString("50%"))},
			want: [][]string{{"node-00", "node-01"}, {"node-02", "node-03"}}},
		{name: "match expressions", nodes: nodes(4, 1, 2),
			spec: meshv1.NodeRolloutSpec{
				Canary: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
					{Key: "pool", Operator: metav1.LabelSelectorOpIn, Values: []string{"canary"}}}},
				MaxUnavailable: ptr.To(intstr.FromInt32(5))},
			want: [][]string{{"node-01", "node-02"}, {"node-00", "node-03"}}},
		{name: "all nodes canary", nodes: nodes(2, 0, 1), spec: meshv1.NodeRolloutSpec{Canary: canaryPool},
			want: [][]string{{"node-00", "node-01"}}},
		{name: "no nodes", nodes: nil, spec: meshv1.NodeRolloutSpec{Canary: canaryPool}, want: nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			waves, err := NodeWaves(tc.nodes, tc.spec)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(waves).To(Equal(tc.want))
		})
	}
}

func TestNodeWavesErrors(t *testing.T) {
	cases := []struct {
		name string
		spec meshv1.NodeRolloutSpec
		want string
	}{
		{name: "empty canary selector", spec: meshv1.NodeRolloutSpec{Canary: &metav1.LabelSelector{}},
			want: "spec.rollout.nodes.canary is an empty selector, which selects every node and leaves no canary"},
		{name: "bad operator", spec: meshv1.NodeRolloutSpec{Canary: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "pool", Operator: "Near"}}}},
			want: "spec.rollout.nodes.canary: "},
		{name: "zero count", spec: meshv1.NodeRolloutSpec{MaxUnavailable: ptr.To(intstr.FromInt32(0))},
			want: "spec.rollout.nodes.maxUnavailable 0: want a count of at least 1 or a percentage from 1% to 100%"},
		{name: "count as a string", spec: meshv1.NodeRolloutSpec{MaxUnavailable: ptr.To(intstr.FromString("2"))},
			want: `spec.rollout.nodes.maxUnavailable "2": want a count`},
		{name: "zero percent", spec: meshv1.NodeRolloutSpec{MaxUnavailable: ptr.To(intstr.FromString("0%"))},
			want: `spec.rollout.nodes.maxUnavailable "0%"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			_, err := NodeWaves(nodes(3), tc.spec)
			g.Expect(err).To(MatchError(ContainSubstring(tc.want)))
		})
	}
}
