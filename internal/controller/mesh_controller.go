// Package controller holds meshkeeper's reconcilers: thin, one per kind, with
// each phase in its own file.
package controller

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/recorder"
	"sigs.k8s.io/controller-runtime/pkg/source"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
)

// MeshReconciler drives the cluster towards a Mesh's spec and reports what it
// did in the Mesh's status.
type MeshReconciler struct {
	client.Client
	Recorder recorder.EventRecorder
	// Helm installs the mesh components; its releases live in the operator's namespace.
	Helm *helm.Client
	// Catalog holds the bundles spec.version resolves against.
	Catalog *bundle.Catalog
	// Catalogs, when set, replaces Catalog: the embedded bundles merged with
	// what the catalog source served (a *bundle.Live fed by
	// internal/bundle/oci). Each reconcile resolves against one snapshot.
	Catalogs CatalogSource
	// CatalogChecked, when set, wakes every Mesh after each check of the
	// catalog source (see SetupWithManager).
	CatalogChecked <-chan event.GenericEvent
	// Clock is what maintenance windows and the pods' enrolment grace period
	// are read from; nil is the real clock.
	Clock clock.PassiveClock
	// ComponentsNamespace is where the mesh components run (istio-system).
	ComponentsNamespace string
	// PrometheusAddress is where SLOs are checked when a Mesh does not say
	// (spec.analysis.prometheus); empty: waves only bake.
	PrometheusAddress string
	// NewProvider makes the SLO provider for an address (tests); nil uses
	// analysis.NewPrometheus.
	NewProvider func(address string) (analysis.Provider, error)
	// APIReader reads Meshes uncached; SetupWithManager sets the manager's.
	APIReader client.Reader
	// NotEnrolledGrace is how long a node agent may leave a wanted pod
	// unenrolled before the Mesh is Degraded (PodsNotEnrolled); 0 is
	// DefaultNotEnrolledGrace.
	NotEnrolledGrace time.Duration
	// SpireServer reaches the SPIRE server API for registration entries
	// (mesh_identity.go); nil: registration off.
	SpireServer SpireConnector
	// SpireRelay, when set and returning non-nil, runs the relay container
	// beside spire-server and keeps its certificates (mesh_spire_relay.go);
	// SpireServer then reaches the server through it.
	SpireRelay func() *SpireRelay
	// Workloads, when set, is the uncached client workload restarts read
	// and patch Deployments, StatefulSets, DaemonSets and
	// PodDisruptionBudgets with (internal/restart); nil uses Client.
	Workloads client.Client

	catalogState bundle.SourceState // of the Catalogs snapshot
}

// CatalogSource is a catalog that changes while the operator runs, and what
// is known about where it comes from (*bundle.Live).
type CatalogSource interface {
	Catalog() *bundle.Catalog
	State() bundle.SourceState
}

// now is the time maintenance windows are checked at.
func (r *MeshReconciler) now() time.Time {
	if r.Clock != nil {
		return r.Clock.Now()
	}
	return time.Now()
}

func (r *MeshReconciler) notEnrolledGrace() time.Duration {
	if r.NotEnrolledGrace > 0 {
		return r.NotEnrolledGrace
	}
	return DefaultNotEnrolledGrace
}

func (r *MeshReconciler) reader() client.Reader {
	if r.APIReader != nil {
		return r.APIReader
	}
	return r.Client
}

// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshes,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshes/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshes/finalizers,verbs=update
// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshnodes,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=namespaces,verbs=get;list;watch;patch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch;patch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
// Helm's release Secrets (pruned to MaxHistory, deleted on uninstall) and the webhook certificate.
// +kubebuilder:rbac:groups="",namespace=meshkeeper-system,resources=secrets,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=coordination.k8s.io,namespace=meshkeeper-system,resources=leases,verbs=get;list;watch;create;update;patch;delete
// Only its own webhook configuration, to keep the caBundle current (webhooks/certs.go).
// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=validatingwebhookconfigurations,verbs=get;patch,resourceNames=meshkeeper-validating-webhook

// Reconcile reads like a table of contents: get, finalizer, deferred status
// patch, then the delete path or the normal phases.
func (r *MeshReconciler) Reconcile(ctx context.Context, req ctrl.Request) (result ctrl.Result, retErr error) {
	// Read past the cache: status.rollout is the rollout's memory, and a
	// reconcile triggered by its own writes must not decide from a copy
	// older than them.
	if r.Catalogs != nil {
		// One catalog for the whole reconcile, however the source moves on.
		snapshot := *r
		snapshot.Catalog, snapshot.Catalogs = r.Catalogs.Catalog(), nil
		snapshot.catalogState = r.Catalogs.State()
		return snapshot.Reconcile(ctx, req)
	}
	mesh := &meshv1.Mesh{}
	if err := r.reader().Get(ctx, req.NamespacedName, mesh); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	ctx = log.IntoContext(ctx, log.FromContext(ctx).WithValues("mesh", klog.KObj(mesh)))

	if mesh.DeletionTimestamp.IsZero() && !controllerutil.ContainsFinalizer(mesh, meshv1.Finalizer) {
		before := mesh.DeepCopy()
		controllerutil.AddFinalizer(mesh, meshv1.Finalizer)
		if err := r.Patch(ctx, mesh, client.MergeFrom(before)); err != nil {
			return ctrl.Result{}, fmt.Errorf("add finalizer: %w", err)
		}
	}

	base := mesh.DeepCopy()
	obs := &observation{base: base}
	defer func() {
		retErr = r.patchStatus(ctx, base, mesh, obs, retErr)
		if apierrors.IsConflict(retErr) {
			// The Mesh changed while this reconcile ran: decide again on the
			// fresh object, soon, without logging an error.
			log.FromContext(ctx).V(1).Info("Mesh changed during the reconcile; reconciling again")
			result, retErr = ctrl.Result{RequeueAfter: 200 * time.Millisecond}, nil
		}
		if retErr != nil {
			result = ctrl.Result{} // an error requeues with backoff; a result would be ignored
		}
	}()

	if !mesh.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, mesh, obs)
	}
	return r.reconcileNormal(ctx, mesh, obs)
}

// reconcileNormal runs the phases in order; each one records what it saw in obs.
func (r *MeshReconciler) reconcileNormal(ctx context.Context, mesh *meshv1.Mesh, obs *observation) (ctrl.Result, error) {
	obs.catalog = catalogStatus(r.Catalog, r.catalogState)
	recordCatalog(r.Catalog, r.catalogState)
	if err := r.reconcileSpec(ctx, mesh, obs); err != nil {
		return ctrl.Result{}, err
	}
	r.computePlan(ctx, mesh, obs)
	if engineOwns(mesh, obs) {
		// The rollout engine runs this change (mesh_engine.go).
		return r.reconcileEngine(ctx, mesh, obs)
	}
	if mesh.Spec.Paused {
		obs.paused = true
		return ctrl.Result{}, nil
	}
	r.resolveRollout(ctx, mesh, obs)
	obs.rolloutResolved = true
	if obs.stalledOnPlan() {
		// A failed plan starts nothing: no install, no rollout, no change to
		// what runs (not even straight to the target, which would skip the
		// minors in between). The Mesh is Stalled with the planner's error.
		// A rollout recorded in status.rollout, if any, still runs its
		// course above. The planner's inputs include nodes, namespaces and
		// the catalog, so look again now and then.
		log.FromContext(ctx).Info("No plan; starting nothing", "reason", obs.planFailed)
		return ctrl.Result{RequeueAfter: jitter(time.Minute)}, nil
	}
	return r.runPhases(ctx, mesh, obs, []phase{
		{"nodes", r.reconcileNodes},
		{"gateway-api", r.reconcileGatewayAPI},
		{"components", r.reconcileComponents},
		{"identity", r.reconcileIdentity},
		{"rollout", r.reconcileRollout},
		{"surges", r.cleanupSurges}, // mesh_nodesurge.go: surge pods left after a rollback
		{"mtls-relax", r.relaxMTLS}, // mesh_mtls.go: a rollout removes STRICT before any namespace moves
		{"namespaces", r.reconcileNamespaces},
		{"restarts", r.sidecarRestartPhase}, // mesh_sidecar_restarts.go: Sidecar mode, once the labels are in place
		{"waypoints", r.reconcileWaypoints},
		{"retire", r.retireComponents},
		{"conclude", r.concludeRollout},
		{"mtls", r.reconcileMTLS}, // mesh_mtls.go: STRICT once no rollout runs
	})
}

// phase is one step of a reconcile; each records what it saw in obs.
type phase struct {
	name string
	run  func(context.Context, *meshv1.Mesh, *observation) error
}

// runPhases runs the phases in order, each whatever the one before did
// (a failed phase is retried in the next reconcile), and says when to look
// again.
func (r *MeshReconciler) runPhases(ctx context.Context, mesh *meshv1.Mesh, obs *observation, phases []phase) (ctrl.Result, error) {
	for _, p := range phases {
		if err := p.run(ctx, mesh, obs); err != nil {
			if errors.Is(err, errWaiting) {
				log.FromContext(ctx).V(1).Info("Phase under way", "phase", p.name, "status", err.Error())
				continue
			}
			log.FromContext(ctx).Error(err, "Phase failed, retrying", "phase", p.name)
			obs.applyErr = errors.Join(obs.applyErr, err)
		}
	}
	switch {
	case obs.applyErr != nil:
		return ctrl.Result{RequeueAfter: jitter(10 * time.Second)}, nil
	case obs.requeueAfter > 0 && !obs.converged():
		return ctrl.Result{RequeueAfter: obs.requeueAfter}, nil
	case !obs.converged():
		return ctrl.Result{RequeueAfter: jitter(3 * time.Second)}, nil
	case obs.enrolmentRecheck > 0 || obs.identity.observed || (obs.requeueAfter > 0 && obs.rollout.deferred != "") || obs.waypoints.recheck() > 0 || obs.mtls.recheck() > 0:
		// Nothing watched would wake this Mesh: a pod still within its
		// enrolment grace period (look again when it ends), the SPIRE
		// server's entries and attested agents (mesh_identity.go), and the
		// window an automatic upgrade waits for. The soonest wins.
		var after time.Duration
		soonest := func(d time.Duration) {
			if d > 0 && (after == 0 || d < after) {
				after = d
			}
		}
		if obs.identity.observed {
			soonest(jitter(identityResync))
		}
		if obs.enrolmentRecheck > 0 {
			soonest(obs.enrolmentRecheck + 100*time.Millisecond)
		}
		if obs.rollout.deferred != "" {
			soonest(obs.requeueAfter)
		}
		soonest(obs.waypoints.recheck()) // mesh_waypoints.go
		soonest(obs.mtls.recheck())      // mesh_mtls.go
		return ctrl.Result{RequeueAfter: after}, nil
	}
	return ctrl.Result{}, nil
}

// reconcileDelete removes everything meshkeeper set, then the finalizer.
func (r *MeshReconciler) reconcileDelete(ctx context.Context, mesh *meshv1.Mesh, obs *observation) (ctrl.Result, error) {
	obs.deleting = true
	if !controllerutil.ContainsFinalizer(mesh, meshv1.Finalizer) {
		return ctrl.Result{}, nil
	}
	// In order, each only once the one before is done: STRICT mTLS goes
	// first (workloads leaving the mesh speak plaintext), then workloads
	// leave the mesh, then its components go (the node agent removing its
	// datapath from every node first), then the node labels.
	for _, cleanup := range []func(context.Context, *meshv1.Mesh) error{r.releaseMTLS, r.releaseWaypoints, r.releaseNamespaces, r.removeIdentity, r.uninstallComponents, r.releaseNodes} {
		if err := cleanup(ctx, mesh); err != nil {
			obs.applyErr = err
			if errors.Is(err, errWaiting) {
				return ctrl.Result{RequeueAfter: jitter(2 * time.Second)}, nil
			}
			log.FromContext(ctx).Error(err, "Cleanup incomplete, retrying")
			return ctrl.Result{RequeueAfter: jitter(5 * time.Second)}, nil
		}
	}
	before := mesh.DeepCopy()
	controllerutil.RemoveFinalizer(mesh, meshv1.Finalizer)
	if err := r.Patch(ctx, mesh, client.MergeFrom(before)); err != nil && !apierrors.IsNotFound(err) {
		return ctrl.Result{}, fmt.Errorf("remove finalizer: %w", err)
	}
	forgetMetrics(mesh.Name)
	log.FromContext(ctx).Info("Cleaned up, finalizer removed")
	return ctrl.Result{}, nil
}

// patchStatus is the one status write of a reconcile.
func (r *MeshReconciler) patchStatus(ctx context.Context, base, mesh *meshv1.Mesh, obs *observation, reconcileErr error) error {
	if obs.deleting && !controllerutil.ContainsFinalizer(mesh, meshv1.Finalizer) {
		return reconcileErr // the object is gone or going; nothing to report on
	}
	prevReady := readyStatus(base)
	applyStatus(mesh, obs, reconcileErr)
	// Optimistic lock: a status computed from a Mesh that changed meanwhile
	// is refused (409) and the reconcile runs again on the fresh object.
	if err := r.Status().Patch(ctx, mesh, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil && !apierrors.IsNotFound(err) {
		if reconcileErr == nil {
			return fmt.Errorf("patch status: %w", err)
		}
		log.FromContext(ctx).Error(err, "Patch status")
	} else if err == nil {
		recordMetrics(mesh, obs.rollout.ended, time.Now())
	}
	r.recordTransition(mesh, prevReady)
	return reconcileErr
}

// recordTransition emits an event when Ready changes.
func (r *MeshReconciler) recordTransition(mesh *meshv1.Mesh, prev string) {
	cur := readyCondition(mesh)
	if cur == nil || string(cur.Status) == prev || r.Recorder == nil {
		return
	}
	eventType := corev1.EventTypeNormal
	if cur.Reason == meshv1.ReasonInvalidSpec || cur.Reason == meshv1.ReasonApplyFailed {
		eventType = corev1.EventTypeWarning
	}
	r.Recorder.Eventf(mesh, nil, eventType, cur.Reason, "Reconcile", "%s", cur.Message)
}

// SetupWithManager watches Meshes and the namespaces they select.
func (r *MeshReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.APIReader == nil {
		r.APIReader = mgr.GetAPIReader()
	}
	b := ctrl.NewControllerManagedBy(mgr)
	if r.CatalogChecked != nil {
		// The catalog source was checked: new bundles to resolve against,
		// and status.catalog to bring up to date.
		b = b.WatchesRawSource(source.Channel(r.CatalogChecked, handler.EnqueueRequestsFromMapFunc(r.allMeshes)))
	}
	return b.
		For(&meshv1.Mesh{}, builder.WithPredicates(predicate.Or(
			predicate.GenerationChangedPredicate{},
			predicate.AnnotationChangedPredicate{},
			finalizerOrDeletionChanged()))).
		Watches(&corev1.Namespace{},
			handler.EnqueueRequestsFromMapFunc(r.allMeshes),
			builder.WithPredicates(namespaceChanged())).
		Watches(&corev1.Node{},
			handler.EnqueueRequestsFromMapFunc(r.allMeshes),
			builder.WithPredicates(nodeChanged())).
		Watches(&meshv1.MeshNode{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes)).
		// Managed workloads: readiness changes and drift.
		Watches(&appsv1.Deployment{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(managedObject())).
		Watches(&appsv1.DaemonSet{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(managedObject())).
		Watches(&appsv1.StatefulSet{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(managedObject())).
		// Other managed objects: drift only, metadata is enough.
		WatchesMetadata(&corev1.ConfigMap{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(managedObject())).
		WatchesMetadata(&corev1.Service{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(managedObject())).
		WatchesMetadata(&corev1.ServiceAccount{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(managedObject())).
		// Service accounts coming and going: SPIRE registration entries.
		WatchesMetadata(&corev1.ServiceAccount{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes), builder.WithPredicates(serviceAccountChurn())).
		Named("mesh").
		Complete(r)
}

// allMeshes maps any watched object to every Mesh (there is one per cluster).
func (r *MeshReconciler) allMeshes(ctx context.Context, _ client.Object) []reconcile.Request {
	var meshes meshv1.MeshList
	if err := r.List(ctx, &meshes); err != nil {
		log.FromContext(ctx).Error(err, "List meshes")
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(meshes.Items))
	for i := range meshes.Items {
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&meshes.Items[i])})
	}
	return reqs
}

func jitter(d time.Duration) time.Duration {
	return d + time.Duration(rand.Int64N(int64(d/5)+1))
}
