package plan

import (
	"fmt"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// move is one release and mode a plan rolls out, checked against history.
type move struct {
	version string
	mode    meshv1.DataplaneMode
	hop     bool // an intermediate or final hop of a multi-minor upgrade
}

// failedBefore is the newest status.history entry for version in mode when
// that entry failed (RolledBack or Failed); nil when the newest one succeeded
// or there is none. An entry without a mode matches every mode.
//
// The rule that makes a failed target stick: Compute consults this only while
// Inputs.Generation <= Inputs.ObservedGeneration, i.e. the spec has not
// changed since the failure was recorded. A target that resolves to another
// release (a new patch in the catalog for a minor spec.version) is a different
// target and is not blocked by the old failure.
func failedBefore(history []meshv1.HistoryEntry, version string, mode meshv1.DataplaneMode) *meshv1.HistoryEntry {
	for i := len(history) - 1; i >= 0; i-- {
		h := history[i]
		if h.Version != version || (h.Mode != "" && h.Mode != mode) {
			continue
		}
		if h.Outcome == meshv1.OutcomeRolledBack || h.Outcome == meshv1.OutcomeFailed {
			return &h
		}
		return nil
	}
	return nil
}

func blockedMessage(h *meshv1.HistoryEntry, m move, installed, target string) string {
	what := fmt.Sprintf("%s (%s)", m.version, m.mode)
	if m.hop && m.version != target {
		what += fmt.Sprintf(", the release the upgrade from %s to %s goes through,", installed, target)
	}
	reason := ""
	if h.Reason != "" {
		reason = fmt.Sprintf(" (%s)", h.Reason)
	}
	stay := "set spec.version to another release"
	if installed != "" {
		stay = fmt.Sprintf("set spec.version to %q to stay on what runs", installed)
	}
	verb := "was rolled back"
	if h.Outcome == meshv1.OutcomeFailed {
		verb = "failed"
	}
	return fmt.Sprintf("%s %s before%s; a failed target is not retried until the spec changes: fix the cause and edit the spec to retry (any change to spec counts), or %s",
		what, verb, reason, stay)
}
