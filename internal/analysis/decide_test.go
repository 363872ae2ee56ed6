package analysis_test

import (
	"encoding/json"
	"testing"

	. "github.com/onsi/gomega"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
)

func res(slo string, v meshv1.Verdict, msg string) analysis.Result {
	return analysis.Result{AnalysisResult: meshv1.AnalysisResult{SLO: slo, Verdict: v, Message: msg}}
}

var (
	pass         = res("l4-success", meshv1.VerdictPass, "l4-success 0.997 >= 0.99")
	fail         = res("l4-success", meshv1.VerdictFail, "l4-success 0.93 < 0.99")
	latencyPass  = res("latency", meshv1.VerdictPass, "latency 0.1 <= 0.5")
	latencyFail  = res("latency", meshv1.VerdictFail, "latency 0.7 > 0.5")
	inconclusive = res("l4-success", meshv1.VerdictInconclusive, "l4-success inconclusive: cannot reach Prometheus at http://prometheus.monitoring:9090")
	clusterWide  = func() analysis.Result {
		r := res("l4-success", meshv1.VerdictPass, "l4-success passes on the baseline comparison: cluster-wide drop, ...")
		r.ClusterWide = true
		return r
	}()
)

func TestDecide(t *testing.T) {
	policy := analysis.Policy{FailureLimit: 2, InconclusiveLimit: 5}
	for _, tc := range []struct {
		name     string
		prev     analysis.State
		results  []analysis.Result
		baked    bool
		policy   *analysis.Policy // default: FailureLimit 2, InconclusiveLimit 5
		nodeWave bool
		action   analysis.Action
		// clusterWide are the messages Decide reports as cluster-wide drops.
		clusterWide []string
		degraded    bool
		verdict     meshv1.Verdict
		next        analysis.State
		reason      string
	}{
		{name: "all pass while baking: continue", results: []analysis.Result{pass, latencyPass},
			action: analysis.ActionContinue, verdict: meshv1.VerdictPass, reason: "l4-success 0.997 >= 0.99; latency 0.1 <= 0.5 in wave 1: baking"},
		{name: "all pass after the bake: promote", results: []analysis.Result{pass, latencyPass}, baked: true,
			action: analysis.ActionPromote, verdict: meshv1.VerdictPass, reason: "l4-success 0.997 >= 0.99; latency 0.1 <= 0.5 in wave 1: every SLO passed after the bake time"},
		{name: "one SLO failing is a failed check", results: []analysis.Result{pass, latencyFail}, baked: true,
			action: analysis.ActionContinue, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 1},
			reason: "latency 0.7 > 0.5 in wave 1: failed check 1 of 2 tolerated (failureLimit 2)"},
		{name: "second consecutive failure is still tolerated", prev: analysis.State{FailedChecks: 1}, results: []analysis.Result{fail},
			action: analysis.ActionContinue, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 2}},
		{name: "failureLimit 2: the third consecutive failure rolls back", prev: analysis.State{FailedChecks: 2}, results: []analysis.Result{fail},
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 3}, reason: "l4-success 0.93 < 0.99 in wave 1"},
		{name: "failureLimit 0: the first failure rolls back", results: []analysis.Result{fail}, policy: &analysis.Policy{FailureLimit: 0},
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 1}, reason: "l4-success 0.93 < 0.99 in wave 1"},
		{name: "failureLimit 1: the second failure rolls back", prev: analysis.State{FailedChecks: 1}, results: []analysis.Result{fail}, policy: &analysis.Policy{FailureLimit: 1},
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 2}},
		{name: "a negative failureLimit counts as 0", results: []analysis.Result{fail}, policy: &analysis.Policy{FailureLimit: -3},
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 1}},
		{name: "every failing SLO is in the reason", prev: analysis.State{FailedChecks: 2}, results: []analysis.Result{fail, latencyFail},
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 3}, reason: "l4-success 0.93 < 0.99; latency 0.7 > 0.5 in wave 1"},
		{name: "a failure rolls back even before the bake is over", prev: analysis.State{FailedChecks: 2}, results: []analysis.Result{fail}, baked: false,
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 3}},
		{name: "a fail beside an inconclusive SLO is a failed check", prev: analysis.State{InconclusiveChecks: 3}, results: []analysis.Result{inconclusive, latencyFail},
			action: analysis.ActionContinue, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 1}},
		{name: "a pass resets the failures", prev: analysis.State{FailedChecks: 2}, results: []analysis.Result{pass},
			action: analysis.ActionContinue, verdict: meshv1.VerdictPass},
		{name: "inconclusive holds, even after the bake", results: []analysis.Result{inconclusive, latencyPass}, baked: true,
			action: analysis.ActionHold, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 1},
			reason: "l4-success inconclusive: cannot reach Prometheus at http://prometheus.monitoring:9090 in wave 1: holding the wave (inconclusive check 1 of 5 tolerated, inconclusiveLimit 5)"},
		{name: "inconclusive keeps earlier failures", prev: analysis.State{FailedChecks: 2, InconclusiveChecks: 1}, results: []analysis.Result{inconclusive},
			action: analysis.ActionHold, verdict: meshv1.VerdictInconclusive, next: analysis.State{FailedChecks: 2, InconclusiveChecks: 2}},
		{name: "a failure after inconclusive checks still counts the earlier ones", prev: analysis.State{FailedChecks: 2, InconclusiveChecks: 4}, results: []analysis.Result{fail},
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 3}},
		{name: "inconclusiveLimit 5: the fifth consecutive inconclusive check is still tolerated", prev: analysis.State{InconclusiveChecks: 4}, results: []analysis.Result{inconclusive},
			action: analysis.ActionHold, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 5}},
		{name: "inconclusiveLimit 5: the sixth is Degraded", prev: analysis.State{InconclusiveChecks: 5}, results: []analysis.Result{inconclusive},
			action: analysis.ActionHold, degraded: true, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 6},
			reason: "analysis inconclusive for 6 consecutive checks in wave 1 (inconclusiveLimit 5), waiting for a human: l4-success inconclusive: cannot reach Prometheus at http://prometheus.monitoring:9090"},
		{name: "and stays Degraded", prev: analysis.State{InconclusiveChecks: 9}, results: []analysis.Result{inconclusive},
			action: analysis.ActionHold, degraded: true, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 10}},
		{name: "inconclusiveLimit 0: the first inconclusive check is Degraded", results: []analysis.Result{inconclusive}, policy: &analysis.Policy{FailureLimit: 2},
			action: analysis.ActionHold, degraded: true, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 1}},
		{name: "inconclusiveLimit 2 with failureLimit 0: inconclusive checks never roll back", prev: analysis.State{InconclusiveChecks: 2}, results: []analysis.Result{inconclusive},
			policy: &analysis.Policy{FailureLimit: 0, InconclusiveLimit: 2},
			action: analysis.ActionHold, degraded: true, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 3}},
		{name: "a cluster-wide drop passes and is reported", results: []analysis.Result{clusterWide}, baked: true,
			action: analysis.ActionPromote, verdict: meshv1.VerdictPass, clusterWide: []string{clusterWide.Message}},
		{name: "a pass ends Degraded and promotes after the bake", prev: analysis.State{InconclusiveChecks: 7}, results: []analysis.Result{pass}, baked: true,
			action: analysis.ActionPromote, verdict: meshv1.VerdictPass},
		{name: "no results are inconclusive", results: nil, baked: true,
			action: analysis.ActionHold, verdict: meshv1.VerdictInconclusive, next: analysis.State{InconclusiveChecks: 1}, reason: "no SLO was checked in wave 1: holding the wave (inconclusive check 1 of 5 tolerated, inconclusiveLimit 5)"},
		{name: "a node wave says so in the reason", results: []analysis.Result{fail}, policy: &analysis.Policy{FailureLimit: 0}, nodeWave: true,
			action: analysis.ActionRollback, verdict: meshv1.VerdictFail, next: analysis.State{FailedChecks: 1}, reason: "l4-success 0.93 < 0.99 in node wave 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			p := policy
			if tc.policy != nil {
				p = *tc.policy
			}
			d := analysis.Decide(tc.prev, analysis.Input{Wave: 1, NodeWave: tc.nodeWave, Results: tc.results, BakeElapsed: tc.baked}, p)
			g.Expect(d.Action).To(Equal(tc.action), d.Reason)
			g.Expect(d.Degraded).To(Equal(tc.degraded))
			g.Expect(d.Verdict).To(Equal(tc.verdict))
			g.Expect(d.State).To(Equal(tc.next))
			if tc.reason != "" {
				g.Expect(d.Reason).To(Equal(tc.reason))
			}
			g.Expect(d.ClusterWide).To(Equal(tc.clusterWide))
		})
	}
}

// TestDecideSequence walks one wave through the checks a controller would
// run, carrying the state between them as status would.
func TestDecideSequence(t *testing.T) {
	g := NewWithT(t)
	policy := analysis.SettingsFor(nil).Policy() // failureLimit 2, inconclusiveLimit 5
	var state analysis.State
	step := func(r analysis.Result, baked bool) analysis.Decision {
		// Round-trip the state through JSON, as it would through status.
		raw, err := json.Marshal(state)
		g.Expect(err).NotTo(HaveOccurred())
		var back analysis.State
		g.Expect(json.Unmarshal(raw, &back)).To(Succeed())
		g.Expect(back).To(Equal(state))
		d := analysis.Decide(back, analysis.Input{Wave: 2, Results: []analysis.Result{r}, BakeElapsed: baked}, policy)
		state = d.State
		return d
	}
	g.Expect(step(pass, false).Action).To(Equal(analysis.ActionContinue))
	g.Expect(step(fail, false).Action).To(Equal(analysis.ActionContinue))
	g.Expect(step(inconclusive, false).Action).To(Equal(analysis.ActionHold))
	g.Expect(step(fail, false).Action).To(Equal(analysis.ActionContinue))
	g.Expect(state).To(Equal(analysis.State{FailedChecks: 2}))
	d := step(fail, true)
	g.Expect(d.Action).To(Equal(analysis.ActionRollback))
	g.Expect(d.Reason).To(Equal("l4-success 0.93 < 0.99 in wave 2"))

	state = analysis.State{}
	for range 5 {
		g.Expect(step(inconclusive, true)).To(HaveField("Degraded", false))
	}
	g.Expect(step(inconclusive, true)).To(HaveField("Degraded", true))
	g.Expect(step(pass, true).Action).To(Equal(analysis.ActionPromote))
	g.Expect(state).To(BeZero())

	raw, err := json.Marshal(analysis.State{FailedChecks: 1, InconclusiveChecks: 3})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(string(raw)).To(Equal(`{"failedChecks":1,"inconclusiveChecks":3}`))
}
