package plan

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	testingclock "k8s.io/utils/clock/testing"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// sim is a cluster as Next sees it, with no cluster: it applies decisions
// the way the controller would (labels written at once, workloads rolled
// out, node pods replaced and ready) except where a test makes a namespace
// or node stuck. It checks what a user would notice on every move.
type sim struct {
	t     *testing.T
	in    Inputs
	clock *testingclock.FakeClock
	start time.Time

	ns    map[string]*simNS
	nodes map[string]*simNode
	ready []Release

	mem  *Memory
	an   *simAnalyzer
	log  strings.Builder
	last []Release
	// hooks run before a decision when their condition first holds.
	hooks []*hook
	// Outcome of the rollout, once finished.
	ended   []meshv1.HistoryEntry
	plan    []meshv1.PlanStep
	decided int
	// crashAt: after this many decisions, record the memory and stop
	// without acting (a crash between the status write and the act).
	crashAt int
	crashed bool
	// holds: the scenario expects the rollout to hold, not end.
	holds     bool
	resumedAt time.Time
}

type simNS struct {
	at        Placement
	rolledOut string
	stuck     bool
	// movedAt is when the namespace last changed placement.
	movedAt time.Time
	history []Placement
}

type simNode struct {
	labels map[string]string
	at     NodePlacement
	stuck  bool
	// fixed: the node cannot run eBPF and falls back to iptables whatever
	// the mesh asks.
	fixed   bool
	movedAt time.Time
	history []NodePlacement
}

type hook struct {
	name string
	when func(s *sim) bool
	do   func(s *sim)
	done bool
}

// simAnalyzer answers checks: breach fails the checks of one wave of one
// step kind, down answers nothing (Prometheus down). It asserts that every
// check sees only traffic from after the move.
type simAnalyzer struct {
	s      *sim
	breach func(sc CheckScope) bool
	down   bool
	checks int
}

func (a *simAnalyzer) Check(sc CheckScope, at time.Time) Verdict {
	a.checks++
	s := a.s
	var bake time.Duration
	switch {
	case sc.Step == ActionMoveNamespaces:
		bake = s.in.Spec.Rollout.Namespaces.EffectiveBake()
	case sc.Wave == 1 && s.in.Spec.Rollout.Nodes.Canary != nil:
		bake = s.in.Spec.Rollout.Nodes.EffectiveBake()
	default:
		bake = s.in.Spec.Rollout.Nodes.EffectiveSoak()
	}
	// Computed here, not by FirstCheckAfter: the test must not share the
	// rule it checks. The fixture's queries look back 5m; scrapes are 1m apart.
	honest := bake + 5*time.Minute + time.Minute
	for _, n := range sc.Namespaces {
		if since := at.Sub(s.ns[n].movedAt); since < honest {
			s.t.Errorf("%s wave %d judged %s after namespace %s moved, before bake+window+scrape %s", sc.Step, sc.Wave, since, n, honest)
		}
	}
	for _, n := range sc.Nodes {
		if since := at.Sub(s.nodes[n].movedAt); since < honest {
			s.t.Errorf("%s wave %d judged %s after node %s moved, before bake+window+scrape %s", sc.Step, sc.Wave, since, n, honest)
		}
	}
	switch {
	case a.down:
		return Verdict{Reason: "Prometheus at http://prometheus:9090 did not answer"}
	case a.breach != nil && a.breach(sc):
		return Verdict{Result: meshv1.VerdictFail, Reason: "success-rate 0.93 < min 0.99"}
	}
	return Verdict{Result: meshv1.VerdictPass, Reason: "success-rate 0.999 ≥ min 0.99"}
}

func gatesOn() Gates {
	return GatesFor(nil, true, []meshv1.SLO{{Name: "success-rate", Query: `sum(rate(istio_requests_total{reporter="destination",response_code!~"5.."}[5m])) / sum(rate(istio_requests_total[5m]))`}})
}

func limitOf(sc scenario) int {
	if sc.hold > 0 {
		return sc.hold
	}
	return 3000
}

func newSim(t *testing.T, in Inputs) *sim {
	s := &sim{t: t, in: in, clock: testingclock.NewFakeClock(in.Now), start: in.Now, ns: map[string]*simNS{}, nodes: map[string]*simNode{}, crashAt: -1}
	s.an = &simAnalyzer{s: s}
	have := installedConfig(in.Installed)
	var at Placement
	var nat NodePlacement
	if in.Installed.Version != "" {
		at = Placement{Revision: revisionOf(in.Installed.Version), Mode: have.mode}
		for _, c := range have.components() {
			s.ready = append(s.ready, Release{c, in.Installed.Version})
		}
		if have.ambient() {
			nat = NodePlacement{Version: in.Installed.Version, Redirection: have.redirection}
		}
	}
	for _, n := range in.Namespaces {
		s.ns[n] = &simNS{at: at, movedAt: in.Now.Add(-24 * time.Hour)}
	}
	for _, n := range in.Nodes {
		s.nodes[n.Name] = &simNode{labels: n.Labels, at: nat, movedAt: in.Now.Add(-24 * time.Hour)}
	}
	s.last = slices.Clone(s.ready)
	return s
}

func (s *sim) facts() Facts {
	var f Facts
	for _, n := range slices.Sorted(maps.Keys(s.ns)) {
		x := s.ns[n]
		w := ""
		if x.stuck {
			w = "deployment/api 0/2 ready: istio-proxy ImagePullBackOff"
		}
		f.Namespaces = append(f.Namespaces, NamespaceFact{Name: n, At: x.at, RolledOut: x.rolledOut, Waiting: w})
	}
	for _, n := range slices.Sorted(maps.Keys(s.nodes)) {
		x := s.nodes[n]
		w := ""
		if x.stuck {
			w = "ztunnel CrashLoopBackOff"
		}
		f.Nodes = append(f.Nodes, NodeFact{Name: n, Labels: x.labels, At: x.at, FixedRedirection: x.fixed, Waiting: w})
	}
	f.Ready = slices.Clone(s.ready)
	return f
}

// nodeInfos are the nodes for Compute (the plan a new rollout starts from).
func (s *sim) nodeInfos() []NodeInfo {
	var out []NodeInfo
	for _, n := range slices.Sorted(maps.Keys(s.nodes)) {
		out = append(out, NodeInfo{Name: n, Labels: s.nodes[n].labels})
	}
	return out
}

// run decides and acts until the rollout ends (or nothing is left to do)
// and returns the trace.
func (s *sim) run(limit int) string {
	for i := 0; i < limit; i++ {
		for _, h := range s.hooks {
			if !h.done && h.when(s) {
				h.done = true
				fmt.Fprintf(&s.log, "%-9s  -- %s\n", s.offset(), h.name)
				h.do(s)
			}
		}
		s.in.Namespaces = slices.Sorted(maps.Keys(s.ns))
		s.in.Nodes = s.nodeInfos()
		d := Next(s.in, s.mem, s.facts(), s.an, s.clock)
		s.decided++
		s.trace(d)
		// Record: memory, history and installed go in one status write.
		s.mem = roundTrip(s.t, d.Memory) // recorded in status: it must survive serialisation
		s.plan = d.Plan
		if d.Ended != nil {
			s.ended = append(s.ended, *d.Ended)
			s.in.History = append(s.in.History, *d.Ended)
		}
		if d.Installed != nil {
			s.in.Installed = *d.Installed
		}
		if d.Verb == VerbFinish {
			s.in.ObservedGeneration = s.in.Generation
		}
		if s.crashAt >= 0 && s.decided == s.crashAt {
			s.crashed = true
			return s.log.String()
		}
		// Act.
		s.act(d)
		if d.Verb == VerbFinish || d.Verb == VerbStall || d.Memory == nil {
			return s.log.String()
		}
		step := d.Requeue
		switch {
		case step > 0:
		case d.Verb == VerbApply:
			step = time.Second // the watch event of what was applied
		default:
			step = time.Minute // someone edits the spec, or a resync
		}
		s.clock.Step(step)
	}
	if !s.holds {
		s.t.Fatalf("the rollout did not end within %d decisions:\n%s", limit, s.log.String())
	}
	return s.log.String()
}

func roundTrip(t *testing.T, m *Memory) *Memory {
	if m == nil {
		return nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var out Memory
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return &out
}

func (s *sim) offset() string {
	return "+" + s.clock.Now().Sub(s.start).String()
}

// act executes a decision as the controller would.
func (s *sim) act(d Decision) {
	now := s.clock.Now()
	rollingBack := d.Memory != nil && d.Memory.Phase == PhaseRollingBack
	s.ready = slices.Clone(d.Releases)
	// SPIRE: the agents never run a newer release than the server.
	var server, agent string
	for _, r := range s.ready {
		switch r.Component {
		case bundle.SpireServer:
			server = r.Version
		case bundle.SpireAgent:
			agent = r.Version
		}
	}
	if agent != "" && (server == "" || releaseOlder(server, agent)) {
		s.t.Errorf("%s: spire-agent %s runs with spire-server %q: the server moves first", s.offset(), agent, server)
	}
	for _, name := range slices.Sorted(maps.Keys(d.Namespaces)) {
		at := d.Namespaces[name]
		x := s.ns[name]
		if x == nil {
			s.t.Errorf("decision moves namespace %s, which does not exist", name)
			continue
		}
		if d.Memory != nil && !rollingBack && x.at.Revision != "" {
			// A move outside a rollback: only the namespace's own wave,
			// never back to where it was.
			if w := d.Memory.NamespaceWave[name]; d.Step == nil || d.Step.Action != ActionMoveNamespaces || w != d.Memory.Wave {
				s.t.Errorf("%s: namespace %s (wave %d) moved %s → %s outside its wave (current wave %d)", s.offset(), name, w, x.at, at, d.Memory.Wave)
			}
			if slices.Contains(x.history, at) {
				s.t.Errorf("%s: namespace %s moved back to %s outside a rollback", s.offset(), name, at)
			}
		}
		x.history = append(x.history, x.at)
		x.at, x.movedAt = at, now
	}
	for _, name := range d.Restart {
		// A stuck namespace cannot pull the sidecar image: it rolls out
		// again once it is back in Ambient.
		if x := s.ns[name]; x != nil && (!x.stuck || x.at.Mode != meshv1.ModeSidecar) {
			x.rolledOut = d.RestartToken
			x.movedAt = now
		}
	}
	for _, name := range slices.Sorted(maps.Keys(d.Nodes)) {
		at := d.Nodes[name]
		x := s.nodes[name]
		if x == nil {
			s.t.Errorf("decision moves node %s, which does not exist", name)
			continue
		}
		if x.stuck && at.Version != "" {
			continue // its new pod never becomes ready
		}
		if x.fixed && at.Version != "" {
			if at.Version == x.at.Version {
				s.t.Errorf("%s: fallback node %s told to move to %s: its redirection cannot change", s.offset(), name, at)
			}
			at.Redirection = meshv1.RedirectionIPTables
		}
		if d.Memory != nil && !rollingBack && slices.Contains(x.history, at) && at.Version != "" {
			s.t.Errorf("%s: node %s moved back to %s outside a rollback", s.offset(), name, at)
		}
		x.history = append(x.history, x.at)
		x.at, x.movedAt = at, now
	}
}

func (s *sim) trace(d Decision) {
	fmt.Fprintf(&s.log, "%-9s  %-6s %s\n", s.offset(), d.Verb, d.Message)
	if d.Degraded {
		fmt.Fprintf(&s.log, "           degraded\n")
	}
	group := map[string][]string{}
	for n, at := range d.Namespaces {
		group["namespaces → "+at.String()] = append(group["namespaces → "+at.String()], n)
	}
	for n, at := range d.Nodes {
		group["nodes → "+at.String()] = append(group["nodes → "+at.String()], n)
	}
	if len(d.Restart) > 0 {
		group["restart workloads"] = d.Restart
	}
	for _, k := range slices.Sorted(maps.Keys(group)) {
		v := group[k]
		slices.Sort(v)
		fmt.Fprintf(&s.log, "           %s: %s\n", k, strings.Join(v, " "))
	}
	if !slices.Equal(d.Releases, s.last) && (d.Verb == VerbApply || d.Verb == VerbFinish) {
		rs := make([]string, len(d.Releases))
		for i, r := range d.Releases {
			rs[i] = r.String()
		}
		fmt.Fprintf(&s.log, "           releases: %s\n", strings.Join(rs, ", "))
		s.last = slices.Clone(d.Releases)
	}
	if d.Ended != nil {
		fmt.Fprintf(&s.log, "           history: %s %s %s %s\n", d.Ended.Version, d.Ended.Mode, d.Ended.Outcome, d.Ended.Reason)
	}
}

// world is the end state, to compare runs.
func (s *sim) world() string {
	var b strings.Builder
	for _, n := range slices.Sorted(maps.Keys(s.ns)) {
		fmt.Fprintf(&b, "namespace %s: %s\n", n, s.ns[n].at)
	}
	for _, n := range slices.Sorted(maps.Keys(s.nodes)) {
		fmt.Fprintf(&b, "node %s: %s\n", n, s.nodes[n].at)
	}
	for _, r := range s.ready {
		fmt.Fprintf(&b, "release %s\n", r)
	}
	for _, e := range s.ended {
		fmt.Fprintf(&b, "history %s %s %s\n", e.Version, e.Mode, e.Outcome)
	}
	fmt.Fprintf(&b, "installed %+v\n", s.in.Installed)
	return b.String()
}

type scenario struct {
	name  string
	in    func() Inputs
	setup func(s *sim)
	// check asserts what a user relies on, whatever the golden says.
	check func(t *testing.T, s *sim)
	// hold: the rollout holds; the run stops after this many decisions.
	hold int
}

func upgradeInputs(sp meshv1.MeshSpec, installed Installed) Inputs {
	in := inputs(sp, installed)
	in.Gates = gatesOn()
	return in
}

func wantOutcome(t *testing.T, s *sim, outcomes ...meshv1.Outcome) {
	t.Helper()
	var got []meshv1.Outcome
	for _, e := range s.ended {
		got = append(got, e.Outcome)
	}
	if !slices.Equal(got, outcomes) {
		t.Errorf("history outcomes %v, want %v", got, outcomes)
	}
}

func wantNamespaces(t *testing.T, s *sim, at Placement, names ...string) {
	t.Helper()
	if len(names) == 0 {
		names = slices.Sorted(maps.Keys(s.ns))
	}
	for _, n := range names {
		if got := s.ns[n].at; got != at {
			t.Errorf("namespace %s is at %s, want %s", n, got, at)
		}
	}
}

func wantNodes(t *testing.T, s *sim, at NodePlacement) {
	t.Helper()
	for _, n := range slices.Sorted(maps.Keys(s.nodes)) {
		if got := s.nodes[n].at; got != at {
			t.Errorf("node %s runs %s, want %s", n, got, at)
		}
	}
}

func onWave(action Action, wave int, phase Phase) func(s *sim) bool {
	return func(s *sim) bool {
		m := s.mem
		return m != nil && m.Steps[m.Step].Action == action && m.Wave == wave && (phase == "" || m.Phase == phase)
	}
}

func breachIn(action Action, wave int) func(sc CheckScope) bool {
	return func(sc CheckScope) bool { return sc.Step == action && sc.Wave == wave }
}

var (
	amb1283 = Placement{Revision: "1-28-2", Mode: meshv1.ModeAmbient}
	amb1273 = Placement{Revision: "1-27-3", Mode: meshv1.ModeAmbient}
	side273 = Placement{Revision: "1-27-3", Mode: meshv1.ModeSidecar}
)

func scenarios() []scenario {
	return []scenario{{
		name: "install",
		in: func() Inputs {
			in := upgradeInputs(spec("1.28"), Installed{})
			in.Now = tuesday // a fresh install does not wait for a window
			return in
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1283)
			wantNodes(t, s, NodePlacement{"1.28.2", meshv1.RedirectionEBPF})
		},
	}, {
		name: "patch",
		in:   func() Inputs { return upgradeInputs(spec("1.27"), ambient("1.27.2")) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1273)
			if s.in.Installed.Version != "1.27.3" {
				t.Errorf("installed %s, want 1.27.3", s.in.Installed.Version)
			}
		},
	}, {
		name: "minor",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1283)
			wantNodes(t, s, NodePlacement{"1.28.2", meshv1.RedirectionEBPF})
			if slices.Contains(s.ready, Release{bundle.Istiod, "1.27.3"}) {
				t.Error("istiod 1.27.3 still runs after the rollout: the old revision is retired")
			}
		},
	}, {
		name: "two-minors",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.26.4")) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded, meshv1.OutcomeSucceeded)
			if s.ended[0].Version != "1.27.3" || s.ended[1].Version != "1.28.2" {
				t.Errorf("hops %v, want 1.27.3 then 1.28.2", s.ended)
			}
			wantNamespaces(t, s, amb1283)
		},
	}, {
		name: "mode-ambient-to-sidecar",
		in: func() Inputs {
			return upgradeInputs(withMode(spec("1.27.3"), meshv1.ModeSidecar, ""), ambient("1.27.3"))
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, side273)
			wantNodes(t, s, NodePlacement{})
			for n, x := range s.ns {
				if x.rolledOut == "" {
					t.Errorf("namespace %s switched to Sidecar without its workloads restarted", n)
				}
			}
			if s.in.Installed.Mode != meshv1.ModeSidecar {
				t.Errorf("installed mode %s, want Sidecar", s.in.Installed.Mode)
			}
		},
	}, {
		name: "mode-sidecar-to-ambient",
		in: func() Inputs {
			return upgradeInputs(spec("1.27.3"), Installed{Version: "1.27.3", Mode: meshv1.ModeSidecar})
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1273)
			wantNodes(t, s, NodePlacement{"1.27.3", meshv1.RedirectionEBPF})
		},
	}, {
		name: "redirection-switch",
		in: func() Inputs {
			return upgradeInputs(withMode(spec("1.27.3"), meshv1.ModeAmbient, meshv1.RedirectionIPTables), ambient("1.27.3"))
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNodes(t, s, NodePlacement{"1.27.3", meshv1.RedirectionIPTables})
		},
	}, {
		// node-05 cannot run eBPF and falls back to iptables: the switch to
		// eBPF moves every other node and leaves it as it is, without
		// waiting for it until the progress deadline.
		name: "redirection-switch-with-a-fallback-node",
		in: func() Inputs {
			return upgradeInputs(spec("1.27.3"), Installed{Version: "1.27.3", Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionIPTables})
		},
		setup: func(s *sim) {
			s.nodes["node-05"].fixed = true
			for _, x := range s.nodes {
				x.at.Redirection = meshv1.RedirectionIPTables
			}
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			for _, n := range slices.Sorted(maps.Keys(s.nodes)) {
				want := NodePlacement{"1.27.3", meshv1.RedirectionEBPF}
				if n == "node-05" {
					want.Redirection = meshv1.RedirectionIPTables
				}
				if got := s.nodes[n].at; got != want {
					t.Errorf("node %s runs %s, want %s", n, got, want)
				}
			}
			if h := s.nodes["node-05"].history; len(h) > 0 {
				t.Errorf("the fallback node moved: %v", h)
			}
		},
	}, {
		name:  "breach-canary-node-wave",
		in:    func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) { s.an.breach = breachIn(ActionUpgradeNodeComponents, 1) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			wantNamespaces(t, s, amb1273)
			wantNodes(t, s, NodePlacement{"1.27.3", meshv1.RedirectionEBPF})
		},
	}, {
		name:  "breach-later-node-wave",
		in:    func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) { s.an.breach = breachIn(ActionUpgradeNodeComponents, 3) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			wantNodes(t, s, NodePlacement{"1.27.3", meshv1.RedirectionEBPF})
		},
	}, {
		name:  "breach-namespace-wave",
		in:    func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) { s.an.breach = breachIn(ActionMoveNamespaces, 2) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			wantNamespaces(t, s, amb1273)
			if slices.Contains(s.ready, Release{bundle.Istiod, "1.28.2"}) {
				t.Error("istiod 1.28.2 still runs after the rollback")
			}
			if s.in.Installed.Version != "1.27.3" {
				t.Errorf("installed %s after the rollback, want 1.27.3", s.in.Installed.Version)
			}
		},
	}, {
		name: "breach-mode-switch-wave-2",
		in: func() Inputs {
			return upgradeInputs(withMode(spec("1.27.3"), meshv1.ModeSidecar, ""), ambient("1.27.3"))
		},
		setup: func(s *sim) { s.an.breach = breachIn(ActionMoveNamespaces, 2) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			wantNamespaces(t, s, amb1273) // wave 1 (shop-staging) back to Ambient
			if x := s.ns["shop-staging"]; !strings.HasPrefix(x.rolledOut, "rollback-") {
				t.Errorf("shop-staging went back to Ambient without a restart dropping its sidecars (rolled out %q)", x.rolledOut)
			}
			if x := s.ns["users"]; x.rolledOut != "" {
				t.Errorf("users never moved and was restarted anyway (%q)", x.rolledOut)
			}
			if s.in.Installed.Mode != meshv1.ModeAmbient {
				t.Errorf("installed mode %s after the rollback, want Ambient", s.in.Installed.Mode)
			}
		},
	}, {
		name:  "prometheus-down",
		in:    func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) { s.an.down = true },
		hold:  12,
		check: func(t *testing.T, s *sim) {
			if len(s.ended) != 0 {
				t.Errorf("the rollout ended (%v) with Prometheus down: it must hold", s.ended)
			}
			if !s.mem.Degraded {
				t.Error("not Degraded after inconclusiveLimit inconclusive checks")
			}
			if s.mem.Steps[s.mem.Step].Action != ActionUpgradeNodeComponents || s.mem.Wave != 1 {
				t.Errorf("moved on to %s wave %d with no verdict", s.mem.Steps[s.mem.Step].Action, s.mem.Wave)
			}
		},
	}, {
		name: "deadline-node",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) {
			s.nodes["node-05"].stuck = true
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			if r := s.ended[0].Reason; !strings.Contains(r, "node node-05 (ztunnel CrashLoopBackOff)") || !strings.Contains(r, "progressDeadline 10m0s") {
				t.Errorf("rollback reason %q does not name the node and the deadline", r)
			}
		},
	}, {
		name: "deadline-held-while-paused",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) {
			s.nodes["node-05"].stuck = true
			s.hooks = append(s.hooks, &hook{name: "spec.paused: true", when: onWave(ActionUpgradeNodeComponents, 3, PhaseMoving),
				do: func(s *sim) { s.in.Spec.Paused = true }})
			s.hooks = append(s.hooks, &hook{name: "spec.paused: false", when: func(s *sim) bool {
				return s.in.Spec.Paused && s.clock.Now().Sub(s.start) > 45*time.Minute
			}, do: func(s *sim) { s.in.Spec.Paused = false; s.resumedAt = s.clock.Now() }})
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			if s.resumedAt.IsZero() {
				t.Fatal("rolled back while paused: the deadline must be held")
			}
			if d := s.ended[0].FinishedAt.Sub(s.resumedAt); d < 9*time.Minute {
				t.Errorf("rolled back %s after the pause ended: the paused time counted against the 10m deadline", d)
			}
		},
	}, {
		name: "deadline-namespace-restart",
		in: func() Inputs {
			return upgradeInputs(withMode(spec("1.27.3"), meshv1.ModeSidecar, ""), ambient("1.27.3"))
		},
		setup: func(s *sim) { s.ns["cart"].stuck = true },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			if r := s.ended[0].Reason; !strings.Contains(r, "namespace cart (deployment/api 0/2 ready: istio-proxy ImagePullBackOff)") {
				t.Errorf("rollback reason %q does not name the namespace and its workload", r)
			}
		},
	}, {
		name: "paused-mid-rollout",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) {
			s.hooks = append(s.hooks, &hook{name: "spec.paused: true", when: onWave(ActionMoveNamespaces, 2, PhaseBaking),
				do: func(s *sim) { s.in.Spec.Paused = true }})
			s.hooks = append(s.hooks, &hook{name: "spec.paused: false", when: func(s *sim) bool {
				return s.in.Spec.Paused && s.clock.Now().Sub(s.start) > 90*time.Minute
			}, do: func(s *sim) { s.in.Spec.Paused = false }})
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1283)
		},
	}, {
		name: "window-closes-mid-rollout",
		in: func() Inputs {
			in := upgradeInputs(spec("1.28"), ambient("1.27.3"))
			in.Now = time.Date(2026, time.March, 7, 5, 15, 0, 0, time.UTC) // the window closes at 06:00
			return in
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			if end := s.clock.Now(); end.Before(time.Date(2026, time.March, 14, 2, 0, 0, 0, time.UTC)) {
				t.Errorf("finished at %s: waves after 06:00 must wait for next Saturday's window", end)
			}
		},
	}, {
		name: "namespaces-added-removed-mid-rollout",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) {
			add := func(n string) func(s *sim) {
				return func(s *sim) { s.ns[n] = &simNS{movedAt: s.clock.Now()} }
			}
			s.hooks = append(s.hooks,
				&hook{name: "namespace early-bird selected", when: onWave(ActionMoveNamespaces, 1, PhaseBaking), do: add("early-bird")},
				&hook{name: "namespace checkout deleted", when: onWave(ActionMoveNamespaces, 3, PhaseMoving), do: func(s *sim) { delete(s.ns, "checkout") }},
				&hook{name: "namespace late-comer selected", when: onWave(ActionMoveNamespaces, 4, PhaseBaking), do: add("late-comer")},
				// cart moved in wave 2; relabelled out of the selection
				// (meshkeeper unenrols it) and back in, it is a newcomer.
				&hook{name: "namespace cart relabelled out of the selection", when: onWave(ActionMoveNamespaces, 3, PhaseBaking), do: func(s *sim) { delete(s.ns, "cart") }},
				&hook{name: "namespace cart relabelled back in", when: onWave(ActionMoveNamespaces, 4, PhaseMoving), do: add("cart")},
			)
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1283)
			if s.an.checks == 0 {
				t.Fatal("no check ran")
			}
		},
	}, {
		name: "nodes-added-relabelled-removed-mid-rollout",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) {
			s.hooks = append(s.hooks,
				&hook{name: "node-04 joins the canary pool", when: onWave(ActionUpgradeNodeComponents, 1, PhaseBaking), do: func(s *sim) {
					s.nodes["node-04"].labels = map[string]string{"pool": "canary"}
				}},
				&hook{name: "node-10 joins the cluster", when: onWave(ActionUpgradeNodeComponents, 2, PhaseBaking), do: func(s *sim) {
					s.nodes["node-10"] = &simNode{labels: map[string]string{}, movedAt: s.clock.Now()}
				}},
				&hook{name: "node-09 is deleted", when: onWave(ActionUpgradeNodeComponents, 3, PhaseMoving), do: func(s *sim) { delete(s.nodes, "node-09") }},
			)
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNodes(t, s, NodePlacement{"1.28.2", meshv1.RedirectionEBPF})
		},
	}, {
		name: "sidecar-minor-breach",
		in: func() Inputs {
			return upgradeInputs(withMode(spec("1.28"), meshv1.ModeSidecar, ""), Installed{Version: "1.27.3", Mode: meshv1.ModeSidecar})
		},
		setup: func(s *sim) { s.an.breach = breachIn(ActionMoveNamespaces, 3) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			wantNamespaces(t, s, side273)
			for _, n := range []string{"shop-staging", "cart", "catalog"} {
				if !strings.HasPrefix(s.ns[n].rolledOut, "rollback-") {
					t.Errorf("%s went back to revision 1-27-3 without a restart: its sidecars still talk to istiod-1-28-2 (%q)", n, s.ns[n].rolledOut)
				}
			}
			if s.ns["users"].rolledOut != "" {
				t.Errorf("users never moved and was restarted (%q)", s.ns["users"].rolledOut)
			}
		},
	}, {
		name: "downgrade-one-minor",
		in:   func() Inputs { return upgradeInputs(spec("1.27"), ambient("1.28.2")) },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded)
			wantNamespaces(t, s, amb1273)
			wantNodes(t, s, NodePlacement{"1.27.3", meshv1.RedirectionEBPF})
		},
	}, {
		name: "two-minors-spire",
		in: func() Inputs {
			return upgradeInputs(withSpire(spec("1.28")), Installed{Version: "1.26.4", Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionEBPF, Identity: true})
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeSucceeded, meshv1.OutcomeSucceeded)
			if !slices.Contains(s.ready, Release{bundle.SpireServer, "1.28.2"}) || !slices.Contains(s.ready, Release{bundle.SpireAgent, "1.28.2"}) {
				t.Errorf("SPIRE not at 1.28.2: %v", s.ready)
			}
		},
	}, {
		name: "install-fails-on-deadline",
		in: func() Inputs {
			in := upgradeInputs(withMode(spec("1.28"), meshv1.ModeSidecar, ""), Installed{})
			return in
		},
		setup: func(s *sim) { s.ns["cart"].stuck = true },
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeFailed)
			if s.ns["shop-staging"].at != (Placement{Revision: "1-28-2", Mode: meshv1.ModeSidecar}) {
				t.Errorf("a failed install took shop-staging (%s) out again: it stays as it is", s.ns["shop-staging"].at)
			}
			if got := s.plan[1].State; got != meshv1.StepFailed {
				t.Errorf("status.plan shows MoveNamespaces %s, want Failed", got)
			}
		},
	}, {
		name: "spec-version-set-back",
		in:   func() Inputs { return upgradeInputs(spec("1.28"), ambient("1.27.3")) },
		setup: func(s *sim) {
			s.hooks = append(s.hooks, &hook{name: "spec.version: 1.27.3", when: onWave(ActionMoveNamespaces, 2, PhaseBaking),
				do: func(s *sim) { s.in.Spec.Version = "1.27.3"; s.in.Generation++ }})
		},
		check: func(t *testing.T, s *sim) {
			wantOutcome(t, s, meshv1.OutcomeRolledBack)
			wantNamespaces(t, s, amb1273)
		},
	}}
}

// TestNextGolden runs whole rollouts through Next, with no cluster, and
// compares each trace to testdata/next/<name>.golden.
func TestNextGolden(t *testing.T) {
	for _, sc := range scenarios() {
		t.Run(sc.name, func(t *testing.T) {
			s := newSim(t, sc.in())
			s.holds = sc.hold > 0
			if sc.setup != nil {
				sc.setup(s)
			}
			trace := s.run(limitOf(sc))
			trace += "--- end\n" + s.world()
			for _, p := range s.plan {
				trace += fmt.Sprintf("plan %s %s: %s\n", p.Action, p.Target, p.State)
			}
			sc.check(t, s)
			golden(t, filepath.Join("testdata", "next", sc.name+".golden"), trace)
		})
	}
}

// TestNextCrashAtEveryStep: a crash after any decision is recorded and
// before it is acted on, then a restart from the recorded memory only,
// ends where the uninterrupted run ends.
func TestNextCrashAtEveryStep(t *testing.T) {
	for _, sc := range scenarios() {
		t.Run(sc.name, func(t *testing.T) {
			ref := newSim(t, sc.in())
			ref.holds = sc.hold > 0
			if sc.setup != nil {
				sc.setup(ref)
			}
			ref.run(limitOf(sc))
			want := ref.world()
			for k := 1; k < ref.decided; k++ {
				s := newSim(t, sc.in())
				s.holds = sc.hold > 0
				if sc.setup != nil {
					sc.setup(s)
				}
				s.crashAt = k
				s.run(limitOf(sc))
				if !s.crashed {
					continue
				}
				// The operator restarts: everything in memory is lost but
				// what was recorded; the clock goes on.
				s.crashAt = -1
				s.clock.Step(time.Second)
				s.run(limitOf(sc) - k)
				if got := s.world(); got != want {
					t.Fatalf("crash after decision %d: the restarted rollout ends elsewhere:\n--- got\n%s\n--- want\n%s", k, got, want)
				}
			}
		})
	}
}

// TestNextStallsOnFailedPlan: a plan that cannot be computed starts
// nothing, and says what is wrong.
func TestNextStallsOnFailedPlan(t *testing.T) {
	for _, c := range []struct {
		name, version, installed, says string
	}{
		{"unknown version", "1.31", "1.27.3", "1.31"},
		{"two minors back", "1.26", "1.28.2", "1.27"},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := upgradeInputs(spec(c.version), ambient(c.installed))
			d := Next(in, nil, Facts{}, nil, testingclock.NewFakeClock(in.Now))
			if d.Verb != VerbStall || d.Memory != nil || len(d.Releases) != 0 {
				t.Fatalf("got %s with memory %v, want Stall and nothing started", d.Verb, d.Memory)
			}
			if !strings.Contains(d.Message, c.says) {
				t.Errorf("message %q does not say %q", d.Message, c.says)
			}
		})
	}
}

// TestNextKeepsPatchWithoutAutomatic: upgrade.automatic: false keeps the
// installed patch although the catalog has a newer one.
func TestNextKeepsPatchWithoutAutomatic(t *testing.T) {
	sp := spec("1.27")
	sp.Upgrade.Automatic = new(bool)
	in := upgradeInputs(sp, ambient("1.27.2"))
	d := Next(in, nil, Facts{}, nil, testingclock.NewFakeClock(in.Now))
	if d.Verb != VerbNone || d.Memory != nil {
		t.Fatalf("got %s (%s), want nothing to do", d.Verb, d.Message)
	}
}

func golden(t *testing.T, file, got string) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v; run go test ./internal/plan/ -update to create it", err)
	}
	if got != string(want) {
		t.Errorf("trace differs from %s (run with -update after checking the change):\n--- got\n%s\n--- want\n%s", file, got, want)
	}
}
