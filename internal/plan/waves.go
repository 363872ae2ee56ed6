package plan

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// NodeInfo is what node waves need to know about a node.
type NodeInfo struct {
	Name   string
	Labels map[string]string
}

// NamespaceWaves splits the selected namespaces into the waves they move in.
//
// The first wave is spec.canary, in the order given, keeping only namespaces
// that are selected (a canary that is not in the mesh is skipped). The rest,
// sorted by name, follow spec's cumulative waves (EffectiveWaves): a wave of
// "p%" moves namespaces until ceil(p% of the rest) have moved. Empty waves
// are dropped, so every wave moves at least one namespace, and whatever the
// waves leave (they end at 100% once validated) moves in a last wave: every
// selected namespace moves exactly once. Duplicates count once.
func NamespaceWaves(selected []string, spec meshv1.NamespaceRolloutSpec) [][]string {
	in := make(map[string]bool, len(selected))
	for _, ns := range selected {
		in[ns] = true
	}
	var waves [][]string
	var canary []string
	for _, ns := range spec.Canary {
		if in[ns] {
			canary = append(canary, ns)
			delete(in, ns) // also drops a repeated canary entry
		}
	}
	if len(canary) > 0 {
		waves = append(waves, canary)
	}

	rest := make([]string, 0, len(in))
	for ns := range in {
		rest = append(rest, ns)
	}
	slices.Sort(rest)
	moved := 0
	for _, w := range spec.EffectiveWaves() {
		pct, ok := parsePercent(w)
		if !ok {
			continue // ValidateSpec refuses it; the last wave below still moves the rest
		}
		upto := min((pct*len(rest)+99)/100, len(rest))
		if upto > moved {
			waves = append(waves, rest[moved:upto:upto])
			moved = upto
		}
	}
	if moved < len(rest) {
		waves = append(waves, rest[moved:])
	}
	return waves
}

// parsePercent parses "1%" to "100%".
func parsePercent(s string) (int, bool) {
	n, err := strconv.Atoi(strings.TrimSuffix(s, "%"))
	if err != nil || !strings.HasSuffix(s, "%") || n < 1 || n > 100 {
		return 0, false
	}
	return n, true
}

// NodeWaves splits the nodes into the waves node components move in: the
// nodes spec.canary selects first (one wave), then the rest in batches of
// spec.maxUnavailable (a count, or a percentage of all nodes rounded up; at
// least one node; default 10%). Nodes are sorted by name in every wave. No
// canary selector, or one that selects no node, means no canary wave.
func NodeWaves(nodes []NodeInfo, spec meshv1.NodeRolloutSpec) ([][]string, error) {
	nw, err := SplitNodes(nodes, spec)
	if err != nil {
		return nil, err
	}
	return nw.Waves, nil
}

// NodeSplit is the node waves (NodeWaves) with what describes them.
type NodeSplit struct {
	// Waves are the node names of each wave.
	Waves [][]string
	// Canary: Waves[0] is the canary wave.
	Canary bool
	// Batch is the size of every later wave but the last, and the most
	// nodes whose node components are replaced at once.
	Batch int
}

// SplitNodes computes the node waves and their batch size (see NodeWaves).
func SplitNodes(nodes []NodeInfo, spec meshv1.NodeRolloutSpec) (*NodeSplit, error) {
	var canary labels.Selector
	if spec.Canary != nil {
		if len(spec.Canary.MatchLabels) == 0 && len(spec.Canary.MatchExpressions) == 0 {
			return nil, fmt.Errorf("spec.rollout.nodes.canary is an empty selector, which selects every node and leaves no canary; set matchLabels, e.g. canary: {matchLabels: {pool: canary}}, or remove canary")
		}
		sel, err := metav1.LabelSelectorAsSelector(spec.Canary)
		if err != nil {
			return nil, fmt.Errorf("spec.rollout.nodes.canary: %w; e.g. canary: {matchLabels: {pool: canary}}", err)
		}
		canary = sel
	}
	batch, err := batchSize(spec.EffectiveMaxUnavailable(), len(nodes))
	if err != nil {
		return nil, err
	}

	sorted := slices.Clone(nodes)
	slices.SortFunc(sorted, func(a, b NodeInfo) int { return strings.Compare(a.Name, b.Name) })
	var first, rest []string
	for _, n := range sorted {
		if canary != nil && canary.Matches(labels.Set(n.Labels)) {
			first = append(first, n.Name)
		} else {
			rest = append(rest, n.Name)
		}
	}
	nw := &NodeSplit{Batch: batch}
	if len(first) > 0 {
		nw.Waves, nw.Canary = append(nw.Waves, first), true
	}
	for len(rest) > 0 {
		n := min(batch, len(rest))
		nw.Waves = append(nw.Waves, rest[:n:n])
		rest = rest[n:]
	}
	return nw, nil
}

// batchSize is maxUnavailable as a node count out of total, rounded up, at
// least 1.
func batchSize(mu intstr.IntOrString, total int) (int, error) {
	const how = "want a count of at least 1 or a percentage from 1% to 100%, e.g. maxUnavailable: 10% or maxUnavailable: 2"
	if mu.Type == intstr.Int && mu.IntVal < 1 {
		return 0, fmt.Errorf("spec.rollout.nodes.maxUnavailable %d: %s", mu.IntVal, how)
	}
	if mu.Type == intstr.String {
		if _, ok := parsePercent(mu.StrVal); !ok {
			return 0, fmt.Errorf("spec.rollout.nodes.maxUnavailable %q: %s", mu.StrVal, how)
		}
	}
	n, err := intstr.GetScaledValueFromIntOrPercent(&mu, total, true)
	if err != nil {
		return 0, fmt.Errorf("spec.rollout.nodes.maxUnavailable %q: %w; %s", mu.String(), err, how)
	}
	return max(n, 1), nil
}
