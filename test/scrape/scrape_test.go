// Package scrape tests the shipped Prometheus scrape configuration
// (config/prometheus/scrape-config.yaml) as Prometheus runs it in a
// cluster: pod service discovery against the local cluster's API server,
// not static targets. The node agents are stand-ins on kwok nodes (the
// real-node harness will replace them): host-network pods whose IP is their
// node's loopback InternalIP, where a test exporter serves the agent's
// metrics with the agent's labels.
package scrape

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	. "github.com/onsi/gomega"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// TestShippedScrapeConfig: through the shipped scrape config, under pod
// service discovery, the default SLO's per-namespace ratio has one value
// per namespace, the target labels (namespace, pod, node) are the agent
// pod's and the agent's own labels arrive unrenamed; a node wave and a
// namespace wave are judged on their own series.
func TestShippedScrapeConfig(t *testing.T) {
	cluster.SkipIfUnavailable(t)
	prom.SkipIfUnavailable(t)
	g := NewWithT(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	root, err := cluster.RepoRoot()
	g.Expect(err).NotTo(HaveOccurred())
	snippet, err := os.ReadFile(filepath.Join(root, prom.ScrapeConfigPath))
	g.Expect(err).NotTo(HaveOccurred())

	// Two nodes with loopback addresses, so their host-network pods are
	// reachable on this machine.
	nodes := []cluster.Node{
		{Name: "scrape-node-a", KernelVersion: "6.1.0-28-amd64", InternalIP: "127.0.42.1"},
		{Name: "scrape-node-b", KernelVersion: "6.1.0-28-amd64", InternalIP: "127.0.42.2"},
	}
	kc, err := cluster.Start(ctx, cluster.Options{Nodes: nodes})
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() {
		if err := kc.Stop(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
	})
	g.Expect(kc.CreateNamespace(ctx, "istio-system", nil)).To(Succeed())

	// One stand-in agent per node, each with pods of shop and shop-staging:
	// shop-staging's pods on node b fail a tenth of their connections.
	// shop has moved to 1-28-2, shop-staging is still on 1-27-3.
	workloads := map[string]*prom.Workload{}
	for _, n := range nodes {
		w := prom.NewWorkloadOn(t, n.Name, n.InternalIP+":0")
		w.SetRatio("shop", 1)
		w.SetRatio("shop-staging", 1)
		w.SetRevision("shop", "1-28-2")
		w.SetRevision("shop-staging", "1-27-3")
		workloads[n.Name] = w
		pod, err := prom.StandInAgentPod("istio-system", n.Name, w.Addr)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(kc.Client.Create(ctx, pod)).To(Succeed())
	}
	workloads["scrape-node-b"].SetRatio("shop-staging", 0.9)
	// A pod that is not the agent's, with a metrics port too: not scraped.
	other := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "ztunnel-x", Labels: map[string]string{meshv1.LabelComponent: "ztunnel"}},
		Spec: corev1.PodSpec{NodeName: "scrape-node-a", HostNetwork: true, Containers: []corev1.Container{{
			Name: "ztunnel", Image: "ztunnel", Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: 1}},
		}}},
	}
	g.Expect(kc.Client.Create(ctx, other)).To(Succeed())

	srv, err := prom.StartKubernetesSD(ctx, t, snippet, kc.KubeconfigPath)
	g.Expect(err).NotTo(HaveOccurred())
	took, err := srv.WaitForTargets(ctx, "meshkeeper-agent", len(nodes), 30*time.Second)
	g.Expect(err).NotTo(HaveOccurred(), srv.Logs())
	t.Logf("both stand-in agents discovered through the API server and scraped %s after Prometheus was ready", took)

	targets, err := srv.ActiveTargets(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	scraped := map[string]model.LabelSet{}
	for _, at := range targets {
		if at.Labels["job"] == "meshkeeper-agent" {
			scraped[string(at.Labels["node"])] = at.Labels
		}
	}
	g.Expect(scraped).To(HaveLen(2), "only the agent's pods, not ztunnel's")
	g.Expect(scraped["scrape-node-a"]).To(And(HaveKeyWithValue(model.LabelName("namespace"), model.LabelValue("istio-system")),
		HaveKeyWithValue(model.LabelName("pod"), model.LabelValue("agent-stand-in-scrape-node-a"))), "target labels are the agent pod's")

	query := func(q string) model.Vector {
		v, _, err := srv.API().Query(ctx, q, time.Now())
		g.Expect(err).NotTo(HaveOccurred(), q)
		return v.(model.Vector)
	}
	// The agent's labels are kept under their own names, nothing renamed.
	g.Eventually(func() int { return len(query(`meshkeeper_agent_connections_total{result="ok"}`)) }).
		WithTimeout(10 * time.Second).Should(Equal(4))
	g.Expect(query(`count({__name__="meshkeeper_agent_connections_total", exported_namespace!=""} or {__name__="meshkeeper_agent_connections_total", exported_pod!=""})`)).To(BeEmpty(),
		"no exported_* labels: the agent's labels cannot collide with target labels")

	// The default SLO's per-namespace ratio, under pod SD: one value per
	// namespace. The inner expression of the default SLO, grouped as in a
	// namespace wave, over every revision.
	const perNamespace = `sum by (workload_namespace) (rate(meshkeeper_agent_connections_total{result="ok"}[1m])) / sum by (workload_namespace) (rate(meshkeeper_agent_connections_total[1m]))`
	// Wait until every pod's rate has two samples in the window.
	const perPod = `sum by (workload_namespace, workload_node) (rate(meshkeeper_agent_connections_total[1m]))`
	g.Eventually(func() int { return len(query(perPod)) }).WithTimeout(20 * time.Second).WithPolling(250 * time.Millisecond).Should(Equal(4))
	var ratios map[string]float64
	g.Eventually(func(g Gomega) {
		ratios = map[string]float64{}
		for _, s := range query(perNamespace) {
			ratios[string(s.Metric["workload_namespace"])] = float64(s.Value)
		}
		g.Expect(ratios).To(HaveLen(2))
		g.Expect(ratios["shop-staging"]).To(BeNumerically("<", 0.99))
	}).WithTimeout(20 * time.Second).WithPolling(250 * time.Millisecond).Should(Succeed())
	t.Logf("per-namespace L4 success ratios through pod SD: %v", ratios)
	for _, s := range query(`sum by (workload_namespace, workload_node, node, pod) (rate(meshkeeper_agent_connections_total{result="ok"}[1m])) / sum by (workload_namespace, workload_node, node, pod) (rate(meshkeeper_agent_connections_total[1m]))`) {
		t.Logf("  %s: %v", s.Metric, s.Value)
	}
	g.Expect(ratios).To(HaveKeyWithValue("shop", 1.0))
	g.Expect(ratios["shop-staging"]).To(BeNumerically("~", 0.95, 0.025), "0.9 on node b, 1 on node a, as much traffic on each (scrape offsets blur the rates a little)")

	// The default SLO itself, part by part (before bottomk picks the
	// worst), expanded as the controller expands it: one value per
	// namespace of a namespace wave, one per namespace and node of a node
	// wave, each part exactly once.
	all := []string{"shop", "shop-staging"}
	byPart := func(g Gomega, d analysis.QueryData) map[string]float64 {
		q, err := analysis.ExpandQuery(analysis.DefaultL4SuccessByPartQuery, d)
		g.Expect(err).NotTo(HaveOccurred())
		v, _, err := srv.API().Query(ctx, q, time.Now())
		g.Expect(err).NotTo(HaveOccurred(), q)
		out := map[string]float64{}
		for _, s := range v.(model.Vector) {
			part := string(s.Metric["workload_namespace"])
			if n := s.Metric["workload_node"]; n != "" {
				part += " on " + string(n)
			}
			g.Expect(out).NotTo(HaveKey(part), "one value per part")
			out[part] = float64(s.Value)
		}
		return out
	}
	var newRev, oldRev, bothNodes map[string]float64
	g.Eventually(func(g Gomega) {
		newRev = byPart(g, analysis.NamespaceWaveScope([]string{"shop"}, "1-28-2", "1-27-3", true, 30*time.Second).Canary)
		oldRev = byPart(g, analysis.NamespaceWaveScope([]string{"shop-staging"}, "1-27-3", "1-26-4", true, 30*time.Second).Canary)
		bothNodes = byPart(g, analysis.NodeWaveScope([]string{"scrape-node-a", "scrape-node-b"}, nil, all, "1-28-2", "1-27-3", 30*time.Second).Canary)
		g.Expect(newRev).To(HaveLen(1))
		g.Expect(oldRev).To(HaveLen(1))
		g.Expect(bothNodes).To(HaveLen(4))
		g.Expect(bothNodes["shop-staging on scrape-node-b"]).To(BeNumerically("<", 0.99))
	}).WithTimeout(20 * time.Second).WithPolling(250 * time.Millisecond).Should(Succeed())
	t.Logf("the default SLO by part: namespace wave on 1-28-2 %v, on 1-27-3 %v, node wave of both nodes %v", newRev, oldRev, bothNodes)
	g.Expect(newRev).To(Equal(map[string]float64{"shop": 1}), "the namespace on the new revision, alone")
	g.Expect(oldRev).To(HaveKeyWithValue("shop-staging", BeNumerically("~", 0.95, 0.025)))
	g.Expect(bothNodes).To(And(HaveKeyWithValue("shop on scrape-node-a", 1.0), HaveKeyWithValue("shop on scrape-node-b", 1.0),
		HaveKeyWithValue("shop-staging on scrape-node-a", 1.0), HaveKeyWithValue("shop-staging on scrape-node-b", BeNumerically("~", 0.9, 0.02))))

	// The default SLO itself, as the controller asks it.
	p, err := analysis.NewPrometheus(srv.URL, analysis.PrometheusOptions{Timeout: 5 * time.Second})
	g.Expect(err).NotTo(HaveOccurred())
	judge := func(scope analysis.Scope) analysis.Result {
		return analysis.EvaluateScope(ctx, p, analysis.DefaultSLOs(), scope, time.Now())[0]
	}
	nodeA := judge(analysis.NodeWaveScope([]string{"scrape-node-a"}, []string{"scrape-node-b"}, all, "1-28-2", "1-27-3", 30*time.Second))
	g.Expect(nodeA.Verdict).To(Equal(meshv1.VerdictPass), nodeA.Message)
	nodeB := judge(analysis.NodeWaveScope([]string{"scrape-node-b"}, []string{"scrape-node-a"}, all, "1-28-2", "1-27-3", 30*time.Second))
	g.Expect(nodeB.Verdict).To(Equal(meshv1.VerdictFail), nodeB.Message)
	g.Expect(nodeB.Message).To(HaveSuffix("(workload_namespace=shop-staging, workload_node=scrape-node-b)"))
	moved := judge(analysis.NamespaceWaveScope([]string{"shop"}, "1-28-2", "1-27-3", true, 30*time.Second))
	g.Expect(moved.Verdict).To(Equal(meshv1.VerdictPass), "shop runs 1-28-2 and is healthy: %s", moved.Message)
	notMoved := judge(analysis.NamespaceWaveScope([]string{"shop-staging"}, "1-27-3", "1-26-4", true, 30*time.Second))
	g.Expect(notMoved.Verdict).To(Equal(meshv1.VerdictFail), notMoved.Message)
	g.Expect(notMoved.Message).To(ContainSubstring("workload_namespace=shop-staging"))
	t.Log(fmt.Sprintf("node wave of node b: %s; namespace wave on 1-27-3: %s", nodeB.Message, notMoved.Message))
}
