package prom

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ConnectionsMetric is the node agent's connection-outcome counter the
// workload exports.
const ConnectionsMetric = "meshkeeper_agent_connections_total"

// Results are the values of the result label, as the node agent has them.
var Results = []string{"ok", "refused", "reset", "timeout"}

// Tick is how often the workload advances its counters, and
// ConnectionsPerTick by how many connections per namespace each time.
const (
	Tick               = 250 * time.Millisecond
	ConnectionsPerTick = 100
)

// maxLifetime bounds how long a workload keeps counting.
const maxLifetime = 10 * time.Minute

// Workload is a tiny HTTP exporter on 127.0.0.1 standing in for one node's
// agent: it exposes meshkeeper_agent_connections_total with the agent's
// labels (workload_namespace, workload_pod, workload_node,
// workload_revision, result) for one pod per namespace on its node, with a
// success ratio per namespace that the test sets. Counters advance every
// Tick by ConnectionsPerTick connections per namespace: ratio of them ok,
// the rest spread evenly over refused, reset and timeout. A scrape always
// sees one consistent snapshot of all counters.
type Workload struct {
	// Addr is the host:port to scrape, e.g. 127.0.0.1:40123.
	Addr string
	// URL is the metrics endpoint, http://<Addr>/metrics.
	URL string
	// Node is the workload_node label of every series.
	Node string

	mu         sync.Mutex
	namespaces map[string]*namespaceCounters
	revisions  map[string]string // workload_revision by namespace
	stopped    bool

	srv  *http.Server
	stop chan struct{}
	done chan struct{}
}

type namespaceCounters struct {
	ratio  float64
	counts map[string]float64 // by result
}

// Pod is the workload_pod label of every series of a workload on
// DefaultNode; on another node it is "workload-<node>".
const Pod = "workload-0"

// DefaultNode is the node of NewWorkload's series.
const DefaultNode = "workload-node"

// The agent's labels (internal/agent/metrics.go).
var connectionsDesc = prometheus.NewDesc(ConnectionsMetric,
	"Outbound TCP connections of enrolled pods by outcome (test workload).",
	[]string{"workload_namespace", "workload_pod", "workload_node", "workload_revision", "result"}, nil)

// NewWorkload starts a workload on DefaultNode; it stops when the test
// ends.
func NewWorkload(t TB) *Workload {
	t.Helper()
	return NewWorkloadOn(t, DefaultNode, "127.0.0.1:0")
}

// NewWorkloadOn starts a workload standing in for the agent of node,
// listening on addr (a loopback host:port; port 0 picks one).
func NewWorkloadOn(t TB, node, addr string) *Workload {
	t.Helper()
	if err := checkLoopback(addr); err != nil {
		t.Fatalf("%v", err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("prom: workload listener: %v", err)
	}
	w := &Workload{
		Addr:       l.Addr().String(),
		Node:       node,
		revisions:  map[string]string{},
		namespaces: map[string]*namespaceCounters{},
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
	}
	w.URL = "http://" + w.Addr + "/metrics"
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(w); err != nil {
		_ = l.Close()
		t.Fatalf("prom: workload registry: %v", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}))
	w.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := w.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("prom: workload server: %v", err)
		}
	}()
	go w.run()
	t.Cleanup(w.Close)
	return w
}

// SetRatio sets the share of ok connections of namespace ns from the next
// tick on (0 to 1). The first call for a namespace exposes all its series
// at 0 before any traffic, as the node agent does.
func (w *Workload) SetRatio(ns string, ratio float64) {
	if math.IsNaN(ratio) || ratio < 0 || ratio > 1 {
		panic(fmt.Sprintf("prom: SetRatio(%q, %v): the ratio must be from 0 to 1", ns, ratio))
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	c, ok := w.namespaces[ns]
	if !ok {
		c = &namespaceCounters{counts: map[string]float64{}}
		for _, r := range Results {
			c.counts[r] = 0
		}
		w.namespaces[ns] = c
	}
	c.ratio = ratio
}

// SetRevision sets the workload_revision label of namespace ns's series
// (the agent takes it from the namespace's istio.io/rev label). A counter
// keeps its value when the label changes, as the agent's does.
func (w *Workload) SetRevision(ns, rev string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.revisions[ns] = rev
}

// PodName is the workload_pod label of the workload's series.
func (w *Workload) PodName() string {
	if w.Node == DefaultNode {
		return Pod
	}
	return "workload-" + w.Node
}

// Counts returns the current counter values of ns by result.
func (w *Workload) Counts(ns string) map[string]float64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string]float64{}
	if c, ok := w.namespaces[ns]; ok {
		for r, v := range c.counts {
			out[r] = v
		}
	}
	return out
}

// Close stops counting and serving. It may be called more than once.
func (w *Workload) Close() {
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		return
	}
	w.stopped = true
	close(w.stop)
	w.mu.Unlock()
	<-w.done
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := w.srv.Shutdown(ctx); err != nil {
		_ = w.srv.Close()
	}
}

func (w *Workload) run() {
	defer close(w.done)
	tick := time.NewTicker(Tick)
	defer tick.Stop()
	deadline := time.After(maxLifetime)
	for {
		select {
		case <-w.stop:
			return
		case <-deadline:
			return
		case <-tick.C:
			w.advance()
		}
	}
}

func (w *Workload) advance() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.namespaces {
		ok := ConnectionsPerTick * c.ratio
		failed := (ConnectionsPerTick - ok) / float64(len(Results)-1)
		for _, r := range Results {
			if r == "ok" {
				c.counts[r] += ok
			} else {
				c.counts[r] += failed
			}
		}
	}
}

// Describe implements prometheus.Collector.
func (w *Workload) Describe(ch chan<- *prometheus.Desc) { ch <- connectionsDesc }

// Collect implements prometheus.Collector: one snapshot under the lock.
func (w *Workload) Collect(ch chan<- prometheus.Metric) {
	w.mu.Lock()
	defer w.mu.Unlock()
	names := make([]string, 0, len(w.namespaces))
	for ns := range w.namespaces {
		names = append(names, ns)
	}
	slices.Sort(names)
	pod := w.PodName()
	for _, ns := range names {
		c := w.namespaces[ns]
		for _, r := range Results {
			ch <- prometheus.MustNewConstMetric(connectionsDesc, prometheus.CounterValue, c.counts[r], ns, pod, w.Node, w.revisions[ns], r)
		}
	}
}
