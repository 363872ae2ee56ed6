package agent

import (
	"math"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

// The labels of a pod's series. They name the pod, its node and the
// revision it runs under their own names, never namespace, pod, node or
// instance: a standard Kubernetes scrape (pod service discovery,
// honor_labels: false) sets those as target labels from the agent's own pod
// and would rename the agent's to exported_namespace and so on.
const (
	// LabelWorkloadNamespace is the pod's namespace.
	LabelWorkloadNamespace = "workload_namespace"
	// LabelWorkloadPod is the pod's name.
	LabelWorkloadPod = "workload_pod"
	// LabelWorkloadNode is the node the pod (and the agent) runs on.
	LabelWorkloadNode = "workload_node"
	// LabelWorkloadRevision is the control-plane revision the pod runs: its
	// namespace's istio.io/rev label ("" without one).
	LabelWorkloadRevision = "workload_revision"
)

var podLabels = []string{LabelWorkloadNamespace, LabelWorkloadPod, LabelWorkloadNode, LabelWorkloadRevision}

var (
	connectionsDesc = prometheus.NewDesc("meshkeeper_agent_connections_total",
		"Outbound TCP connections of enrolled pods by outcome: ok (established), refused, timeout, error (never established), reset (aborted by the peer after establishing).",
		append(append([]string{}, podLabels...), "result"), nil)
	latencyDesc = prometheus.NewDesc("meshkeeper_agent_connect_latency_seconds",
		"Time from SYN to established for outbound TCP connections of enrolled pods.",
		podLabels, nil)
	enrolledDesc = prometheus.NewDesc("meshkeeper_agent_enrolled_pods",
		"Pods on this node whose network namespace is enrolled for eBPF redirection.", nil, nil)
	wantedDesc = prometheus.NewDesc("meshkeeper_agent_wanted_pods",
		"Pods on this node that should be enrolled (in an enrolled namespace), found or not.", nil, nil)
	eligibleDesc = prometheus.NewDesc("meshkeeper_agent_preflight_eligible",
		"1 when this node passed eBPF preflight.", nil, nil)
	datapathDesc = prometheus.NewDesc("meshkeeper_agent_datapath_loaded",
		"1 when the eBPF datapath is loaded and attached.", nil, nil)
	mapEntriesDesc = prometheus.NewDesc("meshkeeper_agent_bpf_map_entries",
		"Entries in a datapath map.", []string{"map"}, nil)
	mapMaxDesc = prometheus.NewDesc("meshkeeper_agent_bpf_map_max_entries",
		"Capacity of a datapath map.", []string{"map"}, nil)
)

// latencyBounds are the histogram's upper bounds in seconds: 2^i µs for
// each bucket of pod_info.latency_buckets but the last (the overflow).
var latencyBounds = func() []float64 {
	var n NetnsEntry
	b := make([]float64, len(n.LatencyBuckets)-1)
	for i := range b {
		b[i] = math.Ldexp(1, i) / 1e6
	}
	return b
}()

// Collector exports the agent's metrics, read from the datapath's maps at
// scrape time.
type Collector struct {
	enroller atomic.Pointer[Enroller]
	datapath atomic.Pointer[Datapath]
	// Eligible is the preflight verdict.
	Eligible atomic.Bool
	// Node is the workload_node label of every pod's series (set before
	// the first scrape).
	Node string
	// OnError, when set, hears about maps that could not be read.
	OnError func(error)
	// notReady is why the agent runs without a datapath, when it does.
	notReady atomic.Pointer[string]
	// ZDSMetrics, when set before NewRegistry, are registered with it.
	ZDSMetrics *zds.Metrics
	// zds is the ZDS server readiness waits for, when the agent hands
	// pods to ztunnel.
	zds atomic.Pointer[zds.Server]
}

// SetZDS makes readiness wait for the ZDS server to serve.
func (c *Collector) SetZDS(s *zds.Server) { c.zds.Store(s) }

// SetNotReady records why the agent runs without a datapath; /readyz says it.
func (c *Collector) SetNotReady(why string) { c.notReady.Store(&why) }

// SetDatapath starts exporting a loaded datapath and its enroller.
func (c *Collector) SetDatapath(dp *Datapath, e *Enroller) {
	c.datapath.Store(dp)
	c.enroller.Store(e)
}

// Ready is true once a datapath is loaded and enrolment runs; otherwise it
// says why not.
func (c *Collector) Ready() (bool, string) {
	switch {
	case c.notReady.Load() != nil:
		return false, *c.notReady.Load()
	case !c.Eligible.Load():
		return false, "this node is not eligible for eBPF redirection (see its MeshNode)"
	case c.datapath.Load() == nil || c.enroller.Load() == nil:
		return false, "the eBPF datapath is not loaded (see the agent's log and its MeshNode)"
	case c.zds.Load() != nil && !c.zds.Load().IsServing():
		return false, "the ZDS server for ztunnel is not serving yet: it waits until the node's pods are found, so that ztunnel's first snapshot is complete"
	}
	return true, ""
}

var _ prometheus.Collector = (*Collector)(nil)

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{connectionsDesc, latencyDesc, enrolledDesc, wantedDesc, eligibleDesc, datapathDesc, mapEntriesDesc, mapMaxDesc} {
		ch <- d
	}
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(eligibleDesc, prometheus.GaugeValue, boolFloat(c.Eligible.Load()))
	dp, enroller := c.datapath.Load(), c.enroller.Load()
	ch <- prometheus.MustNewConstMetric(datapathDesc, prometheus.GaugeValue, boolFloat(dp != nil))
	if dp != nil {
		for name, u := range dp.MapUsage() {
			ch <- prometheus.MustNewConstMetric(mapEntriesDesc, prometheus.GaugeValue, float64(u.Entries), name)
			ch <- prometheus.MustNewConstMetric(mapMaxDesc, prometheus.GaugeValue, float64(u.MaxEntries), name)
		}
	}
	if enroller == nil {
		ch <- prometheus.MustNewConstMetric(enrolledDesc, prometheus.GaugeValue, 0)
		ch <- prometheus.MustNewConstMetric(wantedDesc, prometheus.GaugeValue, 0)
		return
	}
	pods, err := enroller.Telemetry()
	if err != nil {
		if c.OnError != nil {
			c.OnError(err)
		}
		ch <- prometheus.NewInvalidMetric(connectionsDesc, err)
		return
	}
	enrolled := 0
	for _, p := range pods {
		if p.Netns > 0 {
			enrolled++
		}
		m := &p.Metrics
		pod := []string{p.Pod.Namespace, p.Pod.Name, c.Node, p.Pod.Revision}
		// Every result series exists (at 0) from the moment a pod is
		// wanted, so success ratios are defined before the first failure.
		for i, name := range resultNames {
			ch <- prometheus.MustNewConstMetric(connectionsDesc, prometheus.CounterValue, float64(m.Results[i]), append(pod, name)...)
		}
		buckets := make(map[float64]uint64, len(latencyBounds))
		var cum uint64
		for i, bound := range latencyBounds {
			cum += m.LatencyBuckets[i]
			buckets[bound] = cum
		}
		count := cum + m.LatencyBuckets[len(m.LatencyBuckets)-1]
		ch <- prometheus.MustNewConstHistogram(latencyDesc, count, float64(m.LatencySumNs)/1e9, buckets, pod...)
	}
	ch <- prometheus.MustNewConstMetric(enrolledDesc, prometheus.GaugeValue, float64(enrolled))
	ch <- prometheus.MustNewConstMetric(wantedDesc, prometheus.GaugeValue, float64(len(pods)))
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// NewRegistry returns a registry with the agent's collector and the Go
// runtime and process collectors.
func NewRegistry(c *Collector) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, cniRequests, cniAddSeconds, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if c.ZDSMetrics != nil {
		reg.MustRegister(c.ZDSMetrics.Collectors()...)
	}
	return reg
}
