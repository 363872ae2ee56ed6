package controller

import (
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// The manager's rollout metrics, served with controller-runtime's on the
// manager's /metrics. They are read from the Mesh status each reconcile
// wrote (the status is the rollout's memory), so they say what the status
// says. config/grafana and config/prometheus use them; a test checks every
// query there against a scrape of the real endpoint.
var (
	metricRolloutActive = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_active",
		Help: "1 while a canary rollout of the Mesh is in flight, else 0.",
	}, []string{"mesh"})
	metricRolloutStep = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_step",
		Help: "1 for the rollout's current step (Nodes, Namespaces, Retire, RollingBack), 0 for the others.",
	}, []string{"mesh", "step"})
	metricRolloutWave = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_wave",
		Help: "The current wave of the rollout's step (1-based; 0 before the first wave starts or with no rollout).",
	}, []string{"mesh"})
	metricRolloutWaves = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_waves",
		Help: "How many waves the rollout's current step has.",
	}, []string{"mesh"})
	metricWaveStarted = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_wave_started_timestamp_seconds",
		Help: "When the current wave (or, before the first, the rollout) started, Unix seconds; 0 with no rollout.",
	}, []string{"mesh"})
	metricAnalysisValue = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_analysis_value",
		Help: "The last value of each SLO query in the rollout's analysis; NaN when the check was inconclusive.",
	}, []string{"mesh", "slo"})
	metricAnalysisThreshold = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_analysis_threshold",
		Help: "Each SLO's thresholds from spec.analysis.slos (bound min or max).",
	}, []string{"mesh", "slo", "bound"})
	metricFailedChecks = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_rollout_failed_checks",
		Help: "Consecutive failed SLO checks of the current wave (a rollback follows once above spec.analysis.failureLimit).",
	}, []string{"mesh"})
	metricRollbacks = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshkeeper_rollbacks_total",
		Help: "Rollouts rolled back (an SLO breach, or spec.version set back during the rollout).",
	}, []string{"mesh"})
	metricRollouts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshkeeper_rollouts_total",
		Help: "Finished rollouts by outcome (Succeeded, RolledBack).",
	}, []string{"mesh", "outcome"})
	metricStepDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "meshkeeper_rollout_step_duration_seconds",
		Help:    "How long each rollout step ran, from the reconcile that entered it to the one that left it.",
		Buckets: []float64{1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600},
	}, []string{"step"})
	metricCatalogBundles = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshkeeper_catalog_bundles",
		Help: "Releases in the operator's catalog by origin (embedded, or remote: the catalog source).",
	}, []string{"origin"})
	metricCatalogLastCheck = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshkeeper_catalog_last_check_timestamp_seconds",
		Help: "When the catalog source was last checked, Unix seconds; 0 without a source.",
	})
	metricCatalogHealthy = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshkeeper_catalog_source_healthy",
		Help: "1 when the last check of the catalog source succeeded and merged everything it served (or there is no source), else 0.",
	})
)

var rolloutSteps = []string{meshv1.RolloutStepNodes, meshv1.RolloutStepNamespaces, meshv1.RolloutStepRetire, meshv1.RolloutStepRollingBack}

func init() {
	metrics.Registry.MustRegister(metricRolloutActive, metricRolloutStep, metricRolloutWave, metricRolloutWaves,
		metricWaveStarted, metricAnalysisValue, metricAnalysisThreshold, metricFailedChecks, metricRollbacks,
		metricRollouts, metricStepDuration, metricCatalogBundles, metricCatalogLastCheck, metricCatalogHealthy)
	for _, s := range rolloutSteps {
		metricStepDuration.WithLabelValues(s) // present at 0 from the start
	}
	for _, o := range []string{"embedded", "remote"} {
		metricCatalogBundles.WithLabelValues(o)
	}
}

// stepClock remembers, per Mesh, the step in flight and when a reconcile
// first saw it, for meshkeeper_rollout_step_duration_seconds. A step
// running when the operator starts is timed from then.
var stepClock = struct {
	sync.Mutex
	since map[string]stepSeen
}{since: map[string]stepSeen{}}

type stepSeen struct {
	step string
	at   time.Time
}

// recordMetrics updates the rollout metrics from the status a reconcile
// wrote (after a successful patch), and ended, the rollout that finished in
// it.
func recordMetrics(mesh *meshv1.Mesh, ended *meshv1.HistoryEntry, now time.Time) {
	name := mesh.Name
	if ended != nil {
		metricRollouts.WithLabelValues(name, string(ended.Outcome)).Inc()
		if ended.Outcome == meshv1.OutcomeRolledBack {
			metricRollbacks.WithLabelValues(name).Inc()
		}
	}
	// Present at 0 before the first, so increase() and the dashboard see them.
	metricRollbacks.WithLabelValues(name)
	metricRollouts.WithLabelValues(name, string(meshv1.OutcomeSucceeded))
	metricRollouts.WithLabelValues(name, string(meshv1.OutcomeRolledBack))
	ro := mesh.Status.Rollout
	step := ""
	if ro != nil {
		step = ro.Step
	}
	observeStep(name, step, now)

	active, wave, waves, started, failed := 0.0, 0.0, 0.0, 0.0, 0.0
	if ro != nil {
		active, wave, waves, failed = 1, float64(ro.Wave), float64(ro.Waves), float64(ro.FailedChecks)
		switch {
		case ro.WaveStartedAt != nil:
			started = float64(ro.WaveStartedAt.Unix())
		case ro.StartedAt != nil:
			started = float64(ro.StartedAt.Unix())
		}
	}
	metricRolloutActive.WithLabelValues(name).Set(active)
	metricRolloutWave.WithLabelValues(name).Set(wave)
	metricRolloutWaves.WithLabelValues(name).Set(waves)
	metricWaveStarted.WithLabelValues(name).Set(started)
	metricFailedChecks.WithLabelValues(name).Set(failed)
	for _, s := range rolloutSteps {
		v := 0.0
		if s == step {
			v = 1
		}
		metricRolloutStep.WithLabelValues(name, s).Set(v)
	}
	if ro != nil {
		for _, a := range ro.Analysis {
			v, err := strconv.ParseFloat(a.Value, 64)
			if err != nil || a.Verdict == meshv1.VerdictInconclusive {
				v = math.NaN()
			}
			metricAnalysisValue.WithLabelValues(name, a.SLO).Set(v)
		}
	}
	metricAnalysisThreshold.DeletePartialMatch(prometheus.Labels{"mesh": name})
	if a := mesh.Spec.Analysis; a != nil {
		for _, slo := range a.SLOs {
			for bound, s := range map[string]*string{"min": slo.Min, "max": slo.Max} {
				if s == nil {
					continue
				}
				if v, err := strconv.ParseFloat(*s, 64); err == nil {
					metricAnalysisThreshold.WithLabelValues(name, slo.Name, bound).Set(v)
				}
			}
		}
	}
}

// observeStep times the step a Mesh is in: when it differs from the one seen
// before, the old one's duration is observed.
func observeStep(mesh, step string, now time.Time) {
	stepClock.Lock()
	defer stepClock.Unlock()
	prev, ok := stepClock.since[mesh]
	if ok && prev.step == step {
		return
	}
	if ok && prev.step != "" {
		metricStepDuration.WithLabelValues(prev.step).Observe(now.Sub(prev.at).Seconds())
	}
	stepClock.since[mesh] = stepSeen{step: step, at: now}
}

// forgetMetrics drops a deleted Mesh's series.
func forgetMetrics(mesh string) {
	for _, v := range []*prometheus.GaugeVec{metricRolloutActive, metricRolloutStep, metricRolloutWave, metricRolloutWaves,
		metricWaveStarted, metricAnalysisValue, metricAnalysisThreshold, metricFailedChecks} {
		v.DeletePartialMatch(prometheus.Labels{"mesh": mesh})
	}
	metricRollbacks.DeletePartialMatch(prometheus.Labels{"mesh": mesh})
	metricRollouts.DeletePartialMatch(prometheus.Labels{"mesh": mesh})
	stepClock.Lock()
	delete(stepClock.since, mesh)
	stepClock.Unlock()
}

// recordCatalog updates the catalog metrics.
func recordCatalog(cat *bundle.Catalog, st bundle.SourceState) {
	counts := map[string]float64{"embedded": 0, "remote": 0}
	for _, b := range cat.Bundles() {
		if b.Source == bundle.SourceEmbedded {
			counts["embedded"]++
		} else {
			counts["remote"]++
		}
	}
	for o, n := range counts {
		metricCatalogBundles.WithLabelValues(o).Set(n)
	}
	last := 0.0
	if !st.LastChecked.IsZero() {
		last = float64(st.LastChecked.Unix())
	}
	metricCatalogLastCheck.Set(last)
	healthy := 1.0
	if st.Message != "" {
		healthy = 0
	}
	metricCatalogHealthy.Set(healthy)
}
