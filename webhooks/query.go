package webhooks

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"text/template"
	"text/template/parse"

	"github.com/prometheus/prometheus/promql/parser"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// sampleQueryData is what an SLO query is expanded with before it is parsed
// as PromQL: a wave's namespaces as a regex, a revision and the interval.
var sampleQueryData = map[string]string{
	"Namespaces": "shop|shop-staging",
	"Revision":   "1-28-2",
	"Interval":   "30s",
}

const sampleQueryDataText = `.Namespaces="shop|shop-staging", .Revision="1-28-2", .Interval="30s"`

const queryExample = `e.g. sum(rate(meshkeeper_agent_connections_total{namespace=~"{{ .Namespaces }}",result="ok"}[1m])) / sum(rate(meshkeeper_agent_connections_total{namespace=~"{{ .Namespaces }}"}[1m]))`

// maxExpandedQuery bounds the expansion of a query template.
const maxExpandedQuery = 64 << 10

// allowedTemplateFuncs are the template functions a query may call. They
// cannot make the expansion grow beyond the size of the template (print,
// printf and the escapers could, exponentially through variables).
var allowedTemplateFuncs = map[string]bool{
	"and": true, "or": true, "not": true, "len": true, "index": true, "slice": true,
	"eq": true, "ne": true, "lt": true, "le": true, "gt": true, "ge": true,
}

// promqlParser parses the stable PromQL language (no experimental functions).
var promqlParser = parser.NewParser(parser.Options{})

// validateQuery checks that an SLO query is a Go template that expands with
// sample values into PromQL returning a number.
func validateQuery(q string, p *field.Path) field.ErrorList {
	switch {
	case strings.TrimSpace(q) == "":
		return field.ErrorList{field.Required(p, "a PromQL query (Go template) returning one number, "+queryExample)}
	case len(q) > maxQueryLength:
		return field.ErrorList{hint(field.TooLong(p, field.OmitValueType{}, maxQueryLength), "shorten the query; record long expressions with a Prometheus recording rule and query that")}
	}
	expanded, err := expandQuery(q)
	if err != nil {
		return field.ErrorList{field.Invalid(p, field.OmitValueType{}, err.Error())}
	}
	expr, err := parsePromQL(expanded)
	if err != nil {
		return field.ErrorList{field.Invalid(p, field.OmitValueType{}, describePromQLError(expanded, err))}
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
// needs and executes it with the sample values.
func expandQuery(q string) (string, error) {
	t, err := template.New("query").Option("missingkey=error").Parse(q)
	if err != nil {
		return "", fmt.Errorf("not a valid Go template: %v; write placeholders as {{ .Namespaces }}, {{ .Revision }} or {{ .Interval }}", trimTemplateErr(err))
	}
	if len(t.Templates()) > 1 {
		return "", errors.New(`the template may not define templates ({{define}} or {{block}}); use {{ .Namespaces }}, {{ .Revision }} and {{ .Interval }} directly`)
	}
	if t.Tree == nil || t.Root == nil {
		return "", nil
	}
	if err := checkTemplateNode(t.Root); err != nil {
		return "", err
	}
	var out limitedBuffer
	if err := t.Execute(&out, sampleQueryData); err != nil {
		if errors.Is(err, errQueryTooLong) {
			return "", fmt.Errorf("the query expands to more than %d bytes; shorten it", maxExpandedQuery)
		}
		return "", fmt.Errorf("the template does not execute with sample values (%s): %v; the only fields are .Namespaces, .Revision and .Interval", sampleQueryDataText, trimTemplateErr(err))
	}
	return out.String(), nil
}

// trimTemplateErr drops the "template: " prefix Go adds to every message.
func trimTemplateErr(err error) string {
	return strings.TrimPrefix(err.Error(), "template: ")
}

var errRestrictedTemplate = errors.New("restricted")

func checkTemplateNode(n parse.Node) error {
	if n == nil {
		return nil
	}
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			if err := checkTemplateNode(c); err != nil {
				return err
			}
		}
	case *parse.ActionNode:
		return checkTemplateNode(n.Pipe)
	case *parse.IfNode:
		return checkBranch(&n.BranchNode)
	case *parse.WithNode:
		return checkBranch(&n.BranchNode)
	case *parse.RangeNode:
		return fmt.Errorf("{{range}} at %s is not allowed in a query template; use {{ .Namespaces }}, a regex of all namespaces of the wave", position(n))
	case *parse.TemplateNode:
		return fmt.Errorf("{{template %q}} is not allowed in a query template; use {{ .Namespaces }}, {{ .Revision }} and {{ .Interval }} directly", n.Name)
	case *parse.BreakNode, *parse.ContinueNode:
		return errors.New("{{break}} and {{continue}} are not allowed in a query template")
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Cmds {
			if err := checkTemplateNode(c); err != nil {
				return err
			}
		}
	case *parse.CommandNode:
		for _, a := range n.Args {
			if err := checkTemplateNode(a); err != nil {
				return err
			}
		}
	case *parse.ChainNode:
		return checkTemplateNode(n.Node)
	case *parse.IdentifierNode:
		if !allowedTemplateFuncs[n.Ident] {
			return fmt.Errorf("the template function %q is not allowed in a query; use {{ .Namespaces }}, {{ .Revision }} and {{ .Interval }} as they are, with if/with/eq/ne/and/or/not at most", n.Ident)
		}
	case *parse.TextNode, *parse.CommentNode, *parse.FieldNode, *parse.VariableNode, *parse.DotNode,
		*parse.StringNode, *parse.NumberNode, *parse.BoolNode, *parse.NilNode:
	default:
		return fmt.Errorf("%s is not allowed in a query template: %w", n, errRestrictedTemplate)
	}
	return nil
}

func checkBranch(b *parse.BranchNode) error {
	if err := checkTemplateNode(b.Pipe); err != nil {
		return err
	}
	if err := checkTemplateNode(b.List); err != nil {
		return err
	}
	if b.ElseList != nil {
		return checkTemplateNode(b.ElseList)
	}
	return nil
}

func position(n parse.Node) string {
	return fmt.Sprintf("byte %d", n.Position())
}

var errQueryTooLong = errors.New("query expansion too long")

// limitedBuffer fails writes past maxExpandedQuery.
type limitedBuffer struct{ bytes.Buffer }

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if b.Len()+len(p) > maxExpandedQuery {
		return 0, errQueryTooLong
	}
	return b.Buffer.Write(p)
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
func describePromQLError(expanded string, err error) string {
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
	detail := fmt.Sprintf("not valid PromQL after expanding the template with sample values (%s): %s", sampleQueryDataText, msg)
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
