package controller

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// Node waves: the Nodes step of a rollout moves the node components
// (ztunnel, the node agent, istio-cni) to the new bundle node by node, the
// canary nodes first, then batches of spec.rollout.nodes.maxUnavailable.
//
// The mechanism is an OnDelete DaemonSet per component. When the Nodes step
// begins, the component's release is upgraded to the new bundle with
// updateStrategy OnDelete: the DaemonSet's template is the new one, but the
// DaemonSet controller replaces no pod by itself. For every node of the
// waves moved so far, meshkeeper deletes the pod that still runs an older
// template (the pod's controller-revision-hash differs from the DaemonSet's
// newest ControllerRevision), at most maxUnavailable pods of a DaemonSet
// unavailable at once, and the DaemonSet controller recreates it from the
// new template. A wave has moved when every pod on its nodes runs the new
// template and is ready; then it bakes and its SLOs are judged like a
// namespace wave.
//
// Rolling back is per node as well: the release goes back to the old bundle
// with the native RollingUpdate strategy. The old template hashes to the
// old ControllerRevision, so the DaemonSet controller replaces exactly the
// pods of the nodes that had moved (bounded by maxUnavailable) and leaves
// the nodes that never moved alone. When the last node wave passes, the
// release returns to RollingUpdate too; every pod already runs its template,
// so nothing restarts.
//
// Why not two DaemonSets per component, split by a per-node revision label:
// ztunnel and the node agent own per-node resources (the ztunnel socket in
// /var/run/ztunnel, the eBPF pins under /sys/fs/bpf/meshkeeper), so two
// pods of one component must never share a node, and complementary affinity
// on a label meshkeeper writes cannot guarantee that for a node that joins
// before it is labelled. It would also need every object of the node charts
// renamed per revision. With one DaemonSet a node has at most one pod of
// each component, always.
//
// A node that joins during the Nodes step, or whose pod someone else deletes,
// gets the new template straight away: a DaemonSet has one template.

// nodeWaveRequeue is how soon a node wave in flight is looked at again; pod
// readiness also triggers a reconcile through the DaemonSet watch.
const nodeWaveRequeue = time.Second

// hasNodeComponents says whether the Mesh's mode runs node components.
func hasNodeComponents(mesh *meshv1.Mesh) bool {
	in := inputsFor(mesh, "")
	return slices.ContainsFunc(bundle.Components(in.Mode, in.Redirection, false), bundle.Component.OnNodes)
}

// clusterNodes are the cluster's nodes, listed once per reconcile.
func (r *MeshReconciler) clusterNodes(ctx context.Context, obs *observation) ([]corev1.Node, error) {
	if obs.nodeList != nil {
		return obs.nodeList, nil
	}
	var list corev1.NodeList
	if err := r.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	obs.nodeList = append([]corev1.Node{}, list.Items...) // non-nil even when empty
	return obs.nodeList, nil
}

func nodeInfos(nodes []corev1.Node) []plan.NodeInfo {
	infos := make([]plan.NodeInfo, 0, len(nodes))
	for _, n := range nodes {
		infos = append(infos, plan.NodeInfo{Name: n.Name, Labels: n.Labels})
	}
	return infos
}

// reconcileNodeWaves runs the Nodes step: move the current node wave, judge
// it, then start the next one; after the last, the namespace waves.
func (r *MeshReconciler) reconcileNodeWaves(ctx context.Context, mesh *meshv1.Mesh, obs *observation, nsWaves [][]string) error {
	ro := obs.rollout.status
	nodes, err := r.clusterNodes(ctx, obs)
	if err != nil {
		return err
	}
	split, err := plan.SplitNodes(nodeInfos(nodes), mesh.Spec.Rollout.Nodes)
	if err != nil {
		return err
	}
	ro.Waves = int32(len(split.Waves))
	if ro.Wave == 0 || ro.WaveStartedAt == nil {
		if !obs.componentsReady {
			ro.Message = fmt.Sprintf("installing %s beside %s: waiting for %s", ro.To, ro.From, obs.waitingFor())
			return nil
		}
		return r.startNodeWave(mesh, obs, split.Waves, nsWaves, time.Now())
	}
	moved := map[string]bool{}
	for _, wave := range split.Waves[:min(int(ro.Wave), len(split.Waves))] {
		for _, n := range wave {
			moved[n] = true
		}
	}
	progress, err := r.moveNodes(ctx, moved, split.Batch)
	if err != nil {
		return err
	}
	if !progress.done || !obs.componentsReady {
		msg := progress.message(ro.To)
		waiting := progress.waiting
		if progress.done {
			msg = "waiting for " + obs.waitingFor()
			waiting = []string{obs.waitingFor()}
		}
		// spec.rollout.progressDeadline: a wave that does not move (a pod
		// that never becomes ready, a node gone NotReady) is rolled back
		// instead of holding the rollout forever.
		if deadline := mesh.Spec.Rollout.EffectiveProgressDeadline(); time.Since(ro.WaveStartedAt.Time) >= deadline {
			return r.startRollback(mesh, obs, fmt.Sprintf("node wave %d/%d (%s) did not move within spec.rollout.progressDeadline %s: waiting for %s",
				ro.Wave, ro.Waves, nameList(ro.WaveNodes), deadline, nameList(waiting)))
		}
		ro.Message = fmt.Sprintf("node wave %d/%d (%s): %s", ro.Wave, ro.Waves, nameList(ro.WaveNodes), msg)
		obs.requeueAfter = nodeWaveRequeue
		return nil
	}
	if missing := obs.identity.unattested(ro.WaveNodes); len(missing) > 0 {
		// Workloads on these nodes get their identities from the local
		// SPIRE agent: it must have attested before the wave is judged.
		ro.Message = fmt.Sprintf("node wave %d/%d (%s): waiting for the SPIRE agent to attest on %s", ro.Wave, ro.Waves, strings.Join(ro.WaveNodes, ", "), strings.Join(missing, ", "))
		obs.requeueAfter = nodeWaveRequeue
		return nil
	}
	bake := mesh.Spec.Rollout.Nodes.EffectiveSoak() // every later node wave
	if ro.Wave == 1 && split.Canary {
		bake = mesh.Spec.Rollout.Nodes.EffectiveBake()
	}
	// Node components carry the traffic of every meshed namespace; the
	// wave is judged on its nodes, against the other nodes.
	selected, err := r.selectedNamespaces(ctx, mesh, obs)
	if err != nil {
		return err
	}
	scope := waveScope{namespaces: selected, nodeWave: true, nodes: ro.WaveNodes}
	for _, n := range nodes {
		if !slices.Contains(ro.WaveNodes, n.Name) {
			scope.otherNodes = append(scope.otherNodes, n.Name)
		}
	}
	return r.judgeWave(ctx, mesh, obs, scope, bake, func(now time.Time) error {
		return r.startNodeWave(mesh, obs, split.Waves, nsWaves, now)
	})
}

// startNodeWave starts the next node wave inside a maintenance window; after
// the last one the rollout goes on with the namespace waves.
func (r *MeshReconciler) startNodeWave(mesh *meshv1.Mesh, obs *observation, waves, nsWaves [][]string, now time.Time) error {
	ro := obs.rollout.status
	if int(ro.Wave) >= len(waves) {
		if len(waves) > 0 {
			r.event(mesh, corev1.EventTypeNormal, "NodesMoved", "Every node runs the node components of %s; namespaces move next", ro.To)
		}
		ro.Step, ro.Wave, ro.Waves, ro.WaveStartedAt = meshv1.RolloutStepNamespaces, 0, int32(len(nsWaves)), nil
		setWaveNodes(ro, nil)
		resetChecks(ro)
		return r.startWave(mesh, obs, nsWaves, now)
	}
	if open, err := r.windowForWave(mesh, obs, fmt.Sprintf("node wave %d/%d", ro.Wave+1, len(waves)), now); err != nil || !open {
		return err
	}
	ro.Wave++
	setWaveNodes(ro, waves[ro.Wave-1])
	ro.WaveStartedAt = &metav1.Time{Time: now}
	resetChecks(ro)
	ro.Message = fmt.Sprintf("node wave %d/%d (%s) started: replacing the node components' pods with %s", ro.Wave, len(waves), nameList(waves[ro.Wave-1]), ro.To)
	r.event(mesh, corev1.EventTypeNormal, "NodeWaveStarted", "Node wave %d/%d to %s: %s", ro.Wave, len(waves), ro.To, nameList(waves[ro.Wave-1]))
	// The status says which nodes move before any pod is replaced: the
	// next reconcile replaces them.
	obs.requeueAfter = 100 * time.Millisecond
	return nil
}

// resetChecks forgets the previous wave's analysis.
func resetChecks(ro *meshv1.RolloutStatus) {
	ro.LastCheckAt, ro.FailedChecks, ro.InconclusiveChecks, ro.Analysis = nil, 0, 0, nil
}

// nodeProgress is how far the node components have moved on the moved nodes.
type nodeProgress struct {
	done    bool
	current int      // pods on moved nodes that run the newest template and are ready
	total   int      // pods on moved nodes
	waiting []string // what is not there yet, e.g. "ztunnel on node-a: replacing"
}

func (p nodeProgress) message(to string) string {
	msg := fmt.Sprintf("%d/%d node-component pods on the wave's nodes run %s and are ready", p.current, p.total, to)
	if len(p.waiting) > 0 {
		msg += "; waiting for " + p.waiting[0]
		if len(p.waiting) > 1 {
			msg += fmt.Sprintf(" and %d more", len(p.waiting)-1)
		}
	}
	return msg
}

// moveNodes replaces, for every node component, the pods on moved nodes that
// run an older template, and reports whether they all run the newest one.
func (r *MeshReconciler) moveNodes(ctx context.Context, moved map[string]bool, batch int) (nodeProgress, error) {
	var sets appsv1.DaemonSetList
	if err := r.List(ctx, &sets, client.InNamespace(r.ComponentsNamespace), client.HasLabels{meshv1.LabelComponent}); err != nil {
		return nodeProgress{}, fmt.Errorf("list DaemonSets: %w", err)
	}
	total := nodeProgress{done: true}
	for i := range sets.Items {
		ds := &sets.Items[i]
		if !bundle.Component(ds.Labels[meshv1.LabelComponent]).OnNodes() {
			continue
		}
		if ds.Status.ObservedGeneration < ds.Generation {
			total.done = false
			total.waiting = append(total.waiting, ds.Name+": the DaemonSet controller has not seen the new template yet")
			continue
		}
		hash, err := r.newestRevisionHash(ctx, ds)
		if err != nil {
			return nodeProgress{}, err
		}
		pods, err := r.daemonSetPods(ctx, ds)
		if err != nil {
			return nodeProgress{}, err
		}
		states := podStates(pods, hash)
		var step podReplacement
		if surges(bundle.Component(ds.Labels[meshv1.LabelComponent])) {
			if step, err = r.moveSurging(ctx, ds, pods, states, moved, batch); err != nil {
				return nodeProgress{}, err
			}
		} else {
			step = replacePods(states, moved, batch, int(ds.Status.DesiredNumberScheduled))
			for _, name := range step.delete {
				if err := r.deletePod(ctx, pods, name); err != nil {
					return nodeProgress{}, err
				}
			}
		}
		total.done = total.done && step.done
		total.current += step.current
		total.total += step.total
		for _, w := range step.waiting {
			total.waiting = append(total.waiting, ds.Name+" on "+w)
		}
	}
	return total, nil
}

// newestRevisionHash is the controller-revision-hash of the DaemonSet's
// newest ControllerRevision: the hash of its current template.
func (r *MeshReconciler) newestRevisionHash(ctx context.Context, ds *appsv1.DaemonSet) (string, error) {
	var revs appsv1.ControllerRevisionList
	if err := r.reader().List(ctx, &revs, client.InNamespace(ds.Namespace), client.MatchingLabels(ds.Spec.Selector.MatchLabels)); err != nil {
		return "", fmt.Errorf("list ControllerRevisions of %s: %w", ds.Name, err)
	}
	var newest *appsv1.ControllerRevision
	for i := range revs.Items {
		rev := &revs.Items[i]
		if ownedBy(rev.OwnerReferences, ds.UID) && (newest == nil || rev.Revision > newest.Revision) {
			newest = rev
		}
	}
	if newest == nil {
		return "", fmt.Errorf("%w for the DaemonSet controller to record %s's template", errWaiting, ds.Name)
	}
	return newest.Labels[appsv1.DefaultDaemonSetUniqueLabelKey], nil
}

// daemonSetPods lists the DaemonSet's pods from the cache, which holds the
// pods of the components' namespace only (CacheOptions). A List past the
// cache each reconcile was the node waves' largest cost at scale (1.4 s of
// CPU for 500 nodes, make bench-scale). A cache a moment behind the cluster
// makes a wave wait a reconcile longer (an old pod still listed), as any
// informer-fed controller does; pods are deleted with their UID as a
// precondition, so a stale entry never deletes a replacement.
func (r *MeshReconciler) daemonSetPods(ctx context.Context, ds *appsv1.DaemonSet) ([]corev1.Pod, error) {
	return r.podsOf(ctx, ds, client.MatchingLabels(ds.Spec.Selector.MatchLabels), ownedBy)
}

// podsOf lists, from the cache, the pods of ds's namespace with these labels
// whose owner references name ds as owns wants (as controller: ownedBy; at
// all: ownerRef).
func (r *MeshReconciler) podsOf(ctx context.Context, ds *appsv1.DaemonSet, labels client.MatchingLabels, owns func([]metav1.OwnerReference, types.UID) bool) ([]corev1.Pod, error) {
	var list corev1.PodList
	if err := r.List(ctx, &list, client.InNamespace(ds.Namespace), labels); err != nil {
		return nil, fmt.Errorf("list pods of %s: %w", ds.Name, err)
	}
	pods := list.Items[:0]
	for _, p := range list.Items {
		if owns(p.OwnerReferences, ds.UID) {
			pods = append(pods, p)
		}
	}
	return pods, nil
}

func (r *MeshReconciler) deletePod(ctx context.Context, pods []corev1.Pod, name string) error {
	for i := range pods {
		p := &pods[i]
		if p.Name != name {
			continue
		}
		uid := p.UID
		if err := r.Delete(ctx, p, client.Preconditions{UID: &uid}); client.IgnoreNotFound(err) != nil {
			return fmt.Errorf("replace pod %s on node %s: %w", p.Name, p.Spec.NodeName, err)
		}
		log.FromContext(ctx).Info("Replaced a node-component pod for its node wave", "pod", p.Name, "node", p.Spec.NodeName)
	}
	return nil
}

func ownedBy(refs []metav1.OwnerReference, uid types.UID) bool {
	for _, ref := range refs {
		if ref.Controller != nil && *ref.Controller && ref.UID == uid {
			return true
		}
	}
	return false
}

// podState is what replacePods needs to know about a DaemonSet pod.
type podState struct {
	name        string
	node        string
	current     bool // runs the DaemonSet's newest template
	ready       bool
	terminating bool
}

func podStateOf(p *corev1.Pod, hash string) podState {
	ready := false
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			ready = c.Status == corev1.ConditionTrue
		}
	}
	return podState{
		name: p.Name, node: p.Spec.NodeName,
		current:     p.Labels[appsv1.DefaultDaemonSetUniqueLabelKey] == hash,
		ready:       ready,
		terminating: p.DeletionTimestamp != nil,
	}
}

// podReplacement is one step of moving a DaemonSet's pods.
type podReplacement struct {
	delete  []string // pods to delete now
	done    bool     // every pod on a moved node runs the newest template, ready
	current int
	total   int
	waiting []string
}

// replacePods decides which of a DaemonSet's pods to delete so that the
// moved nodes run its newest template: pods on moved nodes running an older
// one, in node order, while fewer than batch pods of the DaemonSet (desired
// in all) are unavailable. Pods on other nodes are never touched. Moving is
// done when no pod on a moved node is old, terminating or unready and the
// DaemonSet has a live pod for every node it wants one on (a deleted pod's
// replacement may not exist yet).
func replacePods(pods []podState, moved map[string]bool, batch, desired int) podReplacement {
	var out podReplacement
	available, live := 0, 0
	var stale []podState
	for _, p := range pods {
		if !p.terminating {
			live++
			if p.ready {
				available++
			}
		}
		if !moved[p.node] {
			continue
		}
		out.total++
		switch {
		case p.terminating:
			out.waiting = append(out.waiting, p.node+": replacing")
		case !p.current:
			stale = append(stale, p)
			out.waiting = append(out.waiting, p.node+": still on the old template")
		case !p.ready:
			out.waiting = append(out.waiting, p.node+": not ready")
		default:
			out.current++
		}
	}
	slices.SortFunc(stale, func(a, b podState) int { return strings.Compare(a.node, b.node) })
	budget := batch - max(desired-available, 0)
	for _, p := range stale[:max(min(budget, len(stale)), 0)] {
		out.delete = append(out.delete, p.name)
	}
	out.done, out.waiting = moveDone(out.waiting, live, desired)
	return out
}

// moveDone says whether a DaemonSet's pods on the moved nodes have moved:
// nothing is waited for there and the DaemonSet has a live pod for every
// node it wants one on (a deleted pod's replacement may not exist yet). It
// returns what is waited for, sorted, naming the missing pods if nothing
// else.
func moveDone(waiting []string, live, desired int) (bool, []string) {
	if len(waiting) == 0 && live >= desired {
		return true, waiting
	}
	if len(waiting) == 0 {
		waiting = append(waiting, fmt.Sprintf("%d of %d pods", live, desired))
	}
	slices.Sort(waiting)
	return false, waiting
}
