package controller

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/restart"
)

// A version rollout in Sidecar mode moves a namespace to the new revision
// with its istio.io/rev label, but that only changes what istiod injects
// into pods created from then on: the pods already running keep the sidecar
// of the old revision, which talks to the old istiod, and the old istiod is
// retired at the end of the rollout. So each namespace wave's workloads are
// restarted (restart.Restart: kubectl rollout restart, paced within their
// PodDisruptionBudgets) once its label is in place, and the wave bakes and
// is judged only once they have rolled out and are ready
// (status.rollout.workloadsRestartedAt). A rollback restarts the moved
// namespaces' workloads again, back onto the old revision, and is recorded
// as RolledBack only once they are. In Ambient mode nothing is restarted: a
// namespace's revision is ztunnel's and the waypoints', not the pods'.

// sidecarRestarts is the restart work of one reconcile of a Sidecar version
// rollout: the namespaces whose workloads follow revision, under token.
type sidecarRestarts struct {
	namespaces []string
	revision   string
	token      string
	pending    bool // not every workload has rolled out yet
}

// sidecarVersionRollout says whether mesh runs a version rollout in Sidecar
// mode, before and after it.
func sidecarVersionRollout(mesh *meshv1.Mesh) bool {
	return mesh.Spec.Dataplane.EffectiveMode() == meshv1.ModeSidecar &&
		effectiveMode(mesh.Status.Dataplane.Mode) == meshv1.ModeSidecar
}

// restartTokens are the restartedAt values a rollout stamps: one for its
// waves, one for its rollback. Both derive from when the rollout started,
// so a retried rollout restarts again.
func restartTokens(ro *meshv1.RolloutStatus) (forward, back string) {
	at := "unknown"
	if ro.StartedAt != nil {
		at = ro.StartedAt.UTC().Format(time.RFC3339)
	}
	return at, "rollback-" + at
}

// observeRestarts says whether every workload of namespaces runs the pod
// template stamped with token, rolled out and ready; waiting names the
// first ones that do not.
func (r *MeshReconciler) observeRestarts(ctx context.Context, namespaces []string, token string) (done bool, waiting []string, err error) {
	for _, ns := range namespaces {
		ok, why, err := restart.Observe(ctx, r.workloads(), ns, token)
		if err != nil {
			return false, nil, fmt.Errorf("workloads of namespace %s: %w", ns, err)
		}
		if !ok {
			waiting = append(waiting, ns+": "+why)
		}
	}
	return len(waiting) == 0, waiting, nil
}

// waitForWaveRestarts holds the current namespace wave until its workloads
// have restarted onto the new revision; then the bake starts. held: the
// wave is not judged in this reconcile.
func (r *MeshReconciler) waitForWaveRestarts(ctx context.Context, mesh *meshv1.Mesh, obs *observation, wave []string) (held bool, err error) {
	ro := obs.rollout.status
	if !sidecarVersionRollout(mesh) || ro.WorkloadsRestartedAt != nil {
		return false, nil
	}
	forward, _ := restartTokens(ro)
	done, waiting, err := r.observeRestarts(ctx, wave, forward)
	if err != nil {
		return true, err
	}
	now := time.Now()
	if done {
		// The move is complete: bake and analysis count from here.
		ro.WorkloadsRestartedAt = &metav1.Time{Time: now}
		ro.WaveStartedAt = ro.WorkloadsRestartedAt.DeepCopy()
		resetChecks(ro)
		ro.Message = fmt.Sprintf("wave %d/%d (%s): workloads restarted onto %s; baking %s", ro.Wave, ro.Waves, nameList(wave),
			obs.bundle.Revision(), mesh.Spec.Rollout.Namespaces.EffectiveBake())
		obs.requeueAfter = 100 * time.Millisecond
		return true, nil
	}
	obs.rollout.restarts = &sidecarRestarts{namespaces: wave, revision: obs.bundle.Revision(), token: forward, pending: true}
	if deadline := mesh.Spec.Rollout.EffectiveProgressDeadline(); now.Sub(ro.WaveStartedAt.Time) >= deadline {
		return true, r.startRollback(mesh, obs, fmt.Sprintf("wave %d/%d (%s) did not move within spec.rollout.progressDeadline %s: workloads not restarted onto %s: %s",
			ro.Wave, ro.Waves, nameList(wave), deadline, obs.bundle.Revision(), someOf(waiting, "; ")))
	}
	ro.Message = fmt.Sprintf("wave %d/%d (%s): restarting workloads onto %s: %s", ro.Wave, ro.Waves, nameList(wave),
		obs.bundle.Revision(), someOf(waiting, "; "))
	obs.requeueAfter = 2 * time.Second // the workloads' rollouts are not watched
	return true, nil
}

// rollbackRestarts is the restart work of a Sidecar rollback: the
// namespaces of the waves that moved go back onto the old revision, and
// their workloads with them.
func (r *MeshReconciler) rollbackRestarts(ctx context.Context, mesh *meshv1.Mesh, obs *observation, waves [][]string) error {
	ro := obs.rollout.status
	recorded := mesh.Status.Rollout
	if !sidecarVersionRollout(mesh) || recorded == nil || recorded.Step != meshv1.RolloutStepRollingBack {
		return nil // record first, act next: the rollback acts once status says so
	}
	ro.Message = rollbackReason(ro.Message) // history records the reason alone
	if len(ro.WaveNamespaces) == 0 && ro.WaveNamespacesOmitted == 0 {
		return nil // rolled back in the node waves: no namespace moved
	}
	var moved []string
	for _, wave := range waves[:min(int(ro.Wave), len(waves))] {
		moved = append(moved, wave...)
	}
	slices.Sort(moved)
	_, back := restartTokens(ro)
	done, waiting, err := r.observeRestarts(ctx, moved, back)
	if err != nil || done {
		return err
	}
	obs.rollout.restarts = &sidecarRestarts{namespaces: moved, revision: obs.bundle.Revision(), token: back, pending: true}
	ro.Message = fmt.Sprintf("%s%s%s: %s", ro.Message, rollbackProgress, obs.bundle.Revision(), someOf(waiting, "; "))
	obs.requeueAfter = 2 * time.Second
	return nil
}

// rollbackReason is the rollback's reason without the restart progress a
// previous reconcile appended to it.
func rollbackReason(msg string) string {
	reason, _, _ := strings.Cut(msg, rollbackProgress)
	return reason
}

const rollbackProgress = "; restarting workloads back onto "

// sidecarRestartPhase restarts the workloads of the namespaces this
// reconcile's rollout names, once their label points at the revision they
// follow (a pod recreated before it would be injected for the old one).
func (r *MeshReconciler) sidecarRestartPhase(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	work := obs.rollout.restarts
	if work == nil || !obs.namespacesObserved {
		return nil
	}
	return r.restartLabelled(ctx, mesh, work.namespaces, work.token, "Restarted for the sidecars of "+work.revision, func(ns *corev1.Namespace) bool {
		return ns.Labels[meshv1.LabelRevision] == work.revision
	})
}
