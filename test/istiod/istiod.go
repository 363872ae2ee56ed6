//go:build linux

// Package istiod runs a real istiod (pilot-discovery, built from the pinned
// istio.io/istio module by hack/istiod.sh) as a host process against a test
// cluster (test/cluster), so tests can assert what istiod itself does with
// what meshkeeper writes. It is bounded (the process is killed when the
// test ends, and by the kernel if the test binary dies) and leaves nothing
// on the machine: its working directory and log are the test's temp dir.
package istiod

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// BinEnv names the pilot-discovery binary to use instead of
// <repo>/bin/istiod/pilot-discovery.
const BinEnv = "MESHKEEPER_ISTIOD_BIN"

// Binary is the pilot-discovery to run, or an error saying how to build it.
func Binary() (string, error) {
	if b := os.Getenv(BinEnv); b != "" {
		return b, nil
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	b := filepath.Join(root, "bin", "istiod", "pilot-discovery")
	if _, err := os.Stat(b); err != nil {
		return "", fmt.Errorf("pilot-discovery not found at %s: run hack/istiod.sh (or make istiod), or set %s", b, BinEnv)
	}
	return b, nil
}

// SkipIfUnavailable skips the test when pilot-discovery is not built, and
// fails it instead when MESHKEEPER_REQUIRE_CLUSTER=1 (make test, CI).
func SkipIfUnavailable(t testing.TB) string {
	t.Helper()
	b, err := Binary()
	if err != nil {
		if os.Getenv(cluster.RequireEnv) == "1" {
			t.Fatalf("%v (%s=1 makes this a failure)", err, cluster.RequireEnv)
		}
		t.Skipf("%v; set %s=1 to fail instead of skipping", err, cluster.RequireEnv)
	}
	return b
}

// Options says which istiod to run.
type Options struct {
	// Revision is the control-plane revision it serves (istio.io/rev), the
	// one of the istiod release meshkeeper installed, e.g. 1-28-2: istiod
	// reads that release's istio-<rev> and istio-sidecar-injector-<rev>
	// ConfigMaps (the waypoint template among them).
	Revision string
	// Namespace is the components' namespace (istio-system by default).
	Namespace string
	// WebhookPort, if set, is the 127.0.0.1 port istiod serves its webhooks
	// (sidecar injection, config validation) on, so the istiod chart can be
	// pointed at it before istiod starts: chart value webhooks.url =
	// WebhookURL(port). Zero: a free port nothing calls.
	WebhookPort int
}

// WebhookURL is the base URL the API server calls an istiod started with
// Options.WebhookPort = port at (the istiod chart's webhooks.url): the
// host is localhost, on loopback, which istiod puts in its serving
// certificate (Start sets ISTIOD_CUSTOM_HOST=localhost).
func WebhookURL(port int) string {
	return fmt.Sprintf("https://localhost:%d", port)
}

// Istiod is a running pilot-discovery.
type Istiod struct {
	cmd     *exec.Cmd
	done    chan struct{}
	LogPath string
	// HTTPAddr serves /ready and the debug endpoints.
	HTTPAddr string
	// MonitoringAddr serves istiod's Prometheus metrics (/metrics).
	MonitoringAddr string
}

// Start runs pilot-discovery against c and waits until it is ready. The
// process is stopped when t ends.
func Start(ctx context.Context, t testing.TB, c *cluster.Cluster, opts Options) (*Istiod, error) {
	t.Helper()
	bin := SkipIfUnavailable(t)
	if opts.Namespace == "" {
		opts.Namespace = "istio-system"
	}
	ports, err := cluster.FreePorts(5)
	if err != nil {
		return nil, err
	}
	if opts.WebhookPort != 0 {
		ports[4] = opts.WebhookPort
	}
	addr := func(i int) string { return fmt.Sprintf("127.0.0.1:%d", ports[i]) }
	dir := t.TempDir()
	logPath := filepath.Join(dir, "istiod.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	args := []string{"discovery",
		"--kubeconfig", c.KubeconfigPath,
		"--httpAddr", addr(0), "--grpcAddr", addr(1), "--secureGRPCAddr", addr(2),
		"--monitoringAddr", addr(3), "--httpsAddr", addr(4),
		"--domain", "cluster.local",
		"--ctrlz_port", "0",
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(),
		"POD_NAMESPACE="+opts.Namespace,
		"POD_NAME=istiod-test",
		"REVISION="+opts.Revision,
		"PILOT_ENABLE_AMBIENT=true",
		"ISTIOD_CUSTOM_HOST=localhost",
		"KUBECONFIG="+c.KubeconfigPath,
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, SIGKILLed by the kernel if the test dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	d := &Istiod{cmd: cmd, done: make(chan struct{}), LogPath: logPath, HTTPAddr: addr(0), MonitoringAddr: addr(3)}
	go func() {
		_ = cmd.Wait()
		_ = logf.Close()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			t.Logf("istiod log (%s), last lines:\n%s", logPath, d.LogTail(60))
		}
	})
	if err := d.waitReady(ctx, 90*time.Second); err != nil {
		d.Stop()
		return nil, fmt.Errorf("istiod not ready: %w; last log lines:\n%s", err, d.LogTail(40))
	}
	return d, nil
}

// waitReady polls istiod's /ready until it answers 200, it exits, or the
// timeout passes.
func (d *Istiod) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Timeout: 2 * time.Second}
	for {
		select {
		case <-d.done:
			return fmt.Errorf("pilot-discovery exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
		resp, err := hc.Get("http://" + d.HTTPAddr + "/ready")
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
	}
}

// Stop kills the process group and waits for it.
func (d *Istiod) Stop() {
	select {
	case <-d.done:
		return
	default:
	}
	_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
	}
}

// LogTail is the last n lines of istiod's log.
func (d *Istiod) LogTail(n int) string {
	raw, err := os.ReadFile(d.LogPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Metric is the sum of istiod's samples of metric name (Prometheus text
// from its monitoring port) whose labels include every pair of want; -1 if
// the metrics cannot be read. A series istiod has not created yet counts 0.
func (d *Istiod) Metric(name string, want map[string]string) float64 {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + d.MonitoringAddr + "/metrics")
	if err != nil {
		return -1
	}
	defer func() { _ = resp.Body.Close() }()
	raw, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return -1
	}
	var sum float64
	for _, line := range strings.Split(string(raw), "\n") {
		series, value, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		metric, labels, _ := strings.Cut(series, "{")
		if metric != name {
			continue
		}
		match := true
		for k, v := range want {
			if !strings.Contains(labels, fmt.Sprintf("%s=%q", k, v)) {
				match = false
				break
			}
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(value), 64); match && err == nil {
			sum += f
		}
	}
	return sum
}
