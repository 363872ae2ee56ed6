// Package analysistest runs analysis.Provider queries on the real PromQL
// engine (github.com/prometheus/prometheus/promql) over series loaded with
// promqltest's "load" syntax, so verdicts can be tested without a
// Prometheus server. For tests only: it pulls in testify through promqltest.
package analysistest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/promql/promqltest"
	"github.com/prometheus/prometheus/storage"

	"github.com/meshkeeper/meshkeeper/internal/analysis"
)

// Start is the time of the first sample of a load command ("load 15s" puts
// samples at Start, Start+15s, ...). Query at Start.Add(d) to evaluate d
// into the loaded series.
var Start = time.Unix(0, 0).UTC()

// MaxSamples is the engine's limit of samples per query: Prometheus's own
// default (--query.max-samples), not promqltest's much smaller one, so a
// query over a big mesh fails here only where it would fail on a server.
const MaxSamples = 50_000_000

// Engine is an analysis.Provider over the PromQL engine and loaded storage.
type Engine struct {
	engine  *promql.Engine
	storage storage.Queryable
}

var _ analysis.Provider = (*Engine)(nil)

// Load returns an Engine over the series of a promqltest script made only
// of load commands, e.g.
//
//	load 15s
//	  meshkeeper_agent_connections_total{namespace="shop",pod="a",result="ok"} 0+100x8
//
// The engine and storage are closed when the test ends.
func Load(t testing.TB, script string) *Engine {
	t.Helper()
	st := promqltest.LoadedStorage(t, script)
	t.Cleanup(func() { _ = st.Close() })
	ng := promqltest.NewTestEngine(t, false, 0, MaxSamples)
	return &Engine{engine: ng, storage: st}
}

// Query evaluates q at at and reduces the result with analysis.SampleOf.
func (e *Engine) Query(ctx context.Context, q string, at time.Time) (analysis.Sample, error) {
	v, err := e.Eval(ctx, q, at)
	if err != nil {
		return analysis.Sample{}, err
	}
	return analysis.SampleOf(v)
}

// Eval evaluates q at at and returns the result as the HTTP API's client
// would see it.
func (e *Engine) Eval(ctx context.Context, q string, at time.Time) (model.Value, error) {
	qry, err := e.engine.NewInstantQuery(ctx, e.storage, nil, q, at)
	if err != nil {
		return nil, fmt.Errorf("the query failed on the PromQL engine: %w", err)
	}
	defer qry.Close()
	res := qry.Exec(ctx)
	if res.Err != nil {
		return nil, fmt.Errorf("the query failed on the PromQL engine: %w", res.Err)
	}
	return toModel(res.Value)
}

func toModel(v parser.Value) (model.Value, error) {
	switch v := v.(type) {
	case promql.Scalar:
		return &model.Scalar{Value: model.SampleValue(v.V), Timestamp: model.Time(v.T)}, nil
	case promql.String:
		return &model.String{Value: v.V, Timestamp: model.Time(v.T)}, nil
	case promql.Vector:
		out := make(model.Vector, 0, len(v))
		for _, s := range v {
			ms := &model.Sample{Metric: metric(s.Metric), Value: model.SampleValue(s.F), Timestamp: model.Time(s.T)}
			if s.H != nil {
				ms.Histogram = &model.SampleHistogram{Count: model.FloatString(s.H.Count), Sum: model.FloatString(s.H.Sum)}
			}
			out = append(out, ms)
		}
		return out, nil
	case promql.Matrix:
		out := make(model.Matrix, 0, len(v))
		for _, s := range v {
			ss := &model.SampleStream{Metric: metric(s.Metric)}
			for _, p := range s.Floats {
				ss.Values = append(ss.Values, model.SamplePair{Timestamp: model.Time(p.T), Value: model.SampleValue(p.F)})
			}
			out = append(out, ss)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("the PromQL engine returned a %T", v)
	}
}

func metric(ls labels.Labels) model.Metric {
	m := make(model.Metric, ls.Len())
	ls.Range(func(l labels.Label) { m[model.LabelName(l.Name)] = model.LabelValue(l.Value) })
	return m
}
