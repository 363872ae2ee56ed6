package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/kernel"
)

// nodeDecision is where one node's traffic redirection lands and why.
type nodeDecision struct {
	name        string
	redirection meshv1.NodeRedirection // "" = meshkeeper sets no label (Sidecar mode)
	ineligible  string                 // why eBPF cannot run there, if it cannot
}

// decideNode is the pure rule: the kernel version the kubelet reports is the
// cheap first filter, the node agent's MeshNode preflight the final word.
func decideNode(node *corev1.Node, report *meshv1.MeshNode, spec meshv1.DataplaneSpec, minKernel kernel.Version) nodeDecision {
	d := nodeDecision{name: node.Name}
	if spec.EffectiveMode() != meshv1.ModeAmbient {
		return d
	}
	if spec.EffectiveRedirection() == meshv1.RedirectionIPTables {
		d.redirection = meshv1.NodeRedirectionIPTables
		return d
	}
	release := node.Status.NodeInfo.KernelVersion
	switch v, err := kernel.Parse(release); {
	case err != nil:
		d.ineligible = fmt.Sprintf("kernel %q not understood", release)
	case v.Less(minKernel):
		d.ineligible = fmt.Sprintf("kernel %s < %s required", v, minKernel)
	case report != nil && !report.Status.Eligible && report.Status.KernelRelease != "":
		d.ineligible = "preflight: " + report.Status.Reason
	}
	switch {
	case d.ineligible == "":
		d.redirection = meshv1.NodeRedirectionEBPF
	case spec.EffectiveKernelFallback() == meshv1.FallbackBlock:
		d.redirection = meshv1.NodeRedirectionBlocked
	default:
		d.redirection = meshv1.NodeRedirectionIPTables
	}
	return d
}

// summarizeNodes counts decisions for status.nodes and describes the
// ineligible ones for the PreflightPassed condition.
func summarizeNodes(ds []nodeDecision) (meshv1.NodeCounts, []string) {
	c := meshv1.NodeCounts{Total: int32(len(ds))}
	var failing []string
	for _, d := range ds {
		switch {
		case d.ineligible != "":
			failing = append(failing, fmt.Sprintf("%s: %s (%s)", d.name, d.ineligible, d.redirection))
		case d.redirection == meshv1.NodeRedirectionEBPF:
			c.Eligible++
		}
		switch d.redirection {
		case meshv1.NodeRedirectionIPTables:
			if d.ineligible != "" {
				c.Fallback++
			}
		case meshv1.NodeRedirectionBlocked:
			c.Blocked++
		}
	}
	slices.Sort(failing)
	return c, failing
}

// reconcileNodes labels every node meshkeeper.dev/redirection=ebpf|iptables|blocked;
// the node agent and istio-cni DaemonSets select nodes by that label.
func (r *MeshReconciler) reconcileNodes(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	nodes, err := r.clusterNodes(ctx, obs)
	if err != nil {
		return err
	}
	byName, err := r.meshNodes(ctx)
	if err != nil {
		return err
	}
	minKernel, err := kernel.Parse(obs.bundle.MinKernel)
	if err != nil {
		return fmt.Errorf("bundle %s minKernel: %w", obs.bundle.Version, err)
	}
	var errs []error
	decisions := make([]nodeDecision, 0, len(nodes))
	var enrolments []nodeEnrolment
	for i := range nodes {
		n := &nodes[i]
		spec := mesh.Spec.Dataplane
		keep := false
		if eo := obs.engine; eo != nil && eo.nodeRedirection != nil {
			// An engine rollout moves nodes one wave at a time: only the
			// nodes its decision moves are relabelled (mesh_engine_nodes.go).
			red, moves := eo.nodeRedirection[n.Name]
			if moves {
				spec.Mode, spec.Redirection = meshv1.ModeAmbient, red
			}
			_, labelled := n.Labels[meshv1.LabelRedirection]
			keep = !moves && labelled
		}
		d := decideNode(n, byName[n.Name], spec, minKernel)
		if keep {
			d.redirection = meshv1.NodeRedirection(n.Labels[meshv1.LabelRedirection])
		}
		decisions = append(decisions, d)
		if err := r.applyNodeLabel(ctx, n, d.redirection); err != nil {
			errs = append(errs, err)
		}
		if report := byName[n.Name]; d.redirection == meshv1.NodeRedirectionEBPF && report != nil {
			enrolments = append(enrolments, nodeEnrolment{node: n.Name, report: report.Status.Enrolment})
		}
	}
	obs.nodes, obs.failingNodes = summarizeNodes(decisions)
	obs.notEnrolledGrace = r.notEnrolledGrace()
	obs.notEnrolled, obs.enrolmentRecheck = podsNotEnrolled(enrolments, r.now(), obs.notEnrolledGrace)
	obs.nodesObserved = true
	return errors.Join(errs...)
}

// meshNodes are the node agents' reports (MeshNode), by node name.
func (r *MeshReconciler) meshNodes(ctx context.Context) (map[string]*meshv1.MeshNode, error) {
	var reports meshv1.MeshNodeList
	if err := r.List(ctx, &reports); err != nil {
		return nil, fmt.Errorf("list meshnodes: %w", err)
	}
	byName := make(map[string]*meshv1.MeshNode, len(reports.Items))
	for i := range reports.Items {
		byName[reports.Items[i].Name] = &reports.Items[i]
	}
	return byName, nil
}

// applyNodeLabel sets (or, with "", removes) meshkeeper's redirection label
// through server-side apply, touching no other label.
func (r *MeshReconciler) applyNodeLabel(ctx context.Context, n *corev1.Node, red meshv1.NodeRedirection) error {
	current, has := n.Labels[meshv1.LabelRedirection]
	if (red == "" && !has) || (red != "" && current == string(red)) {
		return nil
	}
	ac := corev1ac.Node(n.Name)
	if red != "" {
		ac = ac.WithLabels(map[string]string{meshv1.LabelRedirection: string(red)})
	}
	if err := r.Apply(ctx, ac, client.FieldOwner(meshv1.FieldManager), client.ForceOwnership); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("label node %s: %w", n.Name, err)
	}
	log.FromContext(ctx).Info("Labelled node", "node", n.Name, "redirection", red)
	return nil
}

// releaseNodes removes meshkeeper's label from every node.
func (r *MeshReconciler) releaseNodes(ctx context.Context, _ *meshv1.Mesh) error {
	var nodes corev1.NodeList
	if err := r.List(ctx, &nodes); err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	var errs []error
	for i := range nodes.Items {
		if err := r.applyNodeLabel(ctx, &nodes.Items[i], ""); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func preflightMessage(failing []string) string {
	if len(failing) == 0 {
		return "Every node can run eBPF redirection"
	}
	return fmt.Sprintf("%d node(s) cannot run eBPF redirection: %s", len(failing), strings.Join(failing, "; "))
}
