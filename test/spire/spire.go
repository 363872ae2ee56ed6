// Package spire runs a real spire-server and spire-agent for tests, built
// from the pinned SPIRE module by hack/spire-bins.sh (bin/spire in the
// repository, or $MESHKEEPER_SPIRE_BINS).
//
// The server runs on 127.0.0.1 with the sqlite datastore and the memory
// KeyManager, with the join_token node attestor and, given a kubeconfig, the
// k8s_psat node attestor validating agents against that cluster's API server.
// Sockets live in a short directory under /tmp (unix socket paths are limited
// to 108 bytes). Everything a test starts is stopped in t.Cleanup.
package spire

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
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

// BinEnv overrides where spire-server and spire-agent are found.
const BinEnv = "MESHKEEPER_SPIRE_BINS"

// BinDir is $MESHKEEPER_SPIRE_BINS, else <repo root>/bin/spire.
func BinDir() (string, error) {
	if d := os.Getenv(BinEnv); d != "" {
		return d, nil
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin", "spire"), nil
}

// SkipIfUnavailable skips the test when the SPIRE binaries are not built,
// or fails it when MESHKEEPER_REQUIRE_CLUSTER=1 (CI). It returns their
// directory.
func SkipIfUnavailable(t testing.TB) string {
	t.Helper()
	dir, err := BinDir()
	if err != nil {
		t.Fatalf("spire: %v", err)
	}
	for _, b := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			msg := fmt.Sprintf("spire: %s missing from %s: run hack/spire-bins.sh", b, dir)
			if os.Getenv(cluster.RequireEnv) == "1" {
				t.Fatalf("%s (%s=1)", msg, cluster.RequireEnv)
			}
			t.Skipf("SKIP: %s (set %s=1 to fail instead)", msg, cluster.RequireEnv)
		}
	}
	return dir
}

// ServerOptions configure StartServer.
type ServerOptions struct {
	// TrustDomain, default example.org.
	TrustDomain string
	// Kubeconfig enables the k8s_psat node attestor for the cluster named
	// identity.ClusterName ("meshkeeper"), validating tokens of the service
	// account PSATServiceAccount against that cluster.
	Kubeconfig string
	// PSATServiceAccount is "namespace:name" of the agents' service account.
	PSATServiceAccount string
	// DefaultSVIDTTL, default 1h.
	DefaultSVIDTTL time.Duration
}

// Server is a running spire-server.
type Server struct {
	BinDir      string
	Dir         string
	Socket      string // admin API socket
	Address     string // agent API, 127.0.0.1:port
	TrustDomain string
	config      string
	cmd         *exec.Cmd
	done        chan struct{}
	log         *os.File
}

// ShortTempDir is a fresh directory under /tmp, removed in t.Cleanup, short
// enough for unix sockets.
func ShortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// StartServer starts a spire-server and waits until it is healthy.
func StartServer(t testing.TB, opts ServerOptions) *Server {
	t.Helper()
	bin := SkipIfUnavailable(t)
	if opts.TrustDomain == "" {
		opts.TrustDomain = "example.org"
	}
	if opts.DefaultSVIDTTL == 0 {
		opts.DefaultSVIDTTL = time.Hour
	}
	dir := ShortTempDir(t, "mks")
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatalf("spire: find a free port: %v", err)
	}
	s := &Server{
		BinDir:      bin,
		Dir:         dir,
		Socket:      filepath.Join(dir, "api.sock"),
		Address:     fmt.Sprintf("127.0.0.1:%d", port),
		TrustDomain: opts.TrustDomain,
		config:      filepath.Join(dir, "server.conf"),
	}
	psat := ""
	if opts.Kubeconfig != "" {
		psat = fmt.Sprintf(`
  NodeAttestor "k8s_psat" {
    plugin_data {
      clusters = {
        "meshkeeper" = {
          service_account_allow_list = [%q]
          kube_config_file = %q
        }
      }
    }
  }`, opts.PSATServiceAccount, opts.Kubeconfig)
	}
	conf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "DEBUG"
  ca_key_type = "ec-p256"
  default_x509_svid_ttl = %q
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  KeyManager "memory" {
    plugin_data {}
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }%s
}
`, port, s.Socket, s.TrustDomain, filepath.Join(dir, "data"), opts.DefaultSVIDTTL.String(),
		filepath.Join(dir, "data", "datastore.sqlite3"), psat)
	if err := os.WriteFile(s.config, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	return s
}

// Start (re)starts a stopped server with the same configuration and data
// (entries survive: the datastore is on disk) and waits until it is healthy.
func (s *Server) Start() error {
	log, err := os.OpenFile(filepath.Join(s.Dir, "server.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(s.BinDir, "spire-server"), "run", "-config", s.config)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start spire-server: %w", err)
	}
	s.cmd, s.log, s.done = cmd, log, make(chan struct{})
	go func() { _ = cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := s.CLI("healthcheck", "-shallow"); err == nil {
			return nil
		}
		select {
		case <-s.done:
			return fmt.Errorf("spire-server exited: %s", s.Logs())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("spire-server not healthy after 30s: %s", s.Logs())
		}
	}
}

// Stop kills the server (SIGKILL, as a crash would) and waits for it.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
	s.log.Close()
	s.cmd = nil
	_ = os.Remove(s.Socket)
}

// Logs returns the tail of the server's log.
func (s *Server) Logs() string {
	b, _ := os.ReadFile(filepath.Join(s.Dir, "server.log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// CLI runs `spire-server <args> -socketPath <admin socket>`, as an operator
// of the server would, and returns its output.
func (s *Server) CLI(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args = append(args, "-socketPath", s.Socket)
	cmd := exec.CommandContext(ctx, filepath.Join(s.BinDir, "spire-server"), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("spire-server %s: %w: %s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// AgentOptions configure StartAgent.
type AgentOptions struct {
	// JoinToken attests the agent with a join token; else PSATTokenFile.
	JoinToken string
	// PSATTokenFile holds a projected service account token (audience
	// spire-server) for k8s_psat node attestation.
	PSATTokenFile string
	// NodeName and KubeletPort configure the k8s workload attestor: the
	// kubelet's read-only port on 127.0.0.1 and the node the agent is on.
	NodeName    string
	KubeletPort int
}

// Agent is a running spire-agent.
type Agent struct {
	Dir string
	// WorkloadSocket is the Workload API socket.
	WorkloadSocket string
	cmd            *exec.Cmd
	done           chan struct{}
	log            *os.File
}

// StartAgent starts a spire-agent against s and waits until it is healthy
// (attested).
func StartAgent(t testing.TB, s *Server, opts AgentOptions) *Agent {
	t.Helper()
	dir := ShortTempDir(t, "mka")
	// The workload socket's directory holds nothing else (the admin socket
	// must not sit beside it).
	for _, d := range []string{"ws", "data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	a := &Agent{Dir: dir, WorkloadSocket: filepath.Join(dir, "ws", "agent.sock")}
	bundle, err := s.CLI("bundle", "show")
	if err != nil {
		t.Fatal(err)
	}
	bundlePath := filepath.Join(dir, "bundle.crt")
	if err := os.WriteFile(bundlePath, []byte(bundle), 0o600); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(s.Address)
	attestor := `NodeAttestor "join_token" {
    plugin_data {}
  }`
	if opts.JoinToken == "" {
		attestor = fmt.Sprintf(`NodeAttestor "k8s_psat" {
    plugin_data {
      cluster = "meshkeeper"
      token_path = %q
    }
  }`, opts.PSATTokenFile)
	}
	k8s := ""
	if opts.KubeletPort != 0 {
		k8s = fmt.Sprintf(`
  WorkloadAttestor "k8s" {
    plugin_data {
      node_name = %q
      kubelet_read_only_port = %d
      max_poll_attempts = 20
      poll_retry_interval = "250ms"
      use_new_container_locator = false
    }
  }`, opts.NodeName, opts.KubeletPort)
	}
	joinToken := ""
	if opts.JoinToken != "" {
		joinToken = fmt.Sprintf("\n  join_token = %q", opts.JoinToken)
	}
	conf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "DEBUG"
  server_address = %q
  server_port = %q
  socket_path = %q
  trust_bundle_path = %q
  trust_domain = %q%s
}
plugins {
  %s
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }%s
}
`, filepath.Join(dir, "data"), host, port, a.WorkloadSocket, bundlePath, s.TrustDomain, joinToken, attestor, k8s)
	confPath := filepath.Join(dir, "agent.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(s.BinDir, "spire-agent"), "run", "-config", confPath)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a.cmd, a.log, a.done = cmd, log, make(chan struct{})
	go func() { _ = cmd.Wait(); close(a.done) }()
	t.Cleanup(a.Stop)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := a.CLI(s.BinDir, "healthcheck"); err == nil {
			return a
		}
		select {
		case <-a.done:
			t.Fatalf("spire-agent exited: %s", a.Logs())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("spire-agent not healthy after 30s: %s", a.Logs())
		}
	}
}

// Stop kills the agent and waits for it.
func (a *Agent) Stop() {
	if a.cmd == nil {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	<-a.done
	a.log.Close()
	a.cmd = nil
}

// Logs returns the tail of the agent's log.
func (a *Agent) Logs() string {
	b, _ := os.ReadFile(filepath.Join(a.Dir, "agent.log"))
	if len(b) > 6000 {
		b = b[len(b)-6000:]
	}
	return string(b)
}

// CLI runs `spire-agent <args> -socketPath <workload socket>`.
func (a *Agent) CLI(binDir string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args = append(args, "-socketPath", a.WorkloadSocket)
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "spire-agent"), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("spire-agent %s: %w: %s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// JoinToken makes a join token on the server for an agent SPIFFE ID.
func (s *Server) JoinToken(agentID string) (string, error) {
	out, err := s.CLI("token", "generate", "-spiffeID", agentID, "-ttl", "600")
	if err != nil {
		return "", err
	}
	tok, ok := strings.CutPrefix(strings.TrimSpace(out), "Token: ")
	if !ok {
		return "", errors.New("spire-server token generate: unexpected output " + strconv.Quote(out))
	}
	return tok, nil
}
