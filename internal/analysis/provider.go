package analysis

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/api"
	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/common/model"
	"sigs.k8s.io/yaml"
)

// Provider answers an SLO query with one number. Every error means there is
// no answer to judge (unreachable, timed out, no data, more than one series,
// NaN or ±Inf): the check is Inconclusive, never a pass.
type Provider interface {
	// Query evaluates the PromQL expression at the instant at. When the
	// error wraps ErrNotFinite, the returned sample holds that NaN or ±Inf.
	Query(ctx context.Context, promql string, at time.Time) (Sample, error)
}

// Sample is the one number a query answered, with the labels of its series
// (none for a scalar or an aggregation without grouping). A query written
// with bottomk(1, ...) or topk(1, ...) keeps the labels of the worst series,
// so a verdict can say where it was, e.g. which node.
type Sample struct {
	Value  float64
	Labels model.Metric
}

// Where renders the sample's labels for messages, sorted, without
// __name__: "workload_namespace=shop, workload_node=node-07"; "" without
// labels.
func (s Sample) Where() string {
	names := make([]string, 0, len(s.Labels))
	for n := range s.Labels {
		if n != model.MetricNameLabel {
			names = append(names, string(n))
		}
	}
	slices.Sort(names)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = n + "=" + string(s.Labels[model.LabelName(n)])
	}
	return strings.Join(parts, ", ")
}

// The kinds of answer that are not one finite number. Provider errors wrap
// one of these, or are errors of the transport or the server.
var (
	// ErrNoData: the query returned an empty vector.
	ErrNoData = errors.New("no data")
	// ErrNotOneSeries: the query returned more than one series.
	ErrNotOneSeries = errors.New("not one series")
	// ErrNotFinite: the value is NaN or ±Inf.
	ErrNotFinite = errors.New("not a finite number")
	// ErrNotANumber: the query returned a range vector, a string or a
	// native histogram instead of a number.
	ErrNotANumber = errors.New("not a number")
)

// ValueOf reduces a query result to the one finite number an SLO needs. An
// empty vector, several series, a range vector, a string, a histogram, NaN
// and ±Inf are errors saying which (wrapping ErrNoData, ErrNotOneSeries,
// ErrNotANumber or ErrNotFinite). For NaN and ±Inf the value is returned too.
func ValueOf(v model.Value) (float64, error) {
	s, err := SampleOf(v)
	return s.Value, err
}

// SampleOf is ValueOf keeping the labels of the series.
func SampleOf(v model.Value) (Sample, error) {
	var f float64
	var ls model.Metric
	switch v := v.(type) {
	case nil:
		return Sample{}, fmt.Errorf("the query returned nothing: %w", ErrNoData)
	case *model.Scalar:
		f = float64(v.Value)
	case model.Vector:
		switch len(v) {
		case 0:
			return Sample{}, fmt.Errorf("the query returned an empty vector (%w): no series match in the window", ErrNoData)
		case 1:
		default:
			return Sample{}, fmt.Errorf("the query returned %d series (%s, ...), an SLO needs one number (%w); aggregate them, e.g. with sum, min or max",
				len(v), v[0].Metric, ErrNotOneSeries)
		}
		if v[0].Histogram != nil {
			return Sample{}, fmt.Errorf("the query returned a native histogram (%w); use histogram_quantile or histogram_avg", ErrNotANumber)
		}
		f, ls = float64(v[0].Value), v[0].Metric
	case model.Matrix:
		return Sample{}, fmt.Errorf("the query returned a range vector (%w); an SLO needs an instant vector or a scalar", ErrNotANumber)
	case *model.String:
		return Sample{}, fmt.Errorf("the query returned a string (%w)", ErrNotANumber)
	default:
		return Sample{}, fmt.Errorf("the query returned a %s (%w)", v.Type(), ErrNotANumber)
	}
	out := Sample{Value: f, Labels: ls}
	switch {
	case math.IsNaN(f):
		return out, fmt.Errorf("the value is NaN (%w), e.g. 0/0 when there was no traffic in the window", ErrNotFinite)
	case math.IsInf(f, 0):
		return out, fmt.Errorf("the value is %s (%w), e.g. a division by zero", FormatValue(f), ErrNotFinite)
	}
	return out, nil
}

// DefaultQueryTimeout bounds each Prometheus query.
const DefaultQueryTimeout = 10 * time.Second

// PrometheusOptions configure NewPrometheus.
type PrometheusOptions struct {
	// Timeout bounds each query, on the client and (as the query's timeout
	// parameter) on the server. Default DefaultQueryTimeout.
	Timeout time.Duration
	// RoundTripper carries the requests. Default: api.DefaultRoundTripper.
	RoundTripper http.RoundTripper
}

// Prometheus is a Provider backed by a Prometheus server's HTTP API.
type Prometheus struct {
	address string
	timeout time.Duration
	api     promv1.API
}

// NewPrometheus returns a Provider querying the Prometheus at address, the
// base URL (e.g. http://prometheus.monitoring:9090).
func NewPrometheus(address string, opts PrometheusOptions) (*Prometheus, error) {
	if address == "" {
		return nil, errors.New("analysis: a Prometheus address is required, e.g. http://prometheus.monitoring:9090")
	}
	c, err := api.NewClient(api.Config{Address: address, RoundTripper: opts.RoundTripper})
	if err != nil {
		return nil, fmt.Errorf("analysis: Prometheus address %q: %w", address, err)
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultQueryTimeout
	}
	return &Prometheus{address: strings.TrimRight(address, "/"), timeout: timeout, api: promv1.NewAPI(c)}, nil
}

// Address is the base URL queries go to.
func (p *Prometheus) Address() string { return p.address }

// Query runs an instant query at at, bounded by the per-query timeout.
func (p *Prometheus) Query(ctx context.Context, promql string, at time.Time) (Sample, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	v, _, err := p.api.Query(ctx, promql, at, promv1.WithTimeout(p.timeout))
	if err != nil {
		return Sample{}, p.describe(ctx, err)
	}
	return SampleOf(v)
}

// describe says why a query got no answer.
func (p *Prometheus) describe(ctx context.Context, err error) error {
	var perr *promv1.Error
	switch {
	case errors.As(err, &perr):
		switch perr.Type {
		case promv1.ErrBadData, promv1.ErrExec, promv1.ErrTimeout, promv1.ErrCanceled:
			return fmt.Errorf("the query failed on Prometheus at %s: %w", p.address, err)
		default:
			return fmt.Errorf("bad answer from Prometheus at %s: %w", p.address, err)
		}
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("no answer from Prometheus at %s within %s: %w", p.address, p.timeout, err)
	default:
		return fmt.Errorf("cannot reach Prometheus at %s: %w", p.address, err)
	}
}

// ScrapeInterval is the global scrape interval of this Prometheus' own
// configuration (/api/v1/status/config): how long after the traffic a wave
// carries its samples reach the queries. Prometheus' default (1m) when the
// configuration does not set one.
func (p *Prometheus) ScrapeInterval(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	cfg, err := p.api.Config(ctx)
	if err != nil {
		return 0, p.describe(ctx, err)
	}
	return ScrapeIntervalOf(cfg.YAML)
}

// ScrapeIntervalOf reads global.scrape_interval from a Prometheus
// configuration; 1m (Prometheus' default) when it is not set.
func ScrapeIntervalOf(config string) (time.Duration, error) {
	var c struct {
		Global struct {
			ScrapeInterval string `json:"scrape_interval"`
		} `json:"global"`
	}
	if err := yaml.Unmarshal([]byte(config), &c); err != nil {
		return 0, fmt.Errorf("read Prometheus' configuration: %w", err)
	}
	if c.Global.ScrapeInterval == "" {
		return time.Minute, nil
	}
	d, err := model.ParseDuration(c.Global.ScrapeInterval)
	if err != nil {
		return 0, fmt.Errorf("Prometheus' global.scrape_interval %q: %w", c.Global.ScrapeInterval, err)
	}
	return time.Duration(d), nil
}
