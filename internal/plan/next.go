package plan

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// Next is the rollout engine's one decider. Compute says which steps a change
// takes; Next says what to do about them now. It is pure: the controller
// gathers the facts (what runs, which namespaces and nodes exist and where
// they are, which releases are ready), calls Next with the Memory it recorded
// last time, records the returned Memory first and then executes the
// Decision. Nothing else decides.
//
// How a rollout runs, in one place:
//
//   - It starts from a plan (Compute) and freezes it in Memory: the steps,
//     and which wave every namespace and node belongs to. Waves are never
//     recomputed. A namespace or node that appears during the rollout joins
//     the last wave when that wave has not started, and otherwise a wave of
//     its own after the last one, moved and judged like the others; until it
//     moves it stays where the rollout started (the known configuration).
//     One that disappears is dropped; nothing else moves because of it.
//   - A wave is Moving from when it was told to move until the move is seen
//     complete: every namespace labelled (and, for a mode switch, its
//     workloads restarted and rolled out), every node's pods replaced and
//     ready. Only then does it start Baking: the bake, and with SLO gates
//     the first check waits bake + the queries' range window + one scrape
//     interval, so the first check only sees traffic from after the move.
//   - A wave that has not moved within spec.rollout.progressDeadline is
//     rolled back, and the reason names what it waited for.
//   - A failed check beyond failureLimit rolls back; inconclusive checks
//     (Prometheus down counts) never promote and beyond inconclusiveLimit
//     mark the rollout Degraded.
//   - A rollback returns the current hop (or the reconfiguration) to where
//     it started: namespaces to their old revision and mode (restarting
//     their workloads when the mode changes back), nodes to their old pods,
//     releases to the old bundle. Nothing moves back otherwise.
//   - spec.paused and a closed maintenance window stop the next wave or
//     step from starting; a wave in flight finishes (a rollback always
//     runs). The progress deadline does not fire while paused.
//   - A change of target while a rollout runs rolls the current hop back;
//     the new plan starts from what then runs.
func Next(in Inputs, mem *Memory, facts Facts, an Analyzer, clk clock.PassiveClock) Decision {
	e := engine{in: &in, facts: &facts, an: an, now: clk.Now()}
	in.Now = e.now
	if mem == nil {
		return e.start()
	}
	e.mem = mem.clone()
	return e.run()
}

// Analyzer runs the SLO checks of a wave. Next calls it only when a check is
// due; the controller's implementation queries Prometheus.
type Analyzer interface {
	Check(s CheckScope, at time.Time) Verdict
}

// CheckScope is what one check judges.
type CheckScope struct {
	Step Action
	// Wave is the wave, from 1.
	Wave int
	// Namespaces of a namespace wave; Nodes and OtherNodes of a node wave.
	Namespaces, Nodes, OtherNodes []string
	// Revision is the revision the wave moved to, Baseline the one it left.
	Revision, Baseline string
}

// Verdict is the result of one check. Result "" means no answer
// (Prometheus down, no data): it counts as inconclusive.
type Verdict struct {
	Result meshv1.Verdict
	Reason string
}

// Gates are the SLO gate settings in effect (from spec.analysis).
type Gates struct {
	// On: SLO gates are set; without them waves only bake.
	On bool
	// Interval between checks.
	Interval time.Duration
	// FailureLimit, InconclusiveLimit as in analysis.Policy.
	FailureLimit, InconclusiveLimit int32
	// QueryWindow is the longest range window of the SLO queries (QueryWindow).
	QueryWindow time.Duration
	// ScrapeInterval of the Prometheus the SLOs read (DefaultScrapeInterval
	// when zero).
	ScrapeInterval time.Duration
}

// DefaultScrapeInterval is Prometheus' default global scrape interval.
const DefaultScrapeInterval = time.Minute

// Placement is where a namespace is: the revision its istio.io/rev label
// points at and its dataplane mode. The zero Placement is "not in the mesh".
type Placement struct {
	Revision string
	Mode     meshv1.DataplaneMode
}

func (p Placement) String() string {
	if p.Revision == "" {
		return "not enrolled"
	}
	return p.Revision + " " + string(p.Mode)
}

// NodePlacement is what a node runs: the version and redirection of its node
// components' pods, ready. The zero NodePlacement is "no node components".
type NodePlacement struct {
	Version     string
	Redirection meshv1.Redirection
}

func (p NodePlacement) String() string {
	if p.Version == "" {
		return "no node components"
	}
	return p.Version + " " + string(p.Redirection)
}

// Release is one Helm release at one bundle version, e.g. istiod 1.28.2.
type Release struct {
	Component bundle.Component
	Version   string
}

func (r Release) String() string { return string(r.Component) + " " + r.Version }

// Facts are what the controller observed this reconcile.
type Facts struct {
	// Namespaces the spec selects now, with where they are.
	Namespaces []NamespaceFact
	// Nodes of the cluster, with what they run.
	Nodes []NodeFact
	// Ready are the releases installed and ready.
	Ready []Release
}

// NamespaceFact is one selected namespace as observed.
type NamespaceFact struct {
	Name string
	At   Placement
	// RolledOut is the restart token (Decision.Restart) every workload of
	// the namespace has rolled out with and is ready at; "" none.
	RolledOut string
	// Waiting names what is not ready, for the deadline message
	// (e.g. "deployment/cart 1/3 ready").
	Waiting string
}

// NodeFact is one node as observed.
type NodeFact struct {
	Name   string
	Labels map[string]string
	// At is what its node pods run, ready.
	At NodePlacement
	// FixedRedirection: the node redirects the same way whatever the mesh
	// asks (it cannot run eBPF and falls back to iptables), so only its
	// version moves; a redirection switch leaves it as it is.
	FixedRedirection bool
	// Waiting names what is not ready (e.g. "ztunnel-x7k2p CrashLoopBackOff", "node NotReady").
	Waiting string
}

// isAt is whether the node runs p (its redirection aside when it is fixed).
func (n NodeFact) isAt(p NodePlacement) bool {
	if n.FixedRedirection && p.Version != "" {
		return n.At.Version == p.Version
	}
	return n.At == p
}

// Phase is where the current wave or step is.
type Phase string

const (
	// PhaseMoving: told to move, not seen moved yet.
	PhaseMoving Phase = "Moving"
	// PhaseBaking: seen moved; baking and, with gates, checked.
	PhaseBaking Phase = "Baking"
	// PhaseRollingBack: the current hop returns to where it started.
	PhaseRollingBack Phase = "RollingBack"
	// PhaseHeld: the current step (not a wave step) waits to start: paused
	// or outside a maintenance window. Nothing of it is applied.
	PhaseHeld Phase = "Held"
)

// Memory is what the rollout remembers between reconciles: the controller
// records it (status.rollout, and the wave of every namespace and node) and
// passes it back. Next never reads anything else about the past.
type Memory struct {
	// Base is what ran when the rollout started.
	Base Installed
	// Target is the final version of the frozen plan and Want the
	// configuration it ends in; SpecVersion is spec.version then. A spec
	// asking for something else rolls back.
	Target, SpecVersion string
	Want                Installed
	// Steps are the frozen plan, without their wave lists (see Waves).
	Steps []Step
	// Step is the index of the current step.
	Step int
	// NamespaceWave and NodeWave are the wave (from 1) of every namespace and
	// node, frozen at start; newcomers are added as they are seen.
	NamespaceWave map[string]int
	NodeWave      map[string]int
	// Joined are the nodes that joined after the start. A DaemonSet has one
	// template: a node that joins once a node step has begun runs the new
	// node components straight away (it had none to move from), and is
	// judged with the wave it joined.
	Joined map[string]bool
	// NamespaceWaves and NodeWaves are how many waves there are.
	NamespaceWaves, NodeWaves int
	// Wave is the current wave of a wave step (from 1); 0 before the first.
	Wave  int
	Phase Phase
	// StartedAt is when the rollout started; PhaseAt when the current wave
	// or step entered its Phase (Moving: the deadline counts from it;
	// Baking: the bake counts from it).
	StartedAt, PhaseAt time.Time
	// NextCheckAt is when the next SLO check is due (gates on).
	NextCheckAt                      time.Time
	FailedChecks, InconclusiveChecks int32
	Degraded                         bool
	// Reason says why the rollout rolls back.
	Reason string
	// Restart is the restart token of the current wave's workloads.
	Restart string
	// PausedAt is when spec.paused was first seen during the current wave;
	// the wave's clock (deadline, bake) is moved on by the pause when it ends.
	PausedAt time.Time
}

func (m *Memory) clone() *Memory {
	c := *m
	c.Steps = slices.Clone(m.Steps)
	c.NamespaceWave = maps.Clone(m.NamespaceWave)
	c.NodeWave = maps.Clone(m.NodeWave)
	c.Joined = maps.Clone(m.Joined)
	return &c
}

// Verb is what the controller does about a decision.
type Verb string

const (
	// VerbNone: nothing to change (up to date, blocked, paused, waiting).
	VerbNone Verb = "None"
	// VerbStall: the plan failed; nothing starts (Stalled PlanFailed).
	VerbStall Verb = "Stall"
	// VerbApply: make the releases, namespaces and nodes as decided, then look again.
	VerbApply Verb = "Apply"
	// VerbWait: everything is as decided; waiting for a move to complete,
	// a bake, a check, a window, or a human.
	VerbWait Verb = "Wait"
	// VerbFinish: the rollout ended (Decision.Ended); Memory is nil.
	VerbFinish Verb = "Finish"
)

// Decision is what to do now.
type Decision struct {
	Verb Verb
	// Step is the current step, nil when no rollout runs; Wave its wave.
	Step *Step
	Wave int
	// Releases are the releases that must exist, each at its version (the
	// bundle each component follows). Releases the controller owns that are
	// not listed are removed.
	Releases []Release
	// Namespaces and Nodes are the exact moves: where each of them must be
	// and is not yet. Restart lists the namespaces whose workloads are
	// restarted (kubectl rollout restart, Restart as the token) because
	// their dataplane changes.
	Namespaces map[string]Placement
	Nodes      map[string]NodePlacement
	Restart    []string
	// RestartToken is the restartedAt value to stamp.
	RestartToken string
	// Requeue is when to look again at the latest (watches may come first).
	Requeue time.Duration
	Message string
	// Degraded: analysis has been inconclusive beyond inconclusiveLimit.
	Degraded bool
	// Memory is what to record before acting; nil when no rollout runs.
	Memory *Memory
	// Installed is what runs after this decision, when it changed (a hop
	// finished): status.version.installed and status.dataplane.
	Installed *Installed
	// Ended is the history entry of a hop that ended (Succeeded or RolledBack).
	Ended *meshv1.HistoryEntry
	// Plan is status.plan: the frozen steps and where each is.
	Plan []meshv1.PlanStep
}

type engine struct {
	in    *Inputs
	facts *Facts
	an    Analyzer
	now   time.Time
	mem   *Memory
}

// start decides whether a rollout starts.
func (e *engine) start() Decision {
	p, err := Compute(*e.in)
	if err != nil {
		return Decision{Verb: VerbStall, Message: err.Error()}
	}
	d := Decision{Verb: VerbNone, Message: p.Summary, Plan: p.Status()}
	switch {
	case p.Blocked != "":
		d.Message = p.Blocked
		return d
	case len(p.Steps) == 0:
		return d
	}
	if ok, why := p.MayStart(0); !ok {
		d.Message = why
		d.Requeue = untilNext(p.Window.Next, e.now)
		return d
	}
	m := &Memory{
		Base: e.in.Installed, Target: p.Target, SpecVersion: e.in.Spec.Version, Want: wantedInstalled(&e.in.Spec, p.Target),
		StartedAt: e.now, NamespaceWave: map[string]int{}, NodeWave: map[string]int{},
	}
	for _, s := range p.Steps {
		// Every wave step of a plan has the same waves: record them once.
		for i, w := range s.NamespaceWaves {
			for _, ns := range w {
				m.NamespaceWave[ns] = i + 1
			}
			m.NamespaceWaves = max(m.NamespaceWaves, len(s.NamespaceWaves))
		}
		for i, w := range s.NodeWaves {
			for _, n := range w {
				m.NodeWave[n] = i + 1
			}
			m.NodeWaves = max(m.NodeWaves, len(s.NodeWaves))
		}
		s.NamespaceWaves, s.NodeWaves = nil, nil
		m.Steps = append(m.Steps, s)
	}
	e.mem = m
	e.enterStep()
	return e.decide(VerbApply, p.Summary)
}

func wantedInstalled(spec *meshv1.MeshSpec, target string) Installed {
	w := wantedConfig(spec)
	return Installed{Version: target, Mode: w.mode, Redirection: w.redirection, Identity: w.identity}
}

// run carries a rollout on.
func (e *engine) run() Decision {
	m := e.mem
	e.adopt()
	if !e.in.Spec.Paused && !m.PausedAt.IsZero() {
		// Resumed: the pause does not count against the deadline or as bake.
		m.PhaseAt = m.PhaseAt.Add(e.now.Sub(m.PausedAt))
		if !m.NextCheckAt.IsZero() {
			m.NextCheckAt = m.NextCheckAt.Add(e.now.Sub(m.PausedAt))
		}
		m.PausedAt = time.Time{}
	}
	if m.Phase == PhaseRollingBack {
		return e.rollingBack()
	}
	if reason := e.targetChanged(); reason != "" {
		return e.rollback(reason)
	}
	s := &m.Steps[m.Step]
	if waveStep(s) && m.Wave == 0 {
		// A wave step is entered once the previous step is done: start wave 1.
		return e.startWave(1)
	}
	switch m.Phase {
	case PhaseHeld:
		if ok, why, requeue := e.mayStart(); !ok {
			d := e.decide(VerbWait, fmt.Sprintf("%s not started: %s", e.stepName(), why))
			d.Requeue = requeue
			return d
		}
		m.Phase, m.PhaseAt = PhaseMoving, e.now
		return e.decide(VerbApply, e.stepName()+": "+s.Message)
	case PhaseMoving:
		if s.Action == ActionRetireControlPlane {
			if left := e.in.Spec.Rollout.EffectiveRetireAfter() - e.now.Sub(m.PhaseAt); left > 0 {
				d := e.decide(VerbWait, fmt.Sprintf("%s: istiod-%s keeps running for spec.rollout.retireAfter (%s left)", e.stepName(), s.Revision, left.Round(time.Second)))
				d.Requeue = left
				return d
			}
		}
		missing := e.notMoved()
		if len(missing) == 0 {
			m.Phase, m.PhaseAt = PhaseBaking, e.now
			return e.baking()
		}
		if e.in.Spec.Paused {
			if m.PausedAt.IsZero() {
				m.PausedAt = e.now
			}
			d := e.decide(VerbApply, "spec.paused is true: "+e.where()+" keeps moving, nothing new starts and the progress deadline is held")
			d.Requeue = 30 * time.Second
			return d
		}
		deadline := e.in.Spec.Rollout.EffectiveProgressDeadline()
		if late := e.now.Sub(m.PhaseAt); late >= deadline {
			return e.rollback(fmt.Sprintf("%s did not move within spec.rollout.progressDeadline %s: waiting for %s", e.where(), deadline, nameList(missing)))
		}
		d := e.decide(VerbApply, fmt.Sprintf("%s moving: waiting for %s", e.where(), nameList(missing)))
		d.Requeue = min(deadline-e.now.Sub(m.PhaseAt), 30*time.Second)
		return d
	default:
		return e.baking()
	}
}

// waveStep is whether a step moves namespaces or nodes wave by wave.
func waveStep(s *Step) bool {
	switch s.Action {
	case ActionMoveNamespaces, ActionInstallNodeComponents, ActionUpgradeNodeComponents, ActionSwitchRedirection:
		return true
	}
	return false
}

func nodeStep(s *Step) bool { return waveStep(s) && s.Action != ActionMoveNamespaces }

// adopt records newcomers: a namespace or node not in the frozen waves joins
// the last wave when it has not started, and a wave of its own after it
// otherwise. Vanished ones are dropped from the record (nothing else
// moves); one that comes back (a namespace relabelled out of the selection
// and in again) is a newcomer then, so it is judged before it moves.
func (e *engine) adopt() {
	m := e.mem
	cur := &m.Steps[m.Step]
	seen := make(map[string]bool, len(e.facts.Namespaces))
	for _, ns := range e.facts.Namespaces {
		seen[ns.Name] = true
	}
	maps.DeleteFunc(m.NamespaceWave, func(n string, _ int) bool { return !seen[n] })
	clear(seen)
	for _, n := range e.facts.Nodes {
		seen[n.Name] = true
	}
	maps.DeleteFunc(m.NodeWave, func(n string, _ int) bool { return !seen[n] })
	maps.DeleteFunc(m.Joined, func(n string, _ bool) bool { return !seen[n] })
	late := func(waves *int, current bool) int {
		switch {
		case *waves == 0:
			*waves = 1
		case current && m.Wave >= *waves:
			*waves++ // the last wave has started: one more after it
		}
		return *waves
	}
	for _, ns := range e.facts.Namespaces {
		if _, ok := m.NamespaceWave[ns.Name]; !ok {
			m.NamespaceWave[ns.Name] = late(&m.NamespaceWaves, cur.Action == ActionMoveNamespaces)
		}
	}
	for _, n := range e.facts.Nodes {
		if _, ok := m.NodeWave[n.Name]; !ok {
			m.NodeWave[n.Name] = late(&m.NodeWaves, nodeStep(cur))
			if m.Joined == nil {
				m.Joined = map[string]bool{}
			}
			m.Joined[n.Name] = true
		}
	}
}

func (e *engine) targetChanged() string {
	m := e.mem
	want := wantedInstalled(&e.in.Spec, "")
	// Only a change of spec.version counts: a patch the catalog offers in
	// the meantime waits for the next rollout.
	target := m.Target
	if e.in.Spec.Version != m.SpecVersion {
		if r, err := ResolveTarget(&e.in.Spec, m.Base.Version, e.in.Catalog); err == nil {
			target = r.Bundle.Version
		}
	}
	switch {
	case target != m.Target:
		return fmt.Sprintf("spec.version now resolves to %s, not %s: the rollout in flight is rolled back and the new plan starts from what then runs", target, m.Target)
	case want.Mode != m.Want.Mode || want.Redirection != m.Want.Redirection || want.Identity != m.Want.Identity:
		return "spec.dataplane or spec.identity changed during the rollout: the rollout in flight is rolled back and the new plan starts from what then runs"
	}
	return ""
}

// enterStep starts the current step: a wave step waits for its first wave,
// any other step applies its releases.
func (e *engine) enterStep() {
	m := e.mem
	m.Wave, m.Phase, m.PhaseAt, m.Restart = 0, PhaseMoving, e.now, ""
	m.NextCheckAt, m.FailedChecks, m.InconclusiveChecks, m.Degraded = time.Time{}, 0, 0, false
}

// mayStart says whether a new wave or step may start now.
func (e *engine) mayStart() (bool, string, time.Duration) {
	if e.in.Spec.Paused {
		return false, "spec.paused is true: nothing new starts; set paused: false to go on", 0
	}
	if !e.mem.Steps[e.mem.Step].Windowed {
		return true, "", 0
	}
	open, next, err := WindowOpen(e.in.Spec.Upgrade.Windows, e.now)
	if err != nil {
		return false, err.Error(), 0
	}
	if !open {
		return false, fmt.Sprintf("waiting for a maintenance window: spec.upgrade.windows opens next at %s", next.UTC().Format(time.RFC3339)), untilNext(next, e.now)
	}
	return true, "", 0
}

func untilNext(t, now time.Time) time.Duration {
	if t.IsZero() {
		return 0
	}
	return max(t.Sub(now)+time.Second, time.Second)
}

func (e *engine) startWave(w int) Decision {
	m := e.mem
	// Skip waves whose members all vanished.
	for w <= e.waves() && len(e.members(w)) == 0 {
		w++
	}
	if w > e.waves() {
		return e.stepDone()
	}
	if ok, why, requeue := e.mayStart(); !ok {
		d := e.decide(VerbWait, fmt.Sprintf("%s: wave %d/%d not started: %s", e.stepName(), w, e.waves(), why))
		d.Requeue = requeue
		return d
	}
	m.Wave, m.Phase, m.PhaseAt, m.PausedAt = w, PhaseMoving, e.now, time.Time{}
	m.NextCheckAt, m.FailedChecks, m.InconclusiveChecks, m.Degraded = time.Time{}, 0, 0, false
	m.Restart = ""
	if e.restarts(&m.Steps[m.Step]) {
		m.Restart = e.now.UTC().Format(time.RFC3339)
	}
	return e.decide(VerbApply, fmt.Sprintf("%s: wave %d/%d moving (%s)", e.stepName(), w, e.waves(), nameList(e.members(w))))
}

// restarts is whether moving a namespace in step s restarts its workloads:
// a mode switch injects or drops sidecars, and a sidecar follows the
// revision it was injected by.
func (e *engine) restarts(s *Step) bool {
	return s.Action == ActionMoveNamespaces && (e.stepMode(s) == meshv1.ModeSidecar || e.modeSwitch(s))
}

func (e *engine) modeSwitch(s *Step) bool {
	return s.From == s.Version && effMode(e.mem.Base.Mode) != e.stepMode(s)
}

func (e *engine) waves() int {
	if nodeStep(&e.mem.Steps[e.mem.Step]) {
		return e.mem.NodeWaves
	}
	return e.mem.NamespaceWaves
}

// members are the observed namespaces or nodes of wave w of the current step, sorted.
func (e *engine) members(w int) []string {
	var out []string
	if nodeStep(&e.mem.Steps[e.mem.Step]) {
		for _, n := range e.facts.Nodes {
			if e.mem.NodeWave[n.Name] == w {
				out = append(out, n.Name)
			}
		}
	} else {
		for _, ns := range e.facts.Namespaces {
			if e.mem.NamespaceWave[ns.Name] == w {
				out = append(out, ns.Name)
			}
		}
	}
	slices.Sort(out)
	return out
}

func (e *engine) stepName() string {
	s := &e.mem.Steps[e.mem.Step]
	return fmt.Sprintf("step %d/%d %s %s", e.mem.Step+1, len(e.mem.Steps), s.Action, s.Target)
}

func (e *engine) where() string {
	if e.mem.Wave > 0 {
		return fmt.Sprintf("%s wave %d/%d", e.stepName(), e.mem.Wave, e.waves())
	}
	return e.stepName()
}

// notMoved lists what the current wave or step still waits for, with why.
func (e *engine) notMoved() []string {
	want := e.desired(e.mem.Step, true)
	var out []string
	s := &e.mem.Steps[e.mem.Step]
	if waveStep(s) {
		if nodeStep(s) {
			for _, n := range e.facts.Nodes {
				if e.mem.NodeWave[n.Name] == e.mem.Wave && !n.isAt(want.nodeAt(n.Name)) {
					out = append(out, withWhy("node "+n.Name, n.Waiting))
				}
			}
			return out
		}
		for _, ns := range e.facts.Namespaces {
			if e.mem.NamespaceWave[ns.Name] != e.mem.Wave {
				continue
			}
			if ns.At != want.namespaceAt(ns.Name) || (e.mem.Restart != "" && ns.RolledOut != e.mem.Restart) {
				out = append(out, withWhy("namespace "+ns.Name, ns.Waiting))
			}
		}
		return out
	}
	return e.releasesMissing(want)
}

func (e *engine) releasesMissing(want world) []string {
	out := e.releasesMissingFor(want)
	if s := &e.mem.Steps[e.mem.Step]; s.Action == ActionRemoveNodeComponents {
		for _, n := range e.facts.Nodes {
			if n.At.Version != "" {
				out = append(out, withWhy("node "+n.Name, n.Waiting))
			}
		}
	}
	return out
}

func withWhy(what, why string) string {
	if why == "" {
		return what
	}
	return what + " (" + why + ")"
}

// baking waits for the bake, runs the checks and promotes or rolls back.
func (e *engine) baking() Decision {
	m := e.mem
	s := &m.Steps[m.Step]
	if !waveStep(s) {
		return e.componentStepMoved()
	}
	bake := e.bake()
	g := e.in.Gates
	if e.in.Spec.Paused {
		if m.PausedAt.IsZero() {
			m.PausedAt = e.now
		}
		return e.decide(VerbWait, "spec.paused is true: "+e.where()+" holds; set paused: false to go on")
	}
	if !g.On || len(e.members(m.Wave)) == 0 {
		if left := bake - e.now.Sub(m.PhaseAt); left > 0 {
			d := e.decide(VerbWait, fmt.Sprintf("%s moved; baking %s (no SLO gates)", e.where(), bake))
			d.Requeue = left
			return d
		}
		return e.promote()
	}
	if m.NextCheckAt.IsZero() {
		m.NextCheckAt = m.PhaseAt.Add(FirstCheckAfter(bake, g))
	}
	if e.now.Before(m.NextCheckAt) {
		d := e.decide(VerbWait, fmt.Sprintf("%s moved; first check at %s (bake %s + query window %s + scrape interval %s)",
			e.where(), m.NextCheckAt.UTC().Format(time.RFC3339), bake, g.QueryWindow, scrape(g)))
		if m.FailedChecks+m.InconclusiveChecks > 0 {
			d.Message = fmt.Sprintf("%s: next check at %s", e.where(), m.NextCheckAt.UTC().Format(time.RFC3339))
		}
		d.Requeue = m.NextCheckAt.Sub(e.now)
		d.Degraded = m.Degraded
		return d
	}
	v := e.an.Check(e.scope(), e.now)
	m.NextCheckAt = e.now.Add(g.Interval)
	switch v.Result {
	case meshv1.VerdictPass:
		m.FailedChecks, m.InconclusiveChecks, m.Degraded = 0, 0, false
		return e.promote()
	case meshv1.VerdictFail:
		m.FailedChecks++
		m.InconclusiveChecks = 0
		if m.FailedChecks > g.FailureLimit {
			return e.rollback(fmt.Sprintf("%s: %s (failed check %d, failureLimit %d)", e.where(), v.Reason, m.FailedChecks, g.FailureLimit))
		}
		d := e.decide(VerbWait, fmt.Sprintf("%s: %s: failed check %d of %d tolerated", e.where(), v.Reason, m.FailedChecks, g.FailureLimit))
		d.Requeue = g.Interval
		return d
	default:
		m.InconclusiveChecks++
		reason := v.Reason
		if reason == "" {
			reason = "no answer from Prometheus"
		}
		msg := fmt.Sprintf("%s: inconclusive (%s): holding, check %d of %d tolerated", e.where(), reason, m.InconclusiveChecks, g.InconclusiveLimit)
		if m.InconclusiveChecks > g.InconclusiveLimit {
			m.Degraded = true
			msg = fmt.Sprintf("%s: analysis inconclusive for %d consecutive checks (inconclusiveLimit %d), waiting for a human: %s", e.where(), m.InconclusiveChecks, g.InconclusiveLimit, reason)
		}
		d := e.decide(VerbWait, msg)
		d.Requeue, d.Degraded = g.Interval, m.Degraded
		return d
	}
}

func scrape(g Gates) time.Duration {
	if g.ScrapeInterval > 0 {
		return g.ScrapeInterval
	}
	return DefaultScrapeInterval
}

// FirstCheckAfter is how long after a wave is seen moved its first check
// runs: the bake, plus the queries' range window (so the window holds only
// traffic from after the move), plus one scrape interval (so that traffic
// has been scraped).
func FirstCheckAfter(bake time.Duration, g Gates) time.Duration {
	return bake + g.QueryWindow + scrape(g)
}

// bake is the current wave's bake: namespaces' bake, the canary node wave's
// bake, and every later node wave's soak.
func (e *engine) bake() time.Duration {
	r := e.in.Spec.Rollout
	if !nodeStep(&e.mem.Steps[e.mem.Step]) {
		return r.Namespaces.EffectiveBake()
	}
	if e.mem.Wave == 1 && r.Nodes.Canary != nil {
		return r.Nodes.EffectiveBake()
	}
	return r.Nodes.EffectiveSoak()
}

func (e *engine) scope() CheckScope {
	m := e.mem
	s := &m.Steps[m.Step]
	sc := CheckScope{Step: s.Action, Wave: m.Wave, Revision: s.Revision, Baseline: revisionOf(s.From)}
	if s.From == "" || s.From == s.Version {
		sc.Baseline = ""
	}
	if nodeStep(s) {
		sc.Nodes = e.members(m.Wave)
		for _, n := range e.facts.Nodes {
			if m.NodeWave[n.Name] != m.Wave {
				sc.OtherNodes = append(sc.OtherNodes, n.Name)
			}
		}
		slices.Sort(sc.OtherNodes)
		return sc
	}
	sc.Namespaces = e.members(m.Wave)
	return sc
}

func (e *engine) promote() Decision {
	m := e.mem
	if m.Wave < e.waves() {
		return e.startWave(m.Wave + 1)
	}
	return e.stepDone()
}

// componentStepMoved: a step without waves is done once its releases are
// ready (retirement waited retireAfter before it moved).
func (e *engine) componentStepMoved() Decision {
	return e.stepDone()
}

// stepDone moves to the next step, ending a hop when the step was its last.
func (e *engine) stepDone() Decision {
	m := e.mem
	s := m.Steps[m.Step]
	hopEnds := m.Step+1 == len(m.Steps) || m.Steps[m.Step+1].Version != s.Version || m.Steps[m.Step+1].From != s.From
	var ended *meshv1.HistoryEntry
	var installed *Installed
	if hopEnds {
		in := e.afterHop(m.Step)
		installed = &in
		ended = &meshv1.HistoryEntry{Version: s.Version, Mode: effMode(in.Mode), Outcome: meshv1.OutcomeSucceeded,
			StartedAt: tp(m.StartedAt), FinishedAt: tp(e.now), Generation: e.in.Generation}
	}
	if m.Step+1 == len(m.Steps) {
		d := Decision{Verb: VerbFinish, Installed: installed, Ended: ended, Releases: e.desired(m.Step, true).releases,
			Message: fmt.Sprintf("rolled out %s: every step done", m.Target), Plan: e.planStatus(len(m.Steps), "")}
		return d
	}
	m.Step++
	e.enterStep()
	next := &m.Steps[m.Step]
	if ok, why, requeue := e.mayStart(); !ok && !waveStep(next) {
		// Hold the step: it has not started, nothing of it applies yet.
		m.Phase = PhaseHeld
		d := e.decide(VerbWait, fmt.Sprintf("%s not started: %s", e.stepName(), why))
		d.Requeue, d.Installed, d.Ended = requeue, installed, ended
		return d
	}
	var d Decision
	if waveStep(next) {
		d = e.startWave(1)
	} else {
		d = e.decide(VerbApply, e.stepName()+": "+next.Message)
	}
	d.Installed, d.Ended = installed, ended
	return d
}

func tp(t time.Time) *metav1.Time {
	mt := metav1.NewTime(t)
	return &mt
}

// afterHop is what runs once the hop ending at step i is done.
func (e *engine) afterHop(i int) Installed {
	m := e.mem
	s := m.Steps[i]
	in := m.Base
	in.Version = s.Version
	if s.From == s.Version { // the reconfiguration: at the target
		in.Mode, in.Redirection, in.Identity = m.Want.Mode, m.Want.Redirection, m.Want.Identity
	}
	if m.Base.Version == "" {
		in = m.Want
	}
	return in
}

func effMode(m meshv1.DataplaneMode) meshv1.DataplaneMode {
	if m == "" {
		return meshv1.ModeAmbient
	}
	return m
}

// rollback turns the current hop around.
func (e *engine) rollback(reason string) Decision {
	m := e.mem
	if m.Base.Version == "" {
		// A fresh install has nothing to go back to: it stops where it is
		// and fails, and is not retried until the spec changes.
		s := m.Steps[m.Step]
		return Decision{Verb: VerbFinish, Releases: e.desired(m.Step, true).releases,
			Ended: &meshv1.HistoryEntry{Version: s.Version, Mode: effMode(m.Want.Mode), Outcome: meshv1.OutcomeFailed, Reason: reason,
				StartedAt: tp(m.StartedAt), FinishedAt: tp(e.now), Generation: e.in.Generation},
			Message: fmt.Sprintf("install of %s failed, left as it is: %s", s.Version, reason), Plan: e.failedPlan(reason)}
	}
	m.Phase, m.PhaseAt, m.Reason = PhaseRollingBack, e.now, reason
	m.Restart = ""
	// Workloads that were restarted to move (a mode switch, or sidecars
	// following a new revision) are restarted again to go back.
	for i := e.hopStart(); i <= m.Step; i++ {
		if e.restarts(&m.Steps[i]) {
			m.Restart = "rollback-" + e.now.UTC().Format(time.RFC3339)
		}
	}
	return e.rollingBack()
}

// hopStart is the index of the first step of the current hop.
func (e *engine) hopStart() int {
	m := e.mem
	i := m.Step
	for i > 0 && m.Steps[i-1].Version == m.Steps[m.Step].Version && m.Steps[i-1].From == m.Steps[m.Step].From {
		i--
	}
	return i
}

// rollingBack returns the hop to where it started and ends it as RolledBack.
func (e *engine) rollingBack() Decision {
	m := e.mem
	start := e.hopStart()
	want := e.desired(start, false)
	var missing []string
	for _, ns := range e.facts.Namespaces {
		at := want.namespaceAt(ns.Name)
		if ns.At != at || (m.Restart != "" && e.movedThisHop(ns.Name) && ns.RolledOut != m.Restart) {
			missing = append(missing, "namespace "+ns.Name)
		}
	}
	for _, n := range e.facts.Nodes {
		if !n.isAt(want.nodeAt(n.Name)) {
			missing = append(missing, "node "+n.Name)
		}
	}
	missing = append(missing, e.releasesMissingFor(want)...)
	if len(missing) > 0 {
		d := e.decideWorld(VerbApply, want, fmt.Sprintf("rolling back %s: %s; waiting for %s", m.Steps[m.Step].Version, m.Reason, nameList(missing)))
		d.Restart, d.RestartToken = nil, m.Restart
		if m.Restart != "" {
			for _, ns := range e.facts.Namespaces {
				if e.movedThisHop(ns.Name) && ns.RolledOut != m.Restart {
					d.Restart = append(d.Restart, ns.Name)
				}
			}
		}
		d.Requeue = 10 * time.Second
		return d
	}
	s := m.Steps[m.Step]
	in := m.Base
	if start > 0 {
		in = e.afterHop(start - 1)
	}
	mode := effMode(in.Mode)
	if s.From == s.Version {
		mode = effMode(m.Want.Mode)
	}
	return Decision{Verb: VerbFinish, Releases: want.releases, Installed: &in,
		Ended: &meshv1.HistoryEntry{Version: s.Version, Mode: mode, Outcome: meshv1.OutcomeRolledBack, Reason: m.Reason,
			StartedAt: tp(m.StartedAt), FinishedAt: tp(e.now), Generation: e.in.Generation},
		Message: fmt.Sprintf("rolled back %s: %s", s.Version, m.Reason), Plan: e.planStatus(m.Step, m.Reason)}
}

// movedThisHop is whether a namespace moved in the current hop (its
// workloads restart when the mode goes back).
func (e *engine) movedThisHop(ns string) bool {
	start := e.hopStart()
	return e.desired(start, false).namespaceAt(ns) != e.desired(e.mem.Step, true).namespaceAt(ns)
}

func (e *engine) releasesMissingFor(want world) []string {
	var out []string
	ready := map[Release]bool{}
	for _, r := range e.facts.Ready {
		ready[r] = true
	}
	for _, r := range want.releases {
		if !ready[r] {
			out = append(out, r.String())
		}
	}
	for r := range ready {
		if !slices.Contains(want.releases, r) {
			out = append(out, r.String()+" (to be removed)")
		}
	}
	slices.Sort(out)
	return out
}

// world is the state the decisions aim at.
type world struct {
	releases []Release
	ns       map[string]Placement
	nsDef    Placement // a namespace not in ns
	nodes    map[string]NodePlacement
	nodeDef  NodePlacement
}

func (w world) namespaceAt(n string) Placement {
	if p, ok := w.ns[n]; ok {
		return p
	}
	return w.nsDef
}

func (w world) nodeAt(n string) NodePlacement {
	if p, ok := w.nodes[n]; ok {
		return p
	}
	return w.nodeDef
}

// desired is the world after the steps before upto, and, when current, the
// current step as far as it went (its waves up to Wave).
func (e *engine) desired(upto int, current bool) world {
	m := e.mem
	base := installedConfig(m.Base)
	w := world{ns: map[string]Placement{}, nodes: map[string]NodePlacement{}}
	if m.Base.Version != "" {
		for _, c := range base.components() {
			w.releases = append(w.releases, Release{c, m.Base.Version})
		}
		w.nsDef = Placement{Revision: revisionOf(m.Base.Version), Mode: base.mode}
		if base.ambient() {
			w.nodeDef = NodePlacement{Version: m.Base.Version, Redirection: base.redirection}
		}
	}
	last := upto
	if current {
		last = upto + 1
	}
	for i := 0; i < last && i < len(m.Steps); i++ {
		s := &m.Steps[i]
		waves := len(m.Steps) + 1<<20 // every wave
		if current && i == upto {
			waves = m.Wave
			if !waveStep(s) && (m.Phase == PhaseHeld || (s.Action == ActionRetireControlPlane && m.Phase == PhaseMoving && e.now.Sub(m.PhaseAt) < e.in.Spec.Rollout.EffectiveRetireAfter())) {
				continue // held or in its grace period: not applied yet
			}
		}
		e.applyStep(&w, s, waves)
	}
	slices.SortFunc(w.releases, func(a, b Release) int {
		if c := slices.Index(bundle.AllComponents, a.Component) - slices.Index(bundle.AllComponents, b.Component); c != 0 {
			return c
		}
		return strings.Compare(a.Version, b.Version)
	})
	return w
}

func (w *world) set(c bundle.Component, v string) {
	w.drop(c)
	w.releases = append(w.releases, Release{c, v})
}

func (w *world) drop(c bundle.Component) {
	w.releases = slices.DeleteFunc(w.releases, func(r Release) bool { return r.Component == c })
}

func (e *engine) stepMode(s *Step) meshv1.DataplaneMode {
	if s.From == s.Version || e.mem.Base.Version == "" {
		return effMode(e.mem.Want.Mode)
	}
	return effMode(e.mem.Base.Mode)
}

func (e *engine) stepRedirection(s *Step) meshv1.Redirection {
	if s.From == s.Version || e.mem.Base.Version == "" {
		return e.mem.Want.Redirection
	}
	return installedConfig(e.mem.Base).redirection
}

// applyStep applies step s to w, its first waves waves.
func (e *engine) applyStep(w *world, s *Step, waves int) {
	m := e.mem
	switch s.Action {
	case ActionInstallIdentity, ActionUpgradeIdentity:
		for _, c := range s.Components {
			w.set(c, s.Version)
		}
	case ActionRemoveIdentity:
		for _, c := range s.Components {
			w.drop(c)
		}
	case ActionInstallControlPlane:
		w.set(bundle.CRDs, s.Version)
		w.set(bundle.Istiod, s.Version)
	case ActionUpgradeControlPlane:
		w.set(bundle.CRDs, s.Version)
		if !slices.Contains(w.releases, Release{bundle.Istiod, s.Version}) {
			w.releases = append(w.releases, Release{bundle.Istiod, s.Version})
		}
	case ActionRetireControlPlane:
		w.releases = slices.DeleteFunc(w.releases, func(r Release) bool {
			return r.Component == bundle.Istiod && r.Version == s.From
		})
	case ActionInstallNodeComponents, ActionUpgradeNodeComponents, ActionSwitchRedirection:
		for _, c := range bundle.AllComponents {
			if c.OnNodes() {
				w.drop(c)
			}
		}
		for _, c := range s.Components {
			w.releases = append(w.releases, Release{c, s.Version})
		}
		at := NodePlacement{Version: s.Version, Redirection: e.stepRedirection(s)}
		for n, wave := range m.NodeWave {
			if wave <= waves || m.Joined[n] {
				w.nodes[n] = at
			}
		}
		if waves > m.NodeWaves {
			w.nodeDef = at
		}
	case ActionRemoveNodeComponents:
		for _, c := range s.Components {
			w.drop(c)
		}
		w.nodes, w.nodeDef = map[string]NodePlacement{}, NodePlacement{}
	case ActionMoveNamespaces:
		at := Placement{Revision: s.Revision, Mode: e.stepMode(s)}
		for n, wave := range m.NamespaceWave {
			if wave <= waves {
				w.ns[n] = at
			}
		}
		if waves > m.NamespaceWaves {
			// Done: a namespace enrolled from now on goes straight here.
			w.nsDef = at
		}
	}
}

// decide is a decision for the current state: the world as far as the
// current step went, and its moves.
func (e *engine) decide(v Verb, msg string) Decision {
	return e.decideWorld(v, e.desired(e.mem.Step, true), msg)
}

func (e *engine) decideWorld(v Verb, want world, msg string) Decision {
	m := e.mem
	d := Decision{Verb: v, Step: &m.Steps[m.Step], Wave: m.Wave, Releases: want.releases, Message: msg, Memory: m,
		Degraded: m.Degraded, RestartToken: m.Restart}
	for _, ns := range e.facts.Namespaces {
		at := want.namespaceAt(ns.Name)
		if ns.At != at {
			if d.Namespaces == nil {
				d.Namespaces = map[string]Placement{}
			}
			d.Namespaces[ns.Name] = at
		}
		if m.Restart != "" && m.Phase != PhaseRollingBack && m.NamespaceWave[ns.Name] == m.Wave &&
			m.Steps[m.Step].Action == ActionMoveNamespaces && ns.RolledOut != m.Restart {
			d.Restart = append(d.Restart, ns.Name)
		}
	}
	for _, n := range e.facts.Nodes {
		at := want.nodeAt(n.Name)
		if !n.isAt(at) {
			if d.Nodes == nil {
				d.Nodes = map[string]NodePlacement{}
			}
			d.Nodes[n.Name] = at
		}
	}
	// The verb follows from the decision: anything to change is Apply.
	changes := len(d.Namespaces) > 0 || len(d.Nodes) > 0 || len(d.Restart) > 0 || len(e.releasesMissingFor(want)) > 0
	switch {
	case changes:
		d.Verb = VerbApply
	case v == VerbApply:
		d.Verb = VerbWait
	}
	if m.Phase == PhaseRollingBack {
		d.Plan = e.planStatus(m.Step, "rolling back: "+m.Reason)
	} else {
		d.Plan = e.planStatus(m.Step, msg)
	}
	return d
}

// failedPlan is status.plan with the current step Failed.
func (e *engine) failedPlan(reason string) []meshv1.PlanStep {
	p := e.planStatus(e.mem.Step, reason)
	p[e.mem.Step].State = meshv1.StepFailed
	return p
}

// planStatus is status.plan: steps before cur Done, cur Running (or Failed
// while rolling back), the rest Pending.
func (e *engine) planStatus(cur int, msg string) []meshv1.PlanStep {
	m := e.mem
	out := make([]meshv1.PlanStep, len(m.Steps))
	for i, s := range m.Steps {
		st := meshv1.PlanStep{Action: string(s.Action), Target: s.Target, State: meshv1.StepPending, Message: s.Message}
		switch {
		case i < cur:
			st.State = meshv1.StepDone
		case i == cur && m.Phase == PhaseRollingBack:
			st.State, st.Message = meshv1.StepFailed, msg
		case i == cur:
			st.State, st.Message = meshv1.StepRunning, msg
		}
		out[i] = st
	}
	return out
}

// nameList is up to ten names, then how many more.
func nameList(names []string) string {
	const show = 10
	if len(names) <= show {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:show], ", "), len(names)-show)
}
