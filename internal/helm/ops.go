package helm

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/kube"
	rcommon "helm.sh/helm/v4/pkg/release/common"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Rollback makes a new revision from an earlier one. toRevision 0 means the
// previous good revision: the newest revision, other than the newest one,
// that was successfully deployed (state deployed or superseded). A pending
// newest revision is unlocked first. Rollback does not wait for readiness
// (see Ready).
func (c *Client) Rollback(ctx context.Context, name string, toRevision int) error {
	defer c.lock(name)()
	cfg := c.config("")
	if err := c.unlock(cfg, name); err != nil {
		return fmt.Errorf("rollback %s: %w", name, err)
	}
	h, err := history(cfg, name)
	if err != nil {
		return fmt.Errorf("rollback %s: read history: %w", name, err)
	}
	if len(h) == 0 {
		return fmt.Errorf("rollback %s: %w", name, errNotFound)
	}
	target, err := rollbackTarget(h, toRevision)
	if err != nil {
		return fmt.Errorf("rollback %s: %w", name, err)
	}
	cfg = c.config(target.Namespace)
	rb := action.NewRollback(cfg)
	rb.Version = target.Version
	rb.ServerSideApply = "true"
	rb.ForceConflicts = true
	rb.MaxHistory = c.maxHistory()
	rb.Timeout = DefaultTimeout
	rb.WaitStrategy = kube.HookOnlyStrategy
	rb.WaitOptions = []kube.WaitOption{kube.WithWaitContext(ctx)}

	began := time.Now()
	c.log.Info("Rolling back release", "release", name, "from", h[len(h)-1].Version, "to", target.Version)
	if err := rb.Run(name); err != nil {
		return fmt.Errorf("rollback %s to revision %d: %w", name, target.Version, err)
	}
	c.log.Info("Rolled back release", "release", name, "to", target.Version, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// rollbackTarget picks the revision to roll back to from a history sorted
// oldest first.
func rollbackTarget(h []*releasev1.Release, toRevision int) (*releasev1.Release, error) {
	newest := h[len(h)-1]
	if toRevision > 0 {
		i := slices.IndexFunc(h, func(r *releasev1.Release) bool { return r.Version == toRevision })
		if i < 0 {
			var have []int
			for _, r := range h {
				have = append(have, r.Version)
			}
			return nil, fmt.Errorf("no revision %d (stored revisions: %v)", toRevision, have)
		}
		return h[i], nil
	}
	if toRevision < 0 {
		return nil, fmt.Errorf("invalid revision %d", toRevision)
	}
	for _, r := range slices.Backward(h[:len(h)-1]) {
		if s := r.Info.Status; s == rcommon.StatusDeployed || s == rcommon.StatusSuperseded {
			return r, nil
		}
	}
	return nil, fmt.Errorf("no successfully deployed revision before revision %d to roll back to", newest.Version)
}

// Uninstall deletes the objects of a release and all its revision records.
// A release that does not exist is not an error. With wait, objects are
// deleted with foreground propagation and Uninstall returns once they (and
// so their dependents, such as pods) are gone, or after DefaultTimeout.
func (c *Client) Uninstall(ctx context.Context, name string, wait bool) error {
	defer c.lock(name)()
	cfg := c.config("")
	rel, err := last(cfg, name)
	if err != nil {
		return fmt.Errorf("uninstall %s: %w", name, err)
	}
	if rel == nil {
		return nil
	}
	if err := c.uninstall(ctx, c.config(rel.Namespace), name, wait, DefaultTimeout); err != nil {
		return fmt.Errorf("uninstall %s: %w", name, err)
	}
	return nil
}

func (c *Client) uninstall(ctx context.Context, cfg *action.Configuration, name string, wait bool, timeout time.Duration) error {
	var objs []mapped
	if wait {
		rel, err := last(cfg, name)
		if err != nil {
			return err
		}
		if rel != nil {
			// Best effort: an object whose kind is gone cannot be waited for.
			objs, _ = c.releaseObjects(rel)
		}
	}
	un := action.NewUninstall(cfg)
	un.IgnoreNotFound = true
	un.KeepHistory = false
	un.Timeout = timeout
	// Helm's own wait for deletion (StatusWatcherStrategy) can return early:
	// it skips objects whose status it has not observed yet, so one kind
	// being gone ends the wait while a Deployment still terminates. Wait
	// here instead.
	un.WaitStrategy = kube.HookOnlyStrategy
	un.DeletionPropagation = "background"
	if wait {
		un.DeletionPropagation = "foreground"
	}
	began := time.Now()
	res, err := un.Run(name)
	if err != nil {
		return err
	}
	if res != nil && res.Info != "" {
		// Objects Helm kept: resource policy "keep", or not owned by the
		// release (its ownership label/annotations were changed).
		c.log.Info("Uninstall kept objects", "release", name, "info", res.Info)
	}
	if wait {
		if err := c.waitDeleted(ctx, objs, timeout); err != nil {
			return err
		}
	}
	c.log.Info("Uninstalled release", "release", name, "wait", wait, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// waitDeleted polls until every object that is being deleted is gone.
// Objects that exist without a deletion timestamp were kept by Helm and are
// not waited for.
func (c *Client) waitDeleted(ctx context.Context, objs []mapped, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		var left []string
		for _, m := range objs {
			live, err := c.resourceClient(m).Get(ctx, m.obj.GetName(), metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
			case err != nil:
				left = append(left, fmt.Sprintf("%s (%v)", m.key(), err))
			case live.GetDeletionTimestamp() != nil:
				left = append(left, m.key())
			}
		}
		if len(left) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for deletion of %s: %w", strings.Join(left, ", "), ctx.Err())
		case <-tick.C:
		}
	}
}
