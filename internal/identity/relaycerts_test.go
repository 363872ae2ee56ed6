package identity_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/internal/identity"
)

var relayHosts = []string{"spire-server.istio-system.svc", "spire-server.istio-system.svc.cluster.local"}

func pemCount(b []byte) int {
	n := 0
	for {
		var block *pem.Block
		if block, b = pem.Decode(b); block == nil {
			return n
		}
		n++
	}
}

// TestEnsureRelayCerts: the relay's certificates are made once, left alone
// while good, renewed ahead of expiry under the same CA, and a CA nearing
// its end is replaced with the previous one still trusted.
func TestEnsureRelayCerts(t *testing.T) {
	g := NewWithT(t)
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

	first, reason, err := identity.EnsureRelayCerts(nil, nil, relayHosts, now)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(ContainSubstring("CA: missing"))
	g.Expect(first.Manager).To(HaveKey(identity.RelayKeyCAKey))
	g.Expect(first.Relay).To(And(HaveKey("ca.crt"), HaveKey("tls.crt"), HaveKey("tls.key"), HaveLen(3)),
		"the relay's Secret holds no CA key and no client key")
	g.Expect(first.Relay["ca.crt"]).To(Equal(first.Manager["ca.crt"]))

	again, reason, err := identity.EnsureRelayCerts(first.Manager, first.Relay, relayHosts, now.Add(24*time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(BeEmpty())
	g.Expect(again).To(Equal(first))

	// A new host (another components namespace name) reissues the serving
	// certificate only.
	more := append([]string{"spire-server.istio-system"}, relayHosts...)
	moved, reason, err := identity.EnsureRelayCerts(first.Manager, first.Relay, more, now)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(ContainSubstring(`does not cover "spire-server.istio-system"`))
	g.Expect(moved.Manager).To(Equal(first.Manager))
	g.Expect(moved.Relay["tls.crt"]).NotTo(Equal(first.Relay["tls.crt"]))

	// 61 of 90 days on: both leaves are renewed, the CA stays.
	later := now.Add(61 * 24 * time.Hour)
	renewed, reason, err := identity.EnsureRelayCerts(first.Manager, first.Relay, relayHosts, later)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(And(ContainSubstring("client certificate: expires"), ContainSubstring("relay serving certificate: expires")))
	g.Expect(renewed.Manager["ca.crt"]).To(Equal(first.Manager["ca.crt"]))
	g.Expect(renewed.Manager["tls.crt"]).NotTo(Equal(first.Manager["tls.crt"]))
	g.Expect(renewed.Relay["tls.crt"]).NotTo(Equal(first.Relay["tls.crt"]))
	g.Expect(renewed.Manager).NotTo(HaveKey(identity.RelayKeyPreviousCA))

	// Two years on the CA is replaced; the old one stays trusted on both
	// sides and the old client certificate stays presentable.
	late := now.Add(2*365*24*time.Hour + 24*time.Hour)
	// (The leaves were renewed along the way, the last time ten days before.)
	renewed, _, err = identity.EnsureRelayCerts(renewed.Manager, renewed.Relay, relayHosts, late.Add(-10*24*time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	rotated, reason, err := identity.EnsureRelayCerts(renewed.Manager, renewed.Relay, relayHosts, late)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(ContainSubstring("CA expires"))
	g.Expect(rotated.Manager["ca.crt"]).NotTo(Equal(renewed.Manager["ca.crt"]))
	g.Expect(rotated.Manager[identity.RelayKeyPreviousCA]).To(Equal(renewed.Manager["ca.crt"]))
	g.Expect(rotated.Manager[identity.RelayKeyPreviousCert]).To(Equal(renewed.Manager["tls.crt"]))
	g.Expect(pemCount(rotated.Relay["ca.crt"])).To(Equal(2))
	g.Expect(bytes.Contains(rotated.Relay["ca.crt"], renewed.Manager["ca.crt"])).To(BeTrue())

	// Once the previous CA has expired it is dropped.
	gone, reason, err := identity.EnsureRelayCerts(rotated.Manager, rotated.Relay, relayHosts, now.Add(identity.RelayCAValidity+time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(ContainSubstring("the previous CA expired"))
	g.Expect(gone.Manager).NotTo(HaveKey(identity.RelayKeyPreviousCA))
	g.Expect(pemCount(gone.Relay["ca.crt"])).To(Equal(1))

	// A damaged CA key makes a new CA rather than an error.
	broken := map[string][]byte{}
	for k, v := range first.Manager {
		broken[k] = v
	}
	broken[identity.RelayKeyCAKey] = []byte("junk")
	fixed, reason, err := identity.EnsureRelayCerts(broken, first.Relay, relayHosts, now)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(ContainSubstring("CA:"))
	g.Expect(fixed.Manager["ca.crt"]).NotTo(Equal(first.Manager["ca.crt"]))
}

func writeRelayDir(t *testing.T, dir string, data map[string][]byte) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for k, v := range data {
		if err := os.WriteFile(filepath.Join(dir, k), v, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRelayRotation runs the relay (RunRelay, the container's entry point)
// in front of a unix socket and connects as the manager does: a CA rotation
// whose relay Secret has not reached the relay yet still lets the manager
// in (it presents its previous certificate); the renewed files are picked up
// without a restart; the relay's own serving certificate is no client
// certificate; and /ready follows the socket.
func TestRelayRotation(t *testing.T) {
	g := NewWithT(t)
	now := time.Now()
	sockDir, err := os.MkdirTemp("/tmp", "mkr")
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { _ = os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "api.sock")
	up, err := net.Listen("unix", socket)
	g.Expect(err).NotTo(HaveOccurred())
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "admin api\n")
			_ = c.Close()
		}
	}()

	made, _, err := identity.EnsureRelayCerts(nil, nil, relayHosts, now.Add(-(2*365*24*time.Hour + 24*time.Hour)))
	g.Expect(err).NotTo(HaveOccurred())
	// Its leaves were renewed along the way, the last time ten days ago.
	start, why, err := identity.EnsureRelayCerts(made.Manager, made.Relay, relayHosts, now.Add(-10*24*time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(why).NotTo(ContainSubstring("CA expires"))
	rotated, reason, err := identity.EnsureRelayCerts(start.Manager, start.Relay, relayHosts, now)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(reason).To(ContainSubstring("CA expires"))

	tlsDir := filepath.Join(sockDir, "tls")
	writeRelayDir(t, tlsDir, start.Relay) // the kubelet has not synced the Secret yet
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	g.Expect(err).NotTo(HaveOccurred())
	addr := ln.Addr().String()
	_ = ln.Close()
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	g.Expect(err).NotTo(HaveOccurred())
	health := hl.Addr().String()
	_ = hl.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- identity.RunRelay(ctx, identity.RelayOptions{Listen: addr, Health: health, Socket: socket, TLSDir: tlsDir})
	}()
	t.Cleanup(func() { cancel(); <-done })

	call := func(cfg *tls.Config) (string, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, cfg)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		b, err := io.ReadAll(c)
		return string(b), err
	}
	client, err := identity.ClientTLSFromSecret(rotated.Manager, relayHosts[0])
	g.Expect(err).NotTo(HaveOccurred())
	g.Eventually(func() (string, error) { return call(client) }).WithTimeout(5*time.Second).Should(Equal("admin api\n"),
		"a relay still trusting only the previous CA lets the manager in with its previous certificate")

	writeRelayDir(t, tlsDir, rotated.Relay) // the kubelet syncs the Secret
	onlyNew := map[string][]byte{}
	for k, v := range rotated.Manager {
		if k != identity.RelayKeyPreviousCert && k != identity.RelayKeyPreviousKey {
			onlyNew[k] = v
		}
	}
	fresh, err := identity.ClientTLSFromSecret(onlyNew, relayHosts[0])
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(call(fresh)).To(Equal("admin api\n"), "the relay read the renewed files without a restart")

	stranger, _, err := identity.EnsureRelayCerts(nil, nil, relayHosts, now)
	g.Expect(err).NotTo(HaveOccurred())
	strangerCfg, err := identity.ClientTLSFromSecret(map[string][]byte{
		"ca.crt": rotated.Manager["ca.crt"], "tls.crt": stranger.Manager["tls.crt"], "tls.key": stranger.Manager["tls.key"],
	}, relayHosts[0])
	g.Expect(err).NotTo(HaveOccurred())
	out, err := call(strangerCfg)
	g.Expect(out).To(BeEmpty(), "a client certificate of another CA gets nothing: %v", err)

	serving, err := identity.ClientTLSFromSecret(map[string][]byte{
		"ca.crt": rotated.Manager["ca.crt"], "tls.crt": rotated.Relay["tls.crt"], "tls.key": rotated.Relay["tls.key"],
	}, relayHosts[0])
	g.Expect(err).NotTo(HaveOccurred())
	out, err = call(serving)
	g.Expect(out).To(BeEmpty(), "the relay's serving certificate is no client certificate: %v", err)

	ready := func() int {
		resp, err := (&http.Client{Timeout: 3 * time.Second}).Get("http://" + health + "/ready")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	g.Expect(ready()).To(Equal(http.StatusOK))
	_ = up.Close()
	_ = os.Remove(socket)
	g.Expect(ready()).To(Equal(http.StatusServiceUnavailable), "not ready while spire-server's admin socket is gone")
}
