// Package prom runs a real Prometheus server for tests: the one
// hack/prometheus.sh builds from the pinned github.com/prometheus/prometheus
// module (bin/prometheus; make test and make demo build it), on 127.0.0.1 with a free port, a temporary TSDB and a
// 1s scrape interval, scraping loopback targets only, plus a tiny workload
// exporting the node agent's meshkeeper_agent_connections_total with a
// success ratio per namespace that the test sets.
//
// Everything is bounded in time and stopped when the test ends. Without the
// binary, Start skips the test, or fails it when MESHKEEPER_REQUIRE_CLUSTER=1
// (CI), the same convention as test/cluster.
package prom

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/api"
	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/common/model"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// RequireEnv, when "1", turns a missing Prometheus binary into a test
// failure instead of a skip. It is test/cluster's variable: CI sets it.
const RequireEnv = "MESHKEEPER_REQUIRE_CLUSTER"

// BinaryEnv overrides the Prometheus binary (default: bin/prometheus of the
// repository, built by hack/prometheus.sh).
const BinaryEnv = "MESHKEEPER_PROMETHEUS_BIN"

// howToBuild says how to get the binary.
const howToBuild = "run hack/prometheus.sh (make test and make demo do), which builds it from the pinned module in tools/prometheus"

// ScrapeInterval is the scrape (and evaluation) interval of the server.
const ScrapeInterval = time.Second

const (
	readyTimeout = 15 * time.Second
	stopTimeout  = 5 * time.Second
	startTries   = 3
)

// Binary is the Prometheus binary Start runs.
func Binary() string {
	if b := os.Getenv(BinaryEnv); b != "" {
		return b
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return filepath.Join("bin", "prometheus")
	}
	return filepath.Join(root, "bin", "prometheus")
}

// TB is the part of testing.TB the harness uses; a *testing.T is one, and
// so is a program's own adapter (make demo runs Prometheus too).
type TB interface {
	Helper()
	Skipf(format string, args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// SkipIfUnavailable skips the test when the Prometheus binary is missing,
// unless MESHKEEPER_REQUIRE_CLUSTER=1, in which case it fails. It returns
// the binary.
func SkipIfUnavailable(t TB) string {
	t.Helper()
	bin := Binary()
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("Prometheus binary %s is missing (%s=1): %s, or set %s", bin, RequireEnv, howToBuild, BinaryEnv)
		}
		t.Skipf("Prometheus binary %s is missing: %s, or set %s (set %s=1 to fail instead of skipping)", bin, howToBuild, BinaryEnv, RequireEnv)
	}
	return bin
}

// Server is a running Prometheus.
type Server struct {
	// URL is the base URL of the HTTP API, e.g. http://127.0.0.1:41234.
	URL string
	// Addr is its host:port.
	Addr string
	// Targets are the scraped host:port targets (job "workload").
	Targets []string
	// Ready is how long the server took from exec to answering /-/ready.
	Ready time.Duration

	dir     string
	logPath string
	cmd     *exec.Cmd
	log     *os.File
	done    chan struct{}
	waitErr error

	api promv1.API

	stopOnce sync.Once
	stopErr  error
}

// Start runs Prometheus on 127.0.0.1 scraping targets (loopback host:port
// pairs, e.g. a Workload's Addr) every second, and returns once it answers
// /-/ready. The TSDB lives in a temporary directory; the server is stopped
// when the test ends (or earlier with Stop). Without the binary the test
// is skipped (see SkipIfUnavailable).
func Start(ctx context.Context, t TB, targets ...string) (*Server, error) {
	t.Helper()
	for _, target := range targets {
		if err := checkLoopback(target); err != nil {
			return nil, err
		}
	}
	return startWithConfig(ctx, t, config(targets), targets)
}

// startWithConfig runs the Prometheus binary with config (retrying a start
// whose port was taken) and stops it when the test ends; targets are the
// static ones the config scrapes, if any.
func startWithConfig(ctx context.Context, t TB, config string, targets []string) (*Server, error) {
	bin := SkipIfUnavailable(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		return nil, fmt.Errorf("prom: write config: %w", err)
	}
	var lastErr error
	for try := 1; try <= startTries; try++ {
		s, err := start(ctx, bin, dir, cfg, targets, try)
		if err == nil {
			t.Cleanup(func() {
				if err := s.Stop(); err != nil {
					t.Errorf("prom: %v", err)
				}
			})
			return s, nil
		}
		lastErr = err
		if !errors.Is(err, errPortTaken) {
			break
		}
	}
	return nil, lastErr
}

var errPortTaken = errors.New("port taken")

func start(ctx context.Context, bin, dir, cfg string, targets []string, try int) (*Server, error) {
	port, err := cluster.FreePort()
	if err != nil {
		return nil, fmt.Errorf("prom: find a free port: %w", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	client, err := api.NewClient(api.Config{Address: "http://" + addr})
	if err != nil {
		return nil, fmt.Errorf("prom: client for %s: %w", addr, err)
	}
	logPath := filepath.Join(dir, fmt.Sprintf("prometheus-%d.log", try))
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("prom: %w", err)
	}
	args := []string{
		"--config.file=" + cfg,
		"--storage.tsdb.path=" + filepath.Join(dir, "data"),
		"--storage.tsdb.retention.time=1h",
		"--web.listen-address=" + addr,
		"--log.level=info",
	}
	fmt.Fprintf(f, "# %s %s\n", bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = sysProcAttr()
	began := time.Now()
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("prom: start %s: %w", bin, err)
	}
	s := &Server{
		URL: "http://" + addr, Addr: addr, Targets: targets,
		dir: dir, logPath: logPath, cmd: cmd, log: f, done: make(chan struct{}), api: promv1.NewAPI(client),
	}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.done)
	}()
	if err := s.waitReady(ctx); err != nil {
		_ = s.Stop()
		if strings.Contains(s.Logs(), "address already in use") {
			return nil, fmt.Errorf("prom: %s: %w", addr, errPortTaken)
		}
		return nil, fmt.Errorf("prom: %w\n%s", err, tail(s.Logs(), 20))
	}
	s.Ready = time.Since(began)
	return s, nil
}

func (s *Server) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/-/ready", nil)
		if err != nil {
			return err
		}
		if resp, err := client.Do(req); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-s.done:
			return fmt.Errorf("prometheus exited before it was ready (%s)", exitText(s.waitErr))
		case <-ctx.Done():
			return fmt.Errorf("prometheus at %s not ready after %s: %w", s.URL, readyTimeout, ctx.Err())
		case <-tick.C:
		}
	}
}

// API is a client of the server's HTTP API.
func (s *Server) API() promv1.API { return s.api }

// WaitForScrapes waits until every target has been scraped successfully
// (up == 1 for each; its samples are queryable from then on) and returns
// how long that took. It polls every 200ms for at most timeout.
func (s *Server) WaitForScrapes(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	a := s.API()
	want := len(s.Targets)
	var last string
	for {
		v, _, err := a.Query(ctx, `count(up{job="workload"} == 1)`, time.Now())
		switch {
		case err != nil:
			last = err.Error()
		default:
			if vec, ok := v.(model.Vector); ok && len(vec) == 1 && int(vec[0].Value) == want {
				return time.Since(began), nil
			}
			last = "result " + v.String()
		}
		select {
		case <-s.done:
			return 0, fmt.Errorf("prom: prometheus exited (%s)", exitText(s.waitErr))
		case <-ctx.Done():
			return 0, fmt.Errorf("prom: %d target(s) not all scraped after %s (last: %s)", want, timeout, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Logs is the server's log so far.
func (s *Server) Logs() string {
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(log %s: %v)", s.logPath, err)
	}
	return string(data)
}

// Stop terminates the server (SIGTERM, SIGKILL after 5s) and waits for it.
// It may be called more than once; the test's cleanup calls it too.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		defer s.log.Close()
		pid := s.cmd.Process.Pid
		_ = syscall.Kill(-pid, syscall.SIGTERM)
		select {
		case <-s.done:
			return
		case <-time.After(stopTimeout):
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		select {
		case <-s.done:
		case <-time.After(stopTimeout):
			s.stopErr = fmt.Errorf("prometheus (pid %d) did not exit after SIGKILL", pid)
		}
	})
	return s.stopErr
}

func config(targets []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "global:\n  scrape_interval: %s\n  scrape_timeout: %s\n  evaluation_interval: %s\n",
		model.Duration(ScrapeInterval), model.Duration(ScrapeInterval), model.Duration(ScrapeInterval))
	b.WriteString("scrape_configs:\n  - job_name: workload\n    static_configs:\n      - targets: [")
	for i, t := range targets {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Quote(t))
	}
	b.WriteString("]\n")
	return b.String()
}

func checkLoopback(target string) error {
	host, port, err := net.SplitHostPort(target)
	if err != nil || port == "" {
		return fmt.Errorf("prom: target %q must be host:port on the loopback interface, e.g. 127.0.0.1:9100", target)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("prom: target %q is not on the loopback interface; tests scrape 127.0.0.1 only", target)
	}
	return nil
}

func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
