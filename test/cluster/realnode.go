package cluster

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Network of the real node (see realnode_doc.go).
const (
	RealNodeBridge    = "mkbr0"
	RealNodeBridgeIP  = "10.213.0.1"
	RealNodePodCIDR   = "10.213.0.0/24"
	ServiceCIDR       = "10.0.0.0/24" // envtest's --service-cluster-ip-range
	KubernetesSvcIP   = "10.0.0.1"
	RealNodeTaintKey  = "meshkeeper.dev/real-node"
	realNodeLockPath  = "/run/meshkeeper-realnode.lock"
	realNodeStatePath = "/run/meshkeeper-realnode.state"
)

// RealNodeTaint keeps everything but the node DaemonSets (which tolerate
// every taint) and test workloads that tolerate it off the real node.
var RealNodeTaint = corev1.Taint{Key: RealNodeTaintKey, Value: "true", Effect: corev1.TaintEffectNoSchedule}

// RealNodeToleration tolerates RealNodeTaint.
var RealNodeToleration = corev1.Toleration{Key: RealNodeTaintKey, Operator: corev1.TolerationOpEqual, Value: "true", Effect: corev1.TaintEffectNoSchedule}

// NodeBinaries are the executables a real node needs in its binaries
// directory (hack/node-bins.sh).
var NodeBinaries = []string{"kubelet", "kube-proxy", "containerd", "ctr", "containerd-shim-runc-v2"}

// RealNode configures the cluster's real node.
type RealNode struct {
	Name   string
	Labels map[string]string
	// BinDir holds NodeBinaries. Default: $MESHKEEPER_NODE_BINS, else
	// <repo root>/bin/node.
	BinDir string
	// Images are image tarballs (BuildImages) imported into containerd
	// before the kubelet starts. The sandbox image must be among them:
	// PauseImage is pinned as the sandbox.
	Images []string
}

// RealNodeInfo is what a test needs to work with the running real node.
type RealNodeInfo struct {
	Name string
	// StateDir holds containerd's root and state, the kubelet's root dir,
	// the CNI config and IPAM data: everything the node writes.
	StateDir string
	// CNIConfDir and CNIBinDir are the node's CNI config directory and its
	// own CNI bin directory (the runtime also reads /usr/lib/cni), both in
	// StateDir: what a chained plugin's installer is pointed at.
	CNIConfDir, CNIBinDir string
	// ContainerdSocket is containerd's gRPC socket (for ctr -a).
	ContainerdSocket string
	BinDir           string
	// SetupTime is how long the real node took from the start of
	// containerd (the control plane already up) to the node Ready.
	SetupTime time.Duration
}

// DefaultNodeBinDir returns $MESHKEEPER_NODE_BINS or <repo root>/bin/node.
func DefaultNodeBinDir() (string, error) {
	if d := os.Getenv("MESHKEEPER_NODE_BINS"); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin", "node"), nil
}

// RealNodeMissing says why a real node cannot start here (not root, missing
// binaries or tools), or "" if it can.
func RealNodeMissing() string {
	if os.Geteuid() != 0 {
		return "a real node needs root"
	}
	dir, err := DefaultNodeBinDir()
	if err != nil {
		return err.Error()
	}
	var missing []string
	for _, b := range NodeBinaries {
		if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.Mode()&0o111 == 0 {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("%s lacks %v: run hack/node-bins.sh", dir, missing)
	}
	for _, tool := range []string{"runc", "ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore", "nft", "conntrack"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			missing = append(missing, cniBinDir+"/"+p)
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("missing %v (apt-get install runc containernetworking-plugins iptables nftables conntrack iproute2)", missing)
	}
	return ""
}

// SkipIfNoRealNode skips (or, with MESHKEEPER_REQUIRE_CLUSTER=1, fails) a
// test when a real node cannot start on this machine.
func SkipIfNoRealNode(t TB) {
	t.Helper()
	why := RealNodeMissing()
	if why == "" {
		return
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("real node unavailable (%s=1): %s", RequireEnv, why)
	}
	t.Skipf("real node unavailable: %s (set %s=1 to fail instead)", why, RequireEnv)
}

const cniBinDir = "/usr/lib/cni"

// realNode is the running real node's state.
type realNode struct {
	opts    RealNode
	binDir  string
	dir     string // short: unix socket paths must stay under 108 bytes
	lock    *os.File
	before  *HostSnapshot
	info    RealNodeInfo
	kubelet *proc
	began   time.Time
}

// prepareRealNode runs before the API server starts: it takes the machine
// lock, cleans what a dead run left, creates the bridge and points the API
// server at it with a certificate that pods can verify.
func (c *Cluster) prepareRealNode(ctx context.Context, o RealNode, api *envtest.APIServer, certDir string) error {
	if o.Name == "" {
		return errors.New("cluster: real node without a name")
	}
	binDir := o.BinDir
	if binDir == "" {
		d, err := DefaultNodeBinDir()
		if err != nil {
			return err
		}
		binDir = d
	}
	if why := RealNodeMissing(); why != "" && o.BinDir == "" {
		return fmt.Errorf("cluster: real node: %s", why)
	}
	binDir, err := filepath.EvalSymlinks(binDir)
	if err != nil {
		return fmt.Errorf("cluster: real node binaries: %w", err)
	}
	r := &realNode{opts: o, binDir: binDir, began: time.Now()}
	if r.lock, err = lockMachine(ctx); err != nil {
		return err
	}
	c.real = r
	// A run that died (SIGKILL, a crash) left its state behind: undo it.
	if stale, err := os.ReadFile(realNodeStatePath); err == nil && len(stale) > 0 {
		c.progress(r.began, "cleaning up after a real node that did not stop: %s", strings.TrimSpace(string(stale)))
		if err := cleanupRealNode(strings.TrimSpace(string(stale)), binDir, nil); err != nil {
			return fmt.Errorf("cluster: clean up a previous real node: %w", err)
		}
	}
	if r.before, err = TakeHostSnapshot(); err != nil {
		return err
	}
	if r.dir, err = os.MkdirTemp("", "mkrn-"); err != nil {
		return err
	}
	if err := os.WriteFile(realNodeStatePath, []byte(r.dir+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(r.dir, "before.json"), r.before.JSON(), 0o644); err != nil {
		return err
	}
	r.info = RealNodeInfo{Name: o.Name, StateDir: r.dir, ContainerdSocket: filepath.Join(r.dir, "containerd.sock"), BinDir: binDir,
		CNIConfDir: filepath.Join(r.dir, "cni/net.d"), CNIBinDir: filepath.Join(r.dir, "cni/bin")}

	if err := run(ctx, "ip", "link", "add", RealNodeBridge, "type", "bridge"); err != nil {
		return err
	}
	if err := run(ctx, "ip", "addr", "add", RealNodeBridgeIP+"/24", "dev", RealNodeBridge); err != nil {
		return err
	}
	if err := run(ctx, "ip", "link", "set", RealNodeBridge, "up"); err != nil {
		return err
	}
	if err := ensureBPFFS(r.before); err != nil {
		return err
	}

	// The API server on the bridge address, with a certificate for it and
	// for the kubernetes Service's ClusterIP.
	caPEM, err := writeServingCerts(certDir, []string{"127.0.0.1", RealNodeBridgeIP, KubernetesSvcIP},
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"})
	if err != nil {
		return fmt.Errorf("cluster: real node: API server certificates: %w", err)
	}
	port, err := freePortOn(RealNodeBridgeIP)
	if err != nil {
		return err
	}
	api.SecureServing.Address = RealNodeBridgeIP
	api.SecureServing.Port = strconv.Itoa(port)
	api.SecurePort = port
	api.SecureServing.CA = caPEM
	api.Configure().Set("advertise-address", RealNodeBridgeIP).
		// exec, logs: the kubelet by its address, not its node name.
		Set("kubelet-preferred-address-types", "InternalIP")
	return nil
}

func lockMachine(ctx context.Context) (*os.File, error) {
	f, err := os.OpenFile(realNodeLockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("cluster: real node lock: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("cluster: real node lock: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("cluster: waiting for another real node on this machine to stop (%s): %w", realNodeLockPath, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// startRealNode runs once the control plane is up: containerd, the images,
// kube-proxy, kubelet.
func (c *Cluster) startRealNode(ctx context.Context, caFile string) error {
	r := c.real
	r.began = time.Now()
	d := r.dir
	for _, sub := range []string{"containerd/root", "containerd/state", "runc", "cni/net.d", "cni/bin", "cni/ipam", "kubelet", "pod-logs"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(d, "cni/net.d/10-meshkeeper.conflist"), []byte(cniConfig(d)), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(d, "containerd.toml"), []byte(containerdConfig(d)), 0o644); err != nil {
		return err
	}
	env := append(c.childEnv(), "PATH="+r.binDir+":/usr/sbin:/usr/bin:/sbin:/bin")
	if _, err := c.startBin("containerd", filepath.Join(r.binDir, "containerd"), []string{"--config", filepath.Join(d, "containerd.toml")}, env); err != nil {
		return err
	}
	if err := c.waitUntil(ctx, "containerd", func(ctx context.Context) (bool, string, error) {
		out, err := r.ctr(ctx, "version")
		return err == nil, out, nil
	}); err != nil {
		return err
	}
	for _, img := range r.opts.Images {
		if out, err := r.ctr(ctx, "-n", "k8s.io", "images", "import", "--no-unpack=false", img); err != nil {
			return fmt.Errorf("cluster: import %s: %w: %s", img, err, out)
		}
	}

	kp := filepath.Join(d, "kube-proxy.yaml")
	kpPorts, err := FreePorts(2)
	if err != nil {
		return err
	}
	if err := os.WriteFile(kp, []byte(kubeProxyConfig(c.KubeconfigPath, r.opts.Name, kpPorts)), 0o644); err != nil {
		return err
	}
	if _, err := c.startBin("kube-proxy", filepath.Join(r.binDir, "kube-proxy"), []string{"--config=" + kp, "--v=1"}, env); err != nil {
		return err
	}

	kcfg := filepath.Join(d, "kubelet.yaml")
	kport, err := freePortOn(RealNodeBridgeIP)
	if err != nil {
		return err
	}
	hport, err := FreePort()
	if err != nil {
		return err
	}
	if err := os.WriteFile(kcfg, []byte(kubeletConfig(d, kport, hport, caFile)), 0o644); err != nil {
		return err
	}
	labels := []string{"type=real"}
	for k, v := range r.opts.Labels {
		labels = append(labels, k+"="+v)
	}
	kl, err := c.startBin("kubelet", filepath.Join(r.binDir, "kubelet"), []string{
		"--config=" + kcfg,
		"--kubeconfig=" + c.KubeconfigPath,
		"--root-dir=" + filepath.Join(d, "kubelet"),
		"--cert-dir=" + filepath.Join(d, "kubelet/pki"),
		"--hostname-override=" + r.opts.Name,
		"--node-ip=" + RealNodeBridgeIP,
		"--node-labels=" + strings.Join(labels, ","),
		"--v=2",
	}, env)
	if err != nil {
		return err
	}
	r.kubelet = kl
	return nil
}

// realNodeReady: the kubelet registered the node and it is Ready.
func (c *Cluster) realNodeReady(ctx context.Context) (bool, string, error) {
	var n corev1.Node
	if err := c.Client.Get(ctx, client.ObjectKey{Name: c.real.opts.Name}, &n); err != nil {
		return false, "real node " + c.real.opts.Name + ": " + err.Error(), nil
	}
	if !NodeReady(&n) {
		msg := "not Ready"
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				msg = cond.Reason + ": " + cond.Message
			}
		}
		return false, "real node " + c.real.opts.Name + ": " + msg, nil
	}
	return true, "", nil
}

// RealNode returns the running real node, or nil.
func (c *Cluster) RealNode() *RealNodeInfo {
	if c.real == nil {
		return nil
	}
	info := c.real.info
	return &info
}

// Ctr runs ctr against the real node's containerd and returns its stdout
// (containerd's warnings, e.g. about cgroup v1, go to stderr).
func (c *Cluster) Ctr(ctx context.Context, args ...string) (string, error) {
	if c.real == nil {
		return "", errors.New("cluster: no real node")
	}
	return c.real.ctr(ctx, args...)
}

func (r *realNode) ctr(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(r.binDir, "ctr"), append([]string{"-a", r.info.ContainerdSocket}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		err = fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), err
}

// stopRealNodeProcesses stops the kubelet first (so it restarts nothing),
// removes every container (in-cluster clients such as the agent must not
// hold the API server's shutdown open) and stops containerd and kube-proxy.
func (c *Cluster) stopRealNodeProcesses() error {
	r := c.real
	if r == nil {
		return nil
	}
	var errs []error
	c.mu.Lock()
	procs := append([]*proc(nil), c.procs...)
	c.mu.Unlock()
	kill := func(name string) {
		for _, p := range procs {
			if p.name == name {
				if err := p.kill(10 * time.Second); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	kill("kubelet")
	if r.dir != "" {
		if err := removeContainers(r.dir); err != nil {
			errs = append(errs, err)
		}
	}
	kill("containerd")
	kill("kube-proxy")
	// Every pod process and shim, even one runc did not know.
	if err := killNodeProcesses(r.binDir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// stopRealNode leaves the machine as it was; it runs after the API server
// (bound to the bridge's address) has stopped.
func (c *Cluster) stopRealNode() error {
	r := c.real
	if r == nil {
		return nil
	}
	var errs []error
	if r.dir != "" {
		if err := cleanupRealNode(r.dir, r.binDir, r.before); err != nil {
			errs = append(errs, err)
		}
	}
	if r.lock != nil {
		_ = r.lock.Close()
	}
	c.real = nil
	return errors.Join(errs...)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// writeServingCerts writes a fresh CA, the API server's serving certificate
// for ips and dns, and the service-account signing key into certDir under
// the names envtest uses (it then generates none of its own), and returns
// the CA in PEM.
func writeServingCerts(certDir string, ips, dns []string) ([]byte, error) {
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour)
	ca, caDER, err := selfSignedCA("meshkeeper-test-cluster-ca", caKey)
	if err != nil {
		return nil, err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now,
		NotAfter:     now.Add(48 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dns,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	files := map[string][]byte{
		"apiserver.crt":  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"apiserver.key":  pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}),
		"sa-signer.crt":  pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"sa-signer.key":  pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		"serving-ca.crt": caPEM,
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(certDir, name), data, 0o600); err != nil {
			return nil, err
		}
	}
	return caPEM, nil
}

func cniConfig(dir string) string {
	return fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "meshkeeper-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q, "rangeStart": "10.213.0.10", "gateway": %q}]],
        "routes": [{"dst": %q, "gw": %q}]
      }
    },
    {"type": "loopback"}
  ]
}
`, RealNodeBridge, filepath.Join(dir, "cni/ipam"), RealNodePodCIDR, RealNodeBridgeIP, ServiceCIDR, RealNodeBridgeIP)
}

func containerdConfig(dir string) string {
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.cri.v1.runtime"]
  # Root here lacks CAP_SYS_RESOURCE: runc cannot raise oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = %[5]q
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    # The machine's plugins, then the node's own bin directory, where a
    # chained plugin such as meshkeeper-cni is installed.
    bin_dirs = [%[6]q, %[9]q]
    conf_dir = %[7]q
    max_conf_num = 1

[plugins."io.containerd.cri.v1.images"]
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %[8]q

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`, filepath.Join(dir, "containerd/root"), filepath.Join(dir, "containerd/state"),
		filepath.Join(dir, "containerd.sock"), filepath.Join(dir, "containerd.sock.ttrpc"),
		filepath.Join(dir, "runc"), cniBinDir, filepath.Join(dir, "cni/net.d"), PauseImage.Ref, filepath.Join(dir, "cni/bin"))
}

func kubeletConfig(dir string, port, healthzPort int, caFile string) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine: hybrid cgroups, no systemd, swap allowed.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://%[1]s/containerd.sock
address: %[2]s
port: %[3]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %[4]d
# Reachable only from this machine (the bridge address).
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
  x509: {clientCAFile: %[6]q}
authorization:
  mode: AlwaysAllow
registerWithTaints:
- {key: %[7]s, value: "true", effect: NoSchedule}
podLogsDir: %[1]s/pod-logs
# Imported images must never be collected, and a busy disk must not evict.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
localStorageCapacityIsolation: false
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 0s
staticPodPath: ""
maxPods: 110
`, dir, RealNodeBridgeIP, port, healthzPort, "", caFile, RealNodeTaintKey)
}

func kubeProxyConfig(kubeconfig, node string, ports []int) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: %q
hostnameOverride: %q
clusterCIDR: %q
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
# Leave the machine's conntrack settings alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
nodePortAddresses: [%q]
`, kubeconfig, node, RealNodePodCIDR, ports[0], ports[1], RealNodeBridgeIP+"/32")
}
