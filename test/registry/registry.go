// Package registry runs CNCF distribution's registry (the reference OCI
// registry, built from its Go module by hack/registry.sh) on 127.0.0.1 for
// tests, with its storage in a temporary directory, so a test can publish
// artifacts, stop the registry and tamper with what it stores.
//
// Without the binary, Start skips the test, or fails it when
// MESHKEEPER_REQUIRE_CLUSTER=1 (CI), the convention of test/cluster.
package registry

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
	"time"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// BinaryEnv overrides the registry binary (default bin/registry/registry in
// the repository, the link hack/registry.sh makes).
const BinaryEnv = "MESHKEEPER_REGISTRY_BIN"

// TB is the part of testing.TB the harness uses.
type TB interface {
	Helper()
	Skipf(format string, args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// Binary is the registry binary Start runs.
func Binary() (string, error) {
	if b := os.Getenv(BinaryEnv); b != "" {
		return b, nil
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin", "registry", "registry"), nil
}

// Registry is a running registry.
type Registry struct {
	// Addr is its host:port; push and pull with plain HTTP.
	Addr string
	// Storage is the filesystem driver's root directory.
	Storage string

	bin, dir string
	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
	log      *os.File
}

// Start runs a registry on a free loopback port and returns once /v2/
// answers. It is stopped when the test ends.
func Start(ctx context.Context, t TB) *Registry {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatalf("registry: %v", err)
	}
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv(cluster.RequireEnv) == "1" {
			t.Fatalf("registry binary %s is missing (%s=1): run hack/registry.sh", bin, cluster.RequireEnv)
		}
		t.Skipf("registry binary %s is missing: run hack/registry.sh (set %s=1 to fail instead of skipping)", bin, cluster.RequireEnv)
	}
	dir := t.TempDir()
	r := &Registry{bin: bin, dir: dir, Storage: filepath.Join(dir, "storage")}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatalf("registry: find a free port: %v", err)
	}
	r.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	t.Cleanup(r.Stop)
	if err := r.Restart(ctx); err != nil {
		t.Fatalf("registry: %v", err)
	}
	return r
}

// Restart starts the registry again on the same address and storage (after
// Stop).
func (r *Registry) Restart(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		return errors.New("registry: already running")
	}
	cfg := filepath.Join(r.dir, "config.yml")
	conf := fmt.Sprintf(`version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: %q}
  delete: {enabled: true}
http:
  addr: %q
`, r.Storage, r.Addr)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(r.dir, "registry.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(r.bin, "serve", cfg)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return fmt.Errorf("start %s: %w", r.bin, err)
	}
	r.cmd, r.log, r.done = cmd, f, make(chan struct{})
	done := r.done
	go func() { _ = cmd.Wait(); close(done) }()

	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + r.Addr + "/v2/")
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-done:
			r.mu.Unlock()
			r.Stop()
			r.mu.Lock()
			return fmt.Errorf("registry exited: %s", r.Logs())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("registry on %s not ready after 15s: %s", r.Addr, r.Logs())
		}
	}
}

// Stop stops the registry (SIGTERM, then SIGKILL); its storage stays.
func (r *Registry) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(os.Interrupt)
	select {
	case <-r.done:
	case <-time.After(5 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
	}
	_ = r.log.Close()
	r.cmd = nil
}

// Logs is the registry's log so far.
func (r *Registry) Logs() string {
	b, _ := os.ReadFile(filepath.Join(r.dir, "registry.log"))
	return strings.TrimSpace(string(b))
}

// BlobPath is where the filesystem driver keeps a blob's bytes, for tests
// that tamper with what the registry serves.
func (r *Registry) BlobPath(digest string) string {
	hex := strings.TrimPrefix(digest, "sha256:")
	return filepath.Join(r.Storage, "docker", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data")
}
