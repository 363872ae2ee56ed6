package prom

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/common/model"
)

// ScrapeConfigPath is the shipped scrape-config snippet, relative to the
// repository root.
const ScrapeConfigPath = "config/prometheus/scrape-config.yaml"

// LocalTargetsRegex matches the target addresses (host:port) a test
// Prometheus may scrape: loopback (the stand-ins on kwok nodes with
// loopback InternalIPs) and the real node's pod network
// (cluster.RealNodePodCIDR, 10.213.0.0/24, a bridge the harness makes).
// The pods kwok "runs" get made-up addresses (10.244.0.0/16) that lead off
// this machine.
const LocalTargetsRegex = `(127\.[0-9]+\.[0-9]+\.[0-9]+|10\.213\.0\.[0-9]+):[0-9]+`

// localTargetsOnly is the relabel rule StartKubernetesSD appends to every
// job, after the job's own rules.
var localTargetsOnly = map[string]any{"source_labels": []any{"__address__"}, "regex": LocalTargetsRegex, "action": "keep"}

// StartKubernetesSD runs Prometheus (on 127.0.0.1, a 1s scrape interval)
// with the scrape jobs of snippet, a YAML list of scrape_configs such as
// config/prometheus/scrape-config.yaml, as written with two additions:
// each kubernetes_sd_configs entry is pointed at a cluster through
// kubeconfig (in a cluster, Prometheus uses its pod's service account
// instead), and each job's relabel_configs end with one more keep rule,
// LocalTargetsRegex on __address__, so that no scrape leaves this machine
// (the node agent's real pods on kwok nodes have addresses nothing
// answers). That rule only ever drops: which pods and ports are scraped,
// and the target labels, are the snippet's. The server is stopped when the
// test ends.
func StartKubernetesSD(ctx context.Context, t TB, snippet []byte, kubeconfig string) (*Server, error) {
	t.Helper()
	var jobs []map[string]any
	if err := yaml.Unmarshal(snippet, &jobs); err != nil {
		return nil, fmt.Errorf("prom: the scrape config is not a YAML list of scrape_configs: %w", err)
	}
	if len(jobs) == 0 {
		return nil, errors.New("prom: the scrape config has no jobs")
	}
	for _, job := range jobs {
		sds, _ := job["kubernetes_sd_configs"].([]any)
		if len(sds) == 0 {
			return nil, fmt.Errorf("prom: job %v has no kubernetes_sd_configs", job["job_name"])
		}
		for _, sd := range sds {
			m, ok := sd.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("prom: job %v: a kubernetes_sd_configs entry is not a map", job["job_name"])
			}
			m["kubeconfig_file"] = kubeconfig
		}
		rcs, _ := job["relabel_configs"].([]any)
		job["relabel_configs"] = append(rcs, localTargetsOnly)
	}
	cfg := map[string]any{
		"global": map[string]any{
			"scrape_interval":     model.Duration(ScrapeInterval).String(),
			"scrape_timeout":      model.Duration(ScrapeInterval).String(),
			"evaluation_interval": model.Duration(ScrapeInterval).String(),
		},
		"scrape_configs": jobs,
	}
	text, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("prom: %w", err)
	}
	s, err := StartWithConfig(ctx, t, string(text))
	if err != nil && strings.Contains(err.Error(), "field kubernetes_sd_configs not found") {
		// Debian's prometheus package is built without Kubernetes service
		// discovery; the upstream build (the pinned module's
		// cmd/prometheus) has it.
		msg := fmt.Sprintf("Prometheus %s has no Kubernetes service discovery (Debian's package is built without it, and so is a build "+
			"with -tags remove_all_sd alone): use a build of github.com/prometheus/prometheus/cmd/prometheus without tags or with "+
			"-tags remove_all_sd,enable_kubernetes_sd, through %s", Binary(), BinaryEnv)
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("%s (%s=1)", msg, RequireEnv)
		}
		t.Skipf("%s (set %s=1 to fail instead of skipping)", msg, RequireEnv)
	}
	return s, err
}

// StartWithConfig runs Prometheus with a whole prometheus.yml, like Start.
func StartWithConfig(ctx context.Context, t TB, config string) (*Server, error) {
	t.Helper()
	return startWithConfig(ctx, t, config, nil)
}

// WaitForTargets waits until n targets of job are up (up == 1) and returns
// how long that took. It polls every 200ms for at most timeout.
func (s *Server) WaitForTargets(ctx context.Context, job string, n int, timeout time.Duration) (time.Duration, error) {
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	q := fmt.Sprintf(`count(up{job=%q} == 1)`, job)
	var last string
	for {
		v, _, err := s.API().Query(ctx, q, time.Now())
		switch {
		case err != nil:
			last = err.Error()
		default:
			if vec, ok := v.(model.Vector); ok && len(vec) == 1 && int(vec[0].Value) == n {
				return time.Since(began), nil
			}
			last = "result " + v.String()
		}
		select {
		case <-s.done:
			return 0, fmt.Errorf("prom: prometheus exited (%s)", exitText(s.waitErr))
		case <-ctx.Done():
			return 0, fmt.Errorf("prom: %d target(s) of job %s not all up after %s (last: %s); targets: %s", n, job, timeout, last, s.targetsText(job))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// targetsText lists the active targets of job with their health, for
// failure messages.
func (s *Server) targetsText(job string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	res, err := s.API().Targets(ctx)
	if err != nil {
		return err.Error()
	}
	out := ""
	for _, at := range res.Active {
		if string(at.Labels["job"]) != job {
			continue
		}
		out += fmt.Sprintf("%s %s %s; ", at.ScrapeURL, at.Health, at.LastError)
	}
	if out == "" {
		return "none"
	}
	return out
}

// ActiveTargets are the server's active targets.
func (s *Server) ActiveTargets(ctx context.Context) ([]promv1.ActiveTarget, error) {
	res, err := s.API().Targets(ctx)
	if err != nil {
		return nil, err
	}
	return res.Active, nil
}

// StandInAgentPod is a pod that stands in for the node agent's pod on a
// fake (kwok) node, as the shipped scrape config finds it: labelled
// meshkeeper.dev/component=node-agent with a container port named metrics.
// It runs in the host network, so its pod IP is the node's InternalIP: give
// the node a loopback InternalIP (127.x.y.z) and serve the agent's metrics
// there, e.g. with NewWorkloadOn(t, node, "127.x.y.z:0"), whose port the
// pod then declares. kwok never runs its container.
func StandInAgentPod(namespace, node, addr string) (*corev1.Pod, error) {
	_, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("prom: stand-in agent address %q: %w", addr, err)
	}
	port, err := strconv.ParseInt(portText, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("prom: stand-in agent port %q: %w", portText, err)
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: namespace,
			Name:      "agent-stand-in-" + node,
			Labels:    map[string]string{"meshkeeper.dev/component": "node-agent", "app": "agent-stand-in"},
		},
		Spec: corev1.PodSpec{
			NodeName:    node,
			HostNetwork: true,
			Containers: []corev1.Container{{
				Name:  "agent",
				Image: "ghcr.io/meshkeeper/agent:stand-in",
				Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: int32(port), Protocol: corev1.ProtocolTCP}},
			}},
			Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
		},
	}, nil
}
