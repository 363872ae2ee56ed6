package bundle

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Merge returns a catalog with every bundle of base and those of add whose
// versions base lacks. A release never changes content once catalogued: a
// bundle of add whose version base has with a different Digest is refused
// (the error names both sources) and base's is kept; one with the same
// Digest is the same release and keeps base's Source.
func Merge(base, add *Catalog) (*Catalog, error) {
	out := &Catalog{bundles: slices.Clone(base.bundles)}
	var errs []error
	for _, b := range add.bundles {
		have, err := base.exact(b.Version)
		if err != nil {
			out.bundles = append(out.bundles, b)
			continue
		}
		dHave, err1 := have.Digest()
		dNew, err2 := b.Digest()
		if err := errors.Join(err1, err2); err != nil {
			errs = append(errs, err)
			continue
		}
		if dHave != dNew {
			errs = append(errs, fmt.Errorf("bundle %s from %s differs from the %s already in the catalog (from %s): kept the one from %s; a release never changes once catalogued, publish a new patch instead",
				b.Version, b.Source, b.Version, have.Source, have.Source))
		}
	}
	slices.SortFunc(out.bundles, func(a, b *Bundle) int { return a.semver.compare(b.semver) })
	return out, errors.Join(errs...)
}

// exact finds the bundle of an exact release.
func (c *Catalog) exact(version string) (*Bundle, error) {
	for _, b := range c.bundles {
		if b.Version == version {
			return b, nil
		}
	}
	return nil, &VersionError{Requested: version, Known: c.Versions(), Reason: "not in the catalog"}
}

// Bundles lists every bundle, oldest first.
func (c *Catalog) Bundles() []*Bundle {
	return slices.Clone(c.bundles)
}

// Live is the catalog a running operator resolves against: the embedded
// bundles, merged with every bundle its catalog source has served and
// verified since it started. It only grows: a release once seen stays, so
// a Mesh running a release its source later drops can still be planned
// from. Safe for concurrent use; readers take a snapshot per reconcile.
type Live struct {
	mu    sync.RWMutex
	cat   *Catalog
	state SourceState
	// checkErr is why the last check failed; mergeErr what the last merge
	// refused. Message shows the first that is set.
	checkErr, mergeErr string
}

// SourceState is what the operator knows about its catalog source.
type SourceState struct {
	// Source is the configured source ("" when there is none).
	Source string
	// Digest is that of the last artifact verified and merged.
	Digest string
	// LastChecked is when the source was last polled; LastUpdated when a
	// new artifact was last merged.
	LastChecked, LastUpdated time.Time
	// Message is why the last check did not update the catalog; "" when it did
	// or had nothing new.
	Message string
}

// NewLive starts a live catalog from base (the embedded catalog) for a
// source ("" when there is none).
func NewLive(base *Catalog, source string) *Live {
	return &Live{cat: base, state: SourceState{Source: source}}
}

// SetSource records the source being polled (a poller started on a Live
// made without one).
func (l *Live) SetSource(source string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.state.Source = source
}

// Catalog is the current catalog.
func (l *Live) Catalog() *Catalog {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.cat
}

// State is what is known about the source.
func (l *Live) State() SourceState {
	l.mu.RLock()
	defer l.mu.RUnlock()
	st := l.state
	st.Message = l.checkErr
	if st.Message == "" {
		st.Message = l.mergeErr
	}
	return st
}

// Failed records a check at that did not produce a catalog (unreachable
// source, an artifact refused): the catalog stays as it is.
func (l *Live) Failed(at time.Time, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.state.LastChecked, l.checkErr = at, err.Error()
}

// Unchanged records a check at that found the artifact already merged.
func (l *Live) Unchanged(at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.state.LastChecked, l.checkErr = at, ""
}

// Update merges a verified catalog pulled at at from the artifact digest.
// Bundles that conflict with known ones are refused (see Merge) and named in
// the returned error and the state's Message; the others are merged all the
// same. It returns the versions that are new.
func (l *Live) Update(remote *Catalog, digest string, at time.Time) ([]string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	merged, err := Merge(l.cat, remote)
	var added []string
	for _, v := range merged.Versions() {
		if _, e := l.cat.exact(v); e != nil {
			added = append(added, v)
		}
	}
	l.cat = merged
	l.state.Digest, l.state.LastChecked, l.state.LastUpdated = digest, at, at
	l.checkErr, l.mergeErr = "", ""
	if err != nil {
		l.mergeErr = err.Error()
	}
	return added, err
}
