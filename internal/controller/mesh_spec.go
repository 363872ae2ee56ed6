package controller

import (
	"context"
	"fmt"

	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/plan"
	"github.com/meshkeeper/meshkeeper/webhooks"
)

// reconcileSpec re-checks the spec with the admission rules. A spec that
// slipped past admission (webhook down, installed before it) stalls with the
// reason instead of being retried in a hot loop: a terminal error is not
// requeued, and the next spec change starts a new reconcile.
func (r *MeshReconciler) reconcileSpec(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	stall := func(reason string) error {
		obs.invalidSpec = reason
		log.FromContext(ctx).Info("Spec is invalid; waiting for a change", "reason", reason)
		return reconcile.TerminalError(fmt.Errorf("invalid spec: %s", reason))
	}
	if errs := webhooks.ValidateSpec(&mesh.Spec); len(errs) > 0 {
		return stall(errs.ToAggregate().Error())
	}
	if reason := trustDomainChange(mesh); reason != "" {
		return stall(reason)
	}
	t, err := plan.ResolveTarget(&mesh.Spec, mesh.Status.Version.Installed, r.Catalog)
	if err != nil {
		return stall(err.Error())
	}
	obs.bundle, obs.target, obs.automatic = t.Bundle, t.Version, t.Automatic
	return nil
}
