package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// EngineMemory is what the rollout engine (internal/plan.Next) remembers
// between reconciles: the plan frozen when the rollout started, with the
// wave of every namespace and node, and where the rollout is. The engine
// reads nothing else about the past, so an operator restarted at any point
// carries on from it. Users read it to see which namespaces belong to which
// wave; nobody writes it but meshkeeper.
//
// Its size grows with the cluster: one name per namespace and node (about
// 100 KiB at 5,000 namespaces and 500 nodes), well inside an object's 1.5
// MiB. The lists carry no maxItems on purpose: a cap would freeze the
// rollout at the first status patch past it, and a truncated record would
// move namespaces unjudged.
type EngineMemory struct {
	// Base is what ran when the rollout started; a rollback returns to it.
	Base EngineInstalled `json:"base"`
	// Want is the configuration the rollout ends in.
	Want EngineInstalled `json:"want"`
	// Target is the version the frozen plan ends at.
	Target string `json:"target"`
	// SpecVersion is spec.version when the rollout started: another one
	// rolls the rollout back and plans again.
	// +optional
	SpecVersion string `json:"specVersion,omitempty"`
	// Steps are the frozen plan (status.plan shows them with their state).
	Steps []EngineStep `json:"steps"`
	// Step is the index of the current step, from 0.
	Step int32 `json:"step"`
	// NamespaceWaves are the namespaces of each wave, frozen at the start;
	// a namespace selected later joins the last wave, or a wave of its own
	// when the last one has started.
	// +optional
	NamespaceWaves []EngineWave `json:"namespaceWaves,omitempty"`
	// NodeWaves are the nodes of each node wave, frozen likewise.
	// +optional
	NodeWaves []EngineWave `json:"nodeWaves,omitempty"`
	// JoinedNodes joined the cluster after the start.
	// +optional
	JoinedNodes []string `json:"joinedNodes,omitempty"`
	// Wave is the current wave of a wave step, from 1; 0 before the first.
	// +optional
	Wave int32 `json:"wave,omitempty"`
	// Phase of the current wave or step: Moving, Baking, RollingBack or Held.
	Phase string `json:"phase"`
	// StartedAt is when the rollout started.
	StartedAt metav1.Time `json:"startedAt"`
	// PhaseAt is when the current wave or step entered its phase: the
	// progress deadline counts from it while Moving, the bake while Baking.
	PhaseAt metav1.MicroTime `json:"phaseAt"`
	// NextCheckAt is when the next SLO check is due.
	// +optional
	NextCheckAt *metav1.MicroTime `json:"nextCheckAt,omitempty"`
	// FailedChecks and InconclusiveChecks count the current wave's
	// consecutive failed and inconclusive checks.
	// +optional
	FailedChecks int32 `json:"failedChecks,omitempty"`
	// +optional
	InconclusiveChecks int32 `json:"inconclusiveChecks,omitempty"`
	// Degraded: the analysis has been inconclusive beyond inconclusiveLimit.
	// +optional
	Degraded bool `json:"degraded,omitempty"`
	// Reason says why the rollout rolls back.
	// +optional
	Reason string `json:"reason,omitempty"`
	// Restart is the restart token (meshkeeper.dev/restartedAt) of the
	// current wave's workloads; "" when they are not restarted.
	// +optional
	Restart string `json:"restart,omitempty"`
	// PausedAt is when spec.paused was first seen during the current wave.
	// +optional
	PausedAt *metav1.MicroTime `json:"pausedAt,omitempty"`
}

// EngineInstalled is one configuration of the mesh: version, dataplane and
// identity.
type EngineInstalled struct {
	// +optional
	Version string `json:"version,omitempty"`
	// +optional
	Mode DataplaneMode `json:"mode,omitempty"`
	// +optional
	Redirection Redirection `json:"redirection,omitempty"`
	// +optional
	Identity bool `json:"identity,omitempty"`
}

// EngineStep is one step of the frozen plan.
type EngineStep struct {
	// Action, e.g. MoveNamespaces.
	Action string `json:"action"`
	// Target as status.plan shows it, e.g. "1.27.3 Sidecar".
	// +optional
	Target string `json:"target,omitempty"`
	// Version is the bundle the step's hop moves to; From the one it
	// replaces (Version itself for a reconfiguration at one version).
	// +optional
	Version string `json:"version,omitempty"`
	// +optional
	From string `json:"from,omitempty"`
	// Revision is the control-plane revision the step acts on.
	// +optional
	Revision string `json:"revision,omitempty"`
	// Components are the Helm releases' components the step applies or removes.
	// +optional
	Components []string `json:"components,omitempty"`
	// Windowed steps start only while a maintenance window is open.
	// +optional
	Windowed bool `json:"windowed,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
}

// EngineWave is the members of one wave.
type EngineWave struct {
	// +optional
	Names []string `json:"names,omitempty"`
}
