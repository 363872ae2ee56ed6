package v1alpha1

// Condition types of a Mesh. Ready, Reconciling and Stalled follow kstatus, so
// `kubectl wait --for=condition=Ready`, Flux and Argo CD read them correctly.
const (
	// ConditionReady is True when the mesh runs as the spec says.
	ConditionReady = "Ready"
	// ConditionReconciling is True while meshkeeper is acting on a change.
	ConditionReconciling = "Reconciling"
	// ConditionStalled is True when meshkeeper cannot progress without a
	// change by a human (a bad spec, a failed target).
	ConditionStalled = "Stalled"
	// ConditionDegraded is True when the mesh runs but not as wanted (a
	// rollback happened, analysis is inconclusive for too long).
	ConditionDegraded = "Degraded"
	// ConditionPreflightPassed is True when every node passed kernel preflight
	// for the chosen redirection.
	ConditionPreflightPassed = "PreflightPassed"
	// ConditionRolledBack is True when the last rollout was rolled back.
	ConditionRolledBack = "RolledBack"
)

// Condition reasons.
const (
	// ReasonSucceeded: the spec is in effect.
	ReasonSucceeded = "Succeeded"
	// ReasonProgressing: meshkeeper is applying the spec.
	ReasonProgressing = "Progressing"
	// ReasonInvalidSpec: the spec cannot be acted on; the message says which
	// field and how to fix it.
	ReasonInvalidSpec = "InvalidSpec"
	// ReasonApplyFailed: a write to the cluster failed; meshkeeper retries.
	ReasonApplyFailed = "ApplyFailed"
	// ReasonPaused: spec.paused is true; the plan is published, nothing runs.
	ReasonPaused = "Paused"
	// ReasonDeleting: the Mesh is being deleted and meshkeeper is cleaning up.
	ReasonDeleting = "Deleting"
	// ReasonLabelConflict: a namespace's dataplane label is owned by someone else.
	ReasonLabelConflict = "LabelConflict"
	// ReasonRollingOut: a new version moves wave by wave; the message names
	// the wave and what it waits for.
	ReasonRollingOut = "RollingOut"
	// ReasonRolledBack: an SLO broke during a rollout and everything went
	// back to the previous version; the target is not retried until the spec
	// changes.
	ReasonRolledBack = "RolledBack"
	// ReasonAnalysisInconclusive: the SLOs cannot be judged (Prometheus
	// unreachable or without data) for too long; the rollout holds.
	ReasonAnalysisInconclusive = "AnalysisInconclusive"
	// ReasonKernelIneligible: some nodes cannot run eBPF redirection; the
	// message names them and says why.
	ReasonKernelIneligible = "KernelIneligible"
	// ReasonPodsNotEnrolled: on some eBPF nodes, pods that should be
	// redirected have not been enrolled for longer than the grace period
	// (their traffic bypasses the mesh); the message names the nodes and pods.
	ReasonPodsNotEnrolled = "PodsNotEnrolled"
	// ReasonWaypointConflict: a Gateway or an istio.io/use-waypoint label a
	// waypoint needs was written by someone else (meshkeeper leaves it), or
	// a waypoint's namespace is not in the mesh; status.waypoints says which.
	ReasonWaypointConflict = "WaypointConflict"
	// ReasonMTLSConflict: spec.security.mtls is Strict and a mesh-wide
	// PeerAuthentication meshkeeper did not write is in the root namespace
	// (meshkeeper leaves it; istiod applies the oldest mesh-wide one, and
	// a rollout cannot relax it); status.security.conflicts says which.
	ReasonMTLSConflict = "MTLSConflict"
	// ReasonPlanFailed: the planner found no safe way from what runs to the
	// spec (e.g. a downgrade of two minors); nothing new starts until the
	// spec, the catalog or the cluster changes. The message is the planner's:
	// what is wrong and how to fix it.
	ReasonPlanFailed = "PlanFailed"
)

// Well-known labels, annotations and names.
const (
	// Finalizer keeps a Mesh until meshkeeper has removed what it set.
	Finalizer = "meshkeeper.dev/cleanup"
	// FieldManager is the server-side apply field manager meshkeeper writes with.
	FieldManager = "meshkeeper"
	// LabelDataplaneMode enrolls a namespace in ambient mode.
	LabelDataplaneMode = "istio.io/dataplane-mode"
	// LabelRevision points a namespace's sidecar injection at a control-plane revision.
	LabelRevision = "istio.io/rev"
	// LabelRedirection on a Node says which redirection it gets: ebpf, iptables or blocked.
	LabelRedirection = "meshkeeper.dev/redirection"
	// LabelComponent names the mesh component an object belongs to. Every
	// object meshkeeper's releases render carries it, so it is the label to
	// select meshkeeper's objects by (app.kubernetes.io/managed-by is Helm's:
	// Helm sets it to "Helm" on every object it applies).
	LabelComponent = "meshkeeper.dev/component"
	// LabelControlPlaneRevision names the control-plane revision an object belongs to.
	LabelControlPlaneRevision = "meshkeeper.dev/revision"
	// LabelWaypointFor on a waypoint Gateway says which traffic it proxies:
	// service, workload or all.
	LabelWaypointFor = "istio.io/waypoint-for"
	// LabelUseWaypoint on a namespace (or service) sends its traffic
	// through the named waypoint.
	LabelUseWaypoint = "istio.io/use-waypoint"
	// AnnotationIgnore on a managed object makes meshkeeper leave it alone.
	AnnotationIgnore = "meshkeeper.dev/ignore"
)
