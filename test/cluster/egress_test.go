package cluster

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	apiserverv1beta1 "k8s.io/apiserver/pkg/apis/apiserver/v1beta1"
	"sigs.k8s.io/yaml"
)

// TestEgressProxy: the proxy that carries kube-apiserver's egress tunnels to
// loopback, refuses targets off this machine with a 403 that names them
// (what kube-apiserver's dialer reports) without dialling them, counts the
// refusals, serves only its own client certificate, and leaves nothing
// behind when closed.
func TestEgressProxy(t *testing.T) {
	echo := startEcho(t)
	dialer := &recordingDialer{}
	p, err := startEgressProxy([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			_ = p.Close()
		}
	}()
	p.dial = dialer.DialContext
	clientTLS, err := p.clientTLS()
	if err != nil {
		t.Fatal(err)
	}

	t.Run("loopback-passes-bytes", func(t *testing.T) {
		conn, res, err := connect(p.Addr(), clientTLS, echo)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT %s: %s, want 200", echo, res.Status)
		}
		for _, msg := range []string{"hello through the tunnel\n", "and once more\n"} {
			if _, err := io.WriteString(conn, msg); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, got); err != nil {
				t.Fatalf("read back %q: %v", msg, err)
			}
			if string(got) != msg {
				t.Errorf("echo returned %q, want %q", got, msg)
			}
		}
	})

	refused := []string{"10.0.0.1:443", "8.8.8.8:53", "node-a:10250", "10.213.0.1:10250"}
	t.Run("off-machine-refused", func(t *testing.T) {
		for _, target := range refused {
			start := time.Now()
			conn, res, err := connect(p.Addr(), clientTLS, target)
			if err != nil {
				t.Fatalf("CONNECT %s: %v", target, err)
			}
			_ = conn.Close()
			want := "403 test cluster egress: " + target + " is not on this machine"
			if res.StatusCode != http.StatusForbidden || res.Status != want {
				t.Errorf("CONNECT %s: status %q, want %q", target, res.Status, want)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("CONNECT %s took %v: a refusal must be immediate", target, d)
			}
		}
		if got := refusedTargets(p); !slices.Equal(got, refused) {
			t.Errorf("refusals counted %v, want %v", got, refused)
		}
		if dialled := dialer.addrs(); !slices.Equal(dialled, []string{echo}) {
			t.Errorf("the proxy dialled %v, want only the loopback echo %s", dialled, echo)
		}
	})

	t.Run("client-certificate-required", func(t *testing.T) {
		anon := &tls.Config{RootCAs: clientTLS.RootCAs, MinVersion: tls.VersionTLS12}
		conn, res, err := connect(p.Addr(), anon, echo)
		if err == nil {
			_ = conn.Close()
			t.Fatalf("CONNECT without a client certificate answered %s, want a failed handshake", res.Status)
		}
	})

	t.Run("close-ends-tunnels", func(t *testing.T) {
		conn, res, err := connect(p.Addr(), clientTLS, echo)
		if err != nil || res.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT %s: %v %v", echo, res, err)
		}
		defer conn.Close()
		closed = true
		done := make(chan error, 1)
		go func() { done <- p.Close() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not return with a tunnel open")
		}
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("the open tunnel survived Close (read: %v)", err)
		}
		if c, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
			_ = c.Close()
			t.Errorf("%s still accepts connections after Close", p.Addr())
		}
	})
}

// TestEgressAllow: which targets are on this machine, with and without the
// real node's network.
func TestEgressAllow(t *testing.T) {
	loopback := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	withNode := append(slices.Clone(loopback), netip.MustParsePrefix(RealNodePodCIDR), netip.MustParsePrefix(RealNodeBridgeIP+"/32"))
	for _, tc := range []struct {
		target   string
		realNode bool
		want     string // "" = refused
	}{
		{"127.0.0.1:8443", false, "127.0.0.1:8443"},
		{"127.8.9.10:80", false, "127.8.9.10:80"},
		{"localhost:9443", false, "127.0.0.1:9443"},
		{"[::1]:443", false, "[::1]:443"},
		{"[::ffff:127.0.0.1]:443", false, "127.0.0.1:443"},
		{"10.213.0.1:10250", false, ""},
		{"10.213.0.1:10250", true, "10.213.0.1:10250"},
		{"10.213.0.23:15017", true, "10.213.0.23:15017"},
		{"10.213.1.23:15017", true, ""},
		{KubernetesSvcIP + ":443", true, ""}, // a ClusterIP: kube-apiserver resolves endpoints
		{"10.244.0.7:15017", true, ""},       // a kwok pod: it has an IP but no network
		{"10.89.0.2:10250", true, ""},        // a kwok node's kubelet
		{"8.8.8.8:53", true, ""},
		{"istiod.istio-system.svc:443", true, ""},
		{"[fe80::1%lo]:443", true, ""},
		{"127.0.0.1", false, ""},
	} {
		p := &egressProxy{allowed: loopback}
		if tc.realNode {
			p.allowed = withNode
		}
		got, ok := p.allow(tc.target)
		if ok != (tc.want != "") || got != tc.want {
			t.Errorf("allow(%q) with real node %v = %q, %v; want %q", tc.target, tc.realNode, got, ok, tc.want)
		}
	}
}

// TestEgressSelectorConfig: the file kube-apiserver reads decodes strictly
// into upstream's v1beta1 type and routes both proxied egress types to the
// proxy over TLS with the files it wrote.
func TestEgressSelectorConfig(t *testing.T) {
	p, err := startEgressProxy(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	dir := t.TempDir()
	path, err := p.writeConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cfg apiserverv1beta1.EgressSelectorConfiguration
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		t.Fatalf("%s does not decode into %T: %v\n%s", path, cfg, err, data)
	}
	if cfg.APIVersion != "apiserver.k8s.io/v1beta1" || cfg.Kind != "EgressSelectorConfiguration" {
		t.Errorf("type %s %s", cfg.APIVersion, cfg.Kind)
	}
	var names []string
	for _, s := range cfg.EgressSelections {
		names = append(names, s.Name)
		c := s.Connection
		if c.ProxyProtocol != apiserverv1beta1.ProtocolHTTPConnect || c.Transport == nil || c.Transport.TCP == nil || c.Transport.TCP.TLSConfig == nil {
			t.Errorf("%s: connection %+v, want HTTPConnect over TCP with TLS", s.Name, c)
			continue
		}
		if want := "https://" + p.Addr(); c.Transport.TCP.URL != want {
			t.Errorf("%s: url %s, want %s", s.Name, c.Transport.TCP.URL, want)
		}
		tc := c.Transport.TCP.TLSConfig
		for _, f := range []string{tc.CABundle, tc.ClientCert, tc.ClientKey} {
			if _, err := os.Stat(f); err != nil {
				t.Errorf("%s: %v", s.Name, err)
			}
		}
		if _, err := tls.LoadX509KeyPair(tc.ClientCert, tc.ClientKey); err != nil {
			t.Errorf("%s: client key pair: %v", s.Name, err)
		}
	}
	if !slices.Equal(names, []string{"cluster", "controlplane"}) {
		t.Errorf("egress selections %v, want cluster and controlplane (etcd stays direct)", names)
	}
}

// connect opens a tunnel the way kube-apiserver's HTTPConnect dialer
// (k8s.io/apiserver egressselector.tunnelHTTPConnect) does.
func connect(proxy string, cfg *tls.Config, target string) (net.Conn, *http.Response, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", proxy, cfg)
	if err != nil {
		return nil, nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, "127.0.0.1")
	br := bufio.NewReader(io.LimitReader(conn, http.DefaultMaxHeaderBytes))
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	if res.StatusCode == http.StatusOK && br.Buffered() > 0 {
		_ = conn.Close()
		return nil, nil, fmt.Errorf("%d bytes after the CONNECT response: kube-apiserver refuses such a tunnel", br.Buffered())
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, res, nil
}

func refusedTargets(p *egressProxy) []string {
	var out []string
	for _, a := range p.attempts() {
		if a.Refused {
			out = append(out, a.Target)
		}
	}
	return out
}

// startEcho serves an echo on 127.0.0.1 until the test ends.
func startEcho(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = l.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return l.Addr().String()
}

// recordingDialer dials for real and remembers what.
type recordingDialer struct {
	mu     sync.Mutex
	dialed []string
}

func (d *recordingDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.dialed = append(d.dialed, addr)
	d.mu.Unlock()
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

func (d *recordingDialer) addrs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.dialed)
}
