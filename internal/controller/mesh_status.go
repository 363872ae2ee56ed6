package controller

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// maxHistory is how many finished rollouts status.history keeps.
const maxHistory = 32

// observation is what the phases of one reconcile saw and did; the status is
// computed from it once, in the deferred patch.
type observation struct {
	target      string
	automatic   bool // the upgrade policy chose target (plan.Target.Automatic)
	bundle      *bundle.Bundle
	catalog     *meshv1.CatalogStatus
	invalidSpec string
	applyErr    error
	paused      bool
	deleting    bool

	nodesObserved bool
	nodes         meshv1.NodeCounts
	failingNodes  []string
	// notEnrolled describes the eBPF nodes with pods left unenrolled past
	// the grace period; enrolmentRecheck is when the next waiting pod's
	// grace period ends.
	notEnrolled      []string
	notEnrolledGrace time.Duration
	enrolmentRecheck time.Duration

	components      []meshv1.ComponentStatus
	componentsReady bool
	wantedReleases  []string
	retired         bool
	ignored         []string

	namespacesObserved bool
	namespaces         int32
	conflicts          []string

	rolloutResolved bool
	rollout         rolloutState
	requeueAfter    time.Duration

	planned bool
	plan    []meshv1.PlanStep
	hops    []string
	// planFailed is the planner's error: no new rollout starts (see
	// reconcileNormal), one recorded in status.rollout carries on.
	planFailed string

	// selected caches the names of the namespaces the Mesh selects, read
	// once per reconcile (see selectedNamespaces).
	selected []string
	// nodeList caches the cluster's nodes, read once per reconcile (see
	// clusterNodes).
	nodeList []corev1.Node

	identity identityObservation

	waypoints waypointObservation // mesh_waypoints.go
	mtls      mtlsObservation     // mesh_mtls.go

	// base is the Mesh as the reconcile read it, what its status patch is
	// computed against (recordRollout moves it on).
	base *meshv1.Mesh
	// engine is what the rollout engine decided (mesh_engine.go); nil when
	// the step machine of mesh_rollout.go runs the Mesh.
	engine *engineObservation
}

// converged is true when every component is ready at the target, the
// namespaces are enrolled and nothing old is left to retire.
//
// It also needs the target itself to run: the end of an intermediate hop of
// a longer upgrade (1.27.3 on the way to 1.28.2) is not convergence. A
// target that was rolled back is the exception: the installed bundle is
// then what is meant to run.
func (o *observation) converged() bool {
	atTarget := o.bundle == nil || o.bundle.Version == o.target || o.rollout.block != "" || o.rollout.deferred != ""
	return o.settled() && atTarget
}

// settled is true when the bundle the components follow runs everywhere:
// ready, namespaces enrolled, nothing left to retire, no rollout in flight.
func (o *observation) settled() bool {
	return o.applyErr == nil && o.componentsReady && o.namespacesObserved && o.retired && o.rollout.status == nil && o.identity.settled()
}

// stalledOnPlan: the planner failed and no rollout is in flight, so the
// reconcile started nothing.
func (o *observation) stalledOnPlan() bool {
	return o.planFailed != "" && o.rollout.status == nil
}

// applyStatus writes everything the reconcile learned into mesh.status.
func applyStatus(mesh *meshv1.Mesh, obs *observation, reconcileErr error) {
	st := &mesh.Status
	if obs.catalog != nil {
		st.Catalog = obs.catalog
	}
	if obs.target != "" {
		st.Version.Target = obs.target
	}
	if obs.nodesObserved {
		st.Nodes = obs.nodes
	}
	if len(obs.components) > 0 {
		st.Components = obs.components
		slices.Sort(obs.ignored)
		st.Ignored = slices.Compact(obs.ignored)
		st.IgnoredOmitted = 0 // counted again by boundStatus
	}
	if obs.namespacesObserved {
		d := mesh.Spec.Dataplane
		if obs.engine != nil {
			d = obs.engine.dataplane // what runs: the rollout's base until it ends
		}
		st.Dataplane.Mode = d.EffectiveMode()
		st.Dataplane.Redirection = d.EffectiveRedirection()
		if obs.bundle != nil {
			st.Dataplane.Revision = obs.bundle.Revision()
		}
		st.Dataplane.Namespaces = obs.namespaces
		slices.Sort(obs.conflicts)
		st.Dataplane.Conflicts, st.Dataplane.ConflictsOmitted = obs.conflicts, 0 // capped by boundStatus
	}
	switch {
	case obs.planned && obs.engine != nil:
		st.Plan = obs.plan // the engine's decision says where each step is
	case obs.planned:
		st.Plan = planStates(obs.plan, obs)
	}
	if obs.identity.observed {
		st.Identity = obs.identity.status.DeepCopy()
	} else if obs.bundle != nil && !spireEnabled(mesh) {
		st.Identity = nil
	}
	if obs.waypoints.observed {
		st.Waypoints = obs.waypoints.status.DeepCopy()
	} else if obs.namespacesObserved && len(mesh.Spec.Waypoints) == 0 {
		st.Waypoints = nil
	}
	if obs.mtls.observed {
		st.Security = obs.mtls.status.DeepCopy()
	}
	if obs.rolloutResolved {
		st.Rollout = obs.rollout.status
		if e := obs.rollout.ended; e != nil {
			st.History = append(st.History, *e) // capped by boundStatus
		}
	}
	if reconcileErr == nil && obs.bundle != nil && obs.settled() {
		// What runs everywhere: the target, a finished hop, or the version
		// a rollback returned to.
		st.Version.Installed = obs.bundle.Version
	}
	boundStatus(st)
	setConditions(mesh, obs, reconcileErr)
	if settled(obs, reconcileErr) {
		st.ObservedGeneration = mesh.Generation
	}
}

// settled is true when the reconcile reached a result that needs no more
// work from meshkeeper: converged, paused, or stalled on the spec.
func settled(obs *observation, reconcileErr error) bool {
	switch {
	case obs.deleting || obs.applyErr != nil:
		return false
	case obs.invalidSpec != "" || obs.stalledOnPlan():
		return true
	case reconcileErr != nil:
		return false
	}
	return obs.paused || obs.converged()
}

// setConditions sets Ready, Reconciling, Stalled, Degraded and
// PreflightPassed from obs. Reconciling and Stalled are only present while
// True (kstatus convention).
func setConditions(mesh *meshv1.Mesh, obs *observation, reconcileErr error) {
	gen := mesh.Generation
	set := func(t string, s metav1.ConditionStatus, reason, msg string) {
		meta.SetStatusCondition(&mesh.Status.Conditions, metav1.Condition{
			Type: t, Status: s, Reason: reason, Message: msg, ObservedGeneration: gen,
		})
	}
	drop := func(t string) { meta.RemoveStatusCondition(&mesh.Status.Conditions, t) }
	progressing := func(reason, msg string) {
		set(meshv1.ConditionReady, metav1.ConditionFalse, reason, msg)
		set(meshv1.ConditionReconciling, metav1.ConditionTrue, reason, msg)
		drop(meshv1.ConditionStalled)
	}

	switch {
	case obs.deleting:
		msg := "Uninstalling components and removing the labels meshkeeper set"
		if obs.applyErr != nil {
			msg += ": " + obs.applyErr.Error()
		}
		progressing(meshv1.ReasonDeleting, msg)
	case obs.invalidSpec != "":
		msg := "Invalid spec: " + obs.invalidSpec
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonInvalidSpec, msg)
		set(meshv1.ConditionStalled, metav1.ConditionTrue, meshv1.ReasonInvalidSpec, msg)
		drop(meshv1.ConditionReconciling)
	case obs.stalledOnPlan() && !obs.paused:
		msg := "No plan, so nothing new starts: " + obs.planFailed
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonPlanFailed, msg)
		set(meshv1.ConditionStalled, metav1.ConditionTrue, meshv1.ReasonPlanFailed, msg)
		drop(meshv1.ConditionReconciling)
	case obs.applyErr != nil:
		progressing(meshv1.ReasonApplyFailed, "Retrying: "+obs.applyErr.Error())
	case reconcileErr != nil:
		progressing(meshv1.ReasonProgressing, "Retrying: "+reconcileErr.Error())
	case obs.paused:
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonPaused, "spec.paused is true: nothing is executed; set paused: false to continue")
		drop(meshv1.ConditionReconciling)
		drop(meshv1.ConditionStalled)
	case obs.rollout.status != nil && obs.componentsReady:
		progressing(meshv1.ReasonRollingOut, rolloutMessage(obs.rollout.status))
	case !obs.converged():
		progressing(meshv1.ReasonProgressing, progressMessage(obs))
	case obs.rollout.block != "":
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonRolledBack, obs.rollout.block)
		set(meshv1.ConditionStalled, metav1.ConditionTrue, meshv1.ReasonRolledBack, obs.rollout.block)
		drop(meshv1.ConditionReconciling)
	default:
		set(meshv1.ConditionReady, metav1.ConditionTrue, meshv1.ReasonSucceeded, readyMessage(mesh, obs))
		drop(meshv1.ConditionReconciling)
		drop(meshv1.ConditionStalled)
	}

	if len(obs.notEnrolled) > 0 && !obs.deleting {
		// Traffic leaving the mesh unseen comes first.
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonPodsNotEnrolled, notEnrolledMessage(obs.notEnrolled, obs.notEnrolledGrace))
	} else if len(obs.conflicts) > 0 && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonLabelConflict,
			fmt.Sprintf("meshkeeper leaves namespaces whose dataplane label another manager set: %s; remove that label to enroll them",
				someOf(obs.conflicts, "; ")))
	} else if wc := obs.waypoints.status.Conflicts; obs.waypoints.observed && len(wc) > 0 && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonWaypointConflict,
			fmt.Sprintf("meshkeeper leaves what it did not write: %s; see status.waypoints", someOf(wc, "; ")))
	} else if sc := obs.mtls.status.Conflicts; obs.mtls.observed && len(sc) > 0 && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonMTLSConflict,
			fmt.Sprintf("spec.security.mtls is Strict and meshkeeper leaves what it did not write: %s; see status.security", someOf(sc, "; ")))
	} else if obs.rollout.degraded && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonAnalysisInconclusive, obs.rollout.status.Message)
	} else if obs.rollout.block != "" && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonRolledBack, obs.rollout.block)
	} else if reason, msg := identityDegraded(obs); reason != "" && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, reason, msg)
	} else if obs.namespacesObserved || obs.deleting {
		drop(meshv1.ConditionDegraded)
	}

	switch e := obs.rollout.ended; {
	case obs.rollout.block != "":
		set(meshv1.ConditionRolledBack, metav1.ConditionTrue, meshv1.ReasonRolledBack, obs.rollout.block)
	case e != nil && e.Outcome == meshv1.OutcomeRolledBack:
		set(meshv1.ConditionRolledBack, metav1.ConditionTrue, meshv1.ReasonRolledBack, fmt.Sprintf("%s rolled back: %s", e.Version, e.Reason))
	case e != nil:
		set(meshv1.ConditionRolledBack, metav1.ConditionFalse, meshv1.ReasonSucceeded, e.Version+" rolled out")
	}

	switch {
	case obs.nodesObserved && mesh.Spec.Dataplane.EffectiveRedirection() == meshv1.RedirectionEBPF:
		status := metav1.ConditionTrue
		reason := meshv1.ReasonSucceeded
		if len(obs.failingNodes) > 0 {
			status, reason = metav1.ConditionFalse, meshv1.ReasonKernelIneligible
		}
		set(meshv1.ConditionPreflightPassed, status, reason, preflightMessage(obs.failingNodes))
	case obs.nodesObserved || obs.deleting:
		drop(meshv1.ConditionPreflightPassed)
	}
}

// rolloutMessage says where a rollout is.
func rolloutMessage(ro *meshv1.RolloutStatus) string {
	if ro.Step == meshv1.RolloutStepRollingBack {
		return fmt.Sprintf("Rolling %s back to %s: %s", ro.To, ro.From, ro.Message)
	}
	return fmt.Sprintf("Rolling out %s (from %s), %s %d/%d: %s", ro.To, ro.From, strings.ToLower(ro.Step), ro.Wave, ro.Waves, ro.Message)
}

// waitingFor lists the components that are not ready and why, e.g.
// "ztunnel: OnDelete: 2 of 3 pods available"; "" when all are.
func (o *observation) waitingFor() string {
	var waiting []string
	for _, c := range o.components {
		if !c.Ready {
			msg := c.Message
			if msg == "" {
				msg = "not ready"
			}
			waiting = append(waiting, fmt.Sprintf("%s: %s", c.Name, msg))
		}
	}
	return strings.Join(waiting, "; ")
}

// progressMessage says what the rollout waits for.
func progressMessage(obs *observation) string {
	switch waiting := obs.waitingFor(); {
	case waiting != "":
		return fmt.Sprintf("Installing %s: waiting for %s", obs.target, waiting)
	case !obs.namespacesObserved:
		return "Enrolling namespaces"
	case obs.identity.pending() != "":
		return obs.identity.pending()
	case obs.bundle != nil && obs.target != "" && obs.bundle.Version != obs.target && obs.rollout.block == "":
		return fmt.Sprintf("%s rolled out on the way to %s; starting the next hop", obs.bundle.Version, obs.target)
	default:
		return "Removing releases the spec no longer needs"
	}
}

func readyMessage(mesh *meshv1.Mesh, obs *observation) string {
	mode := mesh.Spec.Dataplane.EffectiveMode()
	noun := "namespaces"
	if obs.namespaces == 1 {
		noun = "namespace"
	}
	if obs.rollout.deferred != "" && obs.bundle != nil {
		return fmt.Sprintf("%s %s: %d components ready, %d %s enrolled; %s", mode, obs.bundle.Version, len(obs.components), obs.namespaces, noun, obs.rollout.deferred)
	}
	return fmt.Sprintf("%s %s: %d components ready, %d %s enrolled", mode, obs.target, len(obs.components), obs.namespaces, noun)
}

func readyCondition(mesh *meshv1.Mesh) *metav1.Condition {
	return meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionReady)
}

func readyStatus(mesh *meshv1.Mesh) string {
	if c := readyCondition(mesh); c != nil {
		return string(c.Status)
	}
	return ""
}
