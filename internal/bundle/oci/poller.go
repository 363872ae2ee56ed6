package oci

import (
	"context"
	"errors"
	"io/fs"
	"time"

	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// Poller checks a Source every Interval and merges what verifies into Live.
// A check that fails (registry down, artifact refused) changes nothing but
// the recorded state: the operator keeps resolving against what it had.
// It is a controller-runtime Runnable that runs on every replica (not only
// the leader), so a new leader already holds the catalog.
type Poller struct {
	Source   *Source
	Interval time.Duration
	Live     *bundle.Live
	// Checked is called after every check (the reconciler re-reads the
	// catalog and its state); may be nil.
	Checked func()
	// Clock defaults to the real clock.
	Clock clock.WithTicker
}

// NeedLeaderElection is false: every replica keeps its catalog current.
func (p *Poller) NeedLeaderElection() bool { return false }

// Start checks at once, then every Interval until ctx ends.
func (p *Poller) Start(ctx context.Context) error {
	clk := p.Clock
	if clk == nil {
		clk = clock.RealClock{}
	}
	p.Live.SetSource(p.Source.String())
	t := clk.NewTicker(p.Interval)
	defer t.Stop()
	for {
		p.Check(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		}
	}
}

// Restore merges the artifact the source's cache holds, if any and if it
// verifies: what a restarted operator resolves against before (or without)
// the source answering.
func (p *Poller) Restore(ctx context.Context) {
	logger := log.FromContext(ctx).WithValues("source", p.Source.String())
	cat, d, err := p.Source.Restore()
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return
	case err != nil:
		logger.Error(err, "Cached catalog artifact refused; starting from the embedded catalog")
		return
	}
	added, err := p.Live.Update(cat, d.String(), time.Time{})
	if err != nil {
		logger.Error(err, "Some bundles of the cached catalog artifact were refused", "digest", d.String())
	}
	logger.Info("Catalog restored from the cache", "digest", d.String(), "newVersions", added)
}

// Check polls the source once.
func (p *Poller) Check(ctx context.Context) {
	logger := log.FromContext(ctx).WithValues("source", p.Source.String())
	now := time.Now()
	if p.Clock != nil {
		now = p.Clock.Now()
	}
	defer func() {
		if p.Checked != nil {
			p.Checked()
		}
	}()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	d, err := p.Source.Resolve(cctx)
	if err != nil {
		logger.Info("Catalog source unreachable; keeping the catalog as it is", "error", err.Error())
		p.Live.Failed(now, err)
		return
	}
	if d.String() == p.Live.State().Digest {
		p.Live.Unchanged(now)
		return
	}
	cat, d, err := p.Source.Pull(cctx)
	if err != nil {
		logger.Error(err, "Catalog artifact refused; keeping the catalog as it is")
		p.Live.Failed(now, err)
		return
	}
	added, err := p.Live.Update(cat, d.String(), now)
	if err != nil {
		logger.Error(err, "Some bundles of the catalog artifact were refused", "digest", d.String())
	}
	logger.Info("Catalog updated", "digest", d.String(), "newVersions", added)
}
