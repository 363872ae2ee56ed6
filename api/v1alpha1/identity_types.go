package v1alpha1

// RegistrationState says whether meshkeeper writes SPIRE registration entries
// yet.
// +kubebuilder:validation:Enum=DryRun;Active
type RegistrationState string

const (
	// RegistrationDryRun: the SPIRE server already held entries when
	// meshkeeper first met it. status.identity.dryRun shows what meshkeeper
	// would create, update and leave alone; nothing is written until that dry
	// run shows no conflicts, or spec.identity.spire.acknowledgeDryRun quotes
	// its digest.
	RegistrationDryRun RegistrationState = "DryRun"
	// RegistrationActive: meshkeeper keeps its own entries in step with the
	// meshed namespaces and service accounts.
	RegistrationActive RegistrationState = "Active"
)

// IdentityStatus is workload identity as it runs.
type IdentityStatus struct {
	// TrustDomain is the SPIFFE trust domain the mesh's identities are
	// issued in. meshkeeper never moves a running mesh to another one: a
	// spec.identity.spire.trustDomain different from it is refused.
	// +optional
	TrustDomain string `json:"trustDomain,omitempty"`

	// Registration is DryRun until meshkeeper may write entries, then Active.
	// +optional
	Registration RegistrationState `json:"registration,omitempty"`

	// Entries counts the registration entries meshkeeper saw on the server.
	// +optional
	Entries EntryCounts `json:"entries,omitempty"`

	// DryRun is what the first reconcile against a server that already held
	// entries would do. It stays after the registration became Active, as
	// the record of what was acknowledged.
	// +optional
	DryRun *IdentityDryRun `json:"dryRun,omitempty"`

	// Bundle is where the trust bundle is published for workloads and
	// istiod, as namespace/configmap (key bundle.crt).
	// +optional
	Bundle string `json:"bundle,omitempty"`

	// AgentsAttested lists how many nodes have an attested SPIRE agent, as
	// "n/total".
	// +optional
	AgentsAttested string `json:"agentsAttested,omitempty"`

	// Message says what identity waits for or why it failed.
	// +optional
	Message string `json:"message,omitempty"`
}

// EntryCounts counts SPIRE registration entries.
//
// Always serialised, zeros included.
type EntryCounts struct {
	// Own entries carry meshkeeper's ownership mark (their entry ID).
	// +optional
	Own int32 `json:"own"`
	// Foreign entries are everyone else's; meshkeeper never changes or
	// deletes them.
	// +optional
	Foreign int32 `json:"foreign"`
}

// IdentityDryRun is what meshkeeper would do to the SPIRE server's entries.
type IdentityDryRun struct {
	// Digest names this exact dry run. Copy it into
	// spec.identity.spire.acknowledgeDryRun to let meshkeeper apply it
	// despite the conflicts it lists.
	Digest string `json:"digest"`
	// Create, Update and Delete count meshkeeper's own entries it would
	// create, update or delete; Unchanged its own entries already right.
	// +optional
	Create int32 `json:"create"`
	// +optional
	Update int32 `json:"update"`
	// +optional
	Delete int32 `json:"delete"`
	// +optional
	Unchanged int32 `json:"unchanged"`
	// LeftAlone counts foreign entries: never changed or deleted.
	// +optional
	LeftAlone int32 `json:"leftAlone"`
	// Actions lists the first actions, e.g. "create spiffe://example.org/ns/shop/sa/default".
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Actions []string `json:"actions,omitempty"`
	// Conflicts lists foreign entries that would issue an identity for the
	// same workloads as an entry meshkeeper would create (same SPIFFE ID or
	// same selectors).
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Conflicts []string `json:"conflicts,omitempty"`
}

// Condition reasons of workload identity.
const (
	// ReasonIdentityUnavailable: the SPIRE server's API does not answer or
	// failed; meshkeeper changes no entry and retries (Degraded).
	ReasonIdentityUnavailable = "IdentityUnavailable"
	// ReasonIdentityDryRun: registration waits in its dry run for the
	// conflicts in status.identity.dryRun to be resolved or acknowledged
	// (Degraded).
	ReasonIdentityDryRun = "IdentityDryRun"
	// ReasonEntryErrors: the SPIRE server refused some entries; the message
	// names them (Degraded).
	ReasonEntryErrors = "EntryErrors"
)
