package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/plan"
	"github.com/meshkeeper/meshkeeper/internal/restart"
)

// The rollout engine: plan.Next decides, this file gathers the facts,
// records the decision and executes it. It runs the rollouts it owns
// (engineOwns); the others still run on the step machine of
// mesh_rollout.go and mesh_nodewaves.go until they move here too.
//
// One reconcile of an engine rollout:
//
//  1. facts: the selected namespaces and where their labels put them, the
//     restart state of the workloads of the wave in flight, the nodes and
//     whether they run node components, the releases that are ready;
//  2. plan.Next with the memory recorded in status.rollout.engine;
//  3. the new memory is written to status first (its own status patch), so
//     nothing moves that status does not show;
//  4. the decision is executed: the releases it lists (others are removed
//     once everything wanted is ready), the namespace labels it asks for,
//     then the restarts of the wave's workloads, paced by their
//     PodDisruptionBudgets (internal/restart).

// restartBudget is how many workloads of a namespace restart at once.
const restartBudget = 2

// engineObservation is what the engine decided this reconcile.
type engineObservation struct {
	decision plan.Decision
	// releases the components follow; nil: the view mesh's own
	// components at obs.bundle (no rollout runs).
	releases []plan.Release
	// placements are the namespaces' labels wanted; nil: the view mesh's
	// labels at obs.bundle.
	placements map[string]plan.Placement
	// nodeRedirection is, while a rollout runs, the redirection the label
	// of each node the decision moves follows; the other nodes keep theirs
	// (mesh_engine_nodes.go). nil: every node follows the view mesh.
	nodeRedirection map[string]meshv1.Redirection
	// serveBoth: istiod serves sidecars and ambient while namespaces move
	// between the two.
	serveBoth bool
	// dataplane is what runs, for status.dataplane (the rollout's base
	// until it ends).
	dataplane meshv1.DataplaneSpec
	// analysis holds the results of a check made this reconcile.
	analysis []analysis.Result
	checked  bool
}

// engineOwns says whether the engine runs this Mesh's rollout: one it
// recorded, or a change of dataplane at the installed version: a mode
// switch either way, or a redirection switch EBPF ↔ IPTables (nodes move
// wave by wave: mesh_engine_nodes.go).
func engineOwns(mesh *meshv1.Mesh, obs *observation) bool {
	st := &mesh.Status
	if st.Rollout != nil {
		return st.Rollout.Engine != nil
	}
	installed := st.Version.Installed
	if installed == "" || installed != obs.target {
		return false
	}
	have, want := effectiveMode(st.Dataplane.Mode), mesh.Spec.Dataplane
	switch {
	case have != want.EffectiveMode():
		return true
	case have == meshv1.ModeAmbient:
		return want.EffectiveRedirection() != (meshv1.DataplaneSpec{Mode: meshv1.ModeAmbient, Redirection: st.Dataplane.Redirection}).EffectiveRedirection()
	}
	return false
}

func effectiveMode(m meshv1.DataplaneMode) meshv1.DataplaneMode {
	return meshv1.DataplaneSpec{Mode: m}.EffectiveMode()
}

func (r *MeshReconciler) clock() clock.PassiveClock {
	if r.Clock != nil {
		return r.Clock
	}
	return clock.RealClock{}
}

// workloads is the client restarts read and write workloads with: uncached,
// so no informer on every Deployment and PodDisruptionBudget of the cluster.
func (r *MeshReconciler) workloads() client.Client {
	if r.Workloads != nil {
		return r.Workloads
	}
	return r.Client
}

// reconcileEngine runs one reconcile of an engine rollout.
func (r *MeshReconciler) reconcileEngine(ctx context.Context, mesh *meshv1.Mesh, obs *observation) (ctrl.Result, error) {
	mem, err := memoryFromStatus(mesh.Status.Rollout)
	if err != nil {
		// A record meshkeeper cannot read: acting on a guess could move
		// namespaces unjudged. Stop, say so, keep everything as it is.
		obs.planFailed = fmt.Sprintf("status.rollout.engine cannot be read (%v); nothing moves. Remove status.rollout to plan again from what runs", err)
		obs.rollout.status = mesh.Status.Rollout
		obs.rolloutResolved = true
		return ctrl.Result{}, nil
	}
	installed := plan.InstalledFrom(mesh.Status)
	names, err := r.selectedNamespaces(ctx, mesh, obs)
	if err != nil {
		return ctrl.Result{}, err
	}
	nodes, err := r.clusterNodes(ctx, obs)
	if err != nil {
		return ctrl.Result{}, err
	}
	facts, err := r.engineFacts(ctx, mesh, names, nodes, mem, installed)
	if err != nil {
		return ctrl.Result{}, err
	}
	an := &engineAnalyzer{r: r, ctx: ctx, mesh: mesh, eo: &engineObservation{}, names: names}
	observed := mesh.Status.ObservedGeneration
	if h := mesh.Status.History; len(h) > 0 {
		// A rollback is recorded with the generation it ran at.
		observed = max(observed, h[len(h)-1].Generation)
	}
	in := plan.Inputs{
		Spec: mesh.Spec, Generation: mesh.Generation, ObservedGeneration: observed,
		Installed: installed, History: mesh.Status.History, Namespaces: names, Nodes: nodeInfos(nodes),
		Catalog: r.Catalog, Gates: r.engineGates(ctx, mesh),
	}
	d := plan.Next(in, mem, facts, an, r.clock())
	eo := an.eo
	eo.decision = d
	obs.engine = eo
	obs.planned, obs.plan = true, d.Plan
	log.FromContext(ctx).V(1).Info("Engine decided", "verb", d.Verb, "message", d.Message, "namespaces", d.Namespaces, "restart", d.Restart)

	if d.Verb == plan.VerbStall {
		obs.plan = []meshv1.PlanStep{{Action: "Plan", State: meshv1.StepFailed, Message: d.Message}}
		obs.planFailed = d.Message
		obs.rolloutResolved = true
		return ctrl.Result{RequeueAfter: jitter(time.Minute)}, nil
	}

	// What runs after this decision, and the bundle its components follow.
	now := installed
	if d.Installed != nil {
		now = *d.Installed
	}
	b, err := r.Catalog.Resolve(now.Version)
	if err != nil {
		obs.planFailed = fmt.Sprintf("installed version %s is not in the catalog: %v", now.Version, err)
		obs.rolloutResolved = true
		return ctrl.Result{RequeueAfter: jitter(time.Minute)}, nil
	}
	obs.bundle = b
	eo.dataplane = meshv1.DataplaneSpec{Mode: effectiveMode(now.Mode), Redirection: now.Redirection}
	if eo.dataplane.Mode == meshv1.ModeAmbient && eo.dataplane.Redirection == "" {
		eo.dataplane.Redirection = meshv1.RedirectionEBPF
	}
	view := mesh.DeepCopy()
	view.Spec.Dataplane.Mode = eo.dataplane.Mode
	view.Spec.Dataplane.Redirection = eo.dataplane.Redirection
	if eo.dataplane.Mode == meshv1.ModeSidecar {
		view.Spec.Dataplane.Redirection = ""
	}

	prev := mesh.Status.Rollout
	ro := r.engineRolloutStatus(mesh, d, prev, eo)
	obs.rollout.status, obs.rolloutResolved = ro, true
	obs.rollout.ended = d.Ended
	obs.rollout.degraded = d.Degraded
	if d.Memory != nil {
		eo.releases = d.Releases
		eo.placements = placementsOf(facts, d)
		eo.nodeRedirection = nodeRedirections(d)
		eo.serveBoth = true
		if !equality.Semantic.DeepEqual(ro, prev) {
			// Record first, act next.
			if err := r.recordRollout(ctx, mesh, obs, ro); err != nil {
				return ctrl.Result{}, err
			}
		}
	}
	switch {
	case d.Memory == nil && d.Ended == nil && mem == nil:
		// No rollout runs: blocked, paused or outside a window. What runs
		// stays as it is.
		if mesh.Spec.Paused {
			obs.paused = true
		}
		if last := failedTarget(mesh); last != nil {
			obs.rollout.block = blockedSwitch(last, installed)
		} else if !mesh.Spec.Paused && d.Requeue > 0 {
			obs.rollout.deferred = d.Message
			obs.requeueAfter = d.Requeue
		}
	case d.Ended != nil && d.Ended.Outcome != meshv1.OutcomeSucceeded:
		obs.rollout.block = blockedSwitch(d.Ended, now)
	}
	r.engineEvents(mesh, mem, d)

	if d.Memory != nil {
		// Look again when the decision says (a bake, the next check, a
		// window); while a wave moves, soon: the restarted workloads'
		// rollouts are not watched.
		obs.requeueAfter = d.Requeue
		if d.Verb == plan.VerbApply && (obs.requeueAfter == 0 || obs.requeueAfter > 2*time.Second) {
			obs.requeueAfter = 2 * time.Second
		}
	}
	return r.runPhases(ctx, view, obs, []phase{
		{"nodes", r.reconcileNodes},
		{"gateway-api", r.reconcileGatewayAPI},
		{"components", r.reconcileComponents},
		{"identity", r.reconcileIdentity},
		{"mtls-relax", r.relaxMTLS},
		{"namespaces", r.reconcileNamespaces},
		{"restarts", r.engineRestarts},
		{"waypoints", r.reconcileWaypoints},
		{"retire", r.retireComponents},
		{"mtls", r.reconcileMTLS},
	})
}

// blockedSwitch says why a rolled-back switch is not tried again.
func blockedSwitch(e *meshv1.HistoryEntry, runs plan.Installed) string {
	return fmt.Sprintf("the switch to %s at %s was rolled back (%s); it is not tried again until the spec changes: change the spec to retry, or set spec.dataplane.mode back to %s",
		e.Mode, e.Version, e.Reason, effectiveMode(runs.Mode))
}

// engineFacts observes what the decision depends on.
func (r *MeshReconciler) engineFacts(ctx context.Context, mesh *meshv1.Mesh, names []string, nodes []corev1.Node,
	mem *plan.Memory, installed plan.Installed) (plan.Facts, error) {
	var facts plan.Facts
	releases, err := r.Helm.List(ctx)
	if err != nil {
		return facts, fmt.Errorf("list releases: %w", err)
	}
	// A release counts as there while it exists (one being removed is
	// still there), as ready when the last status said so.
	status := map[string]meshv1.ComponentStatus{}
	for _, c := range mesh.Status.Components {
		status[c.Release] = c
	}
	nodeAt := plan.NodePlacement{}
	for _, rel := range releases {
		c, version := releaseComponent(rel.Name), installed.Version
		st, known := status[rel.Name]
		if known {
			version = st.Version
		}
		if c == bundle.Ztunnel {
			// Node components run on every node while their release exists
			// (one DaemonSet per component).
			nodeAt = plan.NodePlacement{Version: version,
				Redirection: meshv1.DataplaneSpec{Mode: meshv1.ModeAmbient, Redirection: installed.Redirection}.EffectiveRedirection()}
		}
		if !known || st.Ready {
			facts.Ready = append(facts.Ready, plan.Release{Component: c, Version: version})
		}
	}
	nf, err := r.nodeFacts(ctx, mesh, nodes, nodeAt, installed)
	if err != nil {
		return facts, err
	}
	facts.Nodes = nf
	var list corev1.NamespaceList
	if err := r.List(ctx, &list); err != nil {
		return facts, fmt.Errorf("list namespaces: %w", err)
	}
	byName := map[string]*corev1.Namespace{}
	for i := range list.Items {
		byName[list.Items[i].Name] = &list.Items[i]
	}
	for _, name := range names {
		ns := byName[name]
		if ns == nil || foreignDataplane(ns) {
			// Another manager's dataplane label: meshkeeper does not move
			// it (reconcileNamespaces reports the conflict).
			continue
		}
		f := plan.NamespaceFact{Name: name, At: placementOf(ns)}
		if mem != nil && mem.Restart != "" && (mem.Phase == plan.PhaseRollingBack || mem.NamespaceWave[name] == mem.Wave) {
			done, waiting, err := r.observeRestart(ctx, name, mem.Restart)
			if err != nil {
				return facts, fmt.Errorf("observe the restart of namespace %s: %w", name, err)
			}
			if done {
				f.RolledOut = mem.Restart
			}
			f.Waiting = waiting
		}
		facts.Namespaces = append(facts.Namespaces, f)
	}
	return facts, nil
}

// observeRestart is restart.Observe, remembered once true: a namespace seen
// rolled out with a token is not read again for it. A wave's move is
// complete once (the engine never asks again after), and each Observe is
// four uncached LISTs, every reconcile of a wave in flight, for every
// namespace of the wave.
func (r *MeshReconciler) observeRestart(ctx context.Context, ns, token string) (bool, string, error) {
	if rolledOut.seen(ns, token) {
		return true, "", nil
	}
	done, waiting, err := restart.Observe(ctx, r.workloads(), ns, token)
	if err == nil && done {
		rolledOut.record(ns, token)
	}
	return done, waiting, err
}

// rolledOut is, per namespace, the last restart token its workloads were
// seen rolled out with (one Mesh per cluster; the reconciler is copied per
// reconcile, so it lives here, like scrapeIntervals). One entry per
// namespace: a new token replaces the old one.
var rolledOut = &rolledOutCache{}

type rolledOutCache struct {
	mu     sync.Mutex
	tokens map[string]string
}

func (c *rolledOutCache) seen(ns, token string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return token != "" && c.tokens[ns] == token
}

func (c *rolledOutCache) record(ns, token string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tokens == nil {
		c.tokens = map[string]string{}
	}
	c.tokens[ns] = token
}

// releaseComponent is the component a release runs (istiod-1-28-2: istiod).
func releaseComponent(name string) bundle.Component {
	if strings.HasPrefix(name, string(bundle.Istiod)+"-") {
		return bundle.Istiod
	}
	return bundle.Component(name)
}

// foreignDataplane says whether a namespace carries a dataplane label
// meshkeeper does not own (set by its owner or another Istio install).
func foreignDataplane(ns *corev1.Namespace) bool {
	owned := ownedLabelKeys(ns)
	for _, k := range []string{meshv1.LabelDataplaneMode, meshv1.LabelRevision} {
		if _, set := ns.Labels[k]; set && !owned[k] {
			return true
		}
	}
	return false
}

// placementOf is where the labels meshkeeper owns put a namespace.
func placementOf(ns *corev1.Namespace) plan.Placement {
	owned := ownedLabelKeys(ns)
	if !owned[meshv1.LabelRevision] {
		return plan.Placement{}
	}
	p := plan.Placement{Revision: ns.Labels[meshv1.LabelRevision], Mode: meshv1.ModeSidecar}
	if owned[meshv1.LabelDataplaneMode] && ns.Labels[meshv1.LabelDataplaneMode] == "ambient" {
		p.Mode = meshv1.ModeAmbient
	}
	return p
}

// placementLabels are the labels that put a namespace at p.
func placementLabels(p plan.Placement) map[string]string {
	if p.Revision == "" {
		return nil
	}
	if p.Mode == meshv1.ModeSidecar {
		return map[string]string{meshv1.LabelRevision: p.Revision}
	}
	return map[string]string{meshv1.LabelDataplaneMode: "ambient", meshv1.LabelRevision: p.Revision}
}

// placementsOf is where every selected namespace must be after d: where the
// decision moves it, else where it is.
func placementsOf(facts plan.Facts, d plan.Decision) map[string]plan.Placement {
	out := make(map[string]plan.Placement, len(facts.Namespaces))
	for _, ns := range facts.Namespaces {
		out[ns.Name] = ns.At
		if p, ok := d.Namespaces[ns.Name]; ok {
			out[ns.Name] = p
		}
	}
	return out
}

// engineRestarts restarts the workloads of the namespaces the decision
// names, once their labels are in place (a pod created before the label
// would come back with the old dataplane).
func (r *MeshReconciler) engineRestarts(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	eo := obs.engine
	if eo == nil || len(eo.decision.Restart) == 0 || !obs.namespacesObserved {
		return nil
	}
	return r.restartLabelled(ctx, mesh, eo.decision.Restart, eo.decision.RestartToken, "Restarted for their new dataplane", func(ns *corev1.Namespace) bool {
		p, ok := eo.placements[ns.Name]
		return ok && placementOf(ns) == p
	})
}

// restartLabelled restarts the workloads of each namespace (restart.Restart
// with token, paced by PDBs) whose labels are in place (inPlace: a pod
// recreated before its namespace is relabelled would start on the old
// dataplane), and records one WorkloadsRestarted event ("<what>: ...")
// for those it started. Namespaces not relabelled yet (a conflict, or the
// cache is behind) and namespaces gone are passed over.
func (r *MeshReconciler) restartLabelled(ctx context.Context, mesh *meshv1.Mesh, namespaces []string, token, what string, inPlace func(*corev1.Namespace) bool) error {
	var errs []error
	var started []string
	for _, ns := range namespaces {
		var cur corev1.Namespace
		if err := r.Get(ctx, client.ObjectKey{Name: ns}, &cur); err != nil {
			errs = append(errs, client.IgnoreNotFound(err))
			continue
		}
		if !inPlace(&cur) {
			continue
		}
		res, err := restart.Restart(ctx, r.workloads(), ns, token, restartBudget)
		if err != nil {
			errs = append(errs, fmt.Errorf("restart workloads of namespace %s: %w", ns, err))
			continue
		}
		if len(res.Restarted) > 0 {
			started = append(started, fmt.Sprintf("%s (%s)", ns, someOf(res.Restarted, ", ")))
		}
	}
	if len(started) > 0 {
		r.event(mesh, corev1.EventTypeNormal, "WorkloadsRestarted", "%s: %s", what, someOf(started, "; "))
	}
	return errors.Join(errs...)
}

// engineEvents tells what the decision changed: a rollout or wave started,
// a wave promoted, a rollback, the end.
func (r *MeshReconciler) engineEvents(mesh *meshv1.Mesh, before *plan.Memory, d plan.Decision) {
	after := d.Memory
	switch {
	case before == nil && after != nil:
		r.event(mesh, corev1.EventTypeNormal, "RolloutStarted", "%s", d.Message)
	case after == nil && d.Ended != nil:
		if d.Ended.Outcome == meshv1.OutcomeSucceeded {
			r.event(mesh, corev1.EventTypeNormal, "RolloutSucceeded", "%s", d.Message)
		} else {
			r.event(mesh, corev1.EventTypeWarning, "RolledBack", "%s", d.Message)
		}
		return
	}
	if after == nil {
		return
	}
	if after.Phase == plan.PhaseRollingBack && (before == nil || before.Phase != plan.PhaseRollingBack) {
		r.event(mesh, corev1.EventTypeWarning, "RollingBack", "Rolling back: %s", after.Reason)
		return
	}
	if before != nil && before.Phase == plan.PhaseBaking && (before.Wave != after.Wave || before.Step != after.Step) && before.Wave > 0 {
		r.event(mesh, corev1.EventTypeNormal, "WavePromoted", "Wave %d of step %d promoted", before.Wave, before.Step+1)
	}
	if after.Wave > 0 && (before == nil || before.Wave != after.Wave || before.Step != after.Step) {
		r.event(mesh, corev1.EventTypeNormal, "WaveStarted", "%s", d.Message)
	}
}

// engineRolloutStatus is status.rollout for an engine decision: the
// memory, and the step fields `kubectl get mesh` shows.
func (r *MeshReconciler) engineRolloutStatus(mesh *meshv1.Mesh, d plan.Decision, prev *meshv1.RolloutStatus, eo *engineObservation) *meshv1.RolloutStatus {
	m := d.Memory
	if m == nil {
		return nil
	}
	ro := &meshv1.RolloutStatus{From: m.Base.Version, To: m.Target, StartedAt: timeRef(metav1.NewTime(m.StartedAt)),
		Message: d.Message, FailedChecks: m.FailedChecks, InconclusiveChecks: m.InconclusiveChecks, Engine: memoryToStatus(m)}
	s := m.Steps[m.Step]
	ro.Step = string(s.Action)
	switch {
	case m.Phase == plan.PhaseRollingBack:
		ro.Step = meshv1.RolloutStepRollingBack
	case s.Action == plan.ActionMoveNamespaces:
		ro.Step = meshv1.RolloutStepNamespaces
	}
	if m.Wave > 0 {
		// A namespace step's wave lists namespaces, a node step's nodes.
		waveOf, waves, set := m.NamespaceWave, m.NamespaceWaves, setWaveNamespaces
		if s.Action != plan.ActionMoveNamespaces {
			waveOf, waves, set = m.NodeWave, m.NodeWaves, setWaveNodes
		}
		ro.Wave, ro.Waves = int32(m.Wave), int32(waves)
		var members []string
		for n, w := range waveOf {
			if w == m.Wave {
				members = append(members, n)
			}
		}
		slices.Sort(members)
		set(ro, members)
		ro.WaveStartedAt = timeRef(metav1.NewTime(m.PhaseAt))
	}
	settings := analysis.SettingsFor(mesh.Spec.Analysis)
	ro.FailureLimit, ro.InconclusiveLimit = &settings.FailureLimit, &settings.InconclusiveLimit
	if prev != nil {
		ro.Analysis, ro.LastCheckAt = prev.Analysis, prev.LastCheckAt
	}
	if eo.checked {
		ro.Analysis = analysis.AnalysisResults(eo.analysis)
		ro.LastCheckAt = timeRef(metav1.NewTime(r.clock().Now()))
	}
	return ro
}

// recordRollout writes status.rollout on its own, before the decision is
// executed, and moves the reconcile's base on so its final status patch
// carries on from it.
func (r *MeshReconciler) recordRollout(ctx context.Context, mesh *meshv1.Mesh, obs *observation, ro *meshv1.RolloutStatus) error {
	if obs.base == nil {
		return errors.New("record rollout: the reconcile has no base object")
	}
	patched := obs.base.DeepCopy()
	patched.Status.Rollout = ro.DeepCopy()
	if obs.base.Status.Rollout == nil {
		// A rollout starts: Ready says so in the same write, not only in
		// the reconcile's last one.
		msg := "Rolling out: " + ro.Message
		for _, t := range []string{meshv1.ConditionReady, meshv1.ConditionReconciling} {
			status := metav1.ConditionFalse
			if t == meshv1.ConditionReconciling {
				status = metav1.ConditionTrue
			}
			meta.SetStatusCondition(&patched.Status.Conditions, metav1.Condition{Type: t, Status: status,
				Reason: meshv1.ReasonRollingOut, Message: msg, ObservedGeneration: mesh.Generation})
		}
	}
	if err := r.Status().Patch(ctx, patched, client.MergeFromWithOptions(obs.base, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("record the rollout's decision: %w", err)
	}
	obs.base.Status.Rollout = ro.DeepCopy()
	// base keeps its conditions: the reconcile's last patch writes them in
	// full, and the Ready transition is told from them (an event).
	obs.base.ResourceVersion = patched.ResourceVersion
	mesh.ResourceVersion = patched.ResourceVersion
	return nil
}

// engineGates are the SLO gates in effect: on when a Prometheus is known
// and SLOs are set, with that Prometheus' own scrape interval.
func (r *MeshReconciler) engineGates(ctx context.Context, mesh *meshv1.Mesh) plan.Gates {
	settings := analysis.SettingsFor(mesh.Spec.Analysis)
	if settings.Address == "" {
		settings.Address = r.PrometheusAddress
	}
	on := settings.Address != "" && len(settings.SLOs) > 0
	g := plan.GatesFor(mesh.Spec.Analysis, on, settings.SLOs)
	if on {
		if si := r.scrapeInterval(ctx, settings.Address); si > 0 {
			g.ScrapeInterval = si
		}
	}
	return g
}

// scrapeIntervals caches each Prometheus' scrape interval for
// scrapeIntervalTTL: it changes only with its configuration.
var scrapeIntervals = struct {
	sync.Mutex
	byAddress map[string]scrapeIntervalEntry
}{byAddress: map[string]scrapeIntervalEntry{}}

type scrapeIntervalEntry struct {
	d  time.Duration
	at time.Time
}

const scrapeIntervalTTL = 5 * time.Minute

// scrapeInterval is the global scrape interval of the Prometheus at
// address, 0 when it cannot be read (plan.DefaultScrapeInterval is used).
func (r *MeshReconciler) scrapeInterval(ctx context.Context, address string) time.Duration {
	scrapeIntervals.Lock()
	e, ok := scrapeIntervals.byAddress[address]
	scrapeIntervals.Unlock()
	if ok && time.Since(e.at) < scrapeIntervalTTL {
		return e.d
	}
	d := r.readScrapeInterval(ctx, address)
	scrapeIntervals.Lock()
	scrapeIntervals.byAddress[address] = scrapeIntervalEntry{d: d, at: time.Now()}
	scrapeIntervals.Unlock()
	return d
}

func (r *MeshReconciler) readScrapeInterval(ctx context.Context, address string) time.Duration {
	p, err := r.provider(address)
	if err != nil {
		return 0
	}
	si, ok := p.(interface {
		ScrapeInterval(context.Context) (time.Duration, error)
	})
	if !ok {
		return 0
	}
	d, err := si.ScrapeInterval(ctx)
	if err != nil {
		log.FromContext(ctx).V(1).Info("Scrape interval unknown; assuming Prometheus' default", "error", err.Error())
		return 0
	}
	return d
}

// engineAnalyzer runs a wave's SLO checks for plan.Next.
type engineAnalyzer struct {
	r    *MeshReconciler
	ctx  context.Context
	mesh *meshv1.Mesh
	eo   *engineObservation
	// names are the selected namespaces (a node wave judges them all).
	names []string
}

func (a *engineAnalyzer) Check(s plan.CheckScope, at time.Time) plan.Verdict {
	settings := analysis.SettingsFor(a.mesh.Spec.Analysis)
	if settings.Address == "" {
		settings.Address = a.r.PrometheusAddress
	}
	p, err := a.r.provider(settings.Address)
	if err != nil {
		return plan.Verdict{Reason: "spec.analysis.prometheus: " + err.Error()}
	}
	var scope analysis.Scope
	if len(s.Nodes) > 0 {
		scope = analysis.NodeWaveScope(s.Nodes, s.OtherNodes, a.names, s.Revision, s.Baseline, settings.Interval)
	} else {
		scope = analysis.NamespaceWaveScope(s.Namespaces, s.Revision, s.Baseline, s.Baseline != "", settings.Interval)
	}
	results := analysis.EvaluateScope(a.ctx, p, settings.SLOs, scope, at)
	a.eo.analysis, a.eo.checked = results, true
	var failed, inconclusive []string
	for _, res := range results {
		switch res.Verdict {
		case meshv1.VerdictFail:
			failed = append(failed, res.Message)
		case meshv1.VerdictPass:
		default:
			inconclusive = append(inconclusive, res.Message)
		}
	}
	switch {
	case len(failed) > 0:
		return plan.Verdict{Result: meshv1.VerdictFail, Reason: strings.Join(failed, "; ")}
	case len(inconclusive) > 0 || len(results) == 0:
		return plan.Verdict{Result: meshv1.VerdictInconclusive, Reason: strings.Join(inconclusive, "; ")}
	}
	return plan.Verdict{Result: meshv1.VerdictPass}
}

// memoryFromStatus reads the engine's memory back from status.rollout.
func memoryFromStatus(ro *meshv1.RolloutStatus) (*plan.Memory, error) {
	if ro == nil || ro.Engine == nil {
		return nil, nil
	}
	e := ro.Engine
	if len(e.Steps) == 0 || int(e.Step) < 0 || int(e.Step) >= len(e.Steps) {
		return nil, fmt.Errorf("step %d of %d steps", e.Step, len(e.Steps))
	}
	m := &plan.Memory{
		Base: installedFromStatus(e.Base), Want: installedFromStatus(e.Want), Target: e.Target, SpecVersion: e.SpecVersion,
		Step: int(e.Step), Wave: int(e.Wave), Phase: plan.Phase(e.Phase),
		StartedAt: e.StartedAt.Time, PhaseAt: e.PhaseAt.Time,
		FailedChecks: e.FailedChecks, InconclusiveChecks: e.InconclusiveChecks, Degraded: e.Degraded,
		Reason: e.Reason, Restart: e.Restart,
		NamespaceWave: map[string]int{}, NodeWave: map[string]int{},
		NamespaceWaves: len(e.NamespaceWaves), NodeWaves: len(e.NodeWaves),
	}
	if e.NextCheckAt != nil {
		m.NextCheckAt = e.NextCheckAt.Time
	}
	if e.PausedAt != nil {
		m.PausedAt = e.PausedAt.Time
	}
	for _, s := range e.Steps {
		st := plan.Step{Action: plan.Action(s.Action), Target: s.Target, Version: s.Version, From: s.From, Revision: s.Revision,
			Windowed: s.Windowed, Message: s.Message}
		for _, c := range s.Components {
			st.Components = append(st.Components, bundle.Component(c))
		}
		m.Steps = append(m.Steps, st)
	}
	for i, w := range e.NamespaceWaves {
		for _, n := range w.Names {
			m.NamespaceWave[n] = i + 1
		}
	}
	for i, w := range e.NodeWaves {
		for _, n := range w.Names {
			m.NodeWave[n] = i + 1
		}
	}
	for _, n := range e.JoinedNodes {
		if m.Joined == nil {
			m.Joined = map[string]bool{}
		}
		m.Joined[n] = true
	}
	return m, nil
}

// memoryToStatus is the memory as status.rollout.engine holds it.
func memoryToStatus(m *plan.Memory) *meshv1.EngineMemory {
	e := &meshv1.EngineMemory{
		Base: installedToStatus(m.Base), Want: installedToStatus(m.Want), Target: m.Target, SpecVersion: m.SpecVersion,
		Step: int32(m.Step), Wave: int32(m.Wave), Phase: string(m.Phase),
		StartedAt: metav1.NewTime(m.StartedAt), PhaseAt: metav1.NewMicroTime(m.PhaseAt),
		FailedChecks: m.FailedChecks, InconclusiveChecks: m.InconclusiveChecks, Degraded: m.Degraded,
		Reason: m.Reason, Restart: m.Restart,
		NamespaceWaves: wavesToStatus(m.NamespaceWave, m.NamespaceWaves),
		NodeWaves:      wavesToStatus(m.NodeWave, m.NodeWaves),
	}
	if !m.NextCheckAt.IsZero() {
		e.NextCheckAt = microRef(metav1.NewMicroTime(m.NextCheckAt))
	}
	if !m.PausedAt.IsZero() {
		e.PausedAt = microRef(metav1.NewMicroTime(m.PausedAt))
	}
	for _, s := range m.Steps {
		st := meshv1.EngineStep{Action: string(s.Action), Target: s.Target, Version: s.Version, From: s.From, Revision: s.Revision,
			Windowed: s.Windowed, Message: s.Message}
		for _, c := range s.Components {
			st.Components = append(st.Components, string(c))
		}
		e.Steps = append(e.Steps, st)
	}
	for n, ok := range m.Joined {
		if ok {
			e.JoinedNodes = append(e.JoinedNodes, n)
		}
	}
	slices.Sort(e.JoinedNodes)
	return e
}

func wavesToStatus(waveOf map[string]int, waves int) []meshv1.EngineWave {
	if waves == 0 {
		return nil
	}
	out := make([]meshv1.EngineWave, waves)
	for n, w := range waveOf {
		if w >= 1 && w <= waves {
			out[w-1].Names = append(out[w-1].Names, n)
		}
	}
	for i := range out {
		slices.Sort(out[i].Names)
	}
	return out
}

func installedFromStatus(e meshv1.EngineInstalled) plan.Installed {
	return plan.Installed{Version: e.Version, Mode: e.Mode, Redirection: e.Redirection, Identity: e.Identity}
}

func installedToStatus(in plan.Installed) meshv1.EngineInstalled {
	return meshv1.EngineInstalled{Version: in.Version, Mode: in.Mode, Redirection: in.Redirection, Identity: in.Identity}
}

func timeRef(t metav1.Time) *metav1.Time            { return &t }
func microRef(t metav1.MicroTime) *metav1.MicroTime { return &t }
