package prom_test

import (
	"context"
	"io"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/prom"
)

func TestWorkloadExportsInitialisedSeriesAndTheRatio(t *testing.T) {
	g := NewWithT(t)
	w := prom.NewWorkload(t)
	w.SetRatio("shop", 0.9)

	body := scrape(t, w.URL)
	for _, r := range prom.Results {
		g.Expect(body).To(ContainSubstring(`meshkeeper_agent_connections_total{result="` + r + `",workload_namespace="shop",workload_node="workload-node",workload_pod="workload-0",workload_revision=""}`))
	}

	g.Eventually(func() float64 { return w.Counts("shop")["ok"] }).WithTimeout(5 * time.Second).Should(BeNumerically(">=", 3*prom.ConnectionsPerTick*0.9))
	c := w.Counts("shop")
	total := c["ok"] + c["refused"] + c["reset"] + c["timeout"]
	g.Expect(c["ok"] / total).To(BeNumerically("~", 0.9, 1e-9))
	g.Expect(c["refused"]).To(BeNumerically("~", c["timeout"], 1e-9))

	w.Close()
	w.Close() // idempotent
	stopped := w.Counts("shop")["ok"]
	time.Sleep(2 * prom.Tick)
	g.Expect(w.Counts("shop")["ok"]).To(Equal(stopped), "a closed workload stops counting")
}

func TestStartRefusesTargetsOffLoopback(t *testing.T) {
	for _, target := range []string{"10.0.0.1:9100", "prometheus.monitoring:9090", "127.0.0.1"} {
		_, err := prom.Start(context.Background(), t, target)
		NewWithT(t).Expect(err).To(MatchError(ContainSubstring(target)))
	}
}

func TestPrometheusScrapesTheWorkload(t *testing.T) {
	g := NewWithT(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w := prom.NewWorkload(t)
	w.SetRatio("shop", 1)

	s, err := prom.Start(ctx, t, w.Addr)
	g.Expect(err).NotTo(HaveOccurred())
	t.Logf("Prometheus ready in %s at %s", s.Ready, s.URL)
	took, err := s.WaitForScrapes(ctx, 20*time.Second)
	g.Expect(err).NotTo(HaveOccurred(), s.Logs())
	t.Logf("first scrape of the workload queryable %s after ready", took)

	v, _, err := s.API().Query(ctx, `count(meshkeeper_agent_connections_total{workload_namespace="shop"})`, time.Now())
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(v).To(HaveLen(1))
	g.Expect(v.(model.Vector)[0].Value).To(BeEquivalentTo(len(prom.Results)))

	g.Expect(s.Stop()).To(Succeed())
	g.Expect(s.Stop()).To(Succeed(), "Stop is idempotent")
	_, _, err = s.API().Query(ctx, `up`, time.Now())
	g.Expect(err).To(MatchError(ContainSubstring("connection refused")))
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "# TYPE meshkeeper_agent_connections_total counter") {
		t.Fatalf("scrape %s: %s\n%s", url, resp.Status, b)
	}
	return string(b)
}

// TestLocalTargetsRegex: the keep rule StartKubernetesSD appends lets
// through loopback and the real node's pod network, and nothing kwok makes
// up (its pod CIDR, the harness's default node addresses).
func TestLocalTargetsRegex(t *testing.T) {
	g := NewWithT(t)
	re := regexp.MustCompile("^(?:" + prom.LocalTargetsRegex + ")$") // anchored, as Prometheus does
	pods := netip.MustParsePrefix(cluster.RealNodePodCIDR)
	for a := pods.Addr(); pods.Contains(a); a = a.Next() {
		g.Expect(re.MatchString(a.String()+":9102")).To(BeTrue(), a.String())
	}
	for _, ok := range []string{"127.0.0.1:9090", "127.0.43.17:41234"} {
		g.Expect(re.MatchString(ok)).To(BeTrue(), ok)
	}
	for _, off := range []string{"10.244.0.7:9102", "10.89.0.2:9102", "10.213.1.5:9102", "110.213.0.5:9102", "10.0.0.1:443", "192.168.1.1:9102"} {
		g.Expect(re.MatchString(off)).To(BeFalse(), off)
	}
}
