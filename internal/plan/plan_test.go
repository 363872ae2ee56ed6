package plan

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current plans")

// saturday0330 is inside the window "0 2 * * 6" (4h) used by the fixtures.
var saturday0330 = time.Date(2026, time.March, 7, 3, 30, 0, 0, time.UTC)

// tuesday is outside it.
var tuesday = time.Date(2026, time.March, 10, 12, 0, 0, 0, time.UTC)

// fixtureNodes are ten nodes, two of them in the canary pool.
func fixtureNodes() []NodeInfo {
	var nodes []NodeInfo
	for i := 9; i >= 0; i-- { // reverse order: waves must sort
		n := NodeInfo{Name: fmt.Sprintf("node-%02d", i), Labels: map[string]string{"kubernetes.io/os": "linux"}}
		if i == 3 || i == 7 {
			n.Labels["pool"] = "canary"
		}
		nodes = append(nodes, n)
	}
	return nodes
}

var fixtureNamespaces = []string{"shop", "cart", "payments", "shop-staging", "search", "checkout", "users", "catalog"}

// spec is the Mesh spec of the fixtures: canary nodes and namespaces, three
// namespace waves, a Saturday-night window.
func spec(version string) meshv1.MeshSpec {
	return meshv1.MeshSpec{
		Version: version,
		Rollout: meshv1.RolloutSpec{
			Nodes: meshv1.NodeRolloutSpec{
				Canary:         &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}},
				MaxUnavailable: ptr.To(intstr.FromString("30%")),
			},
			Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"shop-staging"},
				Waves:  []string{"10%", "50%", "100%"},
			},
		},
		Upgrade: meshv1.UpgradeSpec{Windows: []meshv1.MaintenanceWindow{{Cron: "0 2 * * 6", Duration: metav1.Duration{Duration: 4 * time.Hour}}}},
	}
}

func withSpire(s meshv1.MeshSpec) meshv1.MeshSpec {
	s.Identity.Spire = &meshv1.SpireSpec{Enabled: true, TrustDomain: "example.org"}
	return s
}

func withMode(s meshv1.MeshSpec, mode meshv1.DataplaneMode, redirection meshv1.Redirection) meshv1.MeshSpec {
	s.Dataplane.Mode, s.Dataplane.Redirection = mode, redirection
	return s
}

func inputs(s meshv1.MeshSpec, installed Installed) Inputs {
	return Inputs{
		Spec:               s,
		Generation:         3,
		ObservedGeneration: 2,
		Installed:          installed,
		Namespaces:         fixtureNamespaces,
		Nodes:              fixtureNodes(),
		Catalog:            bundle.Default(),
		Now:                saturday0330,
	}
}

func ambient(version string) Installed {
	return Installed{Version: version, Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionEBPF}
}

func actions(p Plan) []string {
	out := make([]string, len(p.Steps))
	for i, s := range p.Steps {
		out[i] = string(s.Action) + " " + s.Target
	}
	return out
}

// render prints a plan for the golden files: everything a reviewer of
// status.plan would read, and the waves.
func render(p Plan) string {
	var b strings.Builder
	fmt.Fprintf(&b, "summary: %s\n", p.Summary)
	fmt.Fprintf(&b, "target: %s\n", p.Target)
	fmt.Fprintf(&b, "hops: %s\n", strings.Join(p.Hops, " → "))
	fmt.Fprintf(&b, "paused: %t\n", p.Paused)
	if p.Blocked != "" {
		fmt.Fprintf(&b, "blocked: %s\n", p.Blocked)
	}
	switch {
	case p.Window.Open && p.Window.Next.IsZero():
		fmt.Fprintf(&b, "window: always open\n")
	case p.Window.Open:
		fmt.Fprintf(&b, "window: open until %s\n", p.Window.Next.Format(time.RFC3339))
	default:
		fmt.Fprintf(&b, "window: closed until %s\n", p.Window.Next.Format(time.RFC3339))
	}
	for i, s := range p.Steps {
		windowed := ""
		if s.Windowed {
			windowed = " [windowed]"
		}
		fmt.Fprintf(&b, "%2d. %s %s%s\n", i+1, s.Action, s.Target, windowed)
		fmt.Fprintf(&b, "    version %s, from %q, revision %q, components [%s]\n", s.Version, s.From, s.Revision, joinComponents(s.Components))
		fmt.Fprintf(&b, "    %s\n", s.Message)
		for j, w := range s.NodeWaves {
			fmt.Fprintf(&b, "    node wave %d: %s\n", j+1, strings.Join(w, " "))
		}
		for j, w := range s.NamespaceWaves {
			fmt.Fprintf(&b, "    namespace wave %d: %s\n", j+1, strings.Join(w, " "))
		}
	}
	return b.String()
}

func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	file := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
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
		t.Errorf("plan differs from %s (run with -update after checking the change):\n--- got\n%s\n--- want\n%s", file, got, want)
	}
}

// TestComputeGolden: each scenario's full plan matches its golden file, and
// the properties a user relies on hold whatever the golden says.
func TestComputeGolden(t *testing.T) {
	cases := []struct {
		name  string
		in    Inputs
		check func(g Gomega, p Plan)
	}{{
		name: "fresh-install-ambient-spire",
		in: func() Inputs {
			in := inputs(withSpire(spec("1.28")), Installed{})
			in.Now = tuesday // outside the window
			return in
		}(),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Window.Open).To(BeFalse())
			g.Expect(p.Hops).To(Equal([]string{"1.28.2"}))
			g.Expect(actions(p)).To(Equal([]string{
				"InstallIdentity spire-server 1.28.2",
				"InstallIdentity spire-agent 1.28.2",
				"InstallControlPlane 1.28.2",
				"InstallNodeComponents 1.28.2",
				"MoveNamespaces 1.28.2",
			}))
			g.Expect(p.Steps[2].Components).To(Equal([]bundle.Component{bundle.CRDs, bundle.Istiod}))
			g.Expect(p.Steps[3].Components).To(Equal([]bundle.Component{bundle.Ztunnel, bundle.NodeAgent, bundle.CNI}))
			g.Expect(p.Steps[3].NodeWaves[0]).To(Equal([]string{"node-03", "node-07"}), "canary pool first")
			g.Expect(p.Steps[4].NamespaceWaves[0]).To(Equal([]string{"shop-staging"}), "canary namespace first")
			for i, s := range p.Steps {
				g.Expect(s.Windowed).To(BeFalse(), "a fresh install does not wait for a window: %s", s.Action)
				ok, why := p.MayStart(i)
				g.Expect(ok).To(BeTrue(), why)
			}
		},
	}, {
		name: "fresh-install-sidecar",
		in:   inputs(withMode(spec("1.27.2"), meshv1.ModeSidecar, ""), Installed{}),
		check: func(g Gomega, p Plan) {
			g.Expect(actions(p)).To(Equal([]string{"InstallControlPlane 1.27.2", "MoveNamespaces 1.27.2"}), "no node components in Sidecar mode")
		},
	}, {
		name: "patch-upgrade",
		in:   inputs(spec("1.27"), ambient("1.27.2")),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Hops).To(Equal([]string{"1.27.3"}))
			g.Expect(actions(p)).To(Equal([]string{
				"UpgradeControlPlane 1.27.3",
				"UpgradeNodeComponents 1.27.3",
				"MoveNamespaces 1.27.3",
				"RetireControlPlane 1.27.2",
			}))
			g.Expect(p.Steps[0].Revision).To(Equal("1-27-3"))
			g.Expect(p.Steps[3].Revision).To(Equal("1-27-2"), "the old revision is retired")
			g.Expect(p.Automatic).To(BeTrue(), "1.27.2 satisfies spec.version 1.27: the new patch is the upgrade policy's choice")
			for _, s := range p.Steps[:3] {
				g.Expect(s.Windowed).To(BeTrue(), "nothing of an automatic upgrade starts outside a window, not even the side-by-side revision: %s", s.Action)
			}
		},
	}, {
		name: "minor-upgrade",
		in:   inputs(spec("1.28"), ambient("1.27.3")),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Automatic).To(BeFalse(), "spec.version asks for 1.28")
			g.Expect(p.Steps[0].Windowed).To(BeFalse(), "a side-by-side revision serves nobody yet")
			g.Expect(p.Steps[1].Windowed).To(BeTrue())
			g.Expect(p.Hops).To(Equal([]string{"1.28.2"}))
			g.Expect(actions(p)).To(Equal([]string{
				"UpgradeControlPlane 1.28.2",
				"UpgradeNodeComponents 1.28.2",
				"MoveNamespaces 1.28.2",
				"RetireControlPlane 1.27.3",
			}))
		},
	}, {
		name: "two-minor-upgrade-spire",
		in:   inputs(withSpire(spec("1.28")), Installed{Version: "1.26.4", Mode: meshv1.ModeAmbient, Identity: true}),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Hops).To(Equal([]string{"1.27.3", "1.28.2"}), "through the newest 1.27 patch")
			g.Expect(actions(p)).To(Equal([]string{
				"UpgradeIdentity spire-server 1.27.3",
				"UpgradeIdentity spire-agent 1.27.3",
				"UpgradeControlPlane 1.27.3",
				"UpgradeNodeComponents 1.27.3",
				"MoveNamespaces 1.27.3",
				"RetireControlPlane 1.26.4",
				"UpgradeIdentity spire-server 1.28.2",
				"UpgradeIdentity spire-agent 1.28.2",
				"UpgradeControlPlane 1.28.2",
				"UpgradeNodeComponents 1.28.2",
				"MoveNamespaces 1.28.2",
				"RetireControlPlane 1.27.3",
			}))
			g.Expect(p.Steps[0].Message).To(Equal("Upgrade SPIRE server 1.12.4 → 1.13.3"))
			g.Expect(p.Summary).To(ContainSubstring("through 1.27.3"))
		},
	}, {
		name: "mode-switch-ambient-to-sidecar",
		in:   inputs(withMode(spec("1.27.3"), meshv1.ModeSidecar, ""), ambient("1.27.3")),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Hops).To(BeEmpty())
			g.Expect(actions(p)).To(Equal([]string{
				"ConfigureControlPlane 1.27.3",
				"MoveNamespaces 1.27.3 Sidecar",
				"RemoveNodeComponents 1.27.3",
			}), "node components go only after every namespace left Ambient")
			g.Expect(p.Steps[2].Components).To(Equal([]bundle.Component{bundle.Ztunnel, bundle.NodeAgent, bundle.CNI}))
		},
	}, {
		name: "mode-switch-sidecar-to-ambient",
		in:   inputs(spec("1.27.3"), Installed{Version: "1.27.3", Mode: meshv1.ModeSidecar}),
		check: func(g Gomega, p Plan) {
			g.Expect(actions(p)).To(Equal([]string{
				"ConfigureControlPlane 1.27.3",
				"InstallNodeComponents 1.27.3",
				"MoveNamespaces 1.27.3 Ambient",
			}), "node components are on every node before a namespace relies on them")
			g.Expect(p.Steps[1].Windowed).To(BeTrue(), "on a running mesh")
		},
	}, {
		name: "redirection-switch",
		in:   inputs(withMode(spec("1.27.3"), meshv1.ModeAmbient, meshv1.RedirectionIPTables), ambient("1.27.3")),
		check: func(g Gomega, p Plan) {
			g.Expect(actions(p)).To(Equal([]string{"SwitchRedirection 1.27.3"}), "no namespace moves: redirection is per node")
			g.Expect(p.Steps[0].NodeWaves).To(HaveLen(4))
		},
	}, {
		name: "upgrade-then-mode-switch",
		in:   inputs(withMode(spec("1.28"), meshv1.ModeSidecar, ""), ambient("1.27.3")),
		check: func(g Gomega, p Plan) {
			g.Expect(actions(p)).To(Equal([]string{
				"UpgradeControlPlane 1.28.2",
				"UpgradeNodeComponents 1.28.2",
				"MoveNamespaces 1.28.2",
				"RetireControlPlane 1.27.3",
				"ConfigureControlPlane 1.28.2",
				"MoveNamespaces 1.28.2 Sidecar",
				"RemoveNodeComponents 1.28.2",
			}), "the hop runs in the mode that runs now, the switch at the target")
		},
	}, {
		name: "enable-spire",
		in:   inputs(withSpire(spec("1.27.3")), ambient("1.27.3")),
		check: func(g Gomega, p Plan) {
			g.Expect(actions(p)).To(Equal([]string{
				"InstallIdentity spire-server 1.27.3",
				"InstallIdentity spire-agent 1.27.3",
				"ConfigureControlPlane 1.27.3",
			}))
		},
	}, {
		name: "paused",
		in: func() Inputs {
			in := inputs(spec("1.28"), ambient("1.27.3"))
			in.Spec.Paused = true
			return in
		}(),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Paused).To(BeTrue())
			g.Expect(actions(p)).To(HaveLen(4), "the plan is computed in full")
			ok, why := p.MayStart(0)
			g.Expect(ok).To(BeFalse())
			g.Expect(why).To(ContainSubstring("spec.paused is true"))
		},
	}, {
		name: "failed-target-not-retried",
		in: func() Inputs {
			in := inputs(spec("1.28"), ambient("1.27.3"))
			in.Generation, in.ObservedGeneration = 4, 4
			in.History = []meshv1.HistoryEntry{{Version: "1.28.2", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeRolledBack, Reason: "l4-success 0.93 < 0.99 in wave 1"}}
			return in
		}(),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Steps).To(BeEmpty())
			g.Expect(p.Status()).To(BeEmpty())
			g.Expect(p.Blocked).To(ContainSubstring("1.28.2 (Ambient) was rolled back before (l4-success 0.93 < 0.99 in wave 1)"))
			g.Expect(p.Blocked).To(ContainSubstring(`set spec.version to "1.27.3"`))
		},
	}, {
		name: "window-closed",
		in: func() Inputs {
			in := inputs(spec("1.28"), ambient("1.27.3"))
			in.Now = tuesday
			return in
		}(),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Window).To(Equal(Window{Open: false, Next: time.Date(2026, time.March, 14, 2, 0, 0, 0, time.UTC)}))
			ok, _ := p.MayStart(0)
			g.Expect(ok).To(BeTrue(), "installing the new revision side by side does not wait")
			ok, why := p.MayStart(1)
			g.Expect(ok).To(BeFalse())
			g.Expect(why).To(Equal("waiting for a maintenance window: spec.upgrade.windows opens next at 2026-03-14T02:00:00Z"))
		},
	}, {
		name: "up-to-date",
		in:   inputs(spec("1.28"), ambient("1.28.2")),
		check: func(g Gomega, p Plan) {
			g.Expect(p.Steps).To(BeEmpty())
			g.Expect(p.Blocked).To(BeEmpty())
			g.Expect(p.Summary).To(Equal("Up to date: 1.28.2 (Ambient, EBPF) runs as specified"))
		},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			p, err := Compute(tc.in)
			g.Expect(err).NotTo(HaveOccurred())
			tc.check(g, p)
			again, err := Compute(tc.in)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(again).To(Equal(p), "same inputs, same plan")
			checkGolden(t, tc.name, render(p))
		})
	}
}

func TestFailedTarget(t *testing.T) {
	rolledBack := meshv1.HistoryEntry{Version: "1.28.2", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeRolledBack}
	cases := []struct {
		name        string
		spec        meshv1.MeshSpec
		installed   Installed
		gen, obsGen int64
		history     []meshv1.HistoryEntry
		blocked     string // substring; "" = not blocked
	}{
		{name: "failed, spec unchanged", spec: spec("1.28"), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{rolledBack}, blocked: "1.28.2 (Ambient) was rolled back before"},
		{name: "Failed outcome counts too", spec: spec("1.28"), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{{Version: "1.28.2", Outcome: meshv1.OutcomeFailed}}, blocked: "1.28.2 (Ambient) failed before"},
		{name: "spec changed since", spec: spec("1.28"), installed: ambient("1.27.3"), gen: 5, obsGen: 4,
			history: []meshv1.HistoryEntry{rolledBack}},
		{name: "succeeded later", spec: spec("1.28"), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{rolledBack, {Version: "1.28.2", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeSucceeded}}},
		{name: "failed in another mode", spec: spec("1.28"), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{{Version: "1.28.2", Mode: meshv1.ModeSidecar, Outcome: meshv1.OutcomeRolledBack}}},
		{name: "another patch failed", spec: spec("1.28"), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{{Version: "1.28.1", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeRolledBack}}},
		{name: "intermediate hop failed", spec: spec("1.28"), installed: ambient("1.26.4"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{{Version: "1.27.3", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeRolledBack}},
			blocked: "1.27.3 (Ambient), the release the upgrade from 1.26.4 to 1.28.2 goes through, was rolled back"},
		{name: "failed fresh install", spec: spec("1.28"), installed: Installed{}, gen: 1, obsGen: 1,
			history: []meshv1.HistoryEntry{{Version: "1.28.2", Outcome: meshv1.OutcomeFailed}}, blocked: "or set spec.version to another release"},
		{name: "failed mode switch", spec: withMode(spec("1.27.3"), meshv1.ModeSidecar, ""), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{{Version: "1.27.3", Mode: meshv1.ModeSidecar, Outcome: meshv1.OutcomeRolledBack}}, blocked: "1.27.3 (Sidecar) was rolled back"},
		{name: "an Ambient failure does not block the switch to Sidecar", spec: withMode(spec("1.27.3"), meshv1.ModeSidecar, ""), installed: ambient("1.27.3"), gen: 4, obsGen: 4,
			history: []meshv1.HistoryEntry{{Version: "1.27.3", Mode: meshv1.ModeAmbient, Outcome: meshv1.OutcomeRolledBack}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			in := inputs(tc.spec, tc.installed)
			in.Generation, in.ObservedGeneration, in.History = tc.gen, tc.obsGen, tc.history
			p, err := Compute(in)
			g.Expect(err).NotTo(HaveOccurred())
			if tc.blocked == "" {
				g.Expect(p.Blocked).To(BeEmpty())
				g.Expect(p.Steps).NotTo(BeEmpty())
				ok, _ := p.MayStart(0)
				g.Expect(ok).To(BeTrue())
				return
			}
			g.Expect(p.Blocked).To(ContainSubstring(tc.blocked))
			g.Expect(p.Blocked).To(ContainSubstring("not retried until the spec changes"))
			g.Expect(p.Steps).To(BeEmpty(), "no rollout steps for a failed target")
			g.Expect(p.Target).NotTo(BeEmpty())
			ok, why := p.MayStart(0)
			g.Expect(ok).To(BeFalse())
			g.Expect(why).To(Equal(p.Blocked))
		})
	}
}

func TestAutomaticFalseStaysOnInstalledPatch(t *testing.T) {
	g := NewWithT(t)
	s := spec("1.27")
	s.Upgrade.Automatic = ptr.To(false)
	p, err := Compute(inputs(s, ambient("1.27.2")))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(p.Target).To(Equal("1.27.2"))
	g.Expect(p.Steps).To(BeEmpty())

	// A pinned release is followed whatever automatic says.
	s.Version = "1.27.3"
	p, err = Compute(inputs(s, ambient("1.27.2")))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(p.Hops).To(Equal([]string{"1.27.3"}))

	// So is another minor.
	s.Version = "1.28"
	p, err = Compute(inputs(s, ambient("1.27.2")))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(p.Hops).To(Equal([]string{"1.28.2"}))
}

func TestStatusAllPending(t *testing.T) {
	g := NewWithT(t)
	p, err := Compute(inputs(spec("1.28"), ambient("1.27.3")))
	g.Expect(err).NotTo(HaveOccurred())
	st := p.Status()
	g.Expect(st).To(HaveLen(len(p.Steps)))
	for i, s := range st {
		g.Expect(s).To(Equal(meshv1.PlanStep{
			Action: string(p.Steps[i].Action), Target: p.Steps[i].Target, State: meshv1.StepPending, Message: p.Steps[i].Message,
		}))
	}
	g.Expect(st[0].Action).To(Equal("UpgradeControlPlane"))
	g.Expect(st[0].Target).To(Equal("1.28.2"))
}

func TestMayStart(t *testing.T) {
	g := NewWithT(t)
	p, err := Compute(inputs(spec("1.28"), ambient("1.27.3")))
	g.Expect(err).NotTo(HaveOccurred())
	for i := range p.Steps {
		ok, why := p.MayStart(i)
		g.Expect(ok).To(BeTrue(), "window open at %s: %s", saturday0330, why)
	}
	ok, why := p.MayStart(len(p.Steps))
	g.Expect(ok).To(BeFalse())
	g.Expect(why).To(Equal("the plan has no step 5 (it has 4)"))
}

func TestInstalledFrom(t *testing.T) {
	g := NewWithT(t)
	g.Expect(InstalledFrom(meshv1.MeshStatus{})).To(Equal(Installed{}))
	g.Expect(InstalledFrom(meshv1.MeshStatus{
		Version:    meshv1.VersionStatus{Installed: "1.27.3", Target: "1.28.2"},
		Dataplane:  meshv1.DataplaneStatus{Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionIPTables},
		Components: []meshv1.ComponentStatus{{Name: "crds"}, {Name: "spire-server"}, {Name: "istiod"}},
	})).To(Equal(Installed{Version: "1.27.3", Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionIPTables, Identity: true}))
}

func TestRevisionOfMatchesBundle(t *testing.T) {
	g := NewWithT(t)
	for _, v := range bundle.Default().Versions() {
		b, err := bundle.Default().Resolve(v)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(revisionOf(v)).To(Equal(b.Revision()))
	}
}

func TestComputeErrors(t *testing.T) {
	gappy := testCatalog(t, map[string]manifest{
		"1.26.4": {upgradeFrom: []string{"1.25", "1.26"}, spire: "1.12.4"},
		"1.28.2": {upgradeFrom: []string{"1.26", "1.27", "1.28"}, spire: "1.13.3"},
	})
	strict := testCatalog(t, map[string]manifest{
		"1.26.4": {upgradeFrom: []string{"1.26"}, spire: "1.12.4"},
		"1.27.3": {upgradeFrom: []string{"1.27"}, spire: "1.13.3"},
	})
	spireJump := testCatalog(t, map[string]manifest{
		"1.26.4": {upgradeFrom: []string{"1.26"}, spire: "1.11.0"},
		"1.27.3": {upgradeFrom: []string{"1.26", "1.27"}, spire: "1.13.3"},
	})
	badWindow := spec("1.28")
	badWindow.Upgrade.Windows = []meshv1.MaintenanceWindow{{Cron: "0 2 * *", Duration: metav1.Duration{Duration: time.Hour}}}
	badNodes := spec("1.28")
	badNodes.Rollout.Nodes.MaxUnavailable = ptr.To(intstr.FromString("lots"))
	emptyCanary := spec("1.28")
	emptyCanary.Rollout.Nodes.Canary = &metav1.LabelSelector{}

	cases := []struct {
		name      string
		spec      meshv1.MeshSpec
		installed Installed
		catalog   *bundle.Catalog
		want      []string
	}{
		{name: "downgrade of two minors", spec: spec("1.26"), installed: ambient("1.28.2"),
			want: []string{"spec.version 1.26.4 is 2 minors below installed 1.28.2", "set spec.version to 1.27 first, then 1.26.4"}},
		{name: "unknown version", spec: spec("1.29"), installed: ambient("1.28.2"),
			want: []string{`spec.version "1.29": not in the catalog; known versions: 1.26.4, 1.27.2, 1.27.3, 1.28.2`}},
		{name: "major change", spec: spec("1.28"), installed: ambient("0.9.1"),
			want: []string{"crosses a major version", "set spec.version to a 0.x release"}},
		{name: "installed is not a release", spec: spec("1.28"), installed: ambient("1.27"),
			want: []string{`status.version.installed "1.27" is not a release`}},
		{name: "catalog misses a minor", spec: spec("1.28"), installed: ambient("1.26.4"), catalog: gappy,
			want: []string{"no upgrade path from 1.26.4 to 1.28.2: the catalog has no 1.27 release and the mesh moves one minor at a time", "known versions: 1.26.4, 1.28.2", "ships 1.27"}},
		{name: "bundle does not list the source minor", spec: spec("1.27"), installed: ambient("1.26.4"), catalog: strict,
			want: []string{"no upgrade path from 1.26.4 to 1.27.3: bundle 1.27.3 does not accept upgrades from 1.26", `(its upgradeFrom lists "1.27")`, `add "1.26" to upgradeFrom in bundles/catalog/1.27.3.yaml`}},
		{name: "SPIRE would skip a minor", spec: withSpire(spec("1.27")), installed: Installed{Version: "1.26.4", Mode: meshv1.ModeAmbient, Identity: true}, catalog: spireJump,
			want: []string{"no safe plan to 1.27.3: step 1 (UpgradeIdentity spire-server 1.27.3) would break the skew rules", "SPIRE server 1.13.3 would be 2 minors ahead of the SPIRE agents at 1.11.0"}},
		{name: "bad window", spec: badWindow, installed: ambient("1.27.3"),
			want: []string{`spec.upgrade.windows[0].cron "0 2 * *"`, `e.g. "0 2 * * 6"`}},
		{name: "bad maxUnavailable", spec: badNodes, installed: ambient("1.27.3"),
			want: []string{`spec.rollout.nodes.maxUnavailable "lots"`, "e.g. maxUnavailable: 10%"}},
		{name: "empty canary selector", spec: emptyCanary, installed: ambient("1.27.3"),
			want: []string{"spec.rollout.nodes.canary is an empty selector", "canary: {matchLabels: {pool: canary}}"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			in := inputs(tc.spec, tc.installed)
			if tc.catalog != nil {
				in.Catalog = tc.catalog
			}
			_, err := Compute(in)
			g.Expect(err).To(HaveOccurred())
			for _, w := range tc.want {
				g.Expect(err.Error()).To(ContainSubstring(w))
			}
		})
	}

	t.Run("no catalog", func(t *testing.T) {
		g := NewWithT(t)
		in := inputs(spec("1.28"), Installed{})
		in.Catalog = nil
		_, err := Compute(in)
		g.Expect(err).To(MatchError(errNoCatalog))
	})

	t.Run("node settings do not matter in Sidecar mode", func(t *testing.T) {
		g := NewWithT(t)
		_, err := Compute(inputs(withMode(emptyCanary, meshv1.ModeSidecar, ""), Installed{Version: "1.27.3", Mode: meshv1.ModeSidecar}))
		g.Expect(err).NotTo(HaveOccurred())
	})
}

// manifest is what a test bundle varies.
type manifest struct {
	upgradeFrom []string
	spire       string
}

// testCatalog loads a catalog of the given releases with minimal charts.
func testCatalog(t *testing.T, releases map[string]manifest) *bundle.Catalog {
	t.Helper()
	fsys := fstest.MapFS{}
	for _, c := range bundle.AllComponents {
		fsys["charts/"+string(c)+"/Chart.yaml"] = &fstest.MapFile{Data: fmt.Appendf(nil, "apiVersion: v2\nname: %s\nversion: 0.1.0\n", c)}
	}
	for v, m := range releases {
		var comps strings.Builder
		for _, c := range bundle.AllComponents {
			fmt.Fprintf(&comps, "  %s: {chart: %s}\n", c, c)
		}
		quoted := make([]string, len(m.upgradeFrom))
		for i, f := range m.upgradeFrom {
			quoted[i] = fmt.Sprintf("%q", f)
		}
		yaml := fmt.Sprintf(`version: %q
minKernel: "5.10"
dnsCapture: true
upgradeFrom: [%s]
spire: {version: %q, support: {Sidecar: Supported, Ambient: Unsupported}}
images:
  pilot: docker.io/istio/pilot:%[1]s
  proxy: docker.io/istio/proxyv2:%[1]s
  ztunnel: docker.io/istio/ztunnel:%[1]s
  installCNI: docker.io/istio/install-cni:%[1]s
  nodeAgent: ghcr.io/meshkeeper/agent:0.1.0
  spireServer: ghcr.io/spiffe/spire-server:%[3]s
  spireAgent: ghcr.io/spiffe/spire-agent:%[3]s
  pause: registry.k8s.io/pause:3.10
components:
%s`, v, strings.Join(quoted, ", "), m.spire, comps.String())
		fsys["catalog/"+v+".yaml"] = &fstest.MapFile{Data: []byte(yaml)}
	}
	c, err := bundle.Load(fsys)
	if err != nil {
		t.Fatalf("test catalog: %v", err)
	}
	return c
}

// TestPlansKeepSkew plans every move the catalog allows, in every mode and
// identity setting, and replays each plan step by step with its own model of
// what runs: no state in between may break a skew rule, every hop is at most
// one minor, and the last state is the target everywhere.
func TestPlansKeepSkew(t *testing.T) {
	cat := bundle.Default()
	var specVersions []string
	specVersions = append(specVersions, cat.Versions()...)
	specVersions = append(specVersions, cat.Minors()...)
	installedVersions := append([]string{""}, cat.Versions()...)
	type dataplane struct {
		mode        meshv1.DataplaneMode
		redirection meshv1.Redirection
	}
	dataplanes := []dataplane{{meshv1.ModeAmbient, meshv1.RedirectionEBPF}, {meshv1.ModeAmbient, meshv1.RedirectionIPTables}, {meshv1.ModeSidecar, ""}}

	planned, refused := 0, 0
	for _, from := range installedVersions {
		for _, to := range specVersions {
			for _, have := range dataplanes {
				for _, want := range dataplanes {
					for _, haveSpire := range []bool{false, true} {
						for _, wantSpire := range []bool{false, true} {
							name := fmt.Sprintf("%s %v spire=%t → %s %v spire=%t", from, have, haveSpire, to, want, wantSpire)
							s := withMode(spec(to), want.mode, want.redirection)
							if wantSpire {
								s = withSpire(s)
							}
							installed := Installed{Version: from, Mode: have.mode, Redirection: have.redirection, Identity: haveSpire}
							p, err := Compute(inputs(s, installed))
							if err != nil {
								if !strings.Contains(err.Error(), "minors below installed") {
									t.Errorf("%s: unexpected error: %v", name, err)
								}
								refused++
								continue
							}
							planned++
							replay(t, name, cat, installed, s, p)
						}
					}
				}
			}
		}
	}
	// 36 dataplane and identity combinations per version pair. Planned: 7
	// targets from nothing, 7 from 1.26.4, 7 from 1.27.2 and 1.27.3 (one
	// minor back is a canary rollout) and 5 from 1.28.2; refused: 1.28.2 to
	// 1.26 and 1.26.4, two minors back.
	if planned != 33*36 || refused != 2*36 {
		t.Errorf("planned %d and refused %d moves, want %d and %d", planned, refused, 33*36, 2*36)
	}
}

func replay(t *testing.T, name string, cat *bundle.Catalog, in Installed, s meshv1.MeshSpec, p Plan) {
	t.Helper()
	spireOf := func(v string) string {
		b, err := cat.Resolve(v)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return b.SpireVersion
	}
	var cp, nodes, server, agents string
	if in.Version != "" {
		cp = in.Version
		if in.Mode != meshv1.ModeSidecar {
			nodes = in.Version
		}
		if in.Identity {
			server, agents = spireOf(in.Version), spireOf(in.Version)
		}
	}
	prev := in.Version
	for _, hop := range p.Hops {
		if prev != "" {
			a, _ := parseMinor(prev)
			b, _ := parseMinor(hop)
			if d, _ := minorsAhead(b, a); d > 1 || d < -1 || (d < 0 && len(p.Hops) > 1) {
				t.Errorf("%s: hop %s → %s is %d minors (of hops %v)", name, prev, hop, d, p.Hops)
			}
		}
		prev = hop
	}
	seen := map[string]bool{}
	for i, st := range p.Steps {
		key := string(st.Action) + " " + st.Target
		if seen[key] {
			t.Errorf("%s: step %d %q repeats an action and target", name, i+1, key)
		}
		seen[key] = true
		switch st.Action {
		case ActionInstallIdentity, ActionUpgradeIdentity:
			if strings.HasPrefix(st.Target, "spire-server ") {
				server = spireOf(st.Version)
			} else {
				agents = spireOf(st.Version)
			}
		case ActionRemoveIdentity:
			if strings.HasPrefix(st.Target, "spire-server ") {
				server = ""
			} else {
				agents = ""
			}
		case ActionInstallControlPlane:
			cp = st.Version
		case ActionUpgradeControlPlane:
			// Beside the old revision: the newest one is the control plane.
			if !releaseOlder(st.Version, cp) {
				cp = st.Version
			}
		case ActionRetireControlPlane:
			cp = st.Version
		case ActionInstallNodeComponents, ActionUpgradeNodeComponents, ActionSwitchRedirection:
			nodes = st.Version
		case ActionRemoveNodeComponents:
			nodes = ""
		}
		if err := CheckSkew(cp, nodes); err != nil {
			t.Errorf("%s: after step %d %s: %v", name, i+1, key, err)
		}
		if err := CheckSpireSkew(server, agents); err != nil {
			t.Errorf("%s: after step %d %s: %v", name, i+1, key, err)
		}
	}
	if cp != p.Target {
		t.Errorf("%s: control plane ends at %q, want %s", name, cp, p.Target)
	}
	wantNodes := ""
	if s.Dataplane.EffectiveMode() == meshv1.ModeAmbient {
		wantNodes = p.Target
	}
	if nodes != wantNodes {
		t.Errorf("%s: node components end at %q, want %q", name, nodes, wantNodes)
	}
	wantSpire := ""
	if s.Identity.Spire != nil && s.Identity.Spire.Enabled {
		wantSpire = spireOf(p.Target)
	}
	if server != wantSpire || agents != wantSpire {
		t.Errorf("%s: SPIRE ends at server %q agents %q, want %q", name, server, agents, wantSpire)
	}
	if !slices.Equal(p.Hops, slices.Compact(slices.Clone(p.Hops))) {
		t.Errorf("%s: hops repeat: %v", name, p.Hops)
	}
}

// TestVerifySkewCatchesABadOrder: the check Compute runs on its own steps
// refuses a plan that moves the control plane two minors past the nodes.
func TestVerifySkewCatchesABadOrder(t *testing.T) {
	g := NewWithT(t)
	steps := []Step{
		{Action: ActionUpgradeControlPlane, Target: "1.27.3", Version: "1.27.3"},
		{Action: ActionUpgradeControlPlane, Target: "1.28.2", Version: "1.28.2"},
		{Action: ActionUpgradeNodeComponents, Target: "1.28.2", Version: "1.28.2"},
	}
	err := verifySkew(ambient("1.26.4"), installedConfig(ambient("1.26.4")), steps, bundle.Default())
	g.Expect(err).To(MatchError(ContainSubstring("step 2 (UpgradeControlPlane 1.28.2) would break the skew rules: control plane 1.28.2 would be 2 minors ahead")))

	// The same steps in Sidecar mode have no node components to skew against.
	sidecar := Installed{Version: "1.26.4", Mode: meshv1.ModeSidecar}
	g.Expect(verifySkew(sidecar, installedConfig(sidecar), steps[:2], bundle.Default())).To(Succeed())

	// Agents before the server.
	spire := Installed{Version: "1.26.4", Mode: meshv1.ModeSidecar, Identity: true}
	err = verifySkew(spire, installedConfig(spire), []Step{
		{Action: ActionUpgradeIdentity, Target: "spire-agent 1.27.3", Version: "1.27.3", Components: []bundle.Component{bundle.SpireAgent}},
	}, bundle.Default())
	g.Expect(err).To(MatchError(ContainSubstring("SPIRE agents 1.13.3 would be newer than the SPIRE server 1.12.4: upgrade the server first")))
}

func TestCheckSkew(t *testing.T) {
	cases := []struct {
		cp, nodes string
		want      string // substring of the error; "" = allowed
	}{
		{"1.27.3", "1.27.3", ""},
		{"1.28.2", "1.27.3", ""},
		{"1.27.3", "1.27.2", ""},
		{"1.27.2", "1.27.3", ""}, // patches are not skew
		{"1.28.2", "", ""},
		{"", "", ""},
		{"1.28.2", "1.26.4", "control plane 1.28.2 would be 2 minors ahead of the node components (ztunnel, istio-cni, node agent) at 1.26.4: it may be at most one minor ahead; move the node components to 1.27 first"},
		{"1.30.0", "1.26.4", "4 minors ahead"},
		{"1.27.3", "1.28.2", "node components (ztunnel, istio-cni, node agent) at 1.28.2 would be ahead of the control plane at 1.27.3: upgrade the control plane first"},
		{"", "1.27.3", "would run without a control plane"},
		{"2.0.0", "1.28.2", "different major versions"},
		{"v1.28", "1.28.2", `control plane version: "v1.28" is not a version`},
		{"1.28.2", "latest", `node components version: "latest" is not a version`},
	}
	for _, tc := range cases {
		t.Run(tc.cp+"/"+tc.nodes, func(t *testing.T) {
			g := NewWithT(t)
			err := CheckSkew(tc.cp, tc.nodes)
			if tc.want == "" {
				g.Expect(err).NotTo(HaveOccurred())
				return
			}
			g.Expect(err).To(MatchError(ContainSubstring(tc.want)))
		})
	}
}

func TestCheckSpireSkew(t *testing.T) {
	cases := []struct {
		server, agents string
		want           string
	}{
		{"1.13.3", "1.13.3", ""},
		{"1.13.3", "1.12.4", ""},
		{"1.13.3", "", ""},
		{"1.13.3", "1.11.0", "SPIRE server 1.13.3 would be 2 minors ahead of the SPIRE agents at 1.11.0"},
		{"1.12.4", "1.13.3", "SPIRE agents 1.13.3 would be newer than the SPIRE server 1.12.4: upgrade the server first"},
		{"", "1.13.3", "without a SPIRE server"},
	}
	for _, tc := range cases {
		g := NewWithT(t)
		err := CheckSpireSkew(tc.server, tc.agents)
		if tc.want == "" {
			g.Expect(err).NotTo(HaveOccurred(), "%s/%s", tc.server, tc.agents)
			continue
		}
		g.Expect(err).To(MatchError(ContainSubstring(tc.want)), "%s/%s", tc.server, tc.agents)
	}
}

// TestDowngrades: the one downgrade rule. One minor back (or an older patch of
// the same minor) is one canary rollout to the older release, the same steps
// as an upgrade, SPIRE agents before the server; more is refused naming the
// path.
func TestDowngrades(t *testing.T) {
	cases := []struct {
		name      string
		spec      meshv1.MeshSpec
		installed Installed
		wantSteps []string // Action Target, in order
		wantErr   string
	}{
		{name: "one minor back", spec: spec("1.27"), installed: ambient("1.28.2"), wantSteps: []string{
			"UpgradeControlPlane 1.27.3", "UpgradeNodeComponents 1.27.3", "MoveNamespaces 1.27.3", "RetireControlPlane 1.28.2"}},
		{name: "one minor back to an exact patch", spec: spec("1.26.4"), installed: ambient("1.27.2"), wantSteps: []string{
			"UpgradeControlPlane 1.26.4", "UpgradeNodeComponents 1.26.4", "MoveNamespaces 1.26.4", "RetireControlPlane 1.27.2"}},
		{name: "an older patch of the same minor", spec: spec("1.27.2"), installed: ambient("1.27.3"), wantSteps: []string{
			"UpgradeControlPlane 1.27.2", "UpgradeNodeComponents 1.27.2", "MoveNamespaces 1.27.2", "RetireControlPlane 1.27.3"}},
		{name: "one minor back with SPIRE: agents first", spec: withSpire(spec("1.26")),
			installed: Installed{Version: "1.27.3", Mode: meshv1.ModeAmbient, Identity: true}, wantSteps: []string{
				"UpgradeIdentity spire-agent 1.26.4", "UpgradeIdentity spire-server 1.26.4",
				"UpgradeControlPlane 1.26.4", "UpgradeNodeComponents 1.26.4", "MoveNamespaces 1.26.4", "RetireControlPlane 1.27.3"}},
		{name: "two minors back", spec: spec("1.26"), installed: ambient("1.28.2"),
			wantErr: "spec.version 1.26.4 is 2 minors below installed 1.28.2: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.27 first, then 1.26.4"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			p, err := Compute(inputs(tc.spec, tc.installed))
			if tc.wantErr != "" {
				g.Expect(err).To(MatchError(tc.wantErr))
				return
			}
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(p.Hops).To(Equal([]string{p.Target}), "one rollout, straight to the older release")
			var got []string
			for _, st := range p.Steps {
				got = append(got, string(st.Action)+" "+st.Target)
			}
			g.Expect(got).To(Equal(tc.wantSteps))
		})
	}
}

func TestCheckDowngrade(t *testing.T) {
	cases := []struct{ version, installed, want string }{
		{"1.28", "", ""},
		{"1.27", "1.28.2", ""},
		{"1.27.2", "1.27.3", ""},
		{"1.29", "1.28.2", ""},
		{"2.0", "1.28.2", ""},
		{"not-a-version", "1.28.2", ""},
		{"1.26", "1.28.2", "1.26 is 2 minors below installed 1.28.2: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.27 first, then 1.26"},
		{"1.25.0", "1.28.2", "1.25.0 is 3 minors below installed 1.28.2: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to 1.27 first, then 1.26, then 1.25.0"},
		{"0.9", "1.28.2", "0.9 is a downgrade from installed 1.28.2 across a major version, which meshkeeper does not do: keep 1.28 or roll forward"},
	}
	for _, tc := range cases {
		t.Run(tc.version+" from "+tc.installed, func(t *testing.T) {
			err := CheckDowngrade(tc.version, tc.installed)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
				return
			}
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}
