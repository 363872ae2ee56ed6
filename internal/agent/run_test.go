package agent

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
)

// TestRunProcRootAndReadiness runs the agent (without an API server) on this
// machine: with a proc root that is not the host's it attaches nothing and
// /readyz says why; with the host's /proc it loads the datapath and /readyz
// answers ok.
func TestRunProcRootAndReadiness(t *testing.T) {
	requirePrivileged(t)
	for _, tc := range []struct {
		name, procRoot string
		wantReady      bool
		wantBody       string
	}{
		{"a directory that is not the host's proc", t.TempDir(), false, "the node agent can enrol no pod: proc root "},
		{"the host's proc", "/proc", true, "ok"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			pinPath := filepath.Join("/sys/fs/bpf", testName())
			t.Cleanup(func() {
				if err := Uninstall(pinPath); err != nil {
					t.Errorf("uninstall %s: %v", pinPath, err)
				}
			})
			addr := freeLocalAddr(t)
			ctx, cancel := context.WithCancel(context.Background())
			ready := make(chan struct{})
			done := make(chan error, 1)
			go func() {
				done <- Run(ctx, RunOptions{MetricsAddr: addr, CapturePort: capturePort, BypassMark: DefaultBypassMark,
					PinPath: pinPath, CgroupPath: cgroup2Root(t), ProcRoot: tc.procRoot, Ready: ready, Log: testr.New(t)})
			}()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			})
			select {
			case <-ready:
			case err := <-done:
				t.Fatalf("Run returned before it was ready: %v", err)
			case <-time.After(30 * time.Second):
				t.Fatal("not ready within 30s")
			}
			resp, err := http.Get("http://" + addr + "/readyz")
			g.Expect(err).NotTo(HaveOccurred())
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			g.Expect(resp.StatusCode == http.StatusOK).To(Equal(tc.wantReady), "status %d", resp.StatusCode)
			g.Expect(strings.TrimSpace(string(body))).To(HavePrefix(tc.wantBody))
			if tc.wantReady {
				g.Expect(filepath.Join(pinPath, "links")).To(BeADirectory(), "the datapath is attached")
			} else {
				g.Expect(pinPath).NotTo(BeAnExistingFile(), "nothing is attached on a node where no pod can be found")
			}
		})
	}
}

// freeLocalAddr returns a 127.0.0.1 address with a port free a moment ago.
func freeLocalAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
