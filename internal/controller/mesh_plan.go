package controller

import (
	"context"
	"fmt"
	"slices"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// computePlan runs the planner on what the cluster shows. Its steps go to
// status.plan, so that anyone (and spec.paused: a dry run) can read what
// meshkeeper will do; its first hop is the next rollout's target.
func (r *MeshReconciler) computePlan(ctx context.Context, mesh *meshv1.Mesh, obs *observation) {
	names, err := r.selectedNamespaces(ctx, mesh, obs)
	if err != nil {
		return
	}
	nodes, err := r.clusterNodes(ctx, obs)
	if err != nil {
		return
	}
	p, err := plan.Compute(plan.Inputs{
		Spec: mesh.Spec, Generation: mesh.Generation, ObservedGeneration: mesh.Status.ObservedGeneration,
		Installed: plan.InstalledFrom(mesh.Status), History: mesh.Status.History,
		Namespaces: names, Nodes: nodeInfos(nodes), Catalog: r.Catalog, Now: r.now(),
	})
	obs.planned = true
	if err != nil {
		obs.plan = []meshv1.PlanStep{{Action: "Plan", State: meshv1.StepFailed, Message: err.Error()}}
		obs.planFailed = err.Error()
		return
	}
	obs.hops = p.Hops
	obs.plan = p.Status()
}

// planStates marks the published steps with what this reconcile saw: the
// steps of the hop being rolled out are Done, Running or Failed.
func planStates(steps []meshv1.PlanStep, obs *observation) []meshv1.PlanStep {
	if len(steps) == 0 || obs.paused || obs.rollout.deferred != "" {
		return steps // nothing of it runs yet: every step Pending
	}
	out := slices.Clone(steps)
	ro := obs.rollout.status
	for i := range out {
		s := &out[i]
		if s.State == meshv1.StepFailed {
			continue
		}
		switch s.Action {
		case string(plan.ActionUpgradeNodeComponents):
			switch {
			case ro == nil:
				if st := defaultState(obs); st != "" {
					s.State = st
				}
			case ro.Step == meshv1.RolloutStepRollingBack:
				s.State, s.Message = meshv1.StepFailed, fmt.Sprintf("rolling back: %s", ro.Message)
			case ro.Step == meshv1.RolloutStepNodes && ro.Wave > 0:
				s.State, s.Message = meshv1.StepRunning, fmt.Sprintf("%s; now %s", s.Message, ro.Message)
			case ro.Step == meshv1.RolloutStepNodes:
			default:
				s.State = meshv1.StepDone
			}
		case string(plan.ActionMoveNamespaces):
			switch {
			case ro == nil:
			case ro.Step == meshv1.RolloutStepRollingBack:
				s.State, s.Message = meshv1.StepFailed, fmt.Sprintf("rolling back: %s", ro.Message)
			case ro.Step == meshv1.RolloutStepRetire:
				s.State = meshv1.StepDone
			case ro.Step == meshv1.RolloutStepNamespaces && obs.componentsReady:
				s.State = meshv1.StepRunning
			}
		case string(plan.ActionRetireControlPlane):
			if ro != nil && ro.Step == meshv1.RolloutStepRetire {
				s.State = meshv1.StepRunning
			}
		default:
			if st := defaultState(obs); st != "" {
				s.State = st
			}
		}
		if ro != nil && s.Target != ro.To && s.Target != ro.From {
			// A later hop: untouched until this one finishes.
			s.State = meshv1.StepPending
		}
	}
	return out
}

// defaultState is the state of a step that runs as one piece: Done once the
// components are ready (in a rollout, or converged), Running while they
// are applied, "" (unchanged) before that.
func defaultState(obs *observation) meshv1.StepState {
	switch {
	case obs.componentsReady && (obs.rollout.status != nil || obs.converged()):
		return meshv1.StepDone
	case obs.bundle != nil:
		return meshv1.StepRunning
	}
	return ""
}
