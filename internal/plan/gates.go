package plan

import (
	"regexp"
	"strconv"
	"time"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// GatesFor are the SLO gates of spec.analysis with their defaults. on says
// whether a Prometheus is known (spec.analysis.prometheus, or the
// operator's default address); slos are the SLOs checked (the spec's, or
// the defaults when it lists none).
func GatesFor(a *meshv1.AnalysisSpec, on bool, slos []meshv1.SLO) Gates {
	g := Gates{On: on, Interval: meshv1.DefaultInterval, FailureLimit: meshv1.DefaultFailureLimit,
		InconclusiveLimit: meshv1.DefaultInconclusiveLimit, ScrapeInterval: DefaultScrapeInterval}
	if a != nil {
		if a.Interval != nil && a.Interval.Duration > 0 {
			g.Interval = a.Interval.Duration
		}
		if a.FailureLimit != nil {
			g.FailureLimit = max(*a.FailureLimit, 0)
		}
		if a.InconclusiveLimit != nil {
			g.InconclusiveLimit = max(*a.InconclusiveLimit, 0)
		}
	}
	g.QueryWindow = QueryWindow(slos, g.Interval)
	return g
}

// rangeRE is a PromQL range or subquery selector: [5m], [1h30m], [30m:1m],
// or one written with the .Interval template field.
var rangeRE = regexp.MustCompile(`\[\s*([^\]:]*?)\s*(?::[^\]]*)?\]`)

var promDurationRE = regexp.MustCompile(`^(?:([0-9]+)(ms|s|m|h|d|w|y))+$`)
var promDurationPartRE = regexp.MustCompile(`([0-9]+)(ms|s|m|h|d|w|y)`)

var intervalFieldRE = regexp.MustCompile(`\{\{-?\s*\.Interval\s*-?\}\}`)

// QueryWindow is the longest range window in the SLO queries: how far back
// one check looks. A window written as {{ .Interval }} is the analysis
// interval. A query without a range selector looks back 0.
func QueryWindow(slos []meshv1.SLO, interval time.Duration) time.Duration {
	var longest time.Duration
	for _, slo := range slos {
		for _, q := range []string{slo.Query} {
			for _, m := range rangeRE.FindAllStringSubmatch(q, -1) {
				d, ok := promDuration(m[1])
				if !ok && intervalFieldRE.MatchString(m[1]) {
					d, ok = interval, true
				}
				if ok && d > longest {
					longest = d
				}
			}
		}
	}
	return longest
}

// promDuration parses a Prometheus duration such as 5m or 1h30m.
func promDuration(s string) (time.Duration, bool) {
	if !promDurationRE.MatchString(s) {
		return 0, false
	}
	unit := map[string]time.Duration{"ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour,
		"d": 24 * time.Hour, "w": 7 * 24 * time.Hour, "y": 365 * 24 * time.Hour}
	var d time.Duration
	for _, p := range promDurationPartRE.FindAllStringSubmatch(s, -1) {
		n, err := strconv.Atoi(p[1])
		if err != nil {
			return 0, false
		}
		d += time.Duration(n) * unit[p[2]]
	}
	return d, true
}
