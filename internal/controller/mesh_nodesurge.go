package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// ztunnel moves make-before-break: a node wave never leaves a node without a
// ztunnel listening in its pods.
//
// Replacing an OnDelete DaemonSet's pod leaves a gap: the DaemonSet
// controller creates the new pod only once the old one has left the API
// server, and the old ztunnel, draining, closes its in-pod listeners at
// SIGTERM. For up to its grace period the node's meshed pods would have no
// ztunnel, and their new connections would be refused (fail closed).
// Upstream closes the gap with a surge (maxSurge 1, maxUnavailable 0): the
// new ztunnel takes every pod over ZDS and listens beside the old one
// (SO_REUSEPORT) before the old one is told to stop. A DaemonSet surges only
// in a native RollingUpdate, which moves every node, not a wave's.
//
// So for each ztunnel pod on a moved node that runs an older template,
// meshkeeper starts a surge pod first: a bare pod of the DaemonSet's new
// template on that node, without the DaemonSet's selector labels (the
// DaemonSet never adopts it) and owned, not controlled, by the DaemonSet
// (deleting the DaemonSet deletes it). Once it is ready (ztunnel is ready
// only after the node agent's snapshot), the old pod is deleted and drains
// while the surge pod takes the new connections; the DaemonSet recreates its
// pod; once that one is ready the surge pod is deleted and drains in turn.
// At every moment a ready ztunnel listens in every meshed pod of the node.
//
// Only ztunnel surges: it is a ZDS client, and two of them on a node is what
// upstream's surge does (the agent hands new pods to the newest connection
// and deletes to all). The node agent and istio-cni own per-node state (the
// ZDS socket, eBPF pins, the CNI config) and stay one pod per node.
//
// A rollback, and a rollout without node waves, are native RollingUpdates,
// and the ztunnel chart surges there itself (maxSurge, maxUnavailable 0).

// labelSurgeOf marks a surge pod with the component it stands in for.
const labelSurgeOf = "meshkeeper.dev/surge-of"

// surges says whether a node component's pods are replaced make-before-break.
func surges(c bundle.Component) bool { return c == bundle.Ztunnel }

// surgeStep is one step of moving a surging DaemonSet's pods.
type surgeStep struct {
	create       []string // nodes to start a surge pod on
	delete       []string // DaemonSet pods to delete: their node's surge pod is ready
	deleteSurges []string // surge pods to delete: their node's DaemonSet pod is new and ready
	done         bool
	current      int
	total        int
	waiting      []string
}

// surgePods decides one step of moving a surging DaemonSet's pods on the
// moved nodes to its newest template, make-before-break, at most batch nodes
// in flight (a node is in flight from its surge pod's start until its
// DaemonSet pod is new and ready again; a node whose pod is unavailable for
// another reason counts too). Pods on other nodes are never touched, but a
// surge pod left on any node whose DaemonSet pod is ready (a rollback, an
// interrupted rollout) is deleted: it has done its work.
func surgePods(pods, surgeList []podState, moved map[string]bool, batch, desired int) surgeStep {
	var out surgeStep
	surgeOn := map[string]podState{} // live surge pod per node
	for _, s := range surgeList {
		if !s.terminating {
			surgeOn[s.node] = s
		}
	}
	type nodePods struct{ live, ready, current, terminating bool }
	byNode := map[string]*nodePods{}
	live := 0
	for _, p := range pods {
		n := byNode[p.node]
		if n == nil {
			n = &nodePods{}
			byNode[p.node] = n
		}
		if p.terminating {
			n.terminating = true
			continue
		}
		live++
		n.live = true
		n.ready = n.ready || p.ready
		n.current = n.current || (p.current && p.ready)
	}
	inFlight := map[string]bool{}
	for node := range surgeOn {
		inFlight[node] = true
	}
	for node, n := range byNode {
		if !n.ready {
			inFlight[node] = true
		}
	}
	// Nodes the DaemonSet wants a pod on and has none: a replacement not
	// created yet (its node has a surge pod, counted above, or not).
	missing := max(desired-live, 0)
	for node := range surgeOn {
		if n := byNode[node]; n == nil || !n.live {
			missing = max(missing-1, 0)
		}
	}
	budget := batch - len(inFlight) - missing

	var startable []string
	for _, p := range pods {
		if !moved[p.node] || p.terminating {
			continue
		}
		s, hasSurge := surgeOn[p.node]
		switch {
		case !p.current && !hasSurge:
			startable = append(startable, p.node)
			out.waiting = append(out.waiting, p.node+": still on the old template")
		case !p.current && !s.ready:
			out.waiting = append(out.waiting, p.node+": starting the new pod beside the old one")
		case !p.current:
			out.delete = append(out.delete, p.name)
			out.waiting = append(out.waiting, p.node+": replacing")
		case !p.ready:
			out.waiting = append(out.waiting, p.node+": not ready")
		}
	}
	for node, n := range byNode {
		if moved[node] {
			out.total++
			if n.current {
				out.current++
			}
		}
		if n.terminating && !n.live && moved[node] {
			out.waiting = append(out.waiting, node+": replacing")
		}
	}
	// A surge pod goes once the DaemonSet's pod on its node is ready: the
	// new template's on a moved node, any on the others.
	for _, node := range slices.Sorted(maps.Keys(surgeOn)) {
		n := byNode[node]
		if n != nil && n.live && n.ready && (n.current || !moved[node]) {
			out.deleteSurges = append(out.deleteSurges, surgeOn[node].name)
		}
	}
	slices.Sort(startable)
	out.create = startable[:max(min(budget, len(startable)), 0)]
	if len(out.create) == 0 {
		out.create = nil
	}
	out.done, out.waiting = moveDone(out.waiting, live, desired)
	return out
}

// surgePodsOf lists the surge pods of a DaemonSet from the cache.
func (r *MeshReconciler) surgePodsOf(ctx context.Context, ds *appsv1.DaemonSet) ([]corev1.Pod, error) {
	return r.podsOf(ctx, ds, client.MatchingLabels{labelSurgeOf: ds.Name}, ownerRef)
}

// moveSurging runs one step of surgePods for the DaemonSet ds.
func (r *MeshReconciler) moveSurging(ctx context.Context, ds *appsv1.DaemonSet, pods []corev1.Pod, states []podState, moved map[string]bool, batch int) (podReplacement, error) {
	surgeList, err := r.surgePodsOf(ctx, ds)
	if err != nil {
		return podReplacement{}, err
	}
	step := surgePods(states, podStates(surgeList, ""), moved, batch, int(ds.Status.DesiredNumberScheduled))
	for _, node := range step.create {
		if err := r.createSurgePod(ctx, ds, node); err != nil {
			return podReplacement{}, err
		}
	}
	for _, name := range step.delete {
		if err := r.deletePod(ctx, pods, name); err != nil {
			return podReplacement{}, err
		}
	}
	for _, name := range step.deleteSurges {
		if err := r.deletePod(ctx, surgeList, name); err != nil {
			return podReplacement{}, err
		}
	}
	return podReplacement{done: step.done, current: step.current, total: step.total, waiting: step.waiting}, nil
}

// podStates is podStateOf of each pod.
func podStates(pods []corev1.Pod, hash string) []podState {
	states := make([]podState, 0, len(pods))
	for i := range pods {
		states = append(states, podStateOf(&pods[i], hash))
	}
	return states
}

// surgePodName is the surge pod's name for a node: stable, so a retry after a
// lost response finds the pod it created, and within a pod name's 253 bytes.
func surgePodName(ds, node string) string {
	name := ds + "-surge-" + node
	if len(name) <= 253 {
		return name
	}
	sum := sha256.Sum256([]byte(node))
	return name[:253-11] + "-" + hex.EncodeToString(sum[:5])
}

// surgePod is the bare pod of ds's current template that stands in for its
// pod on node while that one is replaced.
func surgePod(ds *appsv1.DaemonSet, node string) *corev1.Pod {
	tmpl := ds.Spec.Template.DeepCopy()
	labels := map[string]string{}
	for k, v := range tmpl.Labels {
		if _, selector := ds.Spec.Selector.MatchLabels[k]; !selector {
			labels[k] = v
		}
	}
	labels[labelSurgeOf] = ds.Name
	spec := tmpl.Spec
	spec.NodeName = node // bound, as the DaemonSet's own pod is; the kubelet admits it (system-node-critical)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        surgePodName(ds.Name, node),
			Namespace:   ds.Namespace,
			Labels:      labels,
			Annotations: tmpl.Annotations,
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID,
				Controller: new(bool), BlockOwnerDeletion: new(bool), // both false
			}},
		},
		Spec: spec,
	}
}

func (r *MeshReconciler) createSurgePod(ctx context.Context, ds *appsv1.DaemonSet, node string) error {
	p := surgePod(ds, node)
	err := r.Create(ctx, p)
	switch {
	case apierrors.IsAlreadyExists(err):
		// Ours from a reconcile whose cache had not seen it yet, or one
		// still stopping: the next reconcile sees it.
		return nil
	case err != nil:
		return fmt.Errorf("start %s's new pod beside the old one on node %s: %w", ds.Name, node, err)
	}
	log.FromContext(ctx).Info("Started a surge pod: the new ztunnel takes the node's pods before the old one stops", "pod", p.Name, "node", node)
	return nil
}

// cleanupSurges deletes the surge pods whose work is done outside a node
// wave: after a rollback, or a rollout ended another way, a surge pod goes
// once the DaemonSet's own pod on its node is ready again. In the Nodes step
// moveSurging does this itself.
func (r *MeshReconciler) cleanupSurges(ctx context.Context, _ *meshv1.Mesh, obs *observation) error {
	if ro := obs.rollout.status; ro != nil && ro.Step == meshv1.RolloutStepNodes {
		return nil
	}
	var list corev1.PodList
	if err := r.List(ctx, &list, client.InNamespace(r.ComponentsNamespace), client.HasLabels{labelSurgeOf}); err != nil {
		return fmt.Errorf("list surge pods: %w", err)
	}
	if len(list.Items) == 0 {
		return nil
	}
	var sets appsv1.DaemonSetList
	if err := r.List(ctx, &sets, client.InNamespace(r.ComponentsNamespace), client.HasLabels{meshv1.LabelComponent}); err != nil {
		return fmt.Errorf("list DaemonSets: %w", err)
	}
	for i := range sets.Items {
		ds := &sets.Items[i]
		if !surges(bundle.Component(ds.Labels[meshv1.LabelComponent])) {
			continue
		}
		pods, err := r.daemonSetPods(ctx, ds)
		if err != nil {
			return err
		}
		surgeList, err := r.surgePodsOf(ctx, ds)
		if err != nil {
			return err
		}
		// No node moves here: surgePods only names the surge pods whose
		// node has its DaemonSet pod ready.
		step := surgePods(podStates(pods, ""), podStates(surgeList, ""), nil, 0, int(ds.Status.DesiredNumberScheduled))
		for _, name := range step.deleteSurges {
			if err := r.deletePod(ctx, surgeList, name); err != nil {
				return err
			}
		}
	}
	return nil
}

// ownerRef says refs name the object with this UID, as controller or not.
func ownerRef(refs []metav1.OwnerReference, uid types.UID) bool {
	return slices.ContainsFunc(refs, func(ref metav1.OwnerReference) bool { return ref.UID == uid })
}
