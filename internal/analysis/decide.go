package analysis

import (
	"fmt"
	"strings"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// DefaultInconclusiveLimit is how many consecutive inconclusive checks are
// tolerated before the analysis reports Degraded, waiting for a human.
const DefaultInconclusiveLimit = meshv1.DefaultInconclusiveLimit

// State is what the analysis of one wave remembers between checks. It is
// plain data, meant to live in status (rollout.failedChecks,
// rollout.inconclusiveChecks) and to be read back unchanged; the zero value
// is the state of a wave that has not been checked yet, so reset it when a
// wave starts.
type State struct {
	// FailedChecks counts consecutive failed checks (a check fails when any
	// of its SLOs fails). Only a check where every SLO passes resets it; an
	// inconclusive check leaves it as it is.
	FailedChecks int32 `json:"failedChecks,omitempty"`
	// InconclusiveChecks counts consecutive inconclusive checks. Any
	// conclusive check (passed or failed) resets it.
	InconclusiveChecks int32 `json:"inconclusiveChecks,omitempty"`
}

// Policy configures the state machine.
type Policy struct {
	// FailureLimit is how many consecutive failed checks are tolerated: the
	// check after them rolls back, so 0 rolls back on the first failure and
	// 2 on the third (Argo Rollouts' failureLimit: failed > limit).
	FailureLimit int32
	// InconclusiveLimit is how many consecutive inconclusive checks are
	// tolerated: the check after them holds the wave as Degraded, so 0
	// reports Degraded on the first and 5 on the sixth (Argo Rollouts'
	// inconclusiveLimit: inconclusive > limit). Settings.Policy applies the
	// default (DefaultInconclusiveLimit).
	InconclusiveLimit int32
}

// Action is what the rollout does after a check.
type Action string

const (
	// ActionPromote: the bake time is over and every SLO passed; move on.
	ActionPromote Action = "Promote"
	// ActionContinue: keep the wave and check again at the next interval
	// (still baking, or a failure that is still tolerated).
	ActionContinue Action = "Continue"
	// ActionHold: no conclusive answer; keep the wave, never promote, check
	// again. With Decision.Degraded it has been so for too long.
	ActionHold Action = "Hold"
	// ActionRollback: more consecutive failed checks than tolerated.
	ActionRollback Action = "Rollback"
)

// Input is one check of a wave.
type Input struct {
	// Wave is the wave number (from 1) for messages; 0 leaves it out.
	Wave int32
	// NodeWave says Wave counts node waves ("in node wave 2").
	NodeWave bool
	// Results of this check, one per SLO.
	Results []Result
	// BakeElapsed says the wave has soaked for at least the bake time.
	BakeElapsed bool
}

// Decision is the outcome of one check.
type Decision struct {
	Action Action
	// Degraded is set with ActionHold once more than InconclusiveLimit
	// consecutive checks were inconclusive: the rollout waits for a human (it still
	// checks, and resumes by itself when an answer comes).
	Degraded bool
	// Verdict of the check as a whole: Fail when any SLO failed, otherwise
	// Inconclusive when any SLO was, otherwise Pass.
	Verdict meshv1.Verdict
	// State to persist for the next check.
	State State
	// Reason is one line for conditions, events and, on rollback, history:
	// "l4-success 0.93 < 0.99 in wave 1".
	Reason string
	// ClusterWide lists the messages of SLOs that passed on the baseline
	// comparison although both sides broke their bounds: a drop across the
	// cluster, reported in status and an event, not a failure of the wave.
	ClusterWide []string
}

// Decide is the pure state machine of a wave's analysis: the previous
// state and this check's results give the next state and what to do.
//
//   - any SLO Fail: FailedChecks+1; more than FailureLimit → Rollback,
//     otherwise Continue. InconclusiveChecks resets.
//   - otherwise any SLO Inconclusive (or no results): InconclusiveChecks+1;
//     Hold, Degraded once it is above InconclusiveLimit. FailedChecks is
//     kept.
//   - every SLO Pass: both counters reset; Promote when the bake time is
//     over, otherwise Continue.
func Decide(prev State, in Input, p Policy) Decision {
	limit := max(p.FailureLimit, 0)
	inconclusiveLimit := max(p.InconclusiveLimit, 0)
	where := ""
	switch {
	case in.Wave > 0 && in.NodeWave:
		where = fmt.Sprintf(" in node wave %d", in.Wave)
	case in.Wave > 0:
		where = fmt.Sprintf(" in wave %d", in.Wave)
	}
	var failed, inconclusive, passed, clusterWide []string
	for i := range in.Results {
		r := &in.Results[i]
		if r.ClusterWide {
			clusterWide = append(clusterWide, r.Message)
		}
		switch r.Verdict {
		case meshv1.VerdictPass:
			passed = append(passed, r.Message)
		case meshv1.VerdictFail:
			failed = append(failed, r.Message)
		default:
			inconclusive = append(inconclusive, r.Message)
		}
	}
	if len(in.Results) == 0 {
		inconclusive = append(inconclusive, "no SLO was checked")
	}

	d := decide(prev, in.BakeElapsed, limit, inconclusiveLimit, where, failed, inconclusive, passed)
	d.ClusterWide = clusterWide
	return d
}

func decide(prev State, bakeElapsed bool, limit, inconclusiveLimit int32, where string, failed, inconclusive, passed []string) Decision {
	switch {
	case len(failed) > 0:
		next := State{FailedChecks: prev.FailedChecks + 1}
		reason := strings.Join(failed, "; ") + where
		if next.FailedChecks > limit {
			return Decision{Action: ActionRollback, Verdict: meshv1.VerdictFail, State: next, Reason: reason}
		}
		return Decision{Action: ActionContinue, Verdict: meshv1.VerdictFail, State: next,
			Reason: fmt.Sprintf("%s: failed check %d of %d tolerated (failureLimit %d)", reason, next.FailedChecks, limit, limit)}
	case len(inconclusive) > 0:
		next := State{FailedChecks: prev.FailedChecks, InconclusiveChecks: prev.InconclusiveChecks + 1}
		detail := strings.Join(inconclusive, "; ")
		if next.InconclusiveChecks > inconclusiveLimit {
			return Decision{Action: ActionHold, Degraded: true, Verdict: meshv1.VerdictInconclusive, State: next,
				Reason: fmt.Sprintf("analysis inconclusive for %d consecutive checks%s (inconclusiveLimit %d), waiting for a human: %s",
					next.InconclusiveChecks, where, inconclusiveLimit, detail)}
		}
		return Decision{Action: ActionHold, Verdict: meshv1.VerdictInconclusive, State: next,
			Reason: fmt.Sprintf("%s%s: holding the wave (inconclusive check %d of %d tolerated, inconclusiveLimit %d)", detail, where, next.InconclusiveChecks, inconclusiveLimit, inconclusiveLimit)}
	default:
		detail := strings.Join(passed, "; ")
		if bakeElapsed {
			return Decision{Action: ActionPromote, Verdict: meshv1.VerdictPass, Reason: fmt.Sprintf("%s%s: every SLO passed after the bake time", detail, where)}
		}
		return Decision{Action: ActionContinue, Verdict: meshv1.VerdictPass, Reason: fmt.Sprintf("%s%s: baking", detail, where)}
	}
}
