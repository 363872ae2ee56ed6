package controller

import (
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// observation is what the phases of one reconcile saw and did; the status is
// computed from it once, in the deferred patch.
type observation struct {
	target      string
	invalidSpec string
	applyErr    error
	namespaces  int32
	conflicts   []string
	paused      bool
	deleting    bool
}

// applyStatus writes everything the reconcile learned into mesh.status.
func applyStatus(mesh *meshv1.Mesh, obs *observation, reconcileErr error) {
	st := &mesh.Status
	if obs.target != "" {
		st.Version.Target = obs.target
	}
	if obs.invalidSpec == "" && !obs.deleting && !obs.paused && obs.applyErr == nil {
		d := mesh.Spec.Dataplane
		st.Dataplane.Mode = d.EffectiveMode()
		st.Dataplane.Redirection = d.EffectiveRedirection()
		st.Dataplane.Revision = revision(mesh.Spec.Version)
		st.Dataplane.Namespaces = obs.namespaces
		slices.Sort(obs.conflicts)
		st.Dataplane.Conflicts = obs.conflicts
	}
	setConditions(mesh, obs, reconcileErr)
	if settled(obs, reconcileErr) {
		st.ObservedGeneration = mesh.Generation
	}
}

// settled is true when the reconcile reached a result that needs no more
// work from meshkeeper: done, paused, or stalled on the spec.
func settled(obs *observation, reconcileErr error) bool {
	if obs.deleting || obs.applyErr != nil {
		return false
	}
	return reconcileErr == nil || obs.invalidSpec != ""
}

// setConditions sets Ready, Reconciling, Stalled and Degraded from obs.
// Reconciling and Stalled are only present while True (kstatus convention).
func setConditions(mesh *meshv1.Mesh, obs *observation, reconcileErr error) {
	gen := mesh.Generation
	set := func(t string, s metav1.ConditionStatus, reason, msg string) {
		meta.SetStatusCondition(&mesh.Status.Conditions, metav1.Condition{
			Type: t, Status: s, Reason: reason, Message: msg, ObservedGeneration: gen,
		})
	}
	drop := func(t string) { meta.RemoveStatusCondition(&mesh.Status.Conditions, t) }

	switch {
	case obs.deleting:
		msg := "Removing the labels meshkeeper set on namespaces"
		if obs.applyErr != nil {
			msg += ": " + obs.applyErr.Error()
		}
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonDeleting, msg)
		set(meshv1.ConditionReconciling, metav1.ConditionTrue, meshv1.ReasonDeleting, msg)
		drop(meshv1.ConditionStalled)
	case obs.invalidSpec != "":
		msg := "Invalid spec: " + obs.invalidSpec
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonInvalidSpec, msg)
		set(meshv1.ConditionStalled, metav1.ConditionTrue, meshv1.ReasonInvalidSpec, msg)
		drop(meshv1.ConditionReconciling)
	case obs.applyErr != nil:
		msg := "Retrying: " + obs.applyErr.Error()
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonApplyFailed, msg)
		set(meshv1.ConditionReconciling, metav1.ConditionTrue, meshv1.ReasonApplyFailed, msg)
		drop(meshv1.ConditionStalled)
	case reconcileErr != nil:
		msg := "Retrying: " + reconcileErr.Error()
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonProgressing, msg)
		set(meshv1.ConditionReconciling, metav1.ConditionTrue, meshv1.ReasonProgressing, msg)
		drop(meshv1.ConditionStalled)
	case obs.paused:
		msg := "spec.paused is true: nothing is executed; set paused: false to continue"
		set(meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonPaused, msg)
		drop(meshv1.ConditionReconciling)
		drop(meshv1.ConditionStalled)
	default:
		set(meshv1.ConditionReady, metav1.ConditionTrue, meshv1.ReasonSucceeded, readyMessage(mesh, obs))
		drop(meshv1.ConditionReconciling)
		drop(meshv1.ConditionStalled)
	}

	if len(obs.conflicts) > 0 && !obs.deleting {
		set(meshv1.ConditionDegraded, metav1.ConditionTrue, meshv1.ReasonLabelConflict,
			fmt.Sprintf("meshkeeper leaves namespaces whose dataplane label another manager set: %s; remove that label to enroll them",
				strings.Join(obs.conflicts, "; ")))
	} else if obs.invalidSpec == "" {
		drop(meshv1.ConditionDegraded)
	}
}

func readyMessage(mesh *meshv1.Mesh, obs *observation) string {
	mode := mesh.Spec.Dataplane.EffectiveMode()
	noun := "namespaces"
	if obs.namespaces == 1 {
		noun = "namespace"
	}
	return fmt.Sprintf("%d %s enrolled in %s mode", obs.namespaces, noun, mode)
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
