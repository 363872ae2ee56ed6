package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/webhooks"
)

// SpireConnector reaches the SPIRE server API of the Mesh's spire-server
// release. It returns identity.ErrNotConfigured when there is none to
// reach: registration is then off and status.identity says so.
type SpireConnector func(ctx context.Context) (identity.Server, error)

// defaultSVIDTTL is spec.identity.spire.svidTTL's default.
const defaultSVIDTTL = time.Hour

// spireBundleConfigMap is where spire-server's k8sbundle notifier publishes
// the trust bundle (bundles/charts/spire-server), in the components'
// namespace, for agents, istiod and workloads.
const spireBundleConfigMap = "spire-bundle"

// identityObservation is what the identity phase saw.
type identityObservation struct {
	// observed: status.identity is rewritten from status.
	observed bool
	status   meshv1.IdentityStatus
	// unavailable says why the server's API could not be used; nothing
	// was changed on the server.
	unavailable string
	// held says why the registration waits (dry run); "" when it runs.
	held string
	// heldForSpec: only a spec change (an acknowledgement) releases it.
	heldForSpec bool
	// entryErrors are the entries the server refused.
	entryErrors []string
	// attested are the nodes with an attested, unbanned agent (nil: unknown).
	attested map[string]bool
}

// settled is false while identity needs another reconcile by itself.
func (o identityObservation) settled() bool {
	return o.unavailable == "" && (o.held == "" || o.heldForSpec)
}

// pending says what identity waits for, for the Ready message.
func (o identityObservation) pending() string {
	switch {
	case o.unavailable != "":
		return "SPIRE: " + o.unavailable
	case o.held != "" && !o.heldForSpec:
		return "SPIRE registration: " + o.held
	}
	return ""
}

// identityResync is how often a settled Mesh with SPIRE looks at the server
// again: an entry of meshkeeper's deleted or changed there is put back.
const identityResync = 30 * time.Second

// spireTimeout bounds each use of the SPIRE server API in a reconcile: a
// server that hangs is as unavailable as one that refuses.
const spireTimeout = 15 * time.Second

func (r *MeshReconciler) connectSpire(ctx context.Context) (identity.Server, error) {
	if r.SpireServer == nil {
		return nil, identity.ErrNotConfigured
	}
	return r.SpireServer(ctx)
}

func spireTTL(mesh *meshv1.Mesh) time.Duration {
	if s := mesh.Spec.Identity.Spire; s != nil && s.SVIDTTL != nil && s.SVIDTTL.Duration > 0 {
		return s.SVIDTTL.Duration
	}
	return defaultSVIDTTL
}

// owner is the ownership mark of this Mesh's entries: keyed by its UID.
func owner(mesh *meshv1.Mesh) identity.Owner {
	return identity.NewOwner(string(mesh.UID))
}

// reconcileIdentity keeps meshkeeper's SPIRE registration entries in step
// with the meshed namespaces and their service accounts: facts (the
// workloads, the server's entries), one decision (identity.Decide and the
// dry-run gate), then the batch calls. It never touches an entry whose ID is
// not meshkeeper's mark. A server that does not answer changes nothing and
// makes the Mesh Degraded until it does.
func (r *MeshReconciler) reconcileIdentity(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	if !spireEnabled(mesh) {
		return nil
	}
	idn := &obs.identity
	idn.observed = true
	if prev := mesh.Status.Identity; prev != nil {
		idn.status = *prev.DeepCopy()
	}
	st := &idn.status
	st.TrustDomain = mesh.Spec.Identity.Spire.TrustDomain
	st.Bundle = r.ComponentsNamespace + "/" + spireBundleConfigMap
	st.Message = ""

	ctx, cancel := context.WithTimeout(ctx, spireTimeout)
	defer cancel()
	srv, err := r.connectSpire(ctx)
	if errors.Is(err, identity.ErrNotConfigured) {
		st.Message = "registration off: the manager has no SPIRE server API to reach (--spire-server-address)"
		return nil
	}
	if err != nil {
		return idn.fail(err)
	}
	defer srv.Close()

	workloads, err := r.meshWorkloads(ctx, mesh, obs)
	if err != nil {
		return err
	}
	observed, err := srv.ListEntries(ctx)
	if err != nil {
		return idn.fail(err)
	}
	own := owner(mesh)
	desired := identity.Desired(own, st.TrustDomain, spireTTL(mesh), workloads)
	p := identity.Decide(own, desired, observed)
	gate := identity.Gate{State: string(st.Registration), Acknowledged: mesh.Spec.Identity.Spire.AcknowledgeDryRun}
	if st.DryRun != nil {
		gate.Published = st.DryRun.Digest
	}
	d := gate.Decide(p)
	st.Registration = meshv1.RegistrationState(d.State)
	st.Entries = meshv1.EntryCounts{Own: int32(p.Own), Foreign: int32(p.Foreign)}
	if !d.Apply || st.Registration == meshv1.RegistrationDryRun {
		st.DryRun = dryRunStatus(p)
		idn.held, idn.heldForSpec = d.Why, len(p.Conflicts) > 0
		st.Message = d.Why
		return nil
	}
	out, err := identity.Apply(ctx, srv, own, p)
	st.Entries.Own = int32(p.Own + out.Created + out.Adopted - out.Deleted)
	idn.entryErrors = out.Errors
	if out.Created+out.Updated+out.Deleted > 0 {
		log.FromContext(ctx).Info("Reconciled SPIRE entries", "created", out.Created, "updated", out.Updated,
			"deleted", out.Deleted, "adopted", out.Adopted, "foreign", p.Foreign)
	}
	if err != nil {
		return idn.fail(err)
	}
	if len(out.Errors) > 0 {
		st.Message = fmt.Sprintf("the SPIRE server refused %d entries: %s", len(out.Errors), strings.Join(out.Errors, "; "))
		r.event(mesh, corev1.EventTypeWarning, meshv1.ReasonEntryErrors, "%s", st.Message)
	}
	return r.observeAgents(ctx, srv, obs)
}

// fail records that the server's API failed; nothing more is done this
// reconcile, so nothing is deleted on a partial view.
func (o *identityObservation) fail(err error) error {
	o.unavailable = fmt.Sprintf("the SPIRE server API does not answer (%v); no entry is changed until it does", err)
	o.status.Message = o.unavailable
	return nil
}

// observeAgents records which nodes have an attested agent.
func (r *MeshReconciler) observeAgents(ctx context.Context, srv identity.Server, obs *observation) error {
	agents, err := srv.ListAgents(ctx)
	if err != nil {
		return obs.identity.fail(err)
	}
	att := map[string]bool{}
	for _, a := range agents {
		if n := a.NodeName(); n != "" && !a.Banned {
			att[n] = true
		}
	}
	obs.identity.attested = att
	nodes, err := r.clusterNodes(ctx, obs)
	if err != nil {
		return err
	}
	n := 0
	for _, node := range nodes {
		if att[node.Name] {
			n++
		}
	}
	obs.identity.status.AgentsAttested = fmt.Sprintf("%d/%d", n, len(nodes))
	return nil
}

// unattested lists the nodes among names without an attested SPIRE agent;
// nil when identity is off or agents are not known (no server API).
func (o identityObservation) unattested(names []string) []string {
	if o.attested == nil {
		return nil
	}
	var out []string
	for _, n := range names {
		if !o.attested[n] {
			out = append(out, n)
		}
	}
	return out
}

func dryRunStatus(p identity.Plan) *meshv1.IdentityDryRun {
	conflicts := p.Conflicts
	if len(conflicts) > maxDryRunItems {
		conflicts = conflicts[:maxDryRunItems]
	}
	return &meshv1.IdentityDryRun{
		Digest:    p.Digest(),
		Create:    int32(len(p.Create)),
		Update:    int32(len(p.Update)),
		Delete:    int32(len(p.Delete)),
		Unchanged: int32(p.Unchanged),
		LeftAlone: int32(p.Foreign),
		Actions:   p.Actions(maxDryRunItems),
		Conflicts: conflicts,
	}
}

// +kubebuilder:rbac:groups="",resources=serviceaccounts,verbs=get;list;watch

// meshWorkloads are the service accounts of the meshed namespaces, sorted.
// Service accounts are read from the metadata cache the manager keeps anyway.
func (r *MeshReconciler) meshWorkloads(ctx context.Context, mesh *meshv1.Mesh, obs *observation) ([]identity.Workload, error) {
	selected, err := r.selectedNamespaces(ctx, mesh, obs)
	if err != nil {
		return nil, err
	}
	var out []identity.Workload
	for _, ns := range selected {
		list := &metav1.PartialObjectMetadataList{}
		list.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("ServiceAccountList"))
		if err := r.List(ctx, list, client.InNamespace(ns)); err != nil {
			return nil, fmt.Errorf("list service accounts of %s: %w", ns, err)
		}
		for _, sa := range list.Items {
			if sa.DeletionTimestamp == nil {
				out = append(out, identity.Workload{Namespace: ns, ServiceAccount: sa.Name})
			}
		}
	}
	slices.SortFunc(out, func(a, b identity.Workload) int {
		return strings.Compare(a.Namespace+"/"+a.ServiceAccount, b.Namespace+"/"+b.ServiceAccount)
	})
	return out, nil
}

// removeIdentity deletes exactly meshkeeper's entries when the Mesh goes,
// before the SPIRE server is uninstalled.
func (r *MeshReconciler) removeIdentity(ctx context.Context, mesh *meshv1.Mesh) error {
	if !spireEnabled(mesh) && mesh.Status.Identity == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, spireTimeout)
	defer cancel()
	srv, err := r.connectSpire(ctx)
	if errors.Is(err, identity.ErrNotConfigured) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove meshkeeper's SPIRE entries: %w", err)
	}
	defer srv.Close()
	deleted, foreign, err := identity.Cleanup(ctx, srv, owner(mesh))
	if err != nil {
		return fmt.Errorf("remove meshkeeper's SPIRE entries: %w", err)
	}
	if deleted > 0 {
		log.FromContext(ctx).Info("Removed meshkeeper's SPIRE entries", "deleted", deleted, "foreignLeft", foreign)
		r.event(mesh, corev1.EventTypeNormal, "IdentityRemoved", "Deleted meshkeeper's %d SPIRE entries; left %d foreign entries alone", deleted, foreign)
	}
	// The relay is not needed any more: its entries are gone.
	return r.removeSpireRelayCerts(ctx)
}

// spireAgentGate is why the spire-agent release must wait, or "": the SPIRE
// server must be ready and its API answering before agents roll out.
func (r *MeshReconciler) spireAgentGate(ctx context.Context, server *meshv1.ComponentStatus) string {
	if server == nil || !server.Ready {
		return "waiting for spire-server to be ready before the agents roll out"
	}
	ctx, cancel := context.WithTimeout(ctx, spireTimeout)
	defer cancel()
	srv, err := r.connectSpire(ctx)
	if errors.Is(err, identity.ErrNotConfigured) {
		return ""
	}
	if err == nil {
		defer srv.Close()
		_, err = srv.Bundle(ctx)
	}
	if err != nil {
		return fmt.Sprintf("waiting for the SPIRE server API to answer before the agents roll out: %v", err)
	}
	return ""
}

// trustDomainChange refuses moving a running mesh to another trust domain
// (the webhook's rule, for a spec that got past admission).
func trustDomainChange(mesh *meshv1.Mesh) string {
	if err := webhooks.ValidateTrustDomainChange(&mesh.Spec, &mesh.Status); err != nil {
		return err.Error()
	}
	return ""
}

// identityDegraded is the Degraded condition identity asks for, or "".
func identityDegraded(obs *observation) (reason, msg string) {
	ido := obs.identity
	switch {
	case ido.unavailable != "":
		return meshv1.ReasonIdentityUnavailable, ido.unavailable
	case ido.held != "":
		return meshv1.ReasonIdentityDryRun, "SPIRE registration is a dry run: " + ido.held
	case len(ido.entryErrors) > 0:
		return meshv1.ReasonEntryErrors, ido.status.Message
	}
	return "", ""
}

func findComponent(cs []meshv1.ComponentStatus, name string) *meshv1.ComponentStatus {
	for i := range cs {
		if cs[i].Name == name {
			return &cs[i]
		}
	}
	return nil
}

// serviceAccountChurn passes service accounts being created and deleted
// (their registration entries follow), not their updates.
func serviceAccountChurn() predicate.Predicate {
	return predicate.Funcs{
		UpdateFunc: func(e event.UpdateEvent) bool {
			return e.ObjectOld.GetDeletionTimestamp().IsZero() != e.ObjectNew.GetDeletionTimestamp().IsZero()
		},
		GenericFunc: func(event.GenericEvent) bool { return false },
	}
}
