package webhooks

import (
	"errors"
	"fmt"
	"strings"

	"github.com/prometheus/prometheus/promql/parser"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/meshkeeper/meshkeeper/internal/analysis"
)

// sampleQueryDataText shows the sample values a query is expanded with
// before it is parsed as PromQL.
var sampleQueryDataText = sampleText(analysis.SampleQueryData)

func sampleText(d analysis.QueryData) string {
	return fmt.Sprintf(".Nodes=%q, .Revision=%q, .Baseline=%q, .Namespaces=%q, .Interval=%q", d.Nodes, d.Revision, d.Baseline, d.Namespaces, d.Interval)
}

const queryExample = `e.g. sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}",result="ok"}[1m])) / sum(rate(meshkeeper_agent_connections_total{workload_revision="{{ .Revision }}"}[1m]))`

// promqlParser parses the stable PromQL language (no experimental functions).
var promqlParser = parser.NewParser(parser.Options{})

// validateQuery checks that an SLO query is a Go template that expands with
// sample values into PromQL returning a number, both for a namespace wave
// and for a node wave (so both branches of {{ if .Nodes }} are checked).
func validateQuery(q string, p *field.Path) field.ErrorList {
	if errs := validateQueryWith(q, p, analysis.SampleQueryData); len(errs) > 0 {
		return errs
	}
	return validateQueryWith(q, p, analysis.SampleNodeWaveData)
}

func validateQueryWith(q string, p *field.Path, sample analysis.QueryData) field.ErrorList {
	switch {
	case strings.TrimSpace(q) == "":
		return field.ErrorList{field.Required(p, "a PromQL query (Go template) returning one number, "+queryExample)}
	case len(q) > maxQueryLength:
		return field.ErrorList{hint(field.TooLong(p, field.OmitValueType{}, maxQueryLength), "shorten the query; record long expressions with a Prometheus recording rule and query that")}
	}
	expanded, err := expandQuery(q, sample)
	if err != nil {
		return field.ErrorList{field.Invalid(p, field.OmitValueType{}, err.Error())}
	}
	expr, err := parsePromQL(expanded)
	if err != nil {
		return field.ErrorList{field.Invalid(p, field.OmitValueType{}, describePromQLError(expanded, sample, err))}
	}
	switch t := expr.Type(); t {
	case parser.ValueTypeVector, parser.ValueTypeScalar:
	default:
		what := string(t)
		switch t {
		case parser.ValueTypeMatrix:
			what = "range vector"
		case parser.ValueTypeString:
			what = "string"
		}
		return field.ErrorList{field.Invalid(p, field.OmitValueType{}, fmt.Sprintf(
			"the query returns a %s, an SLO needs one number (an instant vector or a scalar); aggregate it, %s", what, queryExample))}
	}
	return nil
}

// expandQuery parses q as a Go template, checks it uses only what a query
// needs and executes it with the sample values (analysis.ParseTemplate and
// Expand, the same code that expands queries for each wave).
func expandQuery(q string, sample analysis.QueryData) (string, error) {
	t, err := analysis.ParseTemplate(q)
	if err != nil {
		return "", err
	}
	out, err := t.Expand(sample)
	switch {
	case errors.Is(err, analysis.ErrQueryTooLong):
		return "", fmt.Errorf("the query expands to more than %d bytes; shorten it", analysis.MaxExpandedQuery)
	case err != nil:
		return "", fmt.Errorf("the template does not execute with sample values (%s): %v; the only fields are .Nodes, .Revision, .Baseline, .Namespaces and .Interval", sampleText(sample), err.Error())
	}
	return out, nil
}

// parsePromQL parses an expanded query and never panics.
func parsePromQL(q string) (expr parser.Expr, err error) {
	defer func() {
		if r := recover(); r != nil {
			expr, err = nil, fmt.Errorf("the PromQL parser failed: %v", r)
		}
	}()
	return promqlParser.ParseExpr(q)
}

// describePromQLError gives the parser's message and position and shows the
// expanded query around that position, since the position counts in the
// expansion, not in the template.
func describePromQLError(expanded string, sample analysis.QueryData, err error) string {
	msg := err.Error()
	var perrs parser.ParseErrors
	var perr *parser.ParseErr
	var pos int
	found := false
	switch {
	case errors.As(err, &perrs) && len(perrs) > 0:
		pos, found = int(perrs[0].PositionRange.Start), true
	case errors.As(err, &perr):
		pos, found = int(perr.PositionRange.Start), true
	}
	detail := fmt.Sprintf("not valid PromQL after expanding the template with sample values (%s): %s", sampleText(sample), msg)
	if found {
		detail += fmt.Sprintf("; near %s", snippet(expanded, pos))
	}
	return detail + "; " + queryExample
}

// snippet shows up to 24 bytes before and after pos, marking pos with «here».
func snippet(s string, pos int) string {
	if pos < 0 {
		pos = 0
	}
	if pos > len(s) {
		pos = len(s)
	}
	from, to := max(pos-24, 0), min(pos+24, len(s))
	pre, post := s[from:pos], s[pos:to]
	if from > 0 {
		pre = "…" + pre
	}
	if to < len(s) {
		post += "…"
	}
	return "`" + pre + "«here»" + post + "`"
}
