package realnode

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

// brokenNS is a meshed namespace whose one client connects to a port
// nothing listens on: every connection it tries fails.
const brokenNS = "apps-broken"

// expectScrapedThroughTheShippedConfig: a real Prometheus with the shipped
// scrape config (config/prometheus/scrape-config.yaml, pod service
// discovery against the cluster's API server) finds the real agent pod on
// the real node and scrapes it; the agent's own series, counted by its
// eBPF programs, arrive with their workload_* labels unrenamed; and the
// default SLO, as the controller expands it, gives one value per meshed
// namespace on the node and fails a node wave of the real node, naming the
// namespace whose connections fail.
func expectScrapedThroughTheShippedConfig(ctx context.Context) {
	GinkgoHelper()
	prom.SkipIfUnavailable(GinkgoT())
	snippet, err := os.ReadFile(filepath.Join(root, prom.ScrapeConfigPath))
	Expect(err).NotTo(HaveOccurred())

	// A port on the harness's bridge address that nothing listens on.
	l, err := net.Listen("tcp", net.JoinHostPort(cluster.RealNodeBridgeIP, "0"))
	Expect(err).NotTo(HaveOccurred())
	closed := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	Expect(l.Close()).To(Succeed())

	Expect(kc.CreateNamespace(ctx, brokenNS, map[string]string{"mesh": "on"})).To(Succeed())
	DeferCleanup(func(ctx SpecContext) {
		kubectl(ctx, "delete", "namespace", brokenNS, "--wait", "--timeout=120s")
	})
	// Enrolled by meshkeeper before its pod starts, so the pod is enrolled
	// at CNI time.
	Eventually(func(g Gomega) {
		var ns corev1.Namespace
		g.Expect(kc.Client.Get(ctx, client.ObjectKey{Name: brokenNS}, &ns)).To(Succeed())
		g.Expect(ns.Labels).To(HaveKeyWithValue(meshv1.LabelDataplaneMode, "ambient"))
		g.Expect(ns.Labels).To(HaveKey(meshv1.LabelRevision))
	}).WithContext(ctx).WithTimeout(60 * time.Second).Should(Succeed())
	broken := clientPod("broken-client", cluster.RealNodeBridgeIP+":"+closed)
	broken.Namespace = brokenNS
	Expect(kc.Client.Create(ctx, broken)).To(Succeed())
	waitPodIP(ctx, brokenNS, broken.Name)

	var apps corev1.Namespace
	Expect(kc.Client.Get(ctx, client.ObjectKey{Name: appsNS}, &apps)).To(Succeed())
	revision := apps.Labels[meshv1.LabelRevision]
	Expect(revision).NotTo(BeEmpty())

	srv, err := prom.StartKubernetesSD(ctx, GinkgoT(), snippet, kc.KubeconfigPath)
	Expect(err).NotTo(HaveOccurred())
	took, err := srv.WaitForTargets(ctx, "meshkeeper-agent", 1, time.Minute)
	Expect(err).NotTo(HaveOccurred(), srv.Logs())
	GinkgoWriter.Printf("the real agent pod found through pod SD and scraped %s after Prometheus was ready\n", took.Round(time.Millisecond))

	// The one target is the real agent pod, with its own target labels.
	agentPod := agentPodOnRealNode(Default, ctx)
	targets, err := srv.ActiveTargets(ctx)
	Expect(err).NotTo(HaveOccurred())
	var scraped []model.LabelSet
	for _, at := range targets {
		if at.Labels["job"] == "meshkeeper-agent" && at.Health == "up" {
			scraped = append(scraped, at.Labels)
			Expect(at.ScrapeURL).To(Equal("http://" + net.JoinHostPort(agentPod.Status.PodIP, "9102") + "/metrics"))
		}
	}
	Expect(scraped).To(ConsistOf(And(
		HaveKeyWithValue(model.LabelName("namespace"), model.LabelValue("istio-system")),
		HaveKeyWithValue(model.LabelName("pod"), model.LabelValue(agentPod.Name)),
		HaveKeyWithValue(model.LabelName("node"), model.LabelValue(realNode)))))

	query := func(g Gomega, q string) model.Vector {
		v, _, err := srv.API().Query(ctx, q, time.Now())
		g.Expect(err).NotTo(HaveOccurred(), q)
		return v.(model.Vector)
	}
	// The agent's labels arrive as the agent wrote them.
	Eventually(func(g Gomega) {
		vec := query(g, `meshkeeper_agent_connections_total{result="ok"}`)
		byNS := map[string]model.Metric{}
		for _, s := range vec {
			byNS[string(s.Metric["workload_namespace"])] = s.Metric
		}
		g.Expect(byNS).To(HaveKey(appsNS))
		g.Expect(byNS).To(HaveKey(brokenNS))
		for _, m := range byNS {
			g.Expect(m).To(HaveKeyWithValue(model.LabelName("workload_node"), model.LabelValue(realNode)))
			g.Expect(m).To(HaveKeyWithValue(model.LabelName("workload_revision"), model.LabelValue(revision)))
			g.Expect(m).To(HaveKeyWithValue(model.LabelName("namespace"), model.LabelValue("istio-system")), "the target label, the agent's namespace")
			g.Expect(m).NotTo(HaveKey(model.LabelName("exported_namespace")))
			g.Expect(m).NotTo(HaveKey(model.LabelName("exported_pod")))
		}
	}).WithContext(ctx).WithTimeout(30 * time.Second).WithPolling(500 * time.Millisecond).Should(Succeed())

	// The default SLO part by part, as the controller expands it for a node
	// wave of the real node: one value per meshed namespace there. apps
	// may still have failures of the earlier specs' restarts in its 1m
	// window; wait until they are out of it.
	nodeWave := analysis.NodeWaveScope([]string{realNode}, nil, []string{appsNS, brokenNS}, revision, "", 30*time.Second)
	byPart, err := analysis.ExpandQuery(analysis.DefaultL4SuccessByPartQuery, nodeWave.Canary)
	Expect(err).NotTo(HaveOccurred())
	var parts map[string]float64
	Eventually(func(g Gomega) {
		parts = map[string]float64{}
		for _, s := range query(g, byPart) {
			g.Expect(s.Metric["workload_node"]).To(BeEquivalentTo(realNode))
			ns := string(s.Metric["workload_namespace"])
			g.Expect(parts).NotTo(HaveKey(ns), "one value per namespace")
			parts[ns] = float64(s.Value)
		}
		g.Expect(parts).To(HaveLen(2))
		g.Expect(parts[appsNS]).To(BeNumerically(">=", 0.99))
		g.Expect(parts[brokenNS]).To(BeNumerically("<", 0.99))
	}).WithContext(ctx).WithTimeout(90 * time.Second).WithPolling(time.Second).Should(Succeed())
	GinkgoWriter.Printf("the default SLO by namespace on %s, from the real agent's counters through pod SD: %v\n", realNode, parts)

	// The default SLO itself.
	p, err := analysis.NewPrometheus(srv.URL, analysis.PrometheusOptions{Timeout: 5 * time.Second})
	Expect(err).NotTo(HaveOccurred())
	r := analysis.EvaluateScope(ctx, p, analysis.DefaultSLOs(), nodeWave, time.Now())[0]
	GinkgoWriter.Printf("node wave of %s: %s\n", realNode, r.Message)
	Expect(r.Verdict).To(Equal(meshv1.VerdictFail), r.Message)
	Expect(r.Message).To(HaveSuffix("(workload_namespace=" + brokenNS + ", workload_node=" + realNode + ")"))
	r = analysis.EvaluateScope(ctx, p, analysis.DefaultSLOs(), analysis.NamespaceWaveScope([]string{brokenNS}, revision, "", false, 30*time.Second), time.Now())[0]
	Expect(r.Verdict).To(Equal(meshv1.VerdictFail), r.Message)
	Expect(r.Message).To(HaveSuffix("(workload_namespace=" + brokenNS + ")"))
}
