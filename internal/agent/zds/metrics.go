package zds

import "github.com/prometheus/client_golang/prometheus"

// Metrics count what happens on the ZDS socket. Register them with the
// agent's registry (Collectors).
type Metrics struct {
	connected      prometheus.Gauge
	snapshots      prometheus.Counter
	requests       *prometheus.CounterVec
	protocolErrors *prometheus.CounterVec
}

// NewMetrics returns unregistered metrics with every series at 0.
func NewMetrics() *Metrics {
	m := &Metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshkeeper_agent_zds_connections",
			Help: "ztunnels connected to the agent's ZDS socket (two during a node wave, while the old one drains).",
		}),
		snapshots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshkeeper_agent_zds_snapshots_total",
			Help: "Snapshots of the node's workloads sent to a ztunnel that connected.",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshkeeper_agent_zds_requests_total",
			Help: "ZDS requests sent to ztunnel by kind (add, keep, delete, snapshot_sent) and result: ok, ack_error (ztunnel answered with an error), failed (no ack: timeout or broken connection).",
		}, []string{"kind", "result"}),
		protocolErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshkeeper_agent_zds_protocol_errors_total",
			Help: "ZDS connections closed for a protocol error: hello (none or malformed), version (unknown), response (not an ack), unexpected (a message nobody asked for).",
		}, []string{"reason"}),
	}
	for _, k := range []string{"add", "keep", "delete", "snapshot_sent"} {
		for _, r := range []string{"ok", "ack_error", "failed"} {
			m.requests.WithLabelValues(k, r)
		}
	}
	for _, r := range []string{"hello", "version", "response", "unexpected"} {
		m.protocolErrors.WithLabelValues(r)
	}
	return m
}

// Collectors returns the metrics to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.connected, m.snapshots, m.requests, m.protocolErrors}
}

func (m *Metrics) request(kind, result string) { m.requests.WithLabelValues(kind, result).Inc() }

func (m *Metrics) protocolError(reason string) { m.protocolErrors.WithLabelValues(reason).Inc() }

// Requests is meshkeeper_agent_zds_requests_total{kind,result}.
func (m *Metrics) Requests() *prometheus.CounterVec { return m.requests }

// ProtocolErrors is meshkeeper_agent_zds_protocol_errors_total{reason}.
func (m *Metrics) ProtocolErrors() *prometheus.CounterVec { return m.protocolErrors }

// Snapshots is meshkeeper_agent_zds_snapshots_total.
func (m *Metrics) Snapshots() prometheus.Counter { return m.snapshots }
