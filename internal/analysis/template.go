package analysis

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"github.com/prometheus/common/model"
)

// QueryData is what an SLO query template is expanded with. The template
// sees exactly these fields: {{ .Nodes }}, {{ .Revision }}, {{ .Baseline }},
// {{ .Namespaces }} and {{ .Interval }}.
type QueryData struct {
	// Nodes is a regex alternation of the node wave's nodes, each
	// regexp.QuoteMeta'd, e.g. "node-a|node-b"; empty in a namespace wave,
	// so a query can tell the two apart with {{ if .Nodes }}.
	Nodes string
	// Revision is the revision the wave moves to, e.g. 1-28-2: in a
	// namespace wave the pods of the wave (and of the waves before it) run
	// it. A query selects them by revision and never lists names.
	Revision string
	// Baseline is the revision the wave moves from, e.g. 1-27-3.
	Baseline string
	// Namespaces is a regex alternation of the wave's namespaces (a node
	// wave: every namespace in the mesh), each regexp.QuoteMeta'd, e.g.
	// "shop|shop-staging". Namespace names are DNS labels, so quoting
	// changes nothing for valid names and the regex can sit inside a
	// double-quoted PromQL string as it is. It grows with the number of
	// namespaces (past ~1,000 a query using it may pass MaxExpandedQuery):
	// prefer .Revision.
	Namespaces string
	// Interval is the analysis interval as a PromQL duration, e.g. 30s.
	Interval string
}

// NewQueryData builds the data of one namespace wave's check (no baseline
// revision).
func NewQueryData(namespaces []string, revision string, interval time.Duration) QueryData {
	return QueryData{Namespaces: NamespacesRegex(namespaces), Revision: revision, Interval: PromDuration(interval)}
}

// Scope is what one check of a wave looks at: the wave (Canary) and, for
// SLOs with maxDegradation, the same query on the old side (Baseline).
type Scope struct {
	Canary QueryData
	// Baseline expands the queries for the baseline: .Revision is the old
	// revision, .Nodes the nodes outside the wave. Nil when nothing is left
	// on the old side (the last namespace wave; a node wave of every node):
	// SLOs are then judged on their min and max only.
	Baseline *QueryData
}

// NamespaceWaveScope is the scope of a namespace wave: the pods that run
// revision (the wave's namespaces and the waves' before it) against the
// pods still on baseline. hasBaseline says some namespace is still on it.
func NamespaceWaveScope(namespaces []string, revision, baseline string, hasBaseline bool, interval time.Duration) Scope {
	s := Scope{Canary: QueryData{Namespaces: NamespacesRegex(namespaces), Revision: revision, Baseline: baseline, Interval: PromDuration(interval)}}
	if hasBaseline && baseline != "" {
		s.Baseline = &QueryData{Revision: baseline, Baseline: baseline, Interval: s.Canary.Interval}
	}
	return s
}

// NodeWaveScope is the scope of a node wave: the wave's nodes against the
// other nodes (others), every namespace of the mesh on revision baseline
// (node waves come before namespace waves).
func NodeWaveScope(nodes, others, namespaces []string, revision, baseline string, interval time.Duration) Scope {
	all := NamespacesRegex(namespaces)
	s := Scope{Canary: QueryData{Nodes: NamespacesRegex(nodes), Revision: revision, Baseline: baseline, Namespaces: all, Interval: PromDuration(interval)}}
	if len(others) > 0 {
		s.Baseline = &QueryData{Nodes: NamespacesRegex(others), Revision: baseline, Baseline: baseline, Namespaces: all, Interval: s.Canary.Interval}
	}
	return s
}

// NamespacesRegex joins names (namespaces or nodes) into a regex
// alternation, each quoted with regexp.QuoteMeta: ["shop", "shop-staging"]
// → "shop|shop-staging". Empty names and duplicates are dropped; the order
// is kept.
func NamespacesRegex(namespaces []string) string {
	seen := make(map[string]bool, len(namespaces))
	parts := make([]string, 0, len(namespaces))
	for _, ns := range namespaces {
		if ns == "" || seen[ns] {
			continue
		}
		seen[ns] = true
		parts = append(parts, regexp.QuoteMeta(ns))
	}
	return strings.Join(parts, "|")
}

// PromDuration renders d as a PromQL duration: 30s, 1m30s, 5m, 1h, 250ms.
func PromDuration(d time.Duration) string {
	return model.Duration(d).String()
}

// SampleQueryData is what admission expands a query with to check that it is
// valid PromQL before any wave exists: a namespace wave. Admission expands
// it with SampleNodeWaveData too, so both branches of {{ if .Nodes }} parse.
var SampleQueryData = QueryData{Namespaces: "shop|shop-staging", Revision: "1-28-2", Baseline: "1-27-3", Interval: "30s"}

// SampleNodeWaveData is a node wave's sample data.
var SampleNodeWaveData = QueryData{Nodes: "node-a|node-b", Namespaces: "shop|shop-staging", Revision: "1-28-2", Baseline: "1-27-3", Interval: "30s"}

func (d QueryData) fields() map[string]string {
	return map[string]string{"Nodes": d.Nodes, "Revision": d.Revision, "Baseline": d.Baseline, "Namespaces": d.Namespaces, "Interval": d.Interval}
}

// MaxExpandedQuery bounds the expansion of a query template, in bytes.
const MaxExpandedQuery = 64 << 10

// ErrQueryTooLong is returned (wrapped) by Template.Expand when the
// expansion would exceed MaxExpandedQuery.
var ErrQueryTooLong = errors.New("query expansion too long")

// allowedTemplateFuncs are the template functions a query may call. They
// cannot make the expansion grow beyond the size of the template (print,
// printf and the escapers could, exponentially through variables).
var allowedTemplateFuncs = map[string]bool{
	"and": true, "or": true, "not": true, "len": true, "index": true, "slice": true,
	"eq": true, "ne": true, "lt": true, "le": true, "gt": true, "ge": true,
}

// Template is a parsed, checked SLO query template.
type Template struct {
	t *template.Template
}

// ParseTemplate parses q as a Go template and checks that it uses only what
// a query needs: the fields of QueryData, if/with/else and the comparison and
// logic functions; no range, define, template, print or escapers. Errors are
// written for the person who wrote the query.
func ParseTemplate(q string) (*Template, error) {
	t, err := template.New("query").Option("missingkey=error").Parse(q)
	if err != nil {
		return nil, fmt.Errorf("not a valid Go template: %v; write placeholders as {{ .Nodes }}, {{ .Revision }}, {{ .Baseline }}, {{ .Namespaces }} or {{ .Interval }}", trimTemplateErr(err))
	}
	if len(t.Templates()) > 1 {
		return nil, errors.New(`the template may not define templates ({{define}} or {{block}}); use {{ .Nodes }}, {{ .Revision }}, {{ .Baseline }}, {{ .Namespaces }} and {{ .Interval }} directly`)
	}
	if t.Tree != nil && t.Root != nil {
		if err := checkTemplateNode(t.Root); err != nil {
			return nil, err
		}
	}
	return &Template{t: t}, nil
}

// Expand executes the template with d. An expansion past MaxExpandedQuery
// wraps ErrQueryTooLong; other errors are the template engine's (an unknown
// field, say), without Go's "template: " prefix.
func (t *Template) Expand(d QueryData) (string, error) {
	if t.t.Tree == nil || t.t.Root == nil {
		return "", nil
	}
	var out limitedBuffer
	if err := t.t.Execute(&out, d.fields()); err != nil {
		if errors.Is(err, ErrQueryTooLong) {
			return "", fmt.Errorf("the query expands to more than %d bytes: %w", MaxExpandedQuery, ErrQueryTooLong)
		}
		return "", errors.New(trimTemplateErr(err))
	}
	return out.String(), nil
}

// ExpandQuery parses and expands q in one go.
func ExpandQuery(q string, d QueryData) (string, error) {
	t, err := ParseTemplate(q)
	if err != nil {
		return "", err
	}
	return t.Expand(d)
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
		return fmt.Errorf("{{range}} at %s is not allowed in a query template; use {{ .Revision }} (or {{ .Namespaces }}, a regex of all namespaces of the wave)", position(n))
	case *parse.TemplateNode:
		return fmt.Errorf("{{template %q}} is not allowed in a query template; use {{ .Nodes }}, {{ .Revision }}, {{ .Baseline }}, {{ .Namespaces }} and {{ .Interval }} directly", n.Name)
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
			return fmt.Errorf("the template function %q is not allowed in a query; use the fields ({{ .Nodes }}, {{ .Revision }}, ...) as they are, with if/with/eq/ne/and/or/not at most", n.Ident)
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

// limitedBuffer fails writes past MaxExpandedQuery.
type limitedBuffer struct{ bytes.Buffer }

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if b.Len()+len(p) > MaxExpandedQuery {
		return 0, ErrQueryTooLong
	}
	return b.Buffer.Write(p)
}
