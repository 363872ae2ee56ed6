package cluster

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// The test cluster's kube-apiserver runs on this machine as a plain host
// process, so whatever it dials goes wherever the machine's routes send it.
// Service-based admission webhooks are the common case: a bundle chart
// renders istiod's injector and validator, no istiod runs, and every
// admission request for a matching object makes kube-apiserver dial a
// Service (10.0.0.x) or a kwok pod (10.244.x.x) address that exists on no
// interface of this machine.
//
// So kube-apiserver gets an egress selector (--egress-selector-config-file,
// an apiserver.k8s.io/v1beta1 EgressSelectorConfiguration): its "cluster"
// egress (Service-based webhooks, aggregated APIs, the kubelet for logs,
// exec, attach and port-forward, the pods/nodes/services proxy
// subresources) and its "controlplane" egress (URL webhooks) go through an
// HTTP CONNECT proxy that the harness runs in-process on 127.0.0.1. The
// proxy dials only addresses of this machine: loopback, and the real node's
// pod network with its bridge address when a real node runs. Everything
// else is refused at once with "403 test cluster egress: <target> is not on
// this machine", which kube-apiserver puts into the error it returns (for a
// webhook: the admission error the client sees), and recorded
// (Cluster.EgressRefused). The "etcd" egress is not configured: etcd is on
// 127.0.0.1 and kube-apiserver dials it directly.
//
// With --enable-aggregator-routing kube-apiserver resolves a Service to one
// of its ready endpoints (a pod IP) instead of its ClusterIP, for webhooks
// and aggregated APIs alike, so the proxy sees the address really meant: a
// pod on the real node is reachable, a kwok pod (which has an IP but no
// network) is refused, and a Service without endpoints fails in
// kube-apiserver ("no endpoints available") before anything is dialled.
//
// The TCP transport is HTTPS with client certificates: kube-apiserver
// v1.37 accepts an http:// proxy URL in validation but then dereferences
// the absent tlsConfig and panics (kubernetes/kubernetes#136470). The
// harness makes its own CA for it; only the holder of the client
// certificate (kube-apiserver) can use the proxy.

// EgressAttempt is one connection kube-apiserver asked the egress proxy for.
type EgressAttempt struct {
	// Target is the host:port asked for (a CONNECT request's authority).
	Target string
	// Refused is true when Target is not on this machine: nothing was
	// dialled and kube-apiserver got a 403.
	Refused bool
	// Err is why a dial of an allowed Target failed ("" if it connected).
	Err string
	At  time.Time
}

// EgressRefused returns the targets kube-apiserver tried to reach off this
// machine, oldest first: its egress proxy refused each of them without
// dialling.
func (c *Cluster) EgressRefused() []string {
	var out []string
	for _, a := range c.EgressAttempts() {
		if a.Refused {
			out = append(out, a.Target)
		}
	}
	return out
}

// EgressAttempts returns every connection kube-apiserver asked its egress
// proxy for, oldest first.
func (c *Cluster) EgressAttempts() []EgressAttempt {
	if c.egress == nil {
		return nil
	}
	return c.egress.attempts()
}

// startEgress starts the egress proxy and writes its certificates and the
// EgressSelectorConfiguration into dir; it returns the configuration's path.
func (c *Cluster) startEgress(dir string, realNode bool) (string, error) {
	allowed := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	if realNode {
		// The bridge address is in the pod network; both are on this
		// machine only while the real node (its bridge) exists.
		allowed = append(allowed, netip.MustParsePrefix(RealNodePodCIDR), netip.MustParsePrefix(RealNodeBridgeIP+"/32"))
	}
	log, err := c.openLog("egress-proxy")
	if err != nil {
		return "", err
	}
	p, err := startEgressProxy(allowed, log)
	if err != nil {
		_ = log.Close()
		return "", fmt.Errorf("cluster: egress proxy: %w", err)
	}
	c.egress, c.egressLog = p, log
	cfg, err := p.writeConfig(dir)
	if err != nil {
		return "", fmt.Errorf("cluster: egress proxy: %w", err)
	}
	return cfg, nil
}

// stopEgress stops the proxy (its listener and every tunnel) once
// kube-apiserver is gone.
func (c *Cluster) stopEgress() error {
	if c.egress == nil {
		return nil
	}
	err := c.egress.Close()
	if c.egressLog != nil {
		_ = c.egressLog.Close()
	}
	if err != nil {
		return fmt.Errorf("cluster: stop egress proxy: %w", err)
	}
	return nil
}

// egressProxy is an HTTP CONNECT proxy over TLS on 127.0.0.1 that dials
// only targets in allowed.
type egressProxy struct {
	allowed []netip.Prefix
	// dial connects to an allowed target (tests replace it).
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	ln   net.Listener

	ctx    context.Context // ends with Close: pending dials give up
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	log    io.Writer
	conns  map[net.Conn]struct{}
	tried  []EgressAttempt
	closed bool

	// What a client (kube-apiserver) needs, in PEM.
	caPEM, clientCertPEM, clientKeyPEM []byte
}

// egressHandshakeTimeout bounds the TLS handshake and the CONNECT request,
// egressDialTimeout the dial of an allowed target.
const (
	egressHandshakeTimeout = 10 * time.Second
	egressDialTimeout      = 10 * time.Second
)

// startEgressProxy listens on a free port of 127.0.0.1 and serves until
// Close. log receives one line per connection.
func startEgressProxy(allowed []netip.Prefix, log io.Writer) (*egressProxy, error) {
	if log == nil {
		log = io.Discard
	}
	p := &egressProxy{allowed: allowed, log: log, conns: map[net.Conn]struct{}{}}
	p.dial = (&net.Dialer{}).DialContext
	serverCert, clientCAs, err := p.makeCerts()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p.ln = tls.NewListener(ln, &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientCAs:    clientCAs,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	})
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Addr is the proxy's host:port.
func (p *egressProxy) Addr() string { return p.ln.Addr().String() }

// Close stops accepting, ends every tunnel and waits for all of the
// proxy's goroutines. It is idempotent.
func (p *egressProxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	conns := make([]net.Conn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	p.cancel()
	err := p.ln.Close()
	for _, c := range conns {
		_ = c.Close()
	}
	p.wg.Wait()
	return err
}

func (p *egressProxy) attempts() []EgressAttempt {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]EgressAttempt(nil), p.tried...)
}

func (p *egressProxy) serve() {
	defer p.wg.Done()
	for {
		conn, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.logf("accept: %v", err)
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		if !p.track(conn) {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(conn)
			p.handle(conn)
		}()
	}
}

// track records an open connection so that Close can end it; once closed,
// it closes conn instead and returns false.
func (p *egressProxy) track(conn net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = conn.Close()
		return false
	}
	p.conns[conn] = struct{}{}
	return true
}

func (p *egressProxy) untrack(conn net.Conn) {
	_ = conn.Close()
	p.mu.Lock()
	delete(p.conns, conn)
	p.mu.Unlock()
}

func (p *egressProxy) logf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.log, "%s %s\n", time.Now().UTC().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func (p *egressProxy) record(a EgressAttempt) {
	a.At = time.Now()
	p.mu.Lock()
	p.tried = append(p.tried, a)
	p.mu.Unlock()
}

func (p *egressProxy) handle(conn net.Conn) {
	_ = conn.SetDeadline(time.Now().Add(egressHandshakeTimeout))
	if tc, ok := conn.(*tls.Conn); ok {
		if err := tc.HandshakeContext(p.ctx); err != nil {
			p.logf("TLS handshake with %s: %v", conn.RemoteAddr(), err)
			return
		}
	}
	br := bufio.NewReader(conn)
	req, err := http.ReadRequest(br)
	if err != nil {
		p.logf("read request from %s: %v", conn.RemoteAddr(), err)
		return
	}
	if req.Method != http.MethodConnect {
		p.logf("refuse %s %s: not CONNECT", req.Method, req.RequestURI)
		writeStatus(conn, http.StatusMethodNotAllowed, "test cluster egress: only CONNECT", "")
		return
	}
	target := req.URL.Host
	if target == "" {
		target = req.Host
	}
	addr, ok := p.allow(target)
	if !ok {
		p.record(EgressAttempt{Target: target, Refused: true})
		msg := fmt.Sprintf("test cluster egress: %s is not on this machine", target)
		p.logf("refuse %s: not on this machine", target)
		writeStatus(conn, http.StatusForbidden, msg,
			fmt.Sprintf("%s: the test cluster's kube-apiserver may reach only %v\n", msg, p.allowed))
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, egressDialTimeout)
	up, err := p.dial(ctx, "tcp", addr)
	cancel()
	if err != nil {
		p.record(EgressAttempt{Target: target, Err: err.Error()})
		p.logf("dial %s: %v", target, err)
		writeStatus(conn, http.StatusBadGateway, fmt.Sprintf("test cluster egress: dial %s: %v", target, err), "")
		return
	}
	if !p.track(up) {
		return
	}
	defer p.untrack(up)
	p.record(EgressAttempt{Target: target})
	p.logf("connect %s", target)
	_ = conn.SetDeadline(time.Time{})
	// Nothing may follow the response's header: kube-apiserver's dialer
	// refuses a tunnel with bytes already buffered.
	if _, err := io.WriteString(conn, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		if _, err := up.Write(b); err != nil {
			return
		}
	}
	pipe(conn, up)
}

// allow says whether target (host:port) is on this machine and returns the
// address to dial. Names are not resolved (a lookup could itself leave the
// machine), except localhost.
func (p *egressProxy) allow(target string) (string, bool) {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return "", false
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || ip.Zone() != "" {
		return "", false
	}
	ip = ip.Unmap()
	for _, pfx := range p.allowed {
		if pfx.Contains(ip) {
			return net.JoinHostPort(ip.String(), port), true
		}
	}
	return "", false
}

// pipe copies both ways until the target has sent everything (or either
// side fails); a client that finishes sending half-closes the target.
func pipe(client, up net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(up, client)
		if cw, ok := up.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	_, _ = io.Copy(client, up)
	_ = client.Close()
	_ = up.Close()
	<-done
}

// writeStatus writes a complete response; reason is the status line's text,
// which is what kube-apiserver's dialer reports ("code 403: 403 <reason>").
func writeStatus(w io.Writer, code int, reason, body string) {
	reason = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, reason)
	_, _ = fmt.Fprintf(w, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		code, reason, len(body), body)
}

// makeCerts makes a CA, the proxy's serving certificate for 127.0.0.1 and
// a client certificate for kube-apiserver; it keeps what a client needs in
// PEM and returns the serving certificate and the pool that verifies
// clients.
func (p *egressProxy) makeCerts() (tls.Certificate, *x509.CertPool, error) {
	now := time.Now().Add(-time.Hour)
	newKey := func() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }
	caKey, err := newKey()
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	ca, caDER, err := selfSignedCA("meshkeeper-test-cluster-egress-ca", caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage, ips []net.IP) ([]byte, *ecdsa.PrivateKey, error) {
		key, err := newKey()
		if err != nil {
			return nil, nil, err
		}
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    now,
			NotAfter:     now.Add(48 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			IPAddresses:  ips,
		}, ca, &key.PublicKey, caKey)
		return der, key, err
	}
	serverDER, serverKey, err := issue(2, "meshkeeper-test-cluster-egress-proxy", x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	clientDER, clientKey, err := issue(3, "kube-apiserver", x509.ExtKeyUsageClientAuth, nil)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	clientKeyDER, err := x509.MarshalPKCS8PrivateKey(clientKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	p.clientCertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: clientDER})
	p.clientKeyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: clientKeyDER})
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return tls.Certificate{Certificate: [][]byte{serverDER}, PrivateKey: serverKey}, pool, nil
}

// clientTLS is the TLS configuration of a client of the proxy, as
// kube-apiserver builds it from the files writeConfig writes.
func (p *egressProxy) clientTLS() (*tls.Config, error) {
	cert, err := tls.X509KeyPair(p.clientCertPEM, p.clientKeyPEM)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(p.caPEM) {
		return nil, errors.New("egress proxy CA: no certificate")
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: roots, MinVersion: tls.VersionTLS12}, nil
}

// writeConfig writes the client's certificates and kube-apiserver's
// --egress-selector-config-file into dir and returns the latter's path.
func (p *egressProxy) writeConfig(dir string) (string, error) {
	files := map[string][]byte{"egress-ca.crt": p.caPEM, "egress-client.crt": p.clientCertPEM, "egress-client.key": p.clientKeyPEM}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return "", err
		}
	}
	path := filepath.Join(dir, "egress-selector.yaml")
	return path, os.WriteFile(path, []byte(p.selectorConfig(dir)), 0o600)
}

// selectorConfig is an apiserver.k8s.io/v1beta1 EgressSelectorConfiguration
// that sends the "cluster" and "controlplane" egress through the proxy.
func (p *egressProxy) selectorConfig(dir string) string {
	var b strings.Builder
	b.WriteString("apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n")
	for _, name := range []string{"cluster", "controlplane"} {
		fmt.Fprintf(&b, `- name: %s
  connection:
    proxyProtocol: HTTPConnect
    transport:
      tcp:
        url: https://%s
        tlsConfig:
          caBundle: %q
          clientCert: %q
          clientKey: %q
`, name, p.Addr(), filepath.Join(dir, "egress-ca.crt"), filepath.Join(dir, "egress-client.crt"), filepath.Join(dir, "egress-client.key"))
	}
	return b.String()
}
