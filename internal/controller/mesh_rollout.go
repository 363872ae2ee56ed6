package controller

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// A version change on a running mesh is a canary rollout (ARCHITECTURE.md,
// "How a change flows"):
//
//  1. the new control-plane revision is installed beside the old one
//     (istiod-<to> and istiod-<from>); identity and the CRDs move to the
//     new bundle in place;
//  2. Nodes: the node components move to the new bundle node by node, the
//     canary nodes first, then batches of maxUnavailable (mesh_nodewaves.go);
//  3. Namespaces: namespaces move to the new revision (istio.io/rev) wave by
//     wave: the canary namespaces first, then the cumulative percentages of
//     the rest.
//     Every wave, node or namespace, bakes, then its SLOs are checked every
//     interval: promote, keep baking, hold (inconclusive) or roll back;
//  4. Retire: after the last wave the old revision is retired and the
//     version is recorded as installed and Succeeded in status.history.
//
// A rollback moves every namespace back to the old revision (newest wave
// first), returns the components to the old bundle (the nodes that moved,
// and only those, get their old pods back), removes the new revision and
// records the target as RolledBack; it is not tried again until the spec
// changes. Everything the rollout knows lives in status.rollout, so an
// operator restarted at any point carries on.

// rolloutState is what one reconcile works out about the rollout.
type rolloutState struct {
	from   *bundle.Bundle        // the revision namespaces leave; nil when no rollout runs
	status *meshv1.RolloutStatus // the status.rollout to write; nil when none
	moved  map[string]bool       // namespaces on the new revision
	waveOf map[string]int        // a namespace's wave (from 0): moving back goes newest first
	ended  *meshv1.HistoryEntry  // set when the rollout finished this reconcile
	block  string                // why the target is not rolled out (failed before)
	// deferred says why an automatic upgrade (a new patch or minor the
	// catalog offers) has not started: no maintenance window is open.
	deferred string
	// holdComponents: no wave has started and no maintenance window is open:
	// the new control plane is installed beside the old one, but identity and
	// the node components stay on From until a window opens.
	holdComponents bool
	// nodeWaves: the Nodes step runs; the node components' DaemonSets are
	// OnDelete and meshkeeper replaces their pods wave by wave.
	nodeWaves bool
	// degraded: the analysis has been inconclusive for too long.
	degraded bool
	// rollingBack: the rollback started in this reconcile.
	rollingBack bool
	// restarts: the workloads restarted in this reconcile (Sidecar mode,
	// mesh_sidecar_restarts.go); pending holds a rollback's end.
	restarts *sidecarRestarts
}

// namespaceRevision is the revision a namespace's istio.io/rev points at.
func (o *observation) namespaceRevision(ns string) string {
	if o.rollout.from != nil && !o.rollout.moved[ns] {
		return o.rollout.from.Revision()
	}
	return o.bundle.Revision()
}

// resolveRollout decides, from the spec's target and status, which bundle the
// components follow this reconcile and whether a rollout is running. It runs
// right after the spec is resolved.
func (r *MeshReconciler) resolveRollout(ctx context.Context, mesh *meshv1.Mesh, obs *observation) {
	st := mesh.Status
	installed := st.Version.Installed
	if cur := st.Rollout; cur != nil && cur.From != "" {
		from, errFrom := r.Catalog.Resolve(cur.From)
		to, errTo := r.Catalog.Resolve(cur.To)
		if errFrom == nil && errTo == nil {
			obs.rollout.status = cur.DeepCopy()
			if (cur.Step == meshv1.RolloutStepNodes || cur.Step == meshv1.RolloutStepNamespaces) && obs.target == from.Version {
				// spec.version set back to where the rollout started: abort.
				obs.rollout.status.Step = meshv1.RolloutStepRollingBack
				obs.rollout.status.Message = "spec.version set back to " + from.Version
				r.event(mesh, corev1.EventTypeWarning, "RollingBack", "Rolling %s back to %s: spec.version set back", to.Version, from.Version)
				obs.bundle = from
				return
			}
			switch obs.rollout.status.Step {
			case meshv1.RolloutStepRollingBack:
				// Everything follows From; the new revision is retired.
				obs.bundle = from
				return
			case meshv1.RolloutStepRetire:
				// Every namespace is on To; the old revision keeps running
				// for the grace period, then it is retired.
				obs.bundle = to
				grace := mesh.Spec.Rollout.EffectiveRetireAfter()
				if since := time.Since(cur.WaveStartedAt.Time); cur.WaveStartedAt != nil && since < grace {
					obs.rollout.from = from
					obs.requeueAfter = grace - since
				}
				return
			}
			obs.bundle, obs.rollout.from = to, from
			obs.rollout.holdComponents = r.holdComponents(mesh, cur)
			obs.rollout.nodeWaves = cur.Step == meshv1.RolloutStepNodes && !obs.rollout.holdComponents
			return
		}
		log.FromContext(ctx).Info("Dropping a rollout whose versions left the catalog", "from", cur.From, "to", cur.To)
	}
	if obs.planFailed != "" {
		return // no plan: nothing new starts (reconcileNormal stops here)
	}
	if e := failedTarget(mesh); e != nil && installed != "" {
		if b, err := r.Catalog.Resolve(installed); err == nil {
			obs.bundle = b
			obs.rollout.block = blockMessage(e, installed)
			return
		}
	}
	if installed == "" || installed == obs.target {
		return // a fresh install, or nothing to move: applied in place
	}
	from, err := r.Catalog.Resolve(installed)
	if err != nil {
		log.FromContext(ctx).Info("Installed version is not in the catalog; upgrading in place", "installed", installed)
		return
	}
	if obs.automatic {
		// Nobody asked for this one in the spec: not even the new control
		// plane starts outside a maintenance window.
		if open, next, err := plan.WindowOpen(mesh.Spec.Upgrade.Windows, r.now()); err == nil && !open {
			obs.bundle = from
			obs.rollout.deferred = fmt.Sprintf("%s is available (from %s); the automatic upgrade starts in the next maintenance window (%s)",
				obs.target, obs.targetSource(), next.UTC().Format(time.RFC3339))
			obs.requeueAfter = min(next.Sub(r.now())+time.Second, 5*time.Minute)
			return
		}
	}
	// One minor at a time: the planner's first hop is this rollout's target.
	to := obs.bundle
	if len(obs.hops) > 0 {
		if b, err := r.Catalog.Resolve(obs.hops[0]); err == nil {
			to = b
		}
	}
	obs.bundle, obs.rollout.from = to, from
	now := metav1.Now()
	obs.rollout.status = &meshv1.RolloutStatus{Step: meshv1.RolloutStepNamespaces, From: from.Version, To: to.Version, StartedAt: &now}
	how := "control plane side by side, then namespaces wave by wave"
	if hasNodeComponents(mesh) {
		obs.rollout.status.Step = meshv1.RolloutStepNodes
		how = "control plane side by side, then nodes and namespaces wave by wave"
	}
	obs.rollout.holdComponents = r.holdComponents(mesh, obs.rollout.status)
	obs.rollout.nodeWaves = obs.rollout.status.Step == meshv1.RolloutStepNodes && !obs.rollout.holdComponents
	r.event(mesh, corev1.EventTypeNormal, "RolloutStarted", "Rolling out %s (from %s): %s", to.Version, from.Version, how)
}

// holdComponents says whether identity and the node components stay on From:
// before the first wave of a rollout, outside a maintenance window (only the
// new control plane is installed then). Once the node waves are over, the
// node components have moved and are never held back.
func (r *MeshReconciler) holdComponents(mesh *meshv1.Mesh, ro *meshv1.RolloutStatus) bool {
	first := ro.Step == meshv1.RolloutStepNodes || (ro.Step == meshv1.RolloutStepNamespaces && !hasNodeComponents(mesh))
	return first && ro.Wave == 0 && !r.windowOpen(mesh)
}

// blockMessage says why a rolled-back target is not rolled out again and how
// to go on.
func blockMessage(e *meshv1.HistoryEntry, installed string) string {
	return fmt.Sprintf("%s was rolled back (%s); it is not tried again until the spec changes: change spec.version to retry or to stay on %s",
		e.Version, e.Reason, installed)
}

// windowOpen says whether a maintenance window is open now (no windows:
// always). A bad window counts as closed; admission refuses those.
func (r *MeshReconciler) windowOpen(mesh *meshv1.Mesh) bool {
	open, _, err := plan.WindowOpen(mesh.Spec.Upgrade.Windows, r.now())
	return err == nil && open
}

// failedTarget is the newest history entry when it is a rollback recorded at
// the Mesh's current generation: the spec has not changed since, so nothing
// is rolled out again (of a longer upgrade, neither the failed hop nor the
// ones after it).
func failedTarget(mesh *meshv1.Mesh) *meshv1.HistoryEntry {
	h := mesh.Status.History
	if len(h) == 0 {
		return nil
	}
	e := h[len(h)-1]
	if (e.Outcome == meshv1.OutcomeRolledBack || e.Outcome == meshv1.OutcomeFailed) && e.Generation == mesh.Generation {
		return &e
	}
	return nil
}

// reconcileRollout advances the rollout by at most one wave decision. It
// runs once the components are ready (the new revision serves) and before
// the namespaces are labelled from obs.rollout.moved.
func (r *MeshReconciler) reconcileRollout(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	ro := obs.rollout.status
	if ro == nil {
		return nil
	}
	if ro.Step == meshv1.RolloutStepNodes || ro.Step == meshv1.RolloutStepNamespaces {
		// Both limits in effect, next to the counters they apply to.
		settings := analysis.SettingsFor(mesh.Spec.Analysis)
		ro.FailureLimit, ro.InconclusiveLimit = &settings.FailureLimit, &settings.InconclusiveLimit
	}
	selected, err := r.selectedNamespaces(ctx, mesh, obs)
	if err != nil {
		return err
	}
	waves := plan.NamespaceWaves(selected, mesh.Spec.Rollout.Namespaces)
	movedWaves := 0 // namespace waves on the new revision
	switch ro.Step {
	case meshv1.RolloutStepNamespaces:
		movedWaves = int(ro.Wave)
	case meshv1.RolloutStepRetire:
		movedWaves = len(waves)
	}
	obs.rollout.moved, obs.rollout.waveOf = map[string]bool{}, map[string]int{}
	for i, wave := range waves {
		for _, ns := range wave {
			obs.rollout.waveOf[ns] = i
			if i < movedWaves {
				obs.rollout.moved[ns] = true
			}
		}
	}
	switch ro.Step {
	case meshv1.RolloutStepNodes:
		return r.reconcileNodeWaves(ctx, mesh, obs, waves)
	case meshv1.RolloutStepNamespaces:
	case meshv1.RolloutStepRollingBack:
		return r.rollbackRestarts(ctx, mesh, obs, waves) // then it ends in concludeRollout
	default:
		return nil // Retire ends in concludeRollout
	}
	ro.Waves = int32(len(waves))
	if !obs.componentsReady {
		ro.Message = fmt.Sprintf("installing %s beside %s: waiting for %s", ro.To, ro.From, obs.waitingFor())
		return nil
	}
	if ro.Wave == 0 || ro.WaveStartedAt == nil {
		return r.startWave(mesh, obs, waves, time.Now())
	}
	judged := ro.WaveNamespaces
	if ro.WaveNamespacesOmitted > 0 && int(ro.Wave) <= len(waves) {
		// status keeps only the first maxWaveMembers: judge the whole wave.
		judged = waves[ro.Wave-1]
	}
	// The wave is judged on the pods of the new revision; the baseline is
	// the namespaces still on the old one (none after the last wave).
	if held, err := r.waitForWaveRestarts(ctx, mesh, obs, judged); held || err != nil {
		return err
	}
	scope := waveScope{namespaces: judged, hasBaseline: len(obs.rollout.moved) < len(selected)}
	return r.judgeWave(ctx, mesh, obs, scope, mesh.Spec.Rollout.Namespaces.EffectiveBake(), func(now time.Time) error {
		return r.startWave(mesh, obs, waves, now) // after the last wave: retire
	})
}

// waveScope is what a wave is judged on (analysis.Scope before the
// revisions and the interval are known).
type waveScope struct {
	// namespaces of a namespace wave; of a node wave, every namespace in
	// the mesh (node components carry all of their traffic).
	namespaces []string
	// nodeWave: nodes are the node wave's nodes, otherNodes the rest of
	// the cluster (its baseline).
	nodeWave          bool
	nodes, otherNodes []string
	// hasBaseline: a namespace wave with namespaces still on the old
	// revision.
	hasBaseline bool
}

// analysisScope is the scope of the wave's queries: the new revision and
// the old one (the baseline), the wave's nodes or namespaces.
func (w waveScope) analysisScope(obs *observation, interval time.Duration) analysis.Scope {
	to, from := obs.bundle.Revision(), ""
	if obs.rollout.from != nil {
		from = obs.rollout.from.Revision()
	}
	if w.nodeWave {
		return analysis.NodeWaveScope(w.nodes, w.otherNodes, w.namespaces, to, from, interval)
	}
	return analysis.NamespaceWaveScope(w.namespaces, to, from, w.hasBaseline, interval)
}

// judgeWave judges the current wave (node or namespace) and acts on the
// verdict: roll back, or start what comes after the wave (next). The SLOs
// are evaluated for namespaces once an analysis interval has passed since
// the last check (until then the reconcile is requeued for it), and the
// wave may be promoted once it has baked for bake. Without a Prometheus to
// ask, or no namespace to judge, a wave only bakes.
func (r *MeshReconciler) judgeWave(ctx context.Context, mesh *meshv1.Mesh, obs *observation, scope waveScope,
	bake time.Duration, next func(now time.Time) error) error {
	now := time.Now()
	nodeWave := scope.nodeWave
	d, checked, err := r.checkWave(ctx, mesh, obs, scope, bake, now)
	if err != nil || !checked {
		return err
	}
	ro := obs.rollout.status
	switch d.Action {
	case analysis.ActionRollback:
		return r.startRollback(mesh, obs, d.Reason)
	case analysis.ActionPromote:
		reason, what := "WavePromoted", "Wave"
		if nodeWave {
			reason, what = "NodeWavePromoted", "Node wave"
		}
		r.event(mesh, corev1.EventTypeNormal, reason, "%s %d/%d promoted: %s", what, ro.Wave, ro.Waves, d.Reason)
		return next(now)
	}
	return nil
}

// checkWave runs one check of the current wave when it is time (checked
// false otherwise) and records it in status.rollout.
func (r *MeshReconciler) checkWave(ctx context.Context, mesh *meshv1.Mesh, obs *observation, scope waveScope,
	bake time.Duration, now time.Time) (d analysis.Decision, checked bool, err error) {
	ro := obs.rollout.status
	settings := analysis.SettingsFor(mesh.Spec.Analysis)
	if settings.Address == "" {
		settings.Address = r.PrometheusAddress
	}
	namespaces, nodeWave := scope.namespaces, scope.nodeWave
	if ro.LastCheckAt != nil && now.Sub(ro.LastCheckAt.Time) < settings.Interval {
		obs.requeueAfter = settings.Interval - now.Sub(ro.LastCheckAt.Time)
		return d, false, nil
	}
	bakeElapsed := now.Sub(ro.WaveStartedAt.Time) >= bake
	switch {
	case settings.Address == "" || len(namespaces) == 0:
		d = analysis.Decision{Action: analysis.ActionContinue, Reason: "no SLO gates (spec.analysis.prometheus is not set): baking only"}
		if settings.Address != "" {
			d.Reason = "no namespace is in the mesh, so no traffic to judge: baking only"
		}
		if bakeElapsed {
			d.Action = analysis.ActionPromote
		} else {
			// Look again when the bake is over.
			obs.requeueAfter = max(min(bake-now.Sub(ro.WaveStartedAt.Time), settings.Interval), 100*time.Millisecond)
		}
	default:
		provider, err := r.provider(settings.Address)
		if err != nil {
			return d, false, fmt.Errorf("spec.analysis.prometheus: %w", err)
		}
		results := analysis.EvaluateScope(ctx, provider, settings.SLOs, scope.analysisScope(obs, settings.Interval), now)
		d = analysis.Decide(analysis.State{FailedChecks: ro.FailedChecks, InconclusiveChecks: ro.InconclusiveChecks},
			analysis.Input{Wave: ro.Wave, NodeWave: nodeWave, Results: results, BakeElapsed: bakeElapsed}, settings.Policy())
		r.reportClusterWide(mesh, ro, results)
		ro.Analysis = analysis.AnalysisResults(results)
		ro.FailedChecks, ro.InconclusiveChecks = d.State.FailedChecks, d.State.InconclusiveChecks
		ro.LastCheckAt = &metav1.Time{Time: now}
		obs.requeueAfter = settings.Interval
	}
	obs.rollout.degraded = d.Degraded
	ro.Message = d.Reason
	log.FromContext(ctx).Info("Wave checked", "step", ro.Step, "wave", ro.Wave, "action", d.Action, "reason", d.Reason)
	return d, true, nil
}

// reportClusterWide sends an event when an SLO starts passing on the
// baseline comparison although both sides broke its bounds: a drop across
// the cluster that does not fail the wave, but that someone should see. The
// status says it too (status.rollout.analysis[].message).
func (r *MeshReconciler) reportClusterWide(mesh *meshv1.Mesh, ro *meshv1.RolloutStatus, results []analysis.Result) {
	for _, res := range results {
		if !res.ClusterWide {
			continue
		}
		seen := false
		for _, prev := range ro.Analysis {
			if prev.SLO == res.SLO && strings.Contains(prev.Message, analysis.ClusterWideMarker) {
				seen = true
			}
		}
		if !seen {
			r.event(mesh, corev1.EventTypeWarning, "ClusterWideDegradation", "%s: not held against the wave", res.Message)
		}
	}
}

// windowForWave says whether a wave may start now: inside a maintenance
// window (a wave in flight always finishes). Outside one, the rollout says
// when the next opens and looks again then.
func (r *MeshReconciler) windowForWave(mesh *meshv1.Mesh, obs *observation, wave string, now time.Time) (bool, error) {
	now = r.now()
	open, next, err := plan.WindowOpen(mesh.Spec.Upgrade.Windows, now)
	if err != nil {
		return false, fmt.Errorf("spec.upgrade.windows: %w", err)
	}
	if !open {
		obs.rollout.status.Message = fmt.Sprintf("waiting for a maintenance window to start %s (next opens %s)", wave, next.UTC().Format(time.RFC3339))
		obs.requeueAfter = min(next.Sub(now)+time.Second, time.Minute)
	}
	return open, nil
}

// startWave moves the next wave's namespaces, if a maintenance window is
// open.
func (r *MeshReconciler) startWave(mesh *meshv1.Mesh, obs *observation, waves [][]string, now time.Time) error {
	ro := obs.rollout.status
	if int(ro.Wave) >= len(waves) {
		r.startRetire(mesh, obs, now)
		return nil
	}
	if open, err := r.windowForWave(mesh, obs, fmt.Sprintf("wave %d/%d", ro.Wave+1, len(waves)), now); err != nil || !open {
		return err
	}
	ro.Wave++
	setWaveNamespaces(ro, waves[ro.Wave-1])
	ro.WaveStartedAt, ro.WorkloadsRestartedAt = &metav1.Time{Time: now}, nil
	resetChecks(ro)
	ro.Message = fmt.Sprintf("wave %d/%d moved (%s); baking %s", ro.Wave, len(waves), nameList(waves[ro.Wave-1]),
		mesh.Spec.Rollout.Namespaces.EffectiveBake())
	r.event(mesh, corev1.EventTypeNormal, "WaveStarted", "Wave %d/%d to %s: %s", ro.Wave, len(waves), ro.To, nameList(waves[ro.Wave-1]))
	// Record first, act next: the namespaces move in the next reconcile,
	// from the status this one writes. A status write refused as a conflict
	// then leaves nothing moved that the status does not show.
	obs.requeueAfter = 100 * time.Millisecond
	return nil
}

// startRetire ends the waves: every namespace is on To. The old revision is
// uninstalled once spec.rollout.retireAfter has passed.
func (r *MeshReconciler) startRetire(mesh *meshv1.Mesh, obs *observation, now time.Time) {
	ro := obs.rollout.status
	grace := mesh.Spec.Rollout.EffectiveRetireAfter()
	ro.Step, ro.WaveStartedAt = meshv1.RolloutStepRetire, &metav1.Time{Time: now}
	setWaveNamespaces(ro, nil)
	ro.Message = fmt.Sprintf("every wave passed; %s is retired after %s", ro.From, grace)
	obs.requeueAfter = max(grace, 100*time.Millisecond)
}

// startRollback turns the rollout around: from this reconcile on every
// component and namespace follows From again.
func (r *MeshReconciler) startRollback(mesh *meshv1.Mesh, obs *observation, reason string) error {
	ro := obs.rollout.status
	ro.Step, ro.Message = meshv1.RolloutStepRollingBack, reason
	r.event(mesh, corev1.EventTypeWarning, "RollingBack", "Rolling %s back to %s: %s", ro.To, ro.From, reason)
	// Record first, act next: from the next reconcile on, the namespaces
	// (newest wave first) and the components follow From.
	obs.rollout.rollingBack = true
	obs.requeueAfter = 100 * time.Millisecond
	return nil
}

// concludeRollout ends a rollback or a retirement once the components are
// ready and the releases not wanted any more are gone. It is the last phase.
func (r *MeshReconciler) concludeRollout(_ context.Context, mesh *meshv1.Mesh, obs *observation) error {
	ro := obs.rollout.status
	// A step entered in this reconcile still had the old revision wanted:
	// it concludes in the next one.
	if ro == nil || ro.Step == meshv1.RolloutStepNamespaces || obs.rollout.rollingBack || obs.rollout.from != nil {
		return nil
	}
	if !obs.componentsReady || !obs.retired || !obs.namespacesObserved {
		return nil
	}
	if w := obs.rollout.restarts; w != nil && w.pending {
		return nil // the moved namespaces' workloads are not back yet
	}
	if ro.Step == meshv1.RolloutStepRollingBack {
		r.finishRollout(mesh, obs, meshv1.OutcomeRolledBack, ro.Message)
		return nil
	}
	r.finishRollout(mesh, obs, meshv1.OutcomeSucceeded, "")
	return nil
}

// finishRollout ends the rollout and records it in status.history.
func (r *MeshReconciler) finishRollout(mesh *meshv1.Mesh, obs *observation, outcome meshv1.Outcome, reason string) {
	ro := obs.rollout.status
	now := metav1.Now()
	e := &meshv1.HistoryEntry{Version: ro.To, Mode: mesh.Spec.Dataplane.EffectiveMode(), Outcome: outcome, Reason: reason,
		FinishedAt: &now, Generation: mesh.Generation}
	e.StartedAt = ro.StartedAt
	obs.rollout.ended = e
	obs.rollout.status = nil
	if outcome == meshv1.OutcomeRolledBack {
		obs.rollout.block = blockMessage(e, ro.From)
		r.event(mesh, corev1.EventTypeWarning, "RolledBack", "%s rolled back to %s: %s", ro.To, ro.From, reason)
		return
	}
	r.event(mesh, corev1.EventTypeNormal, "RolloutSucceeded", "%s rolled out to every namespace; %s retired", ro.To, ro.From)
}

// selectedNamespaces are the names of the namespaces the Mesh selects,
// sorted; listed once per reconcile.
func (r *MeshReconciler) selectedNamespaces(ctx context.Context, mesh *meshv1.Mesh, obs *observation) ([]string, error) {
	if obs.selected != nil {
		return obs.selected, nil
	}
	selector, err := selectorOf(mesh)
	if err != nil {
		return nil, fmt.Errorf("spec.namespaces.selector: %w", err)
	}
	var list corev1.NamespaceList
	if err := r.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	var names []string
	for _, ns := range list.Items {
		if ns.DeletionTimestamp == nil && selector.Matches(labels.Set(ns.Labels)) {
			names = append(names, ns.Name)
		}
	}
	slices.Sort(names)
	obs.selected = append([]string{}, names...) // non-nil even when empty
	return obs.selected, nil
}

// provider is the analysis provider for a Prometheus address.
func (r *MeshReconciler) provider(address string) (analysis.Provider, error) {
	if r.NewProvider != nil {
		return r.NewProvider(address)
	}
	return analysis.NewPrometheus(address, analysis.PrometheusOptions{})
}
