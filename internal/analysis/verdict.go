package analysis

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// DefaultSLOName is the SLO checked when spec.analysis has no SLOs.
const DefaultSLOName = "l4-success"

// DefaultL4SuccessQuery is the L4 success ratio of the worst part of the
// wave over the last minute, from the node agent's connection outcomes
// (result ok, refused, reset or timeout), labelled with where it is:
//
//   - a node wave is judged on the wave's nodes only (.Nodes), per node and
//     namespace, so one canary node that fails every connection fails the
//     wave however many healthy nodes there are;
//   - a namespace wave is judged on the pods that run the new revision
//     (.Revision), per namespace, so a healthy big namespace cannot hide a
//     broken small one. It never lists namespace names, so its size does
//     not depend on how many there are.
//
// bottomk(1, ...) keeps the worst series' labels (workload_namespace, and
// workload_node in a node wave), so the verdict names it. It wraps
// DefaultL4SuccessByPartQuery, the same ratio for every part of the wave.
const DefaultL4SuccessQuery = `bottomk(1, ` + DefaultL4SuccessByPartQuery + `)`

// DefaultL4SuccessByPartQuery is the default SLO before bottomk picks the
// worst part: one L4 success ratio per namespace of the wave (per node and
// namespace in a node wave), as a dashboard would show it. A part without
// error series (no failed connection yet) still counts: "or 0 * total"
// gives it an error rate of 0 instead of dropping it. A part without any
// traffic in the window is 0/0 = NaN and ">= 0" leaves it out; a wave
// without any traffic is empty, Inconclusive.
const DefaultL4SuccessByPartQuery = `(1 - (
  (
    sum by (workload_namespace{{ if .Nodes }}, workload_node{{ end }}) (rate(meshkeeper_agent_connections_total{` + defaultScope + `,result!="ok"}[1m]))
    or
    0 * sum by (workload_namespace{{ if .Nodes }}, workload_node{{ end }}) (rate(meshkeeper_agent_connections_total{` + defaultScope + `}[1m]))
  )
  /
  sum by (workload_namespace{{ if .Nodes }}, workload_node{{ end }}) (rate(meshkeeper_agent_connections_total{` + defaultScope + `}[1m]))
)) >= 0`

// defaultScope selects the wave's series: its nodes in a node wave, the
// pods on the new revision in a namespace wave.
const defaultScope = ` {{- if .Nodes }}workload_node=~"{{ .Nodes }}"{{ else }}workload_revision="{{ .Revision }}"{{ end }}`

// DefaultL4SuccessMin is the lowest passing value of the default SLO.
const DefaultL4SuccessMin = "0.99"

// DefaultSLOs are the SLOs checked when spec.analysis is absent or lists
// none: l4-success ≥ 0.99, so L4-only namespaces get a gate too.
func DefaultSLOs() []meshv1.SLO {
	lowest := DefaultL4SuccessMin
	return []meshv1.SLO{{Name: DefaultSLOName, Query: DefaultL4SuccessQuery, Min: &lowest}}
}

// Settings are a Mesh's analysis settings with their defaults applied.
type Settings struct {
	// Address of Prometheus; empty when spec.analysis.prometheus is absent
	// (the caller supplies its own default then).
	Address string
	// Interval between checks (default 30s).
	Interval time.Duration
	// FailureLimit is how many consecutive failed checks are tolerated
	// (default 2): the one after them rolls back.
	FailureLimit int32
	// InconclusiveLimit is how many consecutive inconclusive checks are
	// tolerated (default 5): the one after them holds the wave as Degraded.
	InconclusiveLimit int32
	// SLOs to check: the spec's, or DefaultSLOs when it lists none.
	SLOs []meshv1.SLO
}

// SettingsFor applies the defaults to spec.analysis (which may be nil).
func SettingsFor(a *meshv1.AnalysisSpec) Settings {
	s := Settings{Interval: meshv1.DefaultInterval, FailureLimit: meshv1.DefaultFailureLimit, InconclusiveLimit: meshv1.DefaultInconclusiveLimit}
	if a != nil {
		if a.Prometheus != nil {
			s.Address = a.Prometheus.Address
		}
		if a.Interval != nil && a.Interval.Duration > 0 {
			s.Interval = a.Interval.Duration
		}
		if a.FailureLimit != nil {
			s.FailureLimit = max(*a.FailureLimit, 0)
		}
		if a.InconclusiveLimit != nil {
			s.InconclusiveLimit = max(*a.InconclusiveLimit, 0)
		}
		s.SLOs = a.SLOs
	}
	if len(s.SLOs) == 0 {
		s.SLOs = DefaultSLOs()
	}
	return s
}

// Policy is the state machine's configuration for these settings.
func (s Settings) Policy() Policy {
	return Policy{FailureLimit: s.FailureLimit, InconclusiveLimit: s.InconclusiveLimit}
}

// Result is one SLO check: what goes to status.rollout.analysis, and a
// one-line message saying why the verdict is what it is.
type Result struct {
	meshv1.AnalysisResult
	// ClusterWide is set on a Pass of an SLO with maxDegradation whose
	// bounds both sides broke alike: a drop that is not the wave's doing,
	// worth an event.
	ClusterWide bool
}

// AnalysisResults are the results as status holds them.
func AnalysisResults(rs []Result) []meshv1.AnalysisResult {
	out := make([]meshv1.AnalysisResult, len(rs))
	for i := range rs {
		out[i] = rs[i].AnalysisResult
	}
	return out
}

// maxConcurrentQueries bounds the queries of one check in flight at once.
const maxConcurrentQueries = 4

// Evaluate runs every SLO of one check against p at the instant at and
// judges it, without a baseline. See EvaluateScope.
func Evaluate(ctx context.Context, p Provider, slos []meshv1.SLO, data QueryData, at time.Time) []Result {
	return EvaluateScope(ctx, p, slos, Scope{Canary: data}, at)
}

// EvaluateScope runs every SLO of one check against p at the instant at and
// judges it; an SLO with maxDegradation is also run on scope.Baseline and
// compared. It never fails: an SLO without an answer is Inconclusive, with
// the reason in its Message. Results are in the order of slos.
func EvaluateScope(ctx context.Context, p Provider, slos []meshv1.SLO, scope Scope, at time.Time) []Result {
	results := make([]Result, len(slos))
	sem := make(chan struct{}, maxConcurrentQueries)
	var wg sync.WaitGroup
	for i := range slos {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			results[i] = evaluate(ctx, p, &slos[i], scope, at)
		}()
	}
	wg.Wait()
	return results
}

func evaluate(ctx context.Context, p Provider, slo *meshv1.SLO, scope Scope, at time.Time) Result {
	r := Result{AnalysisResult: meshv1.AnalysisResult{SLO: slo.Name, Verdict: meshv1.VerdictInconclusive, At: metav1.NewTime(at)}}
	inconclusive := func(err error) Result {
		r.Message = fmt.Sprintf("%s inconclusive: %v", slo.Name, err)
		return r
	}
	data := scope.Canary
	if data.Namespaces == "" && data.Nodes == "" {
		return inconclusive(errors.New("the wave has no namespaces to query"))
	}
	t, err := ParseTemplate(slo.Query)
	if err != nil {
		return inconclusive(fmt.Errorf("the query template does not expand: %w", err))
	}
	q, err := t.Expand(data)
	if err != nil {
		return inconclusive(fmt.Errorf("the query template does not expand: %w", err))
	}
	v, err := p.Query(ctx, q, at)
	if err != nil {
		if errors.Is(err, ErrNotFinite) && (math.IsNaN(v.Value) || math.IsInf(v.Value, 0)) {
			r.Value = FormatValue(v.Value)
		}
		return inconclusive(err)
	}
	if slo.MaxDegradation == nil {
		r.Verdict, r.Value, r.Message = Judge(slo, v.Value)
		r.Message = withWhere(r.Message, r.Verdict, v)
		return r
	}
	if scope.Baseline == nil {
		// Nothing is left on the old side: min and max judge alone.
		r.Verdict, r.Value, r.Message = Judge(slo, v.Value)
		r.Message = withWhere(r.Message, r.Verdict, v) + " (no baseline left to compare with)"
		return r
	}
	bq, err := t.Expand(*scope.Baseline)
	if err != nil {
		return inconclusive(fmt.Errorf("the query template does not expand for the baseline: %w", err))
	}
	b, err := p.Query(ctx, bq, at)
	if err != nil {
		r.Value = FormatValue(v.Value)
		if errors.Is(err, ErrNotFinite) && (math.IsNaN(b.Value) || math.IsInf(b.Value, 0)) {
			r.Baseline = FormatValue(b.Value)
		}
		return inconclusive(fmt.Errorf("no baseline to compare with: %w", err))
	}
	return judgeAgainstBaseline(slo, r, v, b)
}

// withWhere adds where a failing value was, when its series has labels.
func withWhere(msg string, verdict meshv1.Verdict, s Sample) string {
	if w := s.Where(); w != "" && verdict == meshv1.VerdictFail {
		return msg + " (" + w + ")"
	}
	return msg
}

// ParseDegradation parses a maxDegradation such as "1%" or "0.5%" into a
// share (0.01, 0.005).
func ParseDegradation(s string) (float64, error) {
	t := strings.TrimSpace(s)
	num, ok := strings.CutSuffix(t, "%")
	f, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		return 0, fmt.Errorf("%q is not a percentage, e.g. \"1%%\" or \"0.5%%\"", s)
	}
	return f / 100, nil
}

// Degradation is how much worse canary is than baseline, as a share of
// the baseline's value: (baseline - canary) / |baseline| when higher is
// better, (canary - baseline) / |baseline| when lower is. Negative: the
// canary is better. A baseline of 0 gives 0 for an equal canary and ±Inf
// otherwise.
func Degradation(better meshv1.Better, canary, baseline float64) float64 {
	worse := baseline - canary
	if better == meshv1.BetterLower {
		worse = canary - baseline
	}
	if baseline == 0 {
		switch {
		case worse == 0:
			return 0
		case worse > 0:
			return math.Inf(1)
		default:
			return math.Inf(-1)
		}
	}
	return worse / math.Abs(baseline)
}

// FormatPercent renders a share as a percentage with up to two decimals:
// 0.0123 → "1.23%", -0.5 → "-50%".
func FormatPercent(share float64) string {
	switch {
	case math.IsInf(share, 1):
		return "+Inf%"
	case math.IsInf(share, -1):
		return "-Inf%"
	}
	s := strconv.FormatFloat(share*100, 'f', 2, 64)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	if s == "-0" {
		s = "0"
	}
	return s + "%"
}

// ClusterWideMarker is in the message of every cluster-wide drop.
const ClusterWideMarker = "cluster-wide drop"

// judgeAgainstBaseline judges an SLO with maxDegradation from both values:
//
//   - worse than the baseline by more than maxDegradation: Fail;
//   - otherwise outside min/max while the baseline is too: Pass, marked
//     ClusterWide (a drop on both sides is not the wave's doing);
//   - otherwise outside min/max: Fail (the baseline is fine, the wave not);
//   - otherwise Pass.
func judgeAgainstBaseline(slo *meshv1.SLO, r Result, canary, baseline Sample) Result {
	tol, err := ParseDegradation(*slo.MaxDegradation)
	if err != nil {
		r.Value = FormatValue(canary.Value)
		r.Message = fmt.Sprintf("%s inconclusive: maxDegradation %v", slo.Name, err)
		return r
	}
	absVerdict, value, absMsg := Judge(slo, canary.Value)
	baseVerdict, baseValue, _ := Judge(slo, baseline.Value)
	r.Value, r.Baseline = value, baseValue
	deg := Degradation(slo.Better, canary.Value, baseline.Value)
	r.Degradation = FormatPercent(deg)
	vs := fmt.Sprintf("baseline %s, %s worse, maxDegradation %s", baseValue, r.Degradation, *slo.MaxDegradation)
	hasBounds := slo.Min != nil || slo.Max != nil
	switch {
	case absVerdict == meshv1.VerdictInconclusive && hasBounds:
		r.Verdict, r.Message = absVerdict, absMsg
	case deg > tol:
		r.Verdict = meshv1.VerdictFail
		r.Message = withWhere(fmt.Sprintf("%s %s is %s worse than the baseline %s (maxDegradation %s)",
			slo.Name, value, r.Degradation, baseValue, *slo.MaxDegradation), meshv1.VerdictFail, canary)
	case absVerdict == meshv1.VerdictFail && baseVerdict == meshv1.VerdictFail:
		r.Verdict, r.ClusterWide = meshv1.VerdictPass, true
		r.Message = fmt.Sprintf("%s passes on the baseline comparison: %s, %s and the baseline too (%s)", slo.Name, ClusterWideMarker, absMsg, vs)
	case absVerdict == meshv1.VerdictFail:
		r.Verdict = meshv1.VerdictFail
		r.Message = withWhere(absMsg, meshv1.VerdictFail, canary) + " (" + vs + ")"
	case !hasBounds:
		r.Verdict = meshv1.VerdictPass
		r.Message = fmt.Sprintf("%s %s (%s)", slo.Name, value, vs)
	default:
		r.Verdict = meshv1.VerdictPass
		r.Message = absMsg + " (" + vs + ")"
	}
	return r
}

// Judge compares v with the SLO's bounds: Pass when min ≤ v ≤ max (each
// bound optional), Fail otherwise. NaN, ±Inf and a bound that is not a
// number are Inconclusive. It returns the verdict, v formatted with enough
// digits to show on which side of each bound it lies, and a message.
func Judge(slo *meshv1.SLO, v float64) (verdict meshv1.Verdict, value, message string) {
	lo, hasLo, err := parseBound(slo.Min)
	if err != nil {
		return meshv1.VerdictInconclusive, FormatValue(v), fmt.Sprintf("%s inconclusive: min %v", slo.Name, err)
	}
	hi, hasHi, err := parseBound(slo.Max)
	if err != nil {
		return meshv1.VerdictInconclusive, FormatValue(v), fmt.Sprintf("%s inconclusive: max %v", slo.Name, err)
	}
	var bounds []float64
	if hasLo {
		bounds = append(bounds, lo)
	}
	if hasHi {
		bounds = append(bounds, hi)
	}
	value = FormatValue(v, bounds...)
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return meshv1.VerdictInconclusive, value, fmt.Sprintf("%s inconclusive: the value is %s", slo.Name, value)
	case !hasLo && !hasHi:
		return meshv1.VerdictInconclusive, value, fmt.Sprintf("%s inconclusive: the SLO has neither min nor max", slo.Name)
	case hasLo && v < lo:
		return meshv1.VerdictFail, value, fmt.Sprintf("%s %s < %s", slo.Name, value, *slo.Min)
	case hasHi && v > hi:
		return meshv1.VerdictFail, value, fmt.Sprintf("%s %s > %s", slo.Name, value, *slo.Max)
	case hasLo && hasHi:
		return meshv1.VerdictPass, value, fmt.Sprintf("%s %s within [%s, %s]", slo.Name, value, *slo.Min, *slo.Max)
	case hasLo:
		return meshv1.VerdictPass, value, fmt.Sprintf("%s %s >= %s", slo.Name, value, *slo.Min)
	default:
		return meshv1.VerdictPass, value, fmt.Sprintf("%s %s <= %s", slo.Name, value, *slo.Max)
	}
}

func parseBound(s *string) (float64, bool, error) {
	if s == nil {
		return 0, false, nil
	}
	f, err := strconv.ParseFloat(strings.TrimSpace(*s), 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, false, fmt.Errorf("%q is not a finite decimal number, e.g. \"0.99\"", *s)
	}
	return f, true, nil
}

// FormatValue renders v for status and messages: three significant digits
// ("0.997", "250", "0.0123"), more when needed to keep v on the same side of
// each bound as it really is (0.98999 with min 0.99 is "0.98999", not
// "0.99"), "NaN", "+Inf" or "-Inf".
func FormatValue(v float64, bounds ...float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	for p := 3; p <= 17; p++ {
		s := formatSignificant(v, p)
		back, err := strconv.ParseFloat(s, 64)
		if err != nil {
			break
		}
		same := true
		for _, b := range bounds {
			if cmpFloat(back, b) != cmpFloat(v, b) {
				same = false
				break
			}
		}
		if same {
			return s
		}
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// formatSignificant renders v with p significant digits, in plain decimal
// notation between 1e-4 and 1e15, without trailing zeros.
func formatSignificant(v float64, p int) string {
	if v == 0 {
		return "0"
	}
	e := int(math.Floor(math.Log10(math.Abs(v))))
	if e < -4 || e >= 15 {
		return strconv.FormatFloat(v, 'g', p, 64)
	}
	s := strconv.FormatFloat(v, 'f', max(0, p-1-e), 64)
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
