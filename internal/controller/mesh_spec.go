package controller

import (
	"context"
	"fmt"

	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/webhooks"
)

// reconcileSpec re-checks the spec with the admission rules. A spec that
// slipped past admission (webhook down, installed before it) stalls with the
// reason instead of being retried in a hot loop: a terminal error is not
// requeued, and the next spec change starts a new reconcile.
func (r *MeshReconciler) reconcileSpec(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	obs.target = mesh.Spec.Version
	if errs := webhooks.ValidateSpec(&mesh.Spec); len(errs) > 0 {
		obs.invalidSpec = errs.ToAggregate().Error()
		log.FromContext(ctx).Info("Spec is invalid; waiting for a change", "reason", obs.invalidSpec)
		return reconcile.TerminalError(fmt.Errorf("invalid spec: %s", obs.invalidSpec))
	}
	return nil
}
