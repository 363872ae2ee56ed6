package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// DataplaneMode says how workloads join the mesh.
// +kubebuilder:validation:Enum=Ambient;Sidecar
type DataplaneMode string

const (
	// ModeAmbient runs the sidecarless dataplane: ztunnel per node, waypoints for L7.
	ModeAmbient DataplaneMode = "Ambient"
	// ModeSidecar runs classic injected sidecars.
	ModeSidecar DataplaneMode = "Sidecar"
)

// Redirection says how a pod's traffic reaches the node proxy in Ambient mode.
// +kubebuilder:validation:Enum=EBPF;IPTables
type Redirection string

const (
	// RedirectionEBPF uses meshkeeper's node agent and its cgroup eBPF programs.
	RedirectionEBPF Redirection = "EBPF"
	// RedirectionIPTables uses istio-cni's iptables rules in each pod's network namespace.
	RedirectionIPTables Redirection = "IPTables"
)

// KernelFallback says what happens on nodes whose kernel fails eBPF preflight.
// +kubebuilder:validation:Enum=IPTables;Block
type KernelFallback string

const (
	// FallbackIPTables redirects with iptables on those nodes.
	FallbackIPTables KernelFallback = "IPTables"
	// FallbackBlock keeps those nodes out of the mesh and reports them.
	FallbackBlock KernelFallback = "Block"
)

// WaypointFor says which traffic a waypoint proxies.
// +kubebuilder:validation:Enum=Service;Workload;All
type WaypointFor string

const (
	WaypointForService  WaypointFor = "Service"
	WaypointForWorkload WaypointFor = "Workload"
	WaypointForAll      WaypointFor = "All"
)

// MTLSMode is the mesh-wide mutual TLS policy meshkeeper keeps.
// +kubebuilder:validation:Enum=Permissive;Strict
type MTLSMode string

const (
	// MTLSPermissive accepts plaintext and mTLS (Istio's own default):
	// meshkeeper writes no mesh-wide PeerAuthentication.
	MTLSPermissive MTLSMode = "Permissive"
	// MTLSStrict accepts only mTLS between workloads: meshkeeper writes one
	// mesh-wide PeerAuthentication (mode STRICT) once no rollout runs.
	MTLSStrict MTLSMode = "Strict"
)

// MeshSpec is what the platform team wants. meshkeeper never writes it.
// +kubebuilder:validation:XValidation:rule="!has(self.analysis) || !has(self.analysis.slos) || size(self.analysis.slos) == 0 || has(self.analysis.prometheus)",message="spec.analysis.prometheus.address is required when spec.analysis.slos is set: SLOs are read from Prometheus"
type MeshSpec struct {
	// Version is the mesh release to run: an exact version ("1.28.2") or a
	// minor ("1.28"), which means the newest patch of that minor in the catalog.
	// +kubebuilder:validation:Pattern=`^[0-9]+\.[0-9]+(\.[0-9]+)?$`
	// +kubebuilder:validation:MaxLength=32
	// +required
	Version string `json:"version"`

	// Dataplane chooses the dataplane mode and how traffic is redirected.
	// +optional
	Dataplane DataplaneSpec `json:"dataplane,omitempty"`

	// Namespaces selects the namespaces that are in the mesh.
	// +optional
	Namespaces NamespacesSpec `json:"namespaces,omitempty"`

	// Waypoints are the per-namespace L7 proxies (Ambient mode).
	// +listType=map
	// +listMapKey=namespace
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Waypoints []WaypointSpec `json:"waypoints,omitempty"`

	// Identity configures workload identity.
	// +optional
	Identity IdentitySpec `json:"identity,omitempty"`

	// Security configures the mesh's traffic security (mutual TLS).
	// +optional
	Security SecuritySpec `json:"security,omitempty"`

	// Rollout says how changes move across nodes and namespaces.
	// +optional
	Rollout RolloutSpec `json:"rollout,omitempty"`

	// Analysis are the SLO gates each wave must pass before it is promoted.
	// +optional
	Analysis *AnalysisSpec `json:"analysis,omitempty"`

	// Upgrade says whether and when new patch releases are followed.
	// +optional
	Upgrade UpgradeSpec `json:"upgrade,omitempty"`

	// Paused makes meshkeeper compute and publish status.plan without executing
	// any of it: a dry run reviewers can read.
	// +optional
	Paused bool `json:"paused,omitempty"`
}

// DataplaneSpec chooses the dataplane. Defaults are applied when read, never
// written back: mode Ambient, redirection EBPF, kernelFallback IPTables.
// +kubebuilder:validation:XValidation:rule="!has(self.redirection) || !has(self.mode) || self.mode == 'Ambient'",message="spec.dataplane.redirection is only valid with mode Ambient; remove redirection or set mode: Ambient",fieldPath=".redirection"
// +kubebuilder:validation:XValidation:rule="!has(self.kernelFallback) || ((!has(self.mode) || self.mode == 'Ambient') && (!has(self.redirection) || self.redirection == 'EBPF'))",message="spec.dataplane.kernelFallback only applies to mode Ambient with redirection EBPF; remove kernelFallback",fieldPath=".kernelFallback"
type DataplaneSpec struct {
	// Mode is Ambient (default) or Sidecar.
	// +optional
	Mode DataplaneMode `json:"mode,omitempty"`

	// Redirection is EBPF (default) or IPTables; Ambient only.
	// +optional
	Redirection Redirection `json:"redirection,omitempty"`

	// KernelFallback is what nodes failing eBPF preflight get: IPTables
	// (default) or Block.
	// +optional
	KernelFallback KernelFallback `json:"kernelFallback,omitempty"`
}

// NamespacesSpec selects the namespaces in the mesh.
type NamespacesSpec struct {
	// Selector picks namespaces by label. Absent selects none.
	// +optional
	Selector *metav1.LabelSelector `json:"selector,omitempty"`
}

// WaypointSpec declares one waypoint proxy.
type WaypointSpec struct {
	// Namespace the waypoint runs in.
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +kubebuilder:validation:MaxLength=63
	// +required
	Namespace string `json:"namespace"`

	// Name of the waypoint Gateway. The first waypoint listed for a
	// namespace is the one its istio.io/use-waypoint label names.
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +kubebuilder:validation:MaxLength=63
	// +required
	Name string `json:"name"`

	// For is the traffic it proxies: Service (default), Workload or All.
	// +optional
	For WaypointFor `json:"for,omitempty"`
}

// SecuritySpec configures the mesh's traffic security.
type SecuritySpec struct {
	// MTLS is Permissive (default: plaintext still accepted, as during a
	// migration) or Strict: meshkeeper then writes one mesh-wide
	// PeerAuthentication of mode STRICT in the control plane's namespace,
	// only while no rollout runs. A rollout or a rollback removes it before
	// any namespace moves, and it comes back once the rollout has ended.
	// PeerAuthentications of application namespaces (opt-outs) are left
	// alone and listed in status.security.optOuts.
	// +kubebuilder:default=Permissive
	// +optional
	MTLS MTLSMode `json:"mtls,omitempty"`
}

// IdentitySpec configures workload identity.
type IdentitySpec struct {
	// Spire runs SPIRE as the identity provider.
	// +optional
	Spire *SpireSpec `json:"spire,omitempty"`
}

// SpireSpec configures SPIRE.
// +kubebuilder:validation:XValidation:rule="!self.enabled || has(self.trustDomain)",message="spec.identity.spire.trustDomain is required when SPIRE is enabled, e.g. trustDomain: example.org",fieldPath=".trustDomain"
type SpireSpec struct {
	// Enabled turns SPIRE on.
	Enabled bool `json:"enabled"`

	// TrustDomain is the SPIFFE trust domain, e.g. example.org.
	// +kubebuilder:validation:Pattern=`^[a-z0-9._-]+$`
	// +kubebuilder:validation:MaxLength=255
	// +optional
	TrustDomain string `json:"trustDomain,omitempty"`

	// SVIDTTL is the lifetime of workload certificates (default 1h).
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	SVIDTTL *metav1.Duration `json:"svidTTL,omitempty"`

	// AcknowledgeDryRun lets meshkeeper start writing registration entries
	// on a SPIRE server that already held entries, although the dry run in
	// status.identity.dryRun lists conflicts. Its value must be that dry
	// run's digest: an acknowledgement is for what was reviewed, and a dry
	// run that changed since needs a new one.
	// +kubebuilder:validation:Pattern=`^[a-f0-9]{16}$`
	// +optional
	AcknowledgeDryRun string `json:"acknowledgeDryRun,omitempty"`
}

// RolloutSpec says how changes move.
type RolloutSpec struct {
	// Nodes configures node waves for node components.
	// +optional
	Nodes NodeRolloutSpec `json:"nodes,omitempty"`

	// Namespaces configures namespace waves.
	// +optional
	Namespaces NamespaceRolloutSpec `json:"namespaces,omitempty"`

	// RetireAfter is how long the old control-plane revision keeps running
	// after the last wave passed, before it is uninstalled (default 1m).
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	RetireAfter *metav1.Duration `json:"retireAfter,omitempty"`

	// ProgressDeadline is how long a wave may take to move: node pods
	// replaced and ready (and, in the rollout engine, labels written and
	// workloads restarted). A wave not moved within it is rolled back,
	// naming the nodes and pods it waited for (default 10m). It counts from
	// the wave's start, which is always inside a maintenance window; a
	// rollback is not held for one. The controller enforces it on node
	// waves today.
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	ProgressDeadline *metav1.Duration `json:"progressDeadline,omitempty"`
}

// NodeRolloutSpec configures node waves.
type NodeRolloutSpec struct {
	// Canary selects the nodes of the first node wave.
	// +optional
	Canary *metav1.LabelSelector `json:"canary,omitempty"`

	// MaxUnavailable bounds each later node wave: a count or a percentage
	// (default 10%).
	// +kubebuilder:validation:XIntOrString
	// +kubebuilder:validation:XValidation:rule="type(self) == int ? self >= 1 : self.matches('^([1-9][0-9]?|100)%$')",message="spec.rollout.nodes.maxUnavailable must be a count of at least 1 or a percentage from 1% to 100%, e.g. 10%"
	// +optional
	MaxUnavailable *intstr.IntOrString `json:"maxUnavailable,omitempty"`

	// Bake is the minimum soak of the canary node wave before analysis may
	// pass (default 1m).
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	Bake *metav1.Duration `json:"bake,omitempty"`

	// Soak is the minimum soak of every node wave after the canary one
	// before it may be promoted (default 0s: with SLO gates, promoted on
	// the first passing check).
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	Soak *metav1.Duration `json:"soak,omitempty"`
}

// NamespaceRolloutSpec configures namespace waves.
type NamespaceRolloutSpec struct {
	// Canary namespaces move first, in this order.
	// +listType=set
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=63
	// +optional
	Canary []string `json:"canary,omitempty"`

	// Waves are cumulative percentages of the remaining namespaces, strictly
	// increasing and ending at 100% (default ["100%"]).
	// +listType=set
	// +kubebuilder:validation:MaxItems=20
	// +kubebuilder:validation:items:Pattern=`^([1-9][0-9]?|100)%$`
	// +kubebuilder:validation:items:MaxLength=4
	// +kubebuilder:validation:XValidation:rule="size(self) == 0 || self[size(self) - 1] == '100%'",message="spec.rollout.namespaces.waves must end at \"100%\" so every namespace moves, e.g. [\"10%\", \"50%\", \"100%\"]"
	// +kubebuilder:validation:XValidation:rule="self.map(w, int(w.substring(0, size(w) - 1))).isSorted()",message="spec.rollout.namespaces.waves must be strictly increasing, e.g. [\"10%\", \"50%\", \"100%\"]"
	// +optional
	Waves []string `json:"waves,omitempty"`

	// Bake is the minimum soak per wave before analysis may pass (default 5m).
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	Bake *metav1.Duration `json:"bake,omitempty"`
}

// AnalysisSpec configures SLO gates.
type AnalysisSpec struct {
	// Prometheus is where SLO queries run.
	// +optional
	Prometheus *PrometheusSpec `json:"prometheus,omitempty"`

	// Interval between checks (default 30s, at least 5s).
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('5s')",message="spec.analysis.interval must be at least 5s, e.g. 30s"
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +optional
	Interval *metav1.Duration `json:"interval,omitempty"`

	// FailureLimit is how many failed checks are tolerated before rollback
	// (default 2).
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	// +optional
	FailureLimit *int32 `json:"failureLimit,omitempty"`

	// InconclusiveLimit is how many consecutive inconclusive checks are
	// tolerated (default 5): the check after them holds the rollout as
	// Degraded, waiting for a human (Argo Rollouts' inconclusiveLimit:
	// inconclusive > limit). It is counted apart from failureLimit.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1000
	// +optional
	InconclusiveLimit *int32 `json:"inconclusiveLimit,omitempty"`

	// SLOs are the checks. A query is a Go template with .Nodes (a regex of
	// the node wave's nodes, empty in a namespace wave), .Revision and
	// .Baseline (the new and the old revision), .Namespaces (a regex of the
	// wave's namespaces; it grows with their number, prefer .Revision) and
	// .Interval.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=32
	// +optional
	SLOs []SLO `json:"slos,omitempty"`
}

// PrometheusSpec locates a Prometheus server.
type PrometheusSpec struct {
	// Address is the base URL, e.g. http://prometheus.monitoring:9090.
	// +kubebuilder:validation:Pattern=`^https?://[^\s]+$`
	// +kubebuilder:validation:MaxLength=2048
	// +required
	Address string `json:"address"`
}

// SLO is one service-level objective checked each interval.
// +kubebuilder:validation:XValidation:rule="has(self.min) || has(self.max)",message="an SLO needs min, max or both, e.g. min: \"0.99\""
// +kubebuilder:validation:XValidation:rule="!has(self.better) || has(self.maxDegradation)",message="better only applies with maxDegradation; remove better or add maxDegradation: \"1%\"",fieldPath=".better"
type SLO struct {
	// Name identifies the SLO in status and history.
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +kubebuilder:validation:MaxLength=63
	// +required
	Name string `json:"name"`

	// Query is PromQL (a Go template) returning one number.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=4096
	// +required
	Query string `json:"query"`

	// Min is the lowest passing value, a decimal number as a string.
	// +kubebuilder:validation:Pattern=`^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$`
	// +kubebuilder:validation:MaxLength=32
	// +optional
	Min *string `json:"min,omitempty"`

	// Max is the highest passing value, a decimal number as a string.
	// +kubebuilder:validation:Pattern=`^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$`
	// +kubebuilder:validation:MaxLength=32
	// +optional
	Max *string `json:"max,omitempty"`

	// MaxDegradation compares the wave with its baseline (Kayenta / Argo
	// Rollouts style): the same query, expanded for the baseline (.Revision
	// and .Nodes of the old side), may be better than the wave's value by at
	// most this share of the baseline's value, e.g. "1%" or "0.5%". The
	// verdict records both values. A drop that hits both sides alike does
	// not fail the wave (it is reported). min or max still judge the wave
	// when no baseline is left (the last wave).
	// +kubebuilder:validation:Pattern=`^[0-9]+(\.[0-9]+)?%$`
	// +kubebuilder:validation:MaxLength=16
	// +optional
	MaxDegradation *string `json:"maxDegradation,omitempty"`

	// Better says which way the value is better, for maxDegradation:
	// Higher (a success ratio, the default) or Lower (a latency, an error
	// rate).
	// +kubebuilder:validation:Enum=Higher;Lower
	// +optional
	Better Better `json:"better,omitempty"`
}

// Better is which way an SLO's value is better.
type Better string

const (
	// BetterHigher: a higher value is better (success ratios).
	BetterHigher Better = "Higher"
	// BetterLower: a lower value is better (latencies, error rates).
	BetterLower Better = "Lower"
)

// UpgradeSpec says how new releases are followed.
// +kubebuilder:validation:XValidation:rule="!(has(self.minor) && self.minor == 'Automatic' && has(self.automatic) && !self.automatic)",message="spec.upgrade.minor: Automatic needs spec.upgrade.automatic: true (new minors are followed only where new patches are)"
type UpgradeSpec struct {
	// Automatic follows new patch releases of spec.version's minor (default true).
	// A new patch found in the catalog (embedded, or published to the
	// operator's catalog source) starts a canary rollout by itself, only
	// inside a maintenance window.
	// +optional
	Automatic *bool `json:"automatic,omitempty"`

	// Minor says whether new minor releases are followed too: Automatic
	// moves to the next minor once the catalog has one that upgrades from
	// the installed release, one minor at a time, each a full canary rollout
	// started only inside a maintenance window; spec.version (a minor) is
	// then the oldest minor to run. Manual (the default) stays on
	// spec.version's minor.
	// +kubebuilder:validation:Enum=Automatic;Manual
	// +optional
	Minor UpgradePolicy `json:"minor,omitempty"`

	// Windows are when waves may start; none means any time.
	// +kubebuilder:validation:MaxItems=16
	// +optional
	Windows []MaintenanceWindow `json:"windows,omitempty"`
}

// UpgradePolicy is whether a kind of release is followed by itself.
type UpgradePolicy string

const (
	// UpgradeAutomatic follows new releases by itself, inside maintenance windows.
	UpgradeAutomatic UpgradePolicy = "Automatic"
	// UpgradeManual waits for spec.version to name them.
	UpgradeManual UpgradePolicy = "Manual"
)

// MaintenanceWindow opens at each cron time and stays open for Duration.
type MaintenanceWindow struct {
	// Cron is a standard 5-field cron expression in UTC, e.g. "0 2 * * 6".
	// +kubebuilder:validation:MinLength=9
	// +kubebuilder:validation:MaxLength=128
	// +required
	Cron string `json:"cron"`

	// Duration is how long the window stays open, e.g. 4h.
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$`
	// +required
	Duration metav1.Duration `json:"duration"`
}

// MeshStatus is everything meshkeeper knows and does.
type MeshStatus struct {
	// ObservedGeneration is the spec generation the status describes; set only
	// once a reconcile reached a settled result.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Conditions: Ready, Reconciling, Stalled, Degraded, PreflightPassed, RolledBack.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// Version is the installed and target mesh version.
	// +optional
	Version VersionStatus `json:"version,omitempty"`

	// Dataplane is the dataplane as it runs.
	// +optional
	Dataplane DataplaneStatus `json:"dataplane,omitempty"`

	// Components reports each installed mesh component.
	// +listType=map
	// +listMapKey=name
	// +optional
	Components []ComponentStatus `json:"components,omitempty"`

	// Ignored lists managed objects annotated meshkeeper.dev/ignore: "true"
	// that meshkeeper leaves as they are, as kind/namespace/name.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Ignored []string `json:"ignored,omitempty"`
	// IgnoredOmitted counts the ignored objects left out of Ignored, which
	// keeps the first 64 (sorted).
	// +optional
	IgnoredOmitted int32 `json:"ignoredOmitted,omitempty"`

	// Plan is the ordered steps meshkeeper will take, with their state.
	// +optional
	Plan []PlanStep `json:"plan,omitempty"`

	// Rollout is the progress of the rollout in flight.
	// +optional
	Rollout *RolloutStatus `json:"rollout,omitempty"`

	// Nodes counts nodes by eBPF eligibility.
	// +optional
	Nodes NodeCounts `json:"nodes,omitempty"`

	// History records finished rollouts, newest last.
	// +kubebuilder:validation:MaxItems=32
	// +optional
	History []HistoryEntry `json:"history,omitempty"`
	// HistoryOmitted counts the oldest entries dropped from History, which
	// keeps the newest 32.
	// +optional
	HistoryOmitted int32 `json:"historyOmitted,omitempty"`

	// Identity is workload identity (SPIRE) as it runs.
	// +optional
	Identity *IdentityStatus `json:"identity,omitempty"`

	// Catalog says where the bundles spec.version resolves against came
	// from and when the operator's catalog source was last checked.
	// +optional
	Catalog *CatalogStatus `json:"catalog,omitempty"`

	// Waypoints are spec.waypoints as they run, and what meshkeeper found
	// in their way.
	// +optional
	Waypoints *WaypointsStatus `json:"waypoints,omitempty"`

	// Security is the mesh-wide mTLS policy as it is in effect, and the
	// PeerAuthentications meshkeeper found and left alone.
	// +optional
	Security *SecurityStatus `json:"security,omitempty"`
}

// SecurityStatus is the mesh-wide mTLS policy as meshkeeper keeps it.
type SecurityStatus struct {
	// MTLS is the mesh-wide mode meshkeeper has in effect: Strict while its
	// mesh-wide PeerAuthentication exists, Permissive otherwise (also while
	// a rollout holds Strict back).
	// +optional
	MTLS MTLSMode `json:"mtls,omitempty"`
	// PeerAuthentication is the namespace/name of the mesh-wide
	// PeerAuthentication meshkeeper wrote, when it exists.
	// +optional
	PeerAuthentication string `json:"peerAuthentication,omitempty"`
	// Message says why spec.security.mtls is not in effect (a rollout
	// runs, a conflict), empty when it is.
	// +optional
	Message string `json:"message,omitempty"`
	// Conflicts lists the mesh-wide PeerAuthentications in the root
	// namespace that meshkeeper did not write; it leaves them as they are
	// and the Mesh is Degraded (MTLSConflict) while spec.security.mtls is
	// Strict.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Conflicts []string `json:"conflicts,omitempty"`
	// ConflictsOmitted counts the conflicts left out of Conflicts, which
	// keeps the first 64 (sorted).
	// +optional
	ConflictsOmitted int32 `json:"conflictsOmitted,omitempty"`
	// OptOuts lists the PeerAuthentications of other namespaces (or with a
	// workload selector) that users wrote, as "namespace/name: MODE"; they
	// override the mesh-wide policy where they apply, and meshkeeper leaves
	// them alone. Listed while spec.security.mtls is Strict.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	OptOuts []string `json:"optOuts,omitempty"`
	// OptOutsOmitted counts the opt-outs left out of OptOuts, which keeps
	// the first 64 (sorted).
	// +optional
	OptOutsOmitted int32 `json:"optOutsOmitted,omitempty"`
}

// WaypointsStatus is the waypoints as they run.
type WaypointsStatus struct {
	// Ready counts the waypoints whose Gateway istiod has Programmed.
	// +optional
	Ready int32 `json:"ready"`
	// Total counts spec.waypoints.
	// +optional
	Total int32 `json:"total"`
	// Items are the waypoints, one per spec.waypoints entry, sorted by
	// namespace and name.
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Items []WaypointStatus `json:"items,omitempty"`
	// Conflicts lists what meshkeeper did not write and leaves as it is: a
	// Gateway of a waypoint's name, or an istio.io/use-waypoint label on a
	// waypoint's namespace, set by someone else. The Mesh is Degraded
	// (WaypointConflict) while there are any.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Conflicts []string `json:"conflicts,omitempty"`
	// ConflictsOmitted counts the conflicts left out of Conflicts, which
	// keeps the first 64 (sorted).
	// +optional
	ConflictsOmitted int32 `json:"conflictsOmitted,omitempty"`
	// GatewayAPI is the Gateway API CRDs waypoints are written against.
	// +optional
	GatewayAPI *GatewayAPIStatus `json:"gatewayAPI,omitempty"`
}

// WaypointStatus is one waypoint.
type WaypointStatus struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Revision is the control-plane revision its Gateway is labelled with
	// (istio.io/rev): its namespace's, so it moves with the namespace waves.
	// +optional
	Revision string `json:"revision,omitempty"`
	// Programmed is the Gateway's Programmed condition as istiod set it.
	Programmed bool `json:"programmed"`
	// InUse is true when meshkeeper set istio.io/use-waypoint on the
	// namespace to this waypoint.
	// +optional
	InUse bool `json:"inUse,omitempty"`
	// Message says what it waits for, or why meshkeeper does not write it.
	// +optional
	Message string `json:"message,omitempty"`
}

// GatewayAPIStatus is the Gateway API CRDs in the cluster.
type GatewayAPIStatus struct {
	// BundleVersion is the Gateway API release meshkeeper ships, e.g. v1.6.0.
	BundleVersion string `json:"bundleVersion"`
	// Kept lists the Gateway API CRDs meshkeeper found in the cluster and
	// left as they are (a newer release, the experimental channel, an
	// unknown version), each with why.
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Kept []string `json:"kept,omitempty"`
}

// CatalogStatus is the catalog the operator resolves versions against: the
// embedded bundles merged with those of its catalog source (an OCI artifact).
type CatalogStatus struct {
	// Source is the configured catalog source, e.g.
	// oci://registry.example.com/meshkeeper/catalog:stable; empty when the
	// operator runs with the embedded catalog only.
	// +optional
	Source string `json:"source,omitempty"`
	// Digest is the digest of the last artifact pulled from Source and
	// verified, e.g. sha256:4f1c...
	// +optional
	Digest string `json:"digest,omitempty"`
	// LastCheckedAt is when Source was last polled, successfully or not.
	// +optional
	LastCheckedAt *metav1.Time `json:"lastCheckedAt,omitempty"`
	// LastUpdatedAt is when a new artifact from Source was last verified and
	// merged.
	// +optional
	LastUpdatedAt *metav1.Time `json:"lastUpdatedAt,omitempty"`
	// Message says why the last check did not update the catalog (the
	// source unreachable, an artifact refused), empty when it did or had
	// nothing new.
	// +optional
	Message string `json:"message,omitempty"`
	// Bundles lists every release in the catalog and where it came from.
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Bundles []CatalogBundle `json:"bundles,omitempty"`
	// BundlesOmitted counts the oldest releases left out of Bundles, which
	// keeps the newest 256.
	// +optional
	BundlesOmitted int32 `json:"bundlesOmitted,omitempty"`
}

// CatalogBundle is one release of the catalog and its origin.
type CatalogBundle struct {
	// Version is the release, e.g. "1.27.4".
	Version string `json:"version"`
	// From is "embedded" (the operator binary's catalog) or the OCI
	// reference@digest of the artifact that carried it.
	From string `json:"from"`
}

// VersionStatus is the installed and target version.
type VersionStatus struct {
	// Installed is the version every component runs.
	// +optional
	Installed string `json:"installed,omitempty"`
	// Target is the version being rolled out (the resolved spec.version).
	// +optional
	Target string `json:"target,omitempty"`
}

// DataplaneStatus is the dataplane as it runs.
type DataplaneStatus struct {
	// Mode in effect.
	// +optional
	Mode DataplaneMode `json:"mode,omitempty"`
	// Redirection in effect (Ambient only).
	// +optional
	Redirection Redirection `json:"redirection,omitempty"`
	// Revision is the control-plane revision namespaces point at, e.g. 1-28-2.
	// +optional
	Revision string `json:"revision,omitempty"`
	// Namespaces is how many namespaces are enrolled in the mesh.
	// +optional
	Namespaces int32 `json:"namespaces"`
	// Conflicts lists namespaces whose dataplane label is set to another
	// value by someone else; meshkeeper leaves them as they are.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Conflicts []string `json:"conflicts,omitempty"`
	// ConflictsOmitted counts the conflicting namespaces left out of
	// Conflicts, which keeps the first 64 (sorted).
	// +optional
	ConflictsOmitted int32 `json:"conflictsOmitted,omitempty"`
}

// ComponentStatus is one mesh component as installed.
type ComponentStatus struct {
	// Name of the component: istiod, ztunnel, istio-cni, node-agent, spire-server, spire-agent, crds.
	Name string `json:"name"`
	// Release is the Helm release that installs it.
	// +optional
	Release string `json:"release,omitempty"`
	// Version of the mesh bundle it runs.
	// +optional
	Version string `json:"version,omitempty"`
	// Revision is the Helm release revision.
	// +optional
	Revision int32 `json:"revision,omitempty"`
	// Ready is true when its workloads are available.
	Ready bool `json:"ready"`
	// Message says what is missing when it is not ready.
	// +optional
	Message string `json:"message,omitempty"`
}

// StepState is the state of a plan step.
// +kubebuilder:validation:Enum=Pending;Running;Done;Failed;Skipped
type StepState string

const (
	StepPending StepState = "Pending"
	StepRunning StepState = "Running"
	StepDone    StepState = "Done"
	StepFailed  StepState = "Failed"
	StepSkipped StepState = "Skipped"
)

// PlanStep is one step of the plan.
type PlanStep struct {
	// Action, e.g. UpgradeControlPlane.
	Action string `json:"action"`
	// Target of the action, e.g. a version or a wave.
	// +optional
	Target string `json:"target,omitempty"`
	// State of the step.
	State StepState `json:"state"`
	// Message says more, e.g. why the step failed.
	// +optional
	Message string `json:"message,omitempty"`
}

// Verdict of one SLO check.
// +kubebuilder:validation:Enum=Pass;Fail;Inconclusive
type Verdict string

const (
	VerdictPass         Verdict = "Pass"
	VerdictFail         Verdict = "Fail"
	VerdictInconclusive Verdict = "Inconclusive"
)

// RolloutStatus is the rollout in flight.
type RolloutStatus struct {
	// Step is the plan step being executed: Nodes, Namespaces, Retire or
	// RollingBack.
	// +optional
	Step string `json:"step,omitempty"`
	// Wave is the current wave of the step (node waves in Nodes, namespace
	// waves in Namespaces), from 1.
	// +optional
	Wave int32 `json:"wave,omitempty"`
	// Waves is the number of waves of this step.
	// +optional
	Waves int32 `json:"waves,omitempty"`
	// Analysis holds the latest result per SLO.
	// +optional
	Analysis []AnalysisResult `json:"analysis,omitempty"`
	// From is the version being replaced.
	// +optional
	From string `json:"from,omitempty"`
	// To is the version this rollout moves to (one minor hop of a longer
	// upgrade).
	// +optional
	To string `json:"to,omitempty"`
	// StartedAt is when the rollout started.
	// +optional
	StartedAt *metav1.Time `json:"startedAt,omitempty"`
	// WaveNamespaces are the namespaces of the current wave.
	// +kubebuilder:validation:MaxItems=1024
	// +optional
	WaveNamespaces []string `json:"waveNamespaces,omitempty"`
	// WaveNamespacesOmitted counts the namespaces of the current wave left
	// out of WaveNamespaces, which keeps the first 1024 (sorted). The wave
	// still moves and is judged in full.
	// +optional
	WaveNamespacesOmitted int32 `json:"waveNamespacesOmitted,omitempty"`
	// WaveNodes are the nodes of the current node wave.
	// +kubebuilder:validation:MaxItems=1024
	// +optional
	WaveNodes []string `json:"waveNodes,omitempty"`
	// WaveNodesOmitted counts the nodes of the current node wave left out of
	// WaveNodes, which keeps the first 1024. The wave still moves in full.
	// +optional
	WaveNodesOmitted int32 `json:"waveNodesOmitted,omitempty"`
	// WaveStartedAt is when the current wave moved; the bake counts from it.
	// +optional
	WaveStartedAt *metav1.Time `json:"waveStartedAt,omitempty"`
	// WorkloadsRestartedAt is when the current namespace wave's workloads
	// were seen restarted onto the new revision and ready (Sidecar mode: a
	// sidecar keeps talking to the istiod it was injected for until its pod
	// is recreated). The wave's bake starts then; unset while they restart.
	// +optional
	WorkloadsRestartedAt *metav1.Time `json:"workloadsRestartedAt,omitempty"`
	// LastCheckAt is when the SLOs were last checked.
	// +optional
	LastCheckAt *metav1.Time `json:"lastCheckAt,omitempty"`
	// FailedChecks counts consecutive failed checks of the current wave.
	// +optional
	FailedChecks int32 `json:"failedChecks,omitempty"`
	// InconclusiveChecks counts consecutive inconclusive checks.
	// +optional
	InconclusiveChecks int32 `json:"inconclusiveChecks,omitempty"`
	// FailureLimit is the failureLimit in effect: failedChecks above it
	// roll back.
	// +optional
	FailureLimit *int32 `json:"failureLimit,omitempty"`
	// InconclusiveLimit is the inconclusiveLimit in effect:
	// inconclusiveChecks above it hold the rollout as Degraded.
	// +optional
	InconclusiveLimit *int32 `json:"inconclusiveLimit,omitempty"`
	// Message says what the rollout waits for, or why it rolls back.
	// +optional
	Message string `json:"message,omitempty"`
	// Engine is the rollout engine's memory, for the rollouts it runs (today
	// the mode switch Ambient → Sidecar; the others run on the step fields
	// above): the frozen plan, the wave of every namespace and node, and
	// the phase of the current wave.
	// +optional
	Engine *EngineMemory `json:"engine,omitempty"`
}

// Rollout steps (status.rollout.step, the STEP column).
const (
	// RolloutStepNodes: the node components move to the new bundle node by
	// node, wave by wave (the canary nodes first).
	RolloutStepNodes = "Nodes"
	// RolloutStepNamespaces: namespaces move to the new revision wave by wave.
	RolloutStepNamespaces = "Namespaces"
	// RolloutStepRetire: every wave passed; the old revision is removed.
	RolloutStepRetire = "Retire"
	// RolloutStepRollingBack: an SLO broke; everything returns to From.
	RolloutStepRollingBack = "RollingBack"
)

// AnalysisResult is one SLO check.
type AnalysisResult struct {
	SLO     string      `json:"slo"`
	Value   string      `json:"value,omitempty"`
	Verdict Verdict     `json:"verdict"`
	At      metav1.Time `json:"at"`
	// Baseline is the same query's value on the baseline (SLOs with
	// maxDegradation).
	// +optional
	Baseline string `json:"baseline,omitempty"`
	// Degradation is how much worse the wave is than the baseline, as a
	// share of the baseline's value, e.g. "0.4%" (negative: better).
	// +optional
	Degradation string `json:"degradation,omitempty"`
	// Message says why the verdict is what it is, e.g. "l4-success 0.93 <
	// 0.99 (workload_node=node-07, workload_namespace=shop)" or, for a drop
	// on both sides, "cluster-wide drop: ...".
	// +optional
	Message string `json:"message,omitempty"`
}

// NodeCounts counts nodes by eBPF eligibility.
//
// The counts are optional in the schema (a status merge patch sends only the
// counts that changed) but always serialised, zeros included.
type NodeCounts struct {
	// Total is the number of nodes in the cluster.
	// +optional
	Total int32 `json:"total"`
	// Eligible nodes run eBPF redirection.
	// +optional
	Eligible int32 `json:"eligible"`
	// Fallback nodes failed eBPF preflight and use iptables redirection.
	// +optional
	Fallback int32 `json:"fallback"`
	// Blocked nodes failed eBPF preflight and get no mesh dataplane
	// (kernelFallback: Block).
	// +optional
	Blocked int32 `json:"blocked"`
}

// Outcome of a finished rollout.
// +kubebuilder:validation:Enum=Succeeded;RolledBack;Failed
type Outcome string

const (
	OutcomeSucceeded  Outcome = "Succeeded"
	OutcomeRolledBack Outcome = "RolledBack"
	OutcomeFailed     Outcome = "Failed"
)

// HistoryEntry records one finished rollout.
type HistoryEntry struct {
	Version string        `json:"version"`
	Mode    DataplaneMode `json:"mode,omitempty"`
	Outcome Outcome       `json:"outcome"`
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	StartedAt *metav1.Time `json:"startedAt,omitempty"`
	// +optional
	FinishedAt *metav1.Time `json:"finishedAt,omitempty"`
	// Generation is the Mesh's metadata.generation when the rollout ended:
	// a failed target is not tried again until the spec changes.
	// +optional
	Generation int64 `json:"generation,omitempty"`
}

// Mesh is the one object a platform team writes to run the mesh.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,categories=meshkeeper
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.status.dataplane.mode`
// +kubebuilder:printcolumn:name="Installed",type=string,JSONPath=`.status.version.installed`
// +kubebuilder:printcolumn:name="Target",type=string,JSONPath=`.status.version.target`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Step",type=string,JSONPath=`.status.rollout.step`
// +kubebuilder:printcolumn:name="mTLS",type=string,JSONPath=`.status.security.mtls`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Mesh struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec MeshSpec `json:"spec"`
	// +optional
	Status MeshStatus `json:"status,omitempty"`
}

// MeshList is a list of Mesh.
// +kubebuilder:object:root=true
type MeshList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Mesh `json:"items"`
}

func init() {
	SchemeBuilder.Register(&Mesh{}, &MeshList{})
}
