// Package cluster starts a real, local Kubernetes cluster for tests and the
// demo: etcd and kube-apiserver through controller-runtime's envtest, plus
// kube-controller-manager, kube-scheduler and kwok (fake nodes) as child
// processes. Pods really get scheduled and become Running/Ready on the fake
// nodes, DaemonSets and Deployments roll out, nothing leaves the loopback
// interface and no container is run. What kube-apiserver dials for webhooks,
// aggregated APIs and kubelets goes through an egress proxy that refuses
// every address not on this machine (egress.go, Cluster.EgressRefused).
//
// The binaries come from hack/cluster-bins.sh (bin/cluster in the repo).
// Linux is the supported platform (children get PR_SET_PDEATHSIG).
package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"embed"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// ModulePath is the module whose go.mod marks the repository root.
const ModulePath = "github.com/meshkeeper/meshkeeper"

// RequireEnv, when "1", turns a missing binaries directory into a test
// failure instead of a skip (see SkipIfUnavailable).
const RequireEnv = "MESHKEEPER_REQUIRE_CLUSTER"

// Binaries are the executables Start needs in the binaries directory.
var Binaries = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"}

//go:embed stages/*.yaml
var stageFS embed.FS

// Node is a fake (kwok) node.
type Node struct {
	Name          string
	KernelVersion string            // status.nodeInfo.kernelVersion, kept as given
	Labels        map[string]string // added to the defaults (kubernetes.io/hostname, os, arch)
	// InternalIP is the node's InternalIP address (fake, never bound).
	// Default: 10.89.<n/250>.<n%250+2> for the n-th node of the cluster.
	InternalIP string
}

// Options configure Start.
type Options struct {
	// BinDir holds the binaries. Default: $KUBEBUILDER_ASSETS, else
	// <repo root>/bin/cluster.
	BinDir string
	// Nodes are created before Start returns; Start waits until all are Ready.
	Nodes []Node
	// CRDDirectoryPaths are installed by envtest (missing paths are an error).
	CRDDirectoryPaths []string
	// LogDir receives one <component>.log per process and is kept. Default:
	// a directory inside the cluster's temp dir, removed by Stop.
	LogDir string
	// Stdout, if set, receives progress lines.
	Stdout io.Writer
	// StartTimeout bounds Start when ctx has no earlier deadline. Default 90s.
	StartTimeout time.Duration
	// Volumes is how many 10Gi PersistentVolumes (no storage class) are
	// pre-created for kube-controller-manager's binder to hand to claims,
	// as a static provisioner would. Default 4; negative: none.
	Volumes int
	// RealNode, if set, adds a node with a real kubelet and containerd on
	// this machine (root only; see realnode_doc.go). Start waits until it
	// is Ready.
	RealNode *RealNode
}

// Cluster is a running local cluster. Stop it when done.
type Cluster struct {
	Env            *envtest.Environment
	Config         *rest.Config // a system:masters user
	KubeconfigPath string       // kubeconfig of that user, for kubectl and child processes
	BinDir         string
	Client         client.Client // clientgoscheme + meshkeeper v1alpha1
	Scheme         *kruntime.Scheme
	LogDir         string
	// SchedulerPort is kube-scheduler's https port on 127.0.0.1 (/readyz is open).
	SchedulerPort int

	tmpDir     string
	keepLogs   bool
	out        io.Writer
	kubeletVer string

	mu                sync.Mutex
	procs             []*proc
	envPIDs           map[string]int
	nodeCount         int
	schedulerRestarts int
	restartMu         sync.Mutex
	reaper            *reaper
	envUp             bool
	real              *realNode
	egress            *egressProxy // kube-apiserver's way out (egress.go)
	egressLog         *os.File

	stopOnce sync.Once
	stopErr  error
}

// DefaultBinDir returns $KUBEBUILDER_ASSETS if set, else <repo root>/bin/cluster.
func DefaultBinDir() (string, error) {
	if d := os.Getenv("KUBEBUILDER_ASSETS"); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin", "cluster"), nil
}

// RepoRoot finds the directory of the go.mod of module ModulePath, walking up
// from the working directory and, failing that, from this source file.
func RepoRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		for {
			if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && modulePathOf(data) == ModulePath {
				return dir, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", fmt.Errorf("cluster: no go.mod of module %s above %v", ModulePath, starts)
}

func modulePathOf(gomod []byte) string {
	for line := range strings.SplitSeq(string(gomod), "\n") {
		line = strings.TrimSpace(line)
		if rest, ok := strings.CutPrefix(line, "module"); ok && (strings.HasPrefix(rest, " ") || strings.HasPrefix(rest, "\t")) {
			rest = strings.TrimSpace(rest)
			if i := strings.Index(rest, "//"); i >= 0 {
				rest = strings.TrimSpace(rest[:i])
			}
			return strings.Trim(rest, `"`+"`")
		}
	}
	return ""
}

// MissingBinaries lists the Binaries absent from dir (all of them if dir does
// not exist).
func MissingBinaries(dir string) []string {
	var missing []string
	for _, b := range Binaries {
		if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			missing = append(missing, b)
		}
	}
	return missing
}

// TB is the part of testing.TB SkipIfUnavailable uses.
type TB interface {
	Helper()
	Skipf(format string, args ...any)
	Fatalf(format string, args ...any)
}

// SkipIfUnavailable skips the test when the default binaries directory does
// not exist, unless MESHKEEPER_REQUIRE_CLUSTER=1, in which case it fails.
// Incomplete directories are a failure either way. It returns the directory.
func SkipIfUnavailable(t TB) string {
	t.Helper()
	dir, err := DefaultBinDir()
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	if _, err := os.Stat(dir); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("cluster binaries directory %s does not exist (%s=1): run hack/cluster-bins.sh", dir, RequireEnv)
		}
		t.Skipf("cluster binaries directory %s does not exist: run hack/cluster-bins.sh (set %s=1 to fail instead)", dir, RequireEnv)
	}
	if missing := MissingBinaries(dir); len(missing) > 0 {
		t.Fatalf("cluster binaries directory %s lacks %v: run hack/cluster-bins.sh", dir, missing)
	}
	return dir
}

// Start starts a cluster and returns when the controller-manager and the
// scheduler are up and every node in opts.Nodes is Ready (and untainted).
// On error everything started is stopped again and the error carries the
// tail of each component's log.
func Start(ctx context.Context, opts Options) (_ *Cluster, retErr error) {
	began := time.Now()
	binDir := opts.BinDir
	if binDir == "" {
		d, err := DefaultBinDir()
		if err != nil {
			return nil, err
		}
		binDir = d
	}
	if missing := MissingBinaries(binDir); len(missing) > 0 {
		return nil, fmt.Errorf("cluster: %s lacks %v (run hack/cluster-bins.sh)", binDir, missing)
	}
	binDir, err := filepath.Abs(binDir)
	if err != nil {
		return nil, err
	}
	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = 90 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	tmp, err := os.MkdirTemp("", "meshkeeper-cluster-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{BinDir: binDir, tmpDir: tmp, out: opts.Stdout, envPIDs: map[string]int{}}
	c.LogDir = opts.LogDir
	c.keepLogs = opts.LogDir != ""
	if c.LogDir == "" {
		c.LogDir = filepath.Join(tmp, "logs")
	}
	for _, d := range []string{c.LogDir, filepath.Join(tmp, "home")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			_ = os.RemoveAll(tmp)
			return nil, err
		}
	}
	defer func() {
		if retErr != nil {
			tails := c.logTails(40)
			_ = c.Stop()
			retErr = fmt.Errorf("%w%s", retErr, tails)
		}
	}()

	if c.reaper, err = startReaper(); err != nil {
		return nil, fmt.Errorf("cluster: start reaper: %w", err)
	}

	// etcd + kube-apiserver.
	etcdLog, err := c.openLog("etcd")
	if err != nil {
		return nil, err
	}
	apiLog, err := c.openLog("kube-apiserver")
	if err != nil {
		return nil, err
	}
	certDir := filepath.Join(tmp, "apiserver")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return nil, err
	}
	api := &envtest.APIServer{
		Path:    filepath.Join(binDir, "kube-apiserver"),
		CertDir: certDir,
		Out:     apiLog,
		Err:     apiLog,
	}
	egressConfig, err := c.startEgress(certDir, opts.RealNode != nil)
	if err != nil {
		return nil, err
	}
	// envtest disables the ServiceAccount admission plugin because it runs
	// no controller-manager; ours creates the service accounts, and
	// controller-created pods need the plugin. Whatever kube-apiserver dials
	// for webhooks, aggregated APIs and kubelets goes through the egress
	// proxy, to Services' endpoints rather than their ClusterIPs (egress.go).
	api.Configure().
		Disable("disable-admission-plugins").
		Set("enable-admission-plugins", "ServiceAccount").
		Set("egress-selector-config-file", egressConfig).
		Set("enable-aggregator-routing", "true")
	if opts.RealNode != nil {
		if err := c.prepareRealNode(ctx, *opts.RealNode, api, certDir); err != nil {
			return nil, err
		}
	}
	c.Env = &envtest.Environment{
		BinaryAssetsDirectory: binDir,
		CRDDirectoryPaths:     opts.CRDDirectoryPaths,
		ErrorIfCRDPathMissing: true,
		ControlPlane: envtest.ControlPlane{
			APIServer: api,
			Etcd: &envtest.Etcd{
				Path:    filepath.Join(binDir, "etcd"),
				DataDir: filepath.Join(tmp, "etcd"),
				Out:     etcdLog,
				Err:     etcdLog,
			},
			KubectlPath: filepath.Join(binDir, "kubectl"),
		},
		ControlPlaneStartTimeout: timeout,
		ControlPlaneStopTimeout:  20 * time.Second,
	}
	c.progress(began, "starting etcd and kube-apiserver")
	if _, err := c.Env.Start(); err != nil {
		// envtest stops what it started only partially on error.
		c.envUp = true
		c.registerEnvPIDs()
		return nil, fmt.Errorf("cluster: envtest: %w", err)
	}
	c.envUp = true
	c.registerEnvPIDs()
	c.progress(began, "kube-apiserver up at %s", c.Env.Config.Host)

	user, err := c.Env.AddUser(envtest.User{Name: "meshkeeper-admin", Groups: []string{"system:masters"}}, &rest.Config{QPS: 1000, Burst: 2000})
	if err != nil {
		return nil, fmt.Errorf("cluster: add admin user: %w", err)
	}
	c.Config = user.Config()
	kubeconfig, err := user.KubeConfig()
	if err != nil {
		return nil, fmt.Errorf("cluster: admin kubeconfig: %w", err)
	}
	c.KubeconfigPath = filepath.Join(tmp, "kubeconfig")
	if err := os.WriteFile(c.KubeconfigPath, kubeconfig, 0o600); err != nil {
		return nil, err
	}
	caFile := filepath.Join(tmp, "ca.crt")
	if err := os.WriteFile(caFile, c.Config.CAData, 0o644); err != nil {
		return nil, err
	}

	c.Scheme = kruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(c.Scheme); err != nil {
		return nil, err
	}
	if err := gatewayv1.Install(c.Scheme); err != nil { // waypoints
		return nil, err
	}
	if err := meshv1alpha1.AddToScheme(c.Scheme); err != nil {
		return nil, err
	}
	if c.Client, err = client.New(c.Config, client.Options{Scheme: c.Scheme}); err != nil {
		return nil, fmt.Errorf("cluster: client: %w", err)
	}
	if dc, err := discovery.NewDiscoveryClientForConfig(c.Config); err == nil {
		if v, err := dc.ServerVersion(); err == nil {
			c.kubeletVer = v.GitVersion
		}
	}

	// kube-controller-manager, kube-scheduler, kwok.
	if err := c.startControllerManager(caFile, filepath.Join(certDir, "sa-signer.key")); err != nil {
		return nil, err
	}
	if err := c.startScheduler(); err != nil {
		return nil, err
	}
	if err := c.startKwok(); err != nil {
		return nil, err
	}
	c.progress(began, "started kube-controller-manager, kube-scheduler, kwok")
	if c.real != nil {
		if err := c.startRealNode(ctx, caFile); err != nil {
			return nil, err
		}
		c.progress(began, "started containerd, kube-proxy and kubelet of real node %s", c.real.opts.Name)
	}

	for _, n := range opts.Nodes {
		if err := c.createNode(ctx, n); err != nil {
			return nil, err
		}
	}
	if err := c.createVolumes(ctx, opts.Volumes); err != nil {
		return nil, err
	}

	var names []string
	for _, n := range opts.Nodes {
		names = append(names, n.Name)
	}
	if err := c.waitUntil(ctx, "components and nodes ready", func(ctx context.Context) (bool, string, error) {
		if ok, why, err := c.controllerManagerReady(ctx); !ok || err != nil {
			return ok, why, err
		}
		if ok, why := c.schedulerReady(ctx); !ok {
			return false, why, nil
		}
		if c.real != nil {
			if ok, why, err := c.realNodeReady(ctx); !ok || err != nil {
				return ok, why, err
			}
		}
		return c.nodesReady(ctx, names)
	}); err != nil {
		return nil, err
	}
	if c.real != nil {
		c.real.info.SetupTime = time.Since(c.real.began)
		c.progress(began, "real node %s Ready %.1fs after it was set up", c.real.opts.Name, c.real.info.SetupTime.Seconds())
	}
	c.progress(began, "cluster ready with %d node(s)", len(names))
	return c, nil
}

// createVolumes pre-creates n static PersistentVolumes so StatefulSets with
// volumeClaimTemplates get their claims bound, as on a real cluster.
func (c *Cluster) createVolumes(ctx context.Context, n int) error {
	if n == 0 {
		n = 4
	}
	for i := range max(n, 0) {
		pv := &corev1.PersistentVolume{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("local-pv-%d", i)},
			Spec: corev1.PersistentVolumeSpec{
				Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("10Gi")},
				AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRecycle,
				PersistentVolumeSource: corev1.PersistentVolumeSource{
					HostPath: &corev1.HostPathVolumeSource{Path: fmt.Sprintf("/var/lib/kwok-volumes/%d", i)},
				},
			},
		}
		if err := c.Client.Create(ctx, pv); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("cluster: create volume %s: %w", pv.Name, err)
		}
	}
	return nil
}

func (c *Cluster) progress(began time.Time, format string, args ...any) {
	if c.out == nil {
		return
	}
	fmt.Fprintf(c.out, "cluster: [%5.1fs] %s\n", time.Since(began).Seconds(), fmt.Sprintf(format, args...))
}

func (c *Cluster) openLog(name string) (*os.File, error) {
	return os.OpenFile(filepath.Join(c.LogDir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
}

// childEnv is the environment of child processes: ours, with HOME pointing
// into the cluster's temp dir so that nothing reads or writes ~/.kube or
// ~/.kwok.
func (c *Cluster) childEnv() []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "HOME=") || strings.HasPrefix(kv, "KUBECONFIG=")
	})
	return append(env, "HOME="+filepath.Join(c.tmpDir, "home"), "KUBECONFIG="+c.KubeconfigPath)
}

func (c *Cluster) startControllerManager(caFile, saKey string) error {
	_, err := c.startProc("kube-controller-manager", []string{
		"--kubeconfig=" + c.KubeconfigPath,
		"--leader-elect=false",
		"--secure-port=0",
		"--bind-address=127.0.0.1",
		"--service-account-private-key-file=" + saKey,
		"--root-ca-file=" + caFile,
		"--controllers=*",
		"--kube-api-qps=200",
		"--kube-api-burst=400",
		"--concurrent-daemonset-syncs=5",
		"--v=1",
	})
	return err
}

func (c *Cluster) startScheduler() error {
	port, err := FreePort()
	if err != nil {
		return err
	}
	c.SchedulerPort = port
	_, err = c.startProc("kube-scheduler", []string{
		"--kubeconfig=" + c.KubeconfigPath,
		"--authentication-kubeconfig=" + c.KubeconfigPath,
		"--authorization-kubeconfig=" + c.KubeconfigPath,
		"--leader-elect=false",
		"--secure-port=" + strconv.Itoa(port),
		"--bind-address=127.0.0.1",
		"--v=1",
	})
	return err
}

func (c *Cluster) startKwok() error {
	cfg, err := KwokConfig()
	if err != nil {
		return err
	}
	cfgPath := filepath.Join(c.tmpDir, "kwok.yaml")
	if err := os.WriteFile(cfgPath, cfg, 0o644); err != nil {
		return err
	}
	// No --server-address and no --node-port: kwok then opens no port at all.
	manage := "--manage-all-nodes=true"
	if c.real != nil {
		// Never the real node.
		manage = "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake"
	}
	_, err = c.startProc("kwok", []string{
		"--kubeconfig=" + c.KubeconfigPath,
		"--config=" + cfgPath,
		manage,
		"--cidr=10.244.0.0/16",
		"--node-ip=10.89.255.254",
		"--node-lease-duration-seconds=40",
	})
	return err
}

// KwokConfig returns the kwok --config file: the embedded Stage objects.
func KwokConfig() ([]byte, error) {
	entries, err := stageFS.ReadDir("stages")
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	for _, e := range entries {
		data, err := stageFS.ReadFile(path.Join("stages", e.Name()))
		if err != nil {
			return nil, err
		}
		if buf.Len() > 0 {
			buf.WriteString("---\n")
		}
		buf.Write(data)
		if !bytes.HasSuffix(data, []byte("\n")) {
			buf.WriteByte('\n')
		}
	}
	return buf.Bytes(), nil
}

// controllerManagerReady: the service-account controller has created the
// default ServiceAccount (pods cannot be admitted before).
func (c *Cluster) controllerManagerReady(ctx context.Context) (bool, string, error) {
	var sa corev1.ServiceAccount
	err := c.Client.Get(ctx, client.ObjectKey{Namespace: "default", Name: "default"}, &sa)
	switch {
	case apierrors.IsNotFound(err):
		return false, "no default ServiceAccount yet (kube-controller-manager)", nil
	case err != nil:
		return false, err.Error(), nil
	}
	return true, "", nil
}

var insecureHTTP = &http.Client{
	Timeout:   2 * time.Second,
	Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, //nolint:gosec // loopback health check of a self-signed server
}

func (c *Cluster) schedulerReady(ctx context.Context) (bool, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("https://127.0.0.1:%d/readyz", c.SchedulerPort), nil)
	if err != nil {
		return false, err.Error()
	}
	resp, err := insecureHTTP.Do(req)
	if err != nil {
		return false, "kube-scheduler /readyz: " + err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Sprintf("kube-scheduler /readyz: %d %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return true, ""
}

// nodesReady: every named node exists, is Ready and carries no not-ready or
// unreachable taint (so that pods can be scheduled on it right away).
func (c *Cluster) nodesReady(ctx context.Context, names []string) (bool, string, error) {
	for _, name := range names {
		var n corev1.Node
		if err := c.Client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
			return false, fmt.Sprintf("node %s: %v", name, err), nil
		}
		if !NodeReady(&n) {
			return false, fmt.Sprintf("node %s not Ready", name), nil
		}
		for _, t := range n.Spec.Taints {
			if t.Key == corev1.TaintNodeNotReady || t.Key == corev1.TaintNodeUnreachable {
				return false, fmt.Sprintf("node %s still tainted %s", name, t.Key), nil
			}
		}
	}
	return true, "", nil
}

// NodeReady reports whether the node's Ready condition is True.
func NodeReady(n *corev1.Node) bool {
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// waitUntil polls cond every 100ms until it holds, ctx ends or a child
// process exits.
func (c *Cluster) waitUntil(ctx context.Context, what string, cond func(context.Context) (bool, string, error)) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := ""
	for {
		if err := c.deadChild(); err != nil {
			return fmt.Errorf("cluster: waiting for %s: %w", what, err)
		}
		ok, why, err := cond(ctx)
		if err != nil {
			return fmt.Errorf("cluster: waiting for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		last = why
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: waiting for %s: %w (last: %s)", what, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// AddNode creates a fake node and waits until it is Ready and untainted.
func (c *Cluster) AddNode(ctx context.Context, n Node) error {
	if err := c.createNode(ctx, n); err != nil {
		return err
	}
	return c.waitUntil(ctx, "node "+n.Name+" ready", func(ctx context.Context) (bool, string, error) {
		return c.nodesReady(ctx, []string{n.Name})
	})
}

func (c *Cluster) createNode(ctx context.Context, n Node) error {
	if n.Name == "" {
		return errors.New("cluster: node without a name")
	}
	c.mu.Lock()
	idx := c.nodeCount
	c.nodeCount++
	c.mu.Unlock()
	ip := n.InternalIP
	if ip == "" {
		ip = fmt.Sprintf("10.89.%d.%d", idx/250, idx%250+2)
	}
	labels := map[string]string{
		corev1.LabelHostname:   n.Name,
		corev1.LabelOSStable:   "linux",
		corev1.LabelArchStable: "amd64",
		"type":                 "kwok",
	}
	for k, v := range n.Labels {
		labels[k] = v
	}
	kubelet := c.kubeletVer
	if kubelet == "" {
		kubelet = "fake"
	}
	res := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("64"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("250"),
	}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:   n.Name,
			Labels: labels,
			Annotations: map[string]string{
				"kwok.x-k8s.io/node":           "fake",
				"node.alpha.kubernetes.io/ttl": "0",
			},
		},
		// The apiserver keeps the status of a created Node (kubelets
		// register this way); kwok's node-initialize stage then only fills
		// what is missing.
		Status: corev1.NodeStatus{
			Capacity:    res,
			Allocatable: res.DeepCopy(),
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: ip},
				{Type: corev1.NodeHostName, Address: n.Name},
			},
			NodeInfo: corev1.NodeSystemInfo{
				KernelVersion:           n.KernelVersion,
				OSImage:                 "meshkeeper fake node (kwok)",
				ContainerRuntimeVersion: "kwok://v0.8.0",
				KubeletVersion:          kubelet,
				OperatingSystem:         "linux",
				Architecture:            "amd64",
				MachineID:               n.Name,
				SystemUUID:              n.Name,
				BootID:                  n.Name,
			},
		},
	}
	if err := c.Client.Create(ctx, node); err != nil {
		return fmt.Errorf("cluster: create node %s: %w", n.Name, err)
	}
	return nil
}

// CreateNamespace creates a namespace and waits for its default
// ServiceAccount: the ServiceAccount admission plugin is on, so a Pod created
// before the controller-manager has made that account is rejected
// (controllers retry, direct Pod creation does not).
func (c *Cluster) CreateNamespace(ctx context.Context, name string, labels map[string]string) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if err := c.Client.Create(ctx, ns); err != nil {
		return fmt.Errorf("cluster: create namespace %s: %w", name, err)
	}
	return c.waitUntil(ctx, "ServiceAccount "+name+"/default", func(ctx context.Context) (bool, string, error) {
		var sa corev1.ServiceAccount
		if err := c.Client.Get(ctx, client.ObjectKey{Namespace: name, Name: "default"}, &sa); err != nil {
			return false, err.Error(), nil
		}
		return true, "", nil
	})
}

// Kubectl runs BinDir/kubectl against the cluster as the admin user.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, string, error) {
	full := append([]string{"--kubeconfig=" + c.KubeconfigPath, "--cache-dir=" + filepath.Join(c.tmpDir, "kubectl-cache")}, args...)
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, "kubectl"), full...)
	cmd.Env = c.childEnv()
	cmd.SysProcAttr = sysProcAttr()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), stderr.String(), err
}

// PIDs returns the process ids of the cluster's processes by component
// (etcd and kube-apiserver are found on Linux only).
func (c *Cluster) PIDs() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := map[string]int{}
	for k, v := range c.envPIDs {
		m[k] = v
	}
	for _, p := range c.procs {
		m[p.name] = p.cmd.Process.Pid
	}
	return m
}

// Stop kills the child processes (their whole process groups), stops envtest
// and removes the temp dir. It is idempotent.
func (c *Cluster) Stop() error {
	if c == nil {
		return nil
	}
	c.stopOnce.Do(func() { c.stopErr = c.stop() })
	return c.stopErr
}

func (c *Cluster) stop() error {
	var errs []error
	if err := c.stopRealNodeProcesses(); err != nil {
		errs = append(errs, err)
	}
	c.mu.Lock()
	procs := slices.Clone(c.procs)
	c.mu.Unlock()
	for _, p := range slices.Backward(procs) {
		if err := p.kill(10 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	envStopped := true
	if c.envUp && c.Env != nil {
		if err := c.Env.Stop(); err != nil {
			envStopped = false
			errs = append(errs, fmt.Errorf("cluster: stop envtest: %w", err))
		}
	}
	if c.reaper != nil {
		// If envtest failed to stop its processes, let the reaper kill
		// their groups; otherwise just end the reaper.
		c.reaper.finish(!envStopped)
	}
	if err := c.stopEgress(); err != nil {
		errs = append(errs, err)
	}
	// The real node's mounts, chains and bridge go once the API server
	// (bound to the bridge's address) has stopped.
	if err := c.stopRealNode(); err != nil {
		errs = append(errs, err)
	}
	c.closeEnvLogs()
	if err := os.RemoveAll(c.tmpDir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (c *Cluster) closeEnvLogs() {
	if c.Env == nil {
		return
	}
	for _, w := range []io.Writer{c.Env.ControlPlane.Etcd.Out, c.Env.ControlPlane.APIServer.Out} {
		if f, ok := w.(*os.File); ok {
			_ = f.Close()
		}
	}
}

// logTails returns the last n lines of every log in LogDir, for errors.
func (c *Cluster) logTails(n int) string {
	entries, err := os.ReadDir(c.LogDir)
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".log") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(c.LogDir, e.Name()))
		if err != nil || len(bytes.TrimSpace(data)) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		fmt.Fprintf(&b, "\n--- tail of %s ---\n%s", e.Name(), strings.Join(lines, "\n"))
	}
	return b.String()
}
