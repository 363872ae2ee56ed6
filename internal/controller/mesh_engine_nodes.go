package controller

import (
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/kernel"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// Nodes in an engine rollout. A redirection switch (EBPF ↔ IPTables), and
// the node components' install of a switch Sidecar → Ambient, move node by
// node, in the node waves status.plan shows. What redirects on a
// node is chosen by its meshkeeper.dev/redirection label: the node agent's
// DaemonSet selects ebpf, istio-cni's iptables. So moving a node is writing
// its label; the DaemonSet controller then starts the one and stops the
// other there (the stopping node agent removes its datapath, because the
// label no longer says ebpf: DetachOnExit). A node has moved when the pods
// on it match its label: the component that redirects is ready and the
// other one is gone.
//
// While an engine rollout runs, a node's label changes only when the
// decision moves that node; every other node keeps the label it has.

// nodeFacts observes what every node runs for plan.Next: the node
// components' version (nodeAt, from their releases) and the redirection its
// pods show, ready.
func (r *MeshReconciler) nodeFacts(ctx context.Context, mesh *meshv1.Mesh, nodes []corev1.Node, nodeAt plan.NodePlacement, installed plan.Installed) ([]plan.NodeFact, error) {
	out := make([]plan.NodeFact, 0, len(nodes))
	if nodeAt.Version == "" {
		for _, n := range nodes {
			out = append(out, plan.NodeFact{Name: n.Name, Labels: n.Labels})
		}
		return out, nil
	}
	var minKernel *kernel.Version
	if b, err := r.Catalog.Resolve(installed.Version); err == nil {
		if v, err := kernel.Parse(b.MinKernel); err == nil {
			minKernel = &v
		}
	}
	byName, err := r.meshNodes(ctx)
	if err != nil {
		return nil, err
	}
	var pods corev1.PodList
	if err := r.List(ctx, &pods, client.InNamespace(r.ComponentsNamespace), client.HasLabels{meshv1.LabelComponent}); err != nil {
		return nil, fmt.Errorf("list node-component pods: %w", err)
	}
	onNode := map[string]map[bundle.Component][]podState{}
	for i := range pods.Items {
		p := &pods.Items[i]
		c := bundle.Component(p.Labels[meshv1.LabelComponent])
		if (c != bundle.NodeAgent && c != bundle.CNI) || p.Spec.NodeName == "" {
			continue
		}
		if onNode[p.Spec.NodeName] == nil {
			onNode[p.Spec.NodeName] = map[bundle.Component][]podState{}
		}
		onNode[p.Spec.NodeName][c] = append(onNode[p.Spec.NodeName][c], podStateOf(p, ""))
	}
	fallback := mesh.Spec.Dataplane.EffectiveKernelFallback()
	for i := range nodes {
		n := &nodes[i]
		label := n.Labels[meshv1.LabelRedirection]
		red, waiting := nodeRedirectionAt(label, onNode[n.Name][bundle.NodeAgent], onNode[n.Name][bundle.CNI])
		f := plan.NodeFact{Name: n.Name, Labels: n.Labels, At: plan.NodePlacement{Version: nodeAt.Version, Redirection: red}, Waiting: waiting}
		if label == "" {
			// Nothing redirects on a node without the label (neither the
			// node agent nor istio-cni runs there), whatever ztunnel does:
			// it is not in the mesh's node set yet.
			f.At = plan.NodePlacement{}
		}
		if minKernel != nil && label != string(meshv1.NodeRedirectionBlocked) && fallback == meshv1.FallbackIPTables {
			// A node that cannot run eBPF falls back to iptables whichever
			// redirection the mesh asks for: a switch does not move it.
			ebpf := decideNode(n, byName[n.Name], meshv1.DataplaneSpec{Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionEBPF}, *minKernel)
			f.FixedRedirection = ebpf.ineligible != ""
		}
		out = append(out, f)
	}
	return out, nil
}

// nodeRedirectionAt is the redirection a node's pods show: its label's once
// the node agent and istio-cni pods on it match that label (the one that
// redirects there is ready, the other has gone, its cleanup done), and ""
// with what it waits for until then. A blocked node runs neither: that is
// how EBPF looks on a node that cannot run it (kernelFallback: Block).
func nodeRedirectionAt(label string, agent, cni []podState) (meshv1.Redirection, string) {
	var wantReady, wantGone []podState
	var red meshv1.Redirection
	switch meshv1.NodeRedirection(label) {
	case meshv1.NodeRedirectionEBPF:
		red, wantReady, wantGone = meshv1.RedirectionEBPF, agent, cni
	case meshv1.NodeRedirectionIPTables:
		red, wantReady, wantGone = meshv1.RedirectionIPTables, cni, agent
	case meshv1.NodeRedirectionBlocked:
		red, wantGone = meshv1.RedirectionEBPF, append(append([]podState{}, agent...), cni...)
	default:
		return "", "not labelled " + meshv1.LabelRedirection + " yet"
	}
	var waiting []string
	for _, p := range wantGone {
		waiting = append(waiting, p.name+" still running")
	}
	if label != string(meshv1.NodeRedirectionBlocked) {
		ready := false
		for _, p := range wantReady {
			ready = ready || (p.ready && !p.terminating)
		}
		if !ready {
			what := "node-agent"
			if red == meshv1.RedirectionIPTables {
				what = "istio-cni"
			}
			waiting = append(waiting, "no ready "+what+" pod")
		}
	}
	if len(waiting) > 0 {
		return "", strings.Join(waiting, ", ")
	}
	return red, ""
}

// nodeRedirections is the redirection the label of each node the decision
// moves must follow. Nodes it does not move keep the label they have.
func nodeRedirections(d plan.Decision) map[string]meshv1.Redirection {
	out := map[string]meshv1.Redirection{}
	for n, p := range d.Nodes {
		if p.Redirection != "" {
			out[n] = p.Redirection
		}
	}
	return out
}
