package identity

// Registration states, as recorded in status.identity.registration.
const (
	StateDryRun = "DryRun"
	StateActive = "Active"
)

// Gate is what decides whether a plan may be applied.
type Gate struct {
	// State is the recorded registration state: "" (never met this server),
	// DryRun or Active.
	State string
	// Published is the digest of the dry run the last status showed.
	Published string
	// Acknowledged is spec.identity.spire.acknowledgeDryRun.
	Acknowledged string
}

// Decision is the gate's answer.
type Decision struct {
	// Apply: execute the plan now.
	Apply bool
	// State to record.
	State string
	// Why, for status, when the plan is held.
	Why string
}

// Decide says whether p may run. A server that held no entries at all is
// registered at once. One that did gets a dry run first: it runs once a
// status showing exactly this dry run without conflicts was published, or
// once the Mesh acknowledges this dry run's digest. Once Active, every plan
// runs (Decide never touches foreign entries).
func (g Gate) Decide(p Plan) Decision {
	digest := p.Digest()
	switch {
	case g.State == StateActive:
		return Decision{Apply: true, State: StateActive}
	case g.State == "" && p.Own == 0 && p.Foreign == 0:
		return Decision{Apply: true, State: StateActive}
	case g.Acknowledged != "" && g.Acknowledged == digest:
		return Decision{Apply: true, State: StateActive}
	case g.State == StateDryRun && len(p.Conflicts) == 0 && g.Published == digest:
		return Decision{Apply: true, State: StateActive}
	case len(p.Conflicts) > 0:
		return Decision{State: StateDryRun, Why: "the SPIRE server already holds entries and the dry run in status.identity.dryRun lists conflicts with foreign entries; resolve them, or set spec.identity.spire.acknowledgeDryRun: \"" + digest + "\" to apply it as shown"}
	default:
		return Decision{State: StateDryRun, Why: "the SPIRE server already holds entries: publishing the dry run in status.identity.dryRun first; it is applied on the next reconcile unless it changes"}
	}
}
