package controller

import (
	"context"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"

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
	var nodes corev1.NodeList
	if err := r.List(ctx, &nodes); err != nil {
		return
	}
	infos := make([]plan.NodeInfo, 0, len(nodes.Items))
	for _, n := range nodes.Items {
		infos = append(infos, plan.NodeInfo{Name: n.Name, Labels: n.Labels})
	}
	p, err := plan.Compute(plan.Inputs{
		Spec: mesh.Spec, Generation: mesh.Generation, ObservedGeneration: mesh.Status.ObservedGeneration,
		Installed: plan.InstalledFrom(mesh.Status), History: mesh.Status.History,
		Namespaces: names, Nodes: infos, Catalog: r.Catalog, Now: time.Now(),
	})
	obs.planned = true
	if err != nil {
		obs.plan = []meshv1.PlanStep{{Action: "Plan", State: meshv1.StepFailed, Message: err.Error()}}
		return
	}
	obs.hops = p.Hops
	obs.plan = p.Status()
	for i := range obs.plan {
		if s := p.Steps[i]; s.Action == plan.ActionUpgradeNodeComponents || s.Action == plan.ActionInstallNodeComponents {
			obs.plan[i].Message = "In place, ahead of the namespace waves (node waves are planned but not executed yet): " + obs.plan[i].Message
		}
	}
}

// planStates marks the published steps with what this reconcile saw: the
// steps of the hop being rolled out are Done, Running or Failed.
func planStates(steps []meshv1.PlanStep, obs *observation) []meshv1.PlanStep {
	if len(steps) == 0 || obs.paused {
		return steps
	}
	out := slices.Clone(steps)
	ro := obs.rollout.status
	for i := range out {
		s := &out[i]
		if s.State == meshv1.StepFailed {
			continue
		}
		switch s.Action {
		case string(plan.ActionMoveNamespaces):
			switch {
			case ro == nil:
			case ro.Step == meshv1.RolloutStepRollingBack:
				s.State, s.Message = meshv1.StepFailed, fmt.Sprintf("rolling back: %s", ro.Message)
			case ro.Step == meshv1.RolloutStepRetire:
				s.State = meshv1.StepDone
			case obs.componentsReady:
				s.State = meshv1.StepRunning
			}
		case string(plan.ActionRetireControlPlane):
			if ro != nil && ro.Step == meshv1.RolloutStepRetire {
				s.State = meshv1.StepRunning
			}
		default:
			switch {
			case obs.componentsReady && (ro != nil || obs.converged()):
				s.State = meshv1.StepDone
			case obs.bundle != nil:
				s.State = meshv1.StepRunning
			}
		}
		if ro != nil && s.Target != ro.To && s.Target != ro.From {
			// A later hop: untouched until this one finishes.
			s.State = meshv1.StepPending
		}
	}
	return out
}
