// Package alerts tests the alerting rules meshkeeper ships
// (config/prometheus/meshkeeper-rules.yaml) on the real PromQL engine: each
// fires on the series of the situation it names and stays quiet otherwise.
package alerts

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"github.com/prometheus/common/model"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/internal/analysis/analysistest"
)

func rules(t *testing.T) map[string]string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "prometheus", "meshkeeper-rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Spec struct {
			Groups []struct {
				Rules []struct {
					Alert string `json:"alert"`
					Expr  string `json:"expr"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(raw, &r); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, g := range r.Spec.Groups {
		for _, rule := range g.Rules {
			out[rule.Alert] = rule.Expr
		}
	}
	return out
}

// firing evaluates an alert's expression at minute m of the loaded series
// and returns the meshes it fires for.
func firing(t *testing.T, g Gomega, script, expr string, m int) []string {
	t.Helper()
	e := analysistest.Load(t, script)
	v, err := e.Eval(context.Background(), expr, analysistest.Start.Add(time.Duration(m)*time.Minute))
	g.Expect(err).NotTo(HaveOccurred())
	var meshes []string
	for _, s := range v.(model.Vector) {
		meshes = append(meshes, string(s.Metric["mesh"]))
	}
	return meshes
}

func TestAlerts(t *testing.T) {
	r := rules(t)
	if len(r) != 4 {
		t.Fatalf("want 4 alerts, got %v", r)
	}

	t.Run("MeshkeeperRolloutStuck: the same wave for over an hour, not a wave that just started", func(t *testing.T) {
		g := NewWithT(t)
		// stuck's wave started at 0; moving's wave started at 80 min (4800 s).
		script := `load 1m
  meshkeeper_rollout_active{mesh="stuck"} 1x120
  meshkeeper_rollout_wave_started_timestamp_seconds{mesh="stuck"} 0x120
  meshkeeper_rollout_active{mesh="moving"} 1x120
  meshkeeper_rollout_wave_started_timestamp_seconds{mesh="moving"} 4800x120
  meshkeeper_rollout_active{mesh="idle"} 0x120
  meshkeeper_rollout_wave_started_timestamp_seconds{mesh="idle"} 0x120
`
		g.Expect(firing(t, g, script, r["MeshkeeperRolloutStuck"], 90)).To(ConsistOf("stuck"))
		g.Expect(firing(t, g, script, r["MeshkeeperRolloutStuck"], 50)).To(BeEmpty(), "under an hour in the wave")
	})

	t.Run("MeshkeeperRepeatedRollbacks: two rollbacks in a day, not one", func(t *testing.T) {
		g := NewWithT(t)
		script := `load 1h
  meshkeeper_rollbacks_total{mesh="twice"} 0 0 1 1 2 2 2
  meshkeeper_rollbacks_total{mesh="once"} 0 0 1 1 1 1 1
`
		g.Expect(firing(t, g, script, r["MeshkeeperRepeatedRollbacks"], 6*60)).To(ConsistOf("twice"))
	})

	t.Run("MeshkeeperRolloutAnalysisFailing and MeshkeeperCatalogSourceFailing", func(t *testing.T) {
		g := NewWithT(t)
		script := `load 1m
  meshkeeper_rollout_failed_checks{mesh="failing"} 2x10
  meshkeeper_rollout_failed_checks{mesh="fine"} 0x10
  meshkeeper_catalog_source_healthy 0x10
`
		g.Expect(firing(t, g, script, r["MeshkeeperRolloutAnalysisFailing"], 5)).To(ConsistOf("failing"))
		e := analysistest.Load(t, script)
		v, err := e.Eval(context.Background(), r["MeshkeeperCatalogSourceFailing"], analysistest.Start.Add(5*time.Minute))
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(v.(model.Vector)).To(HaveLen(1))
	})
}
