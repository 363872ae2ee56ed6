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

// DefaultL4SuccessQuery is the success ratio of the worst namespace of the
// wave over the last minute, from the node agent's connection outcomes
// (result ok, refused, reset or timeout).
//
// It is written per namespace so a healthy big namespace cannot hide a
// broken small one, and so that a namespace without error series (no
// failed connection yet, or an agent that does not initialise them) still
// counts: "or 0 * total" gives it an error rate of 0 instead of dropping it
// from the ratio. A namespace without any traffic in the window is 0/0 = NaN
// and min ignores it; a wave without any traffic is NaN or empty, both
// Inconclusive.
const DefaultL4SuccessQuery = `min(1 - (
  (
    sum by (namespace) (rate(meshkeeper_agent_connections_total{namespace=~"{{ .Namespaces }}",result!="ok"}[1m]))
    or
    0 * sum by (namespace) (rate(meshkeeper_agent_connections_total{namespace=~"{{ .Namespaces }}"}[1m]))
  )
  /
  sum by (namespace) (rate(meshkeeper_agent_connections_total{namespace=~"{{ .Namespaces }}"}[1m]))
))`

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
	// SLOs to check: the spec's, or DefaultSLOs when it lists none.
	SLOs []meshv1.SLO
}

// SettingsFor applies the defaults to spec.analysis (which may be nil).
func SettingsFor(a *meshv1.AnalysisSpec) Settings {
	s := Settings{Interval: meshv1.DefaultInterval, FailureLimit: meshv1.DefaultFailureLimit}
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
		s.SLOs = a.SLOs
	}
	if len(s.SLOs) == 0 {
		s.SLOs = DefaultSLOs()
	}
	return s
}

// Policy is the state machine's configuration for these settings.
func (s Settings) Policy() Policy {
	return Policy{FailureLimit: s.FailureLimit, InconclusiveLimit: DefaultInconclusiveLimit}
}

// Result is one SLO check: what goes to status.rollout.analysis, and a
// one-line message saying why the verdict is what it is.
type Result struct {
	meshv1.AnalysisResult
	// Message, e.g. "l4-success 0.93 < 0.99", "l4-success 0.997 >= 0.99" or
	// "l4-success inconclusive: cannot reach Prometheus at ...".
	Message string
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
// judges it. It never fails: an SLO without an answer is Inconclusive, with
// the reason in its Message. Results are in the order of slos.
func Evaluate(ctx context.Context, p Provider, slos []meshv1.SLO, data QueryData, at time.Time) []Result {
	results := make([]Result, len(slos))
	sem := make(chan struct{}, maxConcurrentQueries)
	var wg sync.WaitGroup
	for i := range slos {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			results[i] = evaluate(ctx, p, &slos[i], data, at)
		}()
	}
	wg.Wait()
	return results
}

func evaluate(ctx context.Context, p Provider, slo *meshv1.SLO, data QueryData, at time.Time) Result {
	r := Result{AnalysisResult: meshv1.AnalysisResult{SLO: slo.Name, Verdict: meshv1.VerdictInconclusive, At: metav1.NewTime(at)}}
	inconclusive := func(err error) Result {
		r.Message = fmt.Sprintf("%s inconclusive: %v", slo.Name, err)
		return r
	}
	if data.Namespaces == "" {
		return inconclusive(errors.New("the wave has no namespaces to query"))
	}
	q, err := ExpandQuery(slo.Query, data)
	if err != nil {
		return inconclusive(fmt.Errorf("the query template does not expand: %w", err))
	}
	v, err := p.Query(ctx, q, at)
	if err != nil {
		if errors.Is(err, ErrNotFinite) && (math.IsNaN(v) || math.IsInf(v, 0)) {
			r.Value = FormatValue(v)
		}
		return inconclusive(err)
	}
	r.Verdict, r.Value, r.Message = Judge(slo, v)
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
