// Package localmesh installs meshkeeper onto a local test cluster the way a
// user would, with one difference: the manager runs as a host process, so
// its webhook is reached at https://127.0.0.1:<port> instead of a Service.
// The e2e suite and `make demo` share it.
package localmesh

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// Namespace is where the manager keeps its webhook secret.
const Namespace = "meshkeeper-system"

// Options configure Install.
type Options struct {
	// ManagerBin is the built manager binary (bin/manager).
	ManagerBin string
	// RepoRoot holds config/; found from the working directory when empty.
	RepoRoot string
	// LogDir receives manager.log; a temp dir when empty.
	LogDir string
	// Args are extra manager flags.
	Args []string
	// OwnServiceAccount runs the manager as its own ServiceAccount with the
	// RBAC of config/rbac (a token from the TokenRequest API), as in a real
	// deployment, instead of as the cluster admin: every missing or excess
	// permission shows.
	OwnServiceAccount bool
}

// ServiceAccount is the manager's ServiceAccount (config/rbac).
const ServiceAccount = "meshkeeper-manager"

// Manager is a running manager process.
type Manager struct {
	opts        Options
	c           *cluster.Cluster
	cmd         *exec.Cmd
	done        chan error
	LogPath     string
	WebhookPort int
	ProbePort   int
	MetricsPort int
	certDir     string
	kubeconfig  string
}

// Install applies the CRDs, the webhook configuration (pointed at the host
// process) and starts the manager; it returns once the webhook answers.
func Install(ctx context.Context, c *cluster.Cluster, o Options) (*Manager, error) {
	if o.RepoRoot == "" {
		root, err := cluster.RepoRoot()
		if err != nil {
			return nil, err
		}
		o.RepoRoot = root
	}
	if o.LogDir == "" {
		dir, err := os.MkdirTemp("", "meshkeeper-manager-")
		if err != nil {
			return nil, err
		}
		o.LogDir = dir
	}
	if _, stderr, err := c.Kubectl(ctx, "apply", "-k", filepath.Join(o.RepoRoot, "config", "crd")); err != nil {
		return nil, fmt.Errorf("apply CRDs: %w: %s", err, stderr)
	}
	if _, stderr, err := c.Kubectl(ctx, "wait", "--for=condition=Established", "--timeout=30s",
		"crd/meshes.meshkeeper.dev", "crd/meshnodes.meshkeeper.dev"); err != nil {
		return nil, fmt.Errorf("wait for CRDs: %w: %s", err, stderr)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}
	if err := c.Client.Create(ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create namespace %s: %w", Namespace, err)
	}
	ports, err := cluster.FreePorts(3)
	if err != nil {
		return nil, err
	}
	m := &Manager{opts: o, c: c, WebhookPort: ports[0], ProbePort: ports[1], MetricsPort: ports[2],
		LogPath: filepath.Join(o.LogDir, "manager.log"), certDir: filepath.Join(o.LogDir, "webhook-certs"),
		kubeconfig: c.KubeconfigPath}
	if o.OwnServiceAccount {
		if _, stderr, err := c.Kubectl(ctx, "apply", "-k", filepath.Join(o.RepoRoot, "config", "rbac")); err != nil {
			return nil, fmt.Errorf("apply config/rbac: %w: %s", err, stderr)
		}
		path, _, err := c.ServiceAccountKubeconfig(ctx, Namespace, ServiceAccount, 4*time.Hour)
		if err != nil {
			return nil, err
		}
		m.kubeconfig = path
	}
	if err := m.installWebhookConfig(ctx); err != nil {
		return nil, err
	}
	if err := m.Start(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// installWebhookConfig creates config/webhook's ValidatingWebhookConfiguration
// with its clientConfig pointed at the host process.
func (m *Manager) installWebhookConfig(ctx context.Context) error {
	raw, err := os.ReadFile(filepath.Join(m.opts.RepoRoot, "config", "webhook", "manifests.yaml"))
	if err != nil {
		return err
	}
	vwc := &admissionv1.ValidatingWebhookConfiguration{}
	if err := yaml.Unmarshal(raw, vwc); err != nil {
		return fmt.Errorf("parse webhook config: %w", err)
	}
	for i := range vwc.Webhooks {
		wh := &vwc.Webhooks[i]
		url := fmt.Sprintf("https://127.0.0.1:%d%s", m.WebhookPort, *wh.ClientConfig.Service.Path)
		wh.ClientConfig = admissionv1.WebhookClientConfig{URL: &url}
	}
	existing := &admissionv1.ValidatingWebhookConfiguration{}
	if err := m.c.Client.Get(ctx, client.ObjectKeyFromObject(vwc), existing); err == nil {
		if err := m.c.Client.Delete(ctx, existing); err != nil {
			return err
		}
	}
	if err := m.c.Client.Create(ctx, vwc); err != nil {
		return fmt.Errorf("create webhook config: %w", err)
	}
	return nil
}

// Start runs the manager process and waits until it is ready and the API
// server reaches its webhook.
func (m *Manager) Start(ctx context.Context) error {
	logf, err := os.OpenFile(m.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	args := append([]string{
		"--kubeconfig", m.kubeconfig,
		"--namespace", Namespace,
		"--webhook-host", "127.0.0.1",
		"--webhook-port", strconv.Itoa(m.WebhookPort),
		"--webhook-hosts", "127.0.0.1",
		"--webhook-cert-dir", m.certDir,
		"--metrics-bind-address", fmt.Sprintf("127.0.0.1:%d", m.MetricsPort),
		"--health-probe-bind-address", fmt.Sprintf("127.0.0.1:%d", m.ProbePort),
	}, m.opts.Args...)
	cmd := exec.Command(m.opts.ManagerBin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return fmt.Errorf("start manager %s: %w", m.opts.ManagerBin, err)
	}
	m.cmd, m.done = cmd, make(chan error, 1)
	go func() { m.done <- cmd.Wait(); _ = logf.Close() }()
	if err := m.waitReady(ctx); err != nil {
		_ = m.Stop()
		return fmt.Errorf("%w\nmanager log (%s):\n%s", err, m.LogPath, m.LogTail(40))
	}
	return nil
}

func (m *Manager) waitReady(ctx context.Context) error {
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // local probe
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-m.done:
			m.done <- err
			return fmt.Errorf("manager exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", m.ProbePort))
		if err != nil {
			continue
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			continue
		}
		vwc := &admissionv1.ValidatingWebhookConfiguration{}
		if err := m.c.Client.Get(ctx, client.ObjectKey{Name: "meshkeeper-validating-webhook"}, vwc); err != nil ||
			len(vwc.Webhooks) == 0 || len(vwc.Webhooks[0].ClientConfig.CABundle) == 0 {
			continue
		}
		// The API server must reach the webhook: a server-side dry run of a
		// Mesh with an unparsable query is refused by the webhook only.
		probe := filepath.Join(m.opts.LogDir, "probe-mesh.json")
		if err := os.WriteFile(probe, []byte(probeMesh), 0o644); err != nil {
			return err
		}
		_, stderr, err := m.c.Kubectl(ctx, "create", "--dry-run=server", "-f", probe)
		if err != nil && bytes.Contains([]byte(stderr), []byte("spec.analysis.slos[0].query")) {
			return nil
		}
	}
	return errors.New("manager not ready within 60s (readyz, caBundle injection, webhook reachable)")
}

// probeMesh is refused by the webhook (PromQL), never by the schema.
const probeMesh = `{"apiVersion":"meshkeeper.dev/v1alpha1","kind":"Mesh","metadata":{"name":"readiness-probe"},"spec":{"version":"1.28","analysis":{"prometheus":{"address":"http://p:9090"},"slos":[{"name":"probe","query":"sum(","min":"1"}]}}}`

// Kubeconfig is the kubeconfig the manager runs with.
func (m *Manager) Kubeconfig() string { return m.kubeconfig }

// Stop ends the manager (SIGTERM, then SIGKILL after 10s).
func (m *Manager) Stop() error {
	if m.cmd == nil || m.cmd.Process == nil {
		return nil
	}
	_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-m.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
		<-m.done
	}
	m.cmd = nil
	return nil
}

// Kill ends the manager at once, as a crash would.
func (m *Manager) Kill() {
	if m.cmd != nil && m.cmd.Process != nil {
		_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
		<-m.done
		m.cmd = nil
	}
}

// LogTail returns the last n lines of the manager's log.
func (m *Manager) LogTail(n int) string {
	raw, err := os.ReadFile(m.LogPath)
	if err != nil {
		return err.Error()
	}
	lines := bytes.Split(bytes.TrimRight(raw, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
