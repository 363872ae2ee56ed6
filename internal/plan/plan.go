// Package plan is meshkeeper's rollout planner: a pure function of the Mesh
// spec, what runs, the catalog and the clock that returns the ordered steps a
// change takes. It never talks to a cluster; the reconciler publishes the
// plan in status.plan and executes only its next step.
//
// The order of the steps is the safety argument, so here it is in one place:
//
//   - Upgrades move one minor at a time: 1.26.x to "1.28" is a full rollout to
//     the newest 1.27 patch, then one to 1.28. Every bundle must list the
//     minor it is reached from in upgradeFrom.
//   - Each hop is a full rollout: SPIRE server, then SPIRE agents (when SPIRE
//     runs), then the new control-plane revision side by side with the old
//     one (CRDs first), then the node components in node waves (Ambient
//     only), then the namespaces in namespace waves, then the old revision is
//     retired. The control plane therefore moves before the node components
//     and never gets more than one minor ahead of them (CheckSkew), and the
//     SPIRE server moves before its agents (CheckSpireSkew). Compute
//     simulates its own steps and refuses a plan that breaks either rule.
//   - A fresh install has the same order without the retirement.
//   - Version hops run in the configuration that runs now; a change of mode,
//     redirection or identity happens after the last hop, at the target
//     version: a failed upgrade then leaves the known configuration in place.
//   - A target that failed (status.history) is not retried until the spec
//     changes (see Inputs.ObservedGeneration); the plan is then empty and
//     Plan.Blocked says why.
//   - spec.paused computes the same plan and sets Plan.Paused: nothing runs.
//   - Steps that change what running workloads use (Step.Windowed) start only
//     while a maintenance window is open; installing a new revision beside
//     the old one, retiring one, and a fresh install do not wait.
package plan

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// Action is what a step does. The values are published in status.plan and
// read by people and tools: keep them stable.
type Action string

const (
	// ActionInstallIdentity installs one SPIRE component (server, then agents).
	ActionInstallIdentity Action = "InstallIdentity"
	// ActionUpgradeIdentity moves one SPIRE component to the step's bundle,
	// the server before the agents.
	ActionUpgradeIdentity Action = "UpgradeIdentity"
	// ActionRemoveIdentity uninstalls one SPIRE component, agents before the server.
	ActionRemoveIdentity Action = "RemoveIdentity"
	// ActionInstallControlPlane installs the bundle's CRDs and istiod-<revision>.
	ActionInstallControlPlane Action = "InstallControlPlane"
	// ActionUpgradeControlPlane installs the bundle's CRDs, then the new
	// revision istiod-<revision> side by side with the old one; nothing
	// points at it yet.
	ActionUpgradeControlPlane Action = "UpgradeControlPlane"
	// ActionConfigureControlPlane changes the running revision in place for a
	// mode or identity change.
	ActionConfigureControlPlane Action = "ConfigureControlPlane"
	// ActionInstallNodeComponents installs ztunnel, istio-cni and the node
	// agent (as the redirection needs), node wave by node wave.
	ActionInstallNodeComponents Action = "InstallNodeComponents"
	// ActionUpgradeNodeComponents moves the node components to the step's
	// bundle, node wave by node wave.
	ActionUpgradeNodeComponents Action = "UpgradeNodeComponents"
	// ActionSwitchRedirection moves nodes between eBPF and iptables
	// redirection, node wave by node wave.
	ActionSwitchRedirection Action = "SwitchRedirection"
	// ActionRemoveNodeComponents uninstalls the node components once no
	// namespace uses them (Ambient to Sidecar).
	ActionRemoveNodeComponents Action = "RemoveNodeComponents"
	// ActionMoveNamespaces moves namespaces to the step's revision or mode,
	// wave by wave: move, bake, analyse, then promote or roll back.
	ActionMoveNamespaces Action = "MoveNamespaces"
	// ActionRetireControlPlane uninstalls the old revision after the grace
	// period, once no namespace points at it.
	ActionRetireControlPlane Action = "RetireControlPlane"
)

// Installed is what runs, as the Mesh status reports it.
type Installed struct {
	// Version every component runs (status.version.installed); "" when
	// nothing is installed yet.
	Version string
	// Mode in effect (status.dataplane.mode); "" reads as Ambient, the default.
	Mode meshv1.DataplaneMode
	// Redirection in effect in Ambient mode (status.dataplane.redirection);
	// "" reads as EBPF, the default.
	Redirection meshv1.Redirection
	// Identity is true when SPIRE runs.
	Identity bool
}

// InstalledFrom reads what runs from a Mesh status: the installed version,
// the dataplane in effect, and SPIRE when status.components lists spire-server.
func InstalledFrom(st meshv1.MeshStatus) Installed {
	in := Installed{Version: st.Version.Installed, Mode: st.Dataplane.Mode, Redirection: st.Dataplane.Redirection}
	for _, c := range st.Components {
		if c.Name == string(bundle.SpireServer) {
			in.Identity = true
		}
	}
	return in
}

// Inputs is everything a plan depends on. Same inputs, same plan.
type Inputs struct {
	// Spec is the Mesh spec as written; defaults are applied when read.
	Spec meshv1.MeshSpec
	// Generation is the Mesh's metadata.generation.
	Generation int64
	// ObservedGeneration is status.observedGeneration: the generation of the
	// last settled result. The controller records a failed rollout in
	// status.history and sets observedGeneration in the same status patch, so
	// Generation > ObservedGeneration means the spec changed since: a failed
	// target is retried only then.
	ObservedGeneration int64
	// Installed is what runs.
	Installed Installed
	// History is status.history, newest last.
	History []meshv1.HistoryEntry
	// Namespaces are the namespaces spec.namespaces.selector selects now.
	Namespaces []string
	// Nodes are the cluster's nodes.
	Nodes []NodeInfo
	// Catalog is what spec.version resolves against.
	Catalog *bundle.Catalog
	// Now is the time maintenance windows are checked at (Next sets it
	// from its clock).
	Now time.Time
	// Gates are the SLO gates Next judges waves with (GatesFor).
	Gates Gates
}

// Plan is the ordered steps from what runs to what the spec asks for.
type Plan struct {
	// Target is spec.version resolved against the catalog, e.g. "1.28.2".
	Target string
	// Hops are the releases the mesh moves through, in order, each a full
	// rollout: ["1.27.3", "1.28.2"] from 1.26.4 to "1.28". A fresh install
	// has one hop (Target); a mode switch alone has none.
	Hops []string
	// Steps in the order they run. Empty when nothing needs to change or the
	// plan is blocked.
	Steps []Step
	// Paused is spec.paused: the plan is published and nothing runs.
	Paused bool
	// Blocked says why nothing will run until the spec changes (a target
	// that failed before); "" otherwise.
	Blocked string
	// Window is whether a windowed step may start at Inputs.Now.
	Window Window
	// Automatic is true when the upgrade policy, not spec.version, chose
	// Target (a new patch, or the next minor with upgrade.minor: Automatic):
	// every step of such an upgrade waits for a maintenance window.
	Automatic bool
	// Summary is one line for status messages and events.
	Summary string
}

// Window is the maintenance-window answer at Inputs.Now (see WindowOpen).
type Window struct {
	// Open is true when a windowed step may start now.
	Open bool
	// Next is when Open changes; zero when there are no windows.
	Next time.Time
}

// Step is one step of a plan.
type Step struct {
	// Action is what the step does.
	Action Action
	// Target is what it acts on, as status.plan shows it: a version
	// ("1.28.2"), a SPIRE component at a version ("spire-server 1.28.2"), the
	// version being retired, or a version and mode ("1.28.2 Sidecar") for
	// the namespaces of a mode switch. Action and Target together are unique
	// within a plan.
	Target string
	// Version is the bundle the step's hop moves to.
	Version string
	// From is the version being replaced: "" when installing, Version itself
	// when the configuration changes at one version.
	From string
	// Revision is the control-plane revision the step installs, configures,
	// moves namespaces to or retires, e.g. "1-28-2".
	Revision string
	// Components are the Helm releases' components the step applies or removes.
	Components []bundle.Component
	// NodeWaves are the node names of each wave, for node steps.
	NodeWaves [][]string
	// NamespaceWaves are the namespaces of each wave, for MoveNamespaces.
	NamespaceWaves [][]string
	// Windowed steps start only while a maintenance window is open.
	Windowed bool
	// Message says what the step does in words.
	Message string
}

// Status is the plan as status.plan publishes it, every step Pending; the
// controller marks progress.
func (p Plan) Status() []meshv1.PlanStep {
	if len(p.Steps) == 0 {
		return nil
	}
	out := make([]meshv1.PlanStep, len(p.Steps))
	for i, s := range p.Steps {
		out[i] = meshv1.PlanStep{Action: string(s.Action), Target: s.Target, State: meshv1.StepPending, Message: s.Message}
	}
	return out
}

// MayStart says whether step i may start now and, when not, why.
func (p Plan) MayStart(i int) (bool, string) {
	switch {
	case p.Blocked != "":
		return false, p.Blocked
	case i < 0 || i >= len(p.Steps):
		return false, fmt.Sprintf("the plan has no step %d (it has %d)", i+1, len(p.Steps))
	case p.Paused:
		return false, "spec.paused is true: the plan is published and nothing runs; set paused: false to run it"
	case p.Steps[i].Windowed && !p.Window.Open:
		return false, fmt.Sprintf("waiting for a maintenance window: spec.upgrade.windows opens next at %s", p.Window.Next.UTC().Format(time.RFC3339))
	}
	return true, ""
}

// config is a dataplane configuration: what runs, or what the spec asks for.
type config struct {
	mode        meshv1.DataplaneMode
	redirection meshv1.Redirection // "" in Sidecar mode
	identity    bool
}

func (c config) ambient() bool { return c.mode == meshv1.ModeAmbient }

// components are the releases the configuration runs, in install order.
func (c config) components() []bundle.Component {
	return bundle.Components(string(c.mode), string(c.redirection), c.identity)
}

// nodeComponents are the DaemonSets of the configuration.
func (c config) nodeComponents() []bundle.Component {
	var out []bundle.Component
	for _, comp := range c.components() {
		if comp.OnNodes() {
			out = append(out, comp)
		}
	}
	return out
}

func (c config) String() string {
	s := string(c.mode)
	if c.ambient() {
		s += ", " + string(c.redirection)
	}
	if c.identity {
		s += ", SPIRE"
	}
	return s
}

func installedConfig(in Installed) config {
	d := meshv1.DataplaneSpec{Mode: in.Mode, Redirection: in.Redirection}
	if d.EffectiveMode() != meshv1.ModeAmbient {
		d.Redirection = ""
	}
	return config{mode: d.EffectiveMode(), redirection: d.EffectiveRedirection(), identity: in.Identity}
}

func wantedConfig(spec *meshv1.MeshSpec) config {
	return config{
		mode:        spec.Dataplane.EffectiveMode(),
		redirection: spec.Dataplane.EffectiveRedirection(),
		identity:    spec.Identity.Spire != nil && spec.Identity.Spire.Enabled,
	}
}

// Compute plans the way from in.Installed to in.Spec. Every error is a
// problem of the spec, the catalog or the recorded status, never a transient
// one: retrying does not help until one of them changes.
func Compute(in Inputs) (Plan, error) {
	if in.Catalog == nil {
		return Plan{}, errNoCatalog
	}
	resolved, err := ResolveTarget(&in.Spec, in.Installed.Version, in.Catalog)
	if err != nil {
		return Plan{}, err
	}
	target := resolved.Bundle
	p := Plan{Target: target.Version, Paused: in.Spec.Paused, Automatic: resolved.Automatic}
	p.Window.Open, p.Window.Next, err = WindowOpen(in.Spec.Upgrade.Windows, in.Now)
	if err != nil {
		return Plan{}, err
	}

	b := &builder{in: &in, nsWaves: NamespaceWaves(in.Namespaces, in.Spec.Rollout.Namespaces)}
	have, want := installedConfig(in.Installed), wantedConfig(&in.Spec)
	fresh := in.Installed.Version == ""
	var moves []move // what the plan rolls out, for the failed-target rule
	if fresh {
		p.Hops = []string{target.Version}
		moves = append(moves, move{version: target.Version, mode: want.mode})
		if err := b.rollout("", target, want); err != nil {
			return Plan{}, err
		}
	} else {
		path, err := upgradePath(in.Installed.Version, target, in.Catalog)
		if err != nil {
			return Plan{}, err
		}
		from := in.Installed.Version
		for _, hop := range path {
			p.Hops = append(p.Hops, hop.Version)
			moves = append(moves, move{version: hop.Version, mode: have.mode, hop: len(path) > 1})
			if err := b.rollout(from, hop, have); err != nil {
				return Plan{}, err
			}
			from = hop.Version
		}
		changed, err := b.reconfigure(target, have, want)
		if err != nil {
			return Plan{}, err
		}
		if changed {
			moves = append(moves, move{version: target.Version, mode: want.mode})
		}
	}
	p.Summary = summary(in.Installed.Version, target.Version, p.Hops, have, want, len(b.steps))

	if in.Generation <= in.ObservedGeneration {
		for _, m := range moves {
			if h := failedBefore(in.History, m.version, m.mode); h != nil {
				p.Blocked = blockedMessage(h, m, in.Installed.Version, target.Version)
				return p, nil
			}
		}
	}

	if err := verifySkew(in.Installed, have, b.steps, in.Catalog); err != nil {
		return Plan{}, err
	}
	p.Steps = b.steps
	if p.Automatic {
		// Nobody asked for this upgrade in the spec: nothing of it, not
		// even the new control plane, starts outside a window.
		// (Retiring the old revision comes after the last wave of a rollout
		// that, once started, finishes.)
		for i := range p.Steps {
			p.Steps[i].Windowed = p.Steps[i].Action != ActionRetireControlPlane
		}
		p.Summary = "automatic upgrade (spec.upgrade): " + p.Summary
	}
	return p, nil
}

var errNoCatalog = errors.New("plan: Inputs.Catalog is nil; pass the catalog spec.version resolves against (bundle.Default())")

// builder accumulates the steps of a plan.
type builder struct {
	in      *Inputs
	nsWaves [][]string
	nodes   *NodeSplit // computed on first use: Sidecar plans need no nodes
	steps   []Step
}

func (b *builder) add(s Step) {
	s.Windowed = b.in.Installed.Version != "" && windowed(s.Action)
	b.steps = append(b.steps, s)
}

// windowed is whether an action changes what running workloads use, on a
// mesh that already runs.
func windowed(a Action) bool {
	switch a {
	case ActionInstallIdentity, ActionInstallControlPlane, ActionUpgradeControlPlane, ActionRetireControlPlane:
		return false
	}
	return true
}

func (b *builder) nodeWaves() (*NodeSplit, error) {
	if b.nodes == nil {
		nw, err := SplitNodes(b.in.Nodes, b.in.Spec.Rollout.Nodes)
		if err != nil {
			return nil, err
		}
		b.nodes = nw
	}
	return b.nodes, nil
}

// rollout adds the steps of one full rollout of bundle to in configuration
// cfg: identity, control plane, node components, namespaces, retirement.
// from is the version replaced, "" on a fresh install.
func (b *builder) rollout(from string, to *bundle.Bundle, cfg config) error {
	install := from == ""
	rev := to.Revision()
	if cfg.identity {
		act, fromSpire := ActionUpgradeIdentity, ""
		if install {
			act = ActionInstallIdentity
		} else if fb, err := b.in.Catalog.Resolve(from); err == nil {
			fromSpire = fb.SpireVersion
		}
		order := []bundle.Component{bundle.SpireServer, bundle.SpireAgent}
		if releaseOlder(to.Version, from) {
			// A downgrade: the agents go back first, so that they are never
			// newer than the server.
			order = []bundle.Component{bundle.SpireAgent, bundle.SpireServer}
		}
		for _, c := range order {
			b.add(Step{
				Action: act, Target: string(c) + " " + to.Version, Version: to.Version, From: from,
				Components: []bundle.Component{c},
				Message:    spireMessage(c, fromSpire, to.SpireVersion),
			})
		}
	}

	cp := Step{Action: ActionUpgradeControlPlane, Target: to.Version, Version: to.Version, From: from, Revision: rev,
		Components: []bundle.Component{bundle.CRDs, bundle.Istiod}}
	if install {
		cp.Action = ActionInstallControlPlane
		cp.Message = fmt.Sprintf("Install the CRDs and istiod-%s (revision %s, %s)", rev, rev, cfg.mode)
	} else {
		cp.Message = fmt.Sprintf("Install istiod-%s side by side with istiod-%s, CRDs first; no namespace points at it yet", rev, revisionOf(from))
	}
	b.add(cp)

	if cfg.ambient() {
		nw, err := b.nodeWaves()
		if err != nil {
			return err
		}
		comps := cfg.nodeComponents()
		s := Step{
			Action: ActionUpgradeNodeComponents, Target: to.Version, Version: to.Version, From: from, Revision: rev,
			Components: comps, NodeWaves: nw.Waves,
			Message: fmt.Sprintf("Upgrade %s to %s %s", joinComponents(comps), to.Version, nw.describe()),
		}
		if install {
			s.Action = ActionInstallNodeComponents
			s.Message = fmt.Sprintf("Install %s at %s (%s redirection) %s", joinComponents(comps), to.Version, cfg.redirection, nw.describe())
		}
		b.add(s)
	}

	if len(b.nsWaves) > 0 {
		msg := fmt.Sprintf("Move %s to revision %s %s", countNamespaces(b.nsWaves), rev, b.describeNamespaceWaves())
		if install {
			msg = fmt.Sprintf("Enroll %s in the mesh at revision %s %s", countNamespaces(b.nsWaves), rev, b.describeNamespaceWaves())
		}
		b.add(Step{
			Action: ActionMoveNamespaces, Target: to.Version, Version: to.Version, From: from, Revision: rev,
			NamespaceWaves: b.nsWaves, Message: msg,
		})
	}

	if !install {
		old := revisionOf(from)
		b.add(Step{
			Action: ActionRetireControlPlane, Target: from, Version: to.Version, From: from, Revision: old,
			Components: []bundle.Component{bundle.Istiod},
			Message:    fmt.Sprintf("Uninstall istiod-%s after the grace period, once no namespace points at revision %s", old, old),
		})
	}
	return nil
}

// reconfigure adds the steps that change the configuration from have to want
// at the target version, after every hop. It reports whether anything changes.
func (b *builder) reconfigure(to *bundle.Bundle, have, want config) (bool, error) {
	if have == want {
		return false, nil
	}
	rev, v := to.Revision(), to.Version
	identityOn := want.identity && !have.identity
	identityOff := have.identity && !want.identity
	modeSwitch := have.mode != want.mode

	if identityOn {
		for _, c := range []bundle.Component{bundle.SpireServer, bundle.SpireAgent} {
			b.add(Step{
				Action: ActionInstallIdentity, Target: string(c) + " " + v, Version: v, From: v,
				Components: []bundle.Component{c}, Message: spireMessage(c, "", to.SpireVersion),
			})
		}
	}

	if modeSwitch || identityOn || identityOff {
		var what []string
		switch {
		case modeSwitch && want.ambient():
			what = append(what, "serve Ambient as well as Sidecar while namespaces move")
		case modeSwitch:
			what = append(what, "serve Sidecar as well as Ambient while namespaces move")
		}
		if identityOn {
			what = append(what, "take workload certificates from SPIRE")
		}
		if identityOff {
			what = append(what, "issue workload certificates itself instead of SPIRE")
		}
		b.add(Step{
			Action: ActionConfigureControlPlane, Target: v, Version: v, From: v, Revision: rev,
			Components: []bundle.Component{bundle.Istiod},
			Message:    fmt.Sprintf("Reconfigure istiod-%s in place: %s", rev, strings.Join(what, "; ")),
		})
	}

	switch {
	case modeSwitch && want.ambient():
		nw, err := b.nodeWaves()
		if err != nil {
			return false, err
		}
		comps := want.nodeComponents()
		b.add(Step{
			Action: ActionInstallNodeComponents, Target: v, Version: v, From: v, Revision: rev,
			Components: comps, NodeWaves: nw.Waves,
			Message: fmt.Sprintf("Install %s at %s (%s redirection) %s", joinComponents(comps), v, want.redirection, nw.describe()),
		})
		b.switchNamespaces(to, want, "label them istio.io/dataplane-mode=ambient and restart their workloads to drop the sidecars")
	case modeSwitch:
		b.switchNamespaces(to, want, fmt.Sprintf("label them istio.io/rev=%s and restart their workloads to inject sidecars", rev))
		comps := have.nodeComponents()
		b.add(Step{
			Action: ActionRemoveNodeComponents, Target: v, Version: v, From: v, Revision: rev,
			Components: comps,
			Message:    fmt.Sprintf("Uninstall %s: no namespace uses the Ambient dataplane any more", joinComponents(comps)),
		})
	case have.redirection != want.redirection:
		nw, err := b.nodeWaves()
		if err != nil {
			return false, err
		}
		comps := union(have.nodeComponents(), want.nodeComponents())
		b.add(Step{
			Action: ActionSwitchRedirection, Target: v, Version: v, From: v, Revision: rev,
			Components: comps, NodeWaves: nw.Waves,
			Message: fmt.Sprintf("Switch redirection %s → %s %s; %s", have.redirection, want.redirection, nw.describe(), redirectionNote(want.redirection)),
		})
	}

	if identityOff {
		for _, c := range []bundle.Component{bundle.SpireAgent, bundle.SpireServer} {
			b.add(Step{
				Action: ActionRemoveIdentity, Target: string(c) + " " + v, Version: v, From: v,
				Components: []bundle.Component{c},
				Message:    fmt.Sprintf("Uninstall %s: the control plane no longer uses SPIRE", c),
			})
		}
	}
	return true, nil
}

func (b *builder) switchNamespaces(to *bundle.Bundle, want config, how string) {
	if len(b.nsWaves) == 0 {
		return
	}
	b.add(Step{
		Action: ActionMoveNamespaces, Target: to.Version + " " + string(want.mode), Version: to.Version, From: to.Version,
		Revision: to.Revision(), NamespaceWaves: b.nsWaves,
		Message: fmt.Sprintf("Switch %s to %s %s: %s", countNamespaces(b.nsWaves), want.mode, b.describeNamespaceWaves(), how),
	})
}

func redirectionNote(r meshv1.Redirection) string {
	if r == meshv1.RedirectionIPTables {
		return "istio-cni redirects on every node, the node agent is removed after the last wave"
	}
	return "the node agent redirects on nodes passing eBPF preflight, istio-cni stays for the fallback"
}

func spireMessage(c bundle.Component, from, to string) string {
	what := "SPIRE server"
	if c == bundle.SpireAgent {
		what = "SPIRE agents"
	}
	switch from {
	case "":
		return fmt.Sprintf("Install %s %s", what, to)
	case to:
		return fmt.Sprintf("Move %s to the new bundle; SPIRE stays %s", what, to)
	}
	return fmt.Sprintf("Upgrade %s %s → %s", what, from, to)
}

func (nw *NodeSplit) describe() string {
	nodes := 0
	for _, w := range nw.Waves {
		nodes += len(w)
	}
	switch {
	case nodes == 0:
		return "(no nodes yet)"
	case nw.Canary && len(nw.Waves) == 1:
		return fmt.Sprintf("in 1 node wave: the canary nodes (%d)", nodes)
	case nw.Canary:
		return fmt.Sprintf("in %d node waves over %d nodes: the canary nodes (%d) first, then at most %d at a time",
			len(nw.Waves), nodes, len(nw.Waves[0]), nw.Batch)
	}
	return fmt.Sprintf("in %d node %s over %d nodes, at most %d at a time", len(nw.Waves), plural(len(nw.Waves), "wave", "waves"), nodes, nw.Batch)
}

func (b *builder) describeNamespaceWaves() string {
	spec := b.in.Spec.Rollout.Namespaces
	sizes := make([]string, len(b.nsWaves))
	for i, w := range b.nsWaves {
		sizes[i] = fmt.Sprint(len(w))
	}
	desc := fmt.Sprintf("in %d %s (%s)", len(b.nsWaves), plural(len(b.nsWaves), "wave", "waves"), strings.Join(sizes, ", "))
	selected := make(map[string]bool, len(b.in.Namespaces))
	for _, ns := range b.in.Namespaces {
		selected[ns] = true
	}
	if slices.ContainsFunc(spec.Canary, func(ns string) bool { return selected[ns] }) {
		desc += fmt.Sprintf(": canary %s first, then %s of the rest", strings.Join(b.nsWaves[0], ", "), strings.Join(spec.EffectiveWaves(), ", "))
	} else {
		desc += fmt.Sprintf(": %s, cumulative", strings.Join(spec.EffectiveWaves(), ", "))
	}
	return desc
}

func countNamespaces(waves [][]string) string {
	n := 0
	for _, w := range waves {
		n += len(w)
	}
	return fmt.Sprintf("%d %s", n, plural(n, "namespace", "namespaces"))
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func joinComponents(cs []bundle.Component) string {
	s := make([]string, len(cs))
	for i, c := range cs {
		s[i] = string(c)
	}
	return strings.Join(s, ", ")
}

// union is a and b in install order, without duplicates.
func union(a, b []bundle.Component) []bundle.Component {
	var out []bundle.Component
	for _, c := range bundle.AllComponents {
		if slices.Contains(a, c) || slices.Contains(b, c) {
			out = append(out, c)
		}
	}
	return out
}

func summary(installed, target string, hops []string, have, want config, steps int) string {
	var parts []string
	switch {
	case installed == "":
		return fmt.Sprintf("Install %s (%s): %d %s", target, want, steps, plural(steps, "step", "steps"))
	case len(hops) > 1:
		parts = append(parts, fmt.Sprintf("upgrade %s → %s through %s, one minor at a time", installed, target, strings.Join(hops[:len(hops)-1], ", ")))
	case len(hops) == 1:
		parts = append(parts, fmt.Sprintf("upgrade %s → %s", installed, target))
	}
	if have != want {
		parts = append(parts, fmt.Sprintf("reconfigure %s → %s at %s", have, want, target))
	}
	if len(parts) == 0 {
		return fmt.Sprintf("Up to date: %s (%s) runs as specified", target, have)
	}
	s := strings.Join(parts, ", then ")
	return strings.ToUpper(s[:1]) + s[1:] + fmt.Sprintf(": %d %s", steps, plural(steps, "step", "steps"))
}
