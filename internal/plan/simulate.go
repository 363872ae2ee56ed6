package plan

import (
	"fmt"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// state is what runs between two steps: the newest control-plane revision's
// version, the node components' version, and the SPIRE releases. "" is not
// installed.
type state struct {
	controlPlane, nodes      string
	spireServer, spireAgents string
}

// apply is the state after step s. spire is the SPIRE release of s.Version.
func (st state) apply(s Step, spire string) state {
	for _, c := range s.Components {
		switch {
		case c == bundle.SpireServer && s.Action == ActionRemoveIdentity:
			st.spireServer = ""
		case c == bundle.SpireAgent && s.Action == ActionRemoveIdentity:
			st.spireAgents = ""
		case c == bundle.SpireServer:
			st.spireServer = spire
		case c == bundle.SpireAgent:
			st.spireAgents = spire
		}
	}
	switch s.Action {
	case ActionInstallControlPlane:
		st.controlPlane = s.Version
	case ActionUpgradeControlPlane:
		// The new revision runs beside the old one: on a downgrade the
		// newest control plane is still the old one, until it is retired.
		if st.controlPlane == "" || !releaseOlder(s.Version, st.controlPlane) {
			st.controlPlane = s.Version
		}
	case ActionRetireControlPlane:
		st.controlPlane = s.Version
	case ActionInstallNodeComponents, ActionUpgradeNodeComponents, ActionSwitchRedirection:
		st.nodes = s.Version
	case ActionRemoveNodeComponents:
		st.nodes = ""
	}
	return st
}

func (st state) check() error {
	if err := CheckSkew(st.controlPlane, st.nodes); err != nil {
		return err
	}
	return CheckSpireSkew(st.spireServer, st.spireAgents)
}

// verifySkew walks the steps from what runs and refuses the plan if any state
// in between breaks a skew rule. A node step's waves leave some nodes on the
// old version and some on the new one: both states are checked, before and
// after the step. Steps are built to pass; a failure here means the catalog
// holds a bundle the rules cannot reach (SPIRE two minors ahead), or a bug.
func verifySkew(in Installed, have config, steps []Step, cat *bundle.Catalog) error {
	var st state
	if in.Version != "" {
		st.controlPlane = in.Version
		if have.ambient() {
			st.nodes = in.Version
		}
		if have.identity {
			if b, err := cat.Resolve(in.Version); err == nil {
				st.spireServer, st.spireAgents = b.SpireVersion, b.SpireVersion
			}
		}
	}
	for i, s := range steps {
		spire := ""
		if b, err := cat.Resolve(s.Version); err == nil {
			spire = b.SpireVersion
		}
		st = st.apply(s, spire)
		if err := st.check(); err != nil {
			return fmt.Errorf("no safe plan to %s: step %d (%s %s) would break the skew rules: %w", steps[len(steps)-1].Version, i+1, s.Action, s.Target, err)
		}
	}
	return nil
}
