package helm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"time"

	"helm.sh/helm/v4/pkg/action"
	ri "helm.sh/helm/v4/pkg/release"
	rcommon "helm.sh/helm/v4/pkg/release/common"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	"helm.sh/helm/v4/pkg/storage/driver"
)

// Release is what Apply installs or upgrades to.
type Release struct {
	// Name of the release (at most 53 characters, DNS-1123).
	Name string
	// Namespace the objects go to; created if missing.
	Namespace string
	// Chart is the chart directory (Chart.yaml at its root).
	Chart fs.FS
	// Values override the chart's values.yaml.
	Values map[string]any
	// Labels are added to every rendered object (metadata.labels) and to the
	// pod templates of workloads. See ManagedLabels.
	Labels map[string]string
	// Wait until the release's objects are ready (kstatus), up to Timeout.
	Wait bool
	// Timeout bounds waiting and hooks (DefaultTimeout when zero).
	Timeout time.Duration
}

// Release states, as Helm names them.
const (
	StateDeployed        = string(rcommon.StatusDeployed)
	StateFailed          = string(rcommon.StatusFailed)
	StateSuperseded      = string(rcommon.StatusSuperseded)
	StatePendingInstall  = string(rcommon.StatusPendingInstall)
	StatePendingUpgrade  = string(rcommon.StatusPendingUpgrade)
	StatePendingRollback = string(rcommon.StatusPendingRollback)
	StateUninstalling    = string(rcommon.StatusUninstalling)
	StateUninstalled     = string(rcommon.StatusUninstalled)
)

// Status describes one revision of a release.
type Status struct {
	Name, Namespace string
	Revision        int
	// State is Helm's status: deployed, failed, superseded, pending-install,
	// pending-upgrade, pending-rollback, uninstalling, uninstalled.
	State                    string
	ChartVersion, AppVersion string
	Updated                  time.Time
	// ValuesDigest digests the values, labels and namespace the revision was
	// made from; ChartDigest the chart's files. Empty for revisions not made
	// by Apply (a rollback copies the digests of the revision it restores).
	ValuesDigest string
	ChartDigest  string
	// Description is Helm's note on the revision ("Install complete",
	// "Upgrade \"x\" failed: ...", "Rollback to 2", ...).
	Description string
}

// Deployed reports whether the revision is the live, successful one.
func (s *Status) Deployed() bool { return s != nil && s.State == StateDeployed }

func statusOf(rel *releasev1.Release) *Status {
	if rel == nil {
		return nil
	}
	s := &Status{
		Name:         rel.Name,
		Namespace:    rel.Namespace,
		Revision:     rel.Version,
		ValuesDigest: rel.Labels[labelValuesDigest],
		ChartDigest:  rel.Labels[labelChartDigest],
	}
	if rel.Info != nil {
		s.State = string(rel.Info.Status)
		s.Updated = rel.Info.LastDeployed
		s.Description = rel.Info.Description
	}
	if rel.Chart != nil && rel.Chart.Metadata != nil {
		s.ChartVersion = rel.Chart.Metadata.Version
		s.AppVersion = rel.Chart.Metadata.AppVersion
	}
	return s
}

// asV1 converts what Helm's storage and actions return.
func asV1(r ri.Releaser) (*releasev1.Release, error) {
	switch t := r.(type) {
	case nil:
		return nil, nil
	case *releasev1.Release:
		return t, nil
	case releasev1.Release:
		return &t, nil
	default:
		return nil, fmt.Errorf("unsupported release type %T", r)
	}
}

func asV1List(rs []ri.Releaser) ([]*releasev1.Release, error) {
	out := make([]*releasev1.Release, 0, len(rs))
	for _, r := range rs {
		v, err := asV1(r)
		if err != nil {
			return nil, err
		}
		if v != nil {
			out = append(out, v)
		}
	}
	return out, nil
}

// history returns all revisions of a release, oldest first (nil when absent).
func history(cfg *action.Configuration, name string) ([]*releasev1.Release, error) {
	rs, err := cfg.Releases.History(name)
	if err != nil {
		if errors.Is(err, driver.ErrReleaseNotFound) {
			return nil, nil
		}
		return nil, err
	}
	out, err := asV1List(rs)
	if err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b *releasev1.Release) int { return a.Version - b.Version })
	return out, nil
}

// last returns the newest revision of a release, or nil when absent.
func last(cfg *action.Configuration, name string) (*releasev1.Release, error) {
	h, err := history(cfg, name)
	if err != nil || len(h) == 0 {
		return nil, err
	}
	return h[len(h)-1], nil
}

// deployed returns the newest deployed revision in h, or nil.
func deployed(h []*releasev1.Release) *releasev1.Release {
	for _, r := range slices.Backward(h) {
		if r.Info != nil && r.Info.Status == rcommon.StatusDeployed {
			return r
		}
	}
	return nil
}

// Get returns the newest revision of a release, or (nil, nil) when there is
// none.
func (c *Client) Get(_ context.Context, name string) (*Status, error) {
	rel, err := last(c.config(""), name)
	if err != nil {
		return nil, fmt.Errorf("get release %s: %w", name, err)
	}
	return statusOf(rel), nil
}

// History returns every stored revision of a release, oldest first (empty
// when absent).
func (c *Client) History(_ context.Context, name string) ([]Status, error) {
	h, err := history(c.config(""), name)
	if err != nil {
		return nil, fmt.Errorf("history of release %s: %w", name, err)
	}
	out := make([]Status, 0, len(h))
	for _, r := range h {
		out = append(out, *statusOf(r))
	}
	return out, nil
}

// List returns the newest revision of every release in the storage
// namespace, by name.
func (c *Client) List(_ context.Context) ([]Status, error) {
	rs, err := c.config("").Releases.ListReleases()
	if err != nil {
		return nil, fmt.Errorf("list releases: %w", err)
	}
	all, err := asV1List(rs)
	if err != nil {
		return nil, fmt.Errorf("list releases: %w", err)
	}
	newest := map[string]*releasev1.Release{}
	for _, r := range all {
		if cur, ok := newest[r.Name]; !ok || r.Version > cur.Version {
			newest[r.Name] = r
		}
	}
	out := make([]Status, 0, len(newest))
	for _, r := range newest {
		out = append(out, *statusOf(r))
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
