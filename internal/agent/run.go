package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

// RunOptions configure the agent's run command.
type RunOptions struct {
	NodeName    string
	MetricsAddr string
	CapturePort uint16
	BypassMark  uint32
	// DNSCapture sends enrolled pods' DNS to ztunnel's DNS proxy on port
	// 15053 in their netns (for bundles that enable it).
	DNSCapture bool
	PinPath    string
	// ProcRoot is the host's procfs, through which pods' processes and
	// network namespaces are found ("" is /proc: a host process).
	ProcRoot string
	// CgroupPath overrides the cgroup2 mount found by preflight.
	CgroupPath        string
	NamespaceSelector string
	AgentVersion      string
	// RestConfig is the API server to use; nil runs without Kubernetes:
	// no MeshNode, pods come from PodsFile.
	RestConfig *rest.Config
	// PodsFile lists the pods to enroll when there is no API server, one
	// per line: "<namespace>/<name> <uid> [<netns path>]". Without a netns
	// path the pod's namespace is found by scanning /proc. The file is
	// re-read when it changes.
	PodsFile string
	// ZDSSocket is where the agent serves ztunnel's ZDS hand-off of each
	// enrolled pod's netns (zds.DefaultSocketPath in the chart); "" hands
	// nothing to ztunnel (the datapath only: tests of it alone).
	ZDSSocket string
	// Ready, when set, is closed once the datapath is loaded (or known to
	// be unavailable) and enrolment is running.
	Ready chan<- struct{}
	// CNI configures CNI-time enrolment (needs RestConfig); zero disables it.
	CNI CNIOptions
	Log logr.Logger
}

// Run is the node agent: preflight, report the node, load or adopt the
// datapath, keep the enrolled pods up to date and serve metrics until ctx
// ends. It returns without detaching anything: the datapath keeps running
// while the agent restarts or is upgraded.
func Run(ctx context.Context, o RunOptions) error {
	log := o.Log
	if o.NamespaceSelector == "" {
		o.NamespaceSelector = DefaultNamespaceSelector
	}
	result, err := Preflight()
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	log.Info("Preflight", "kernel", result.KernelRelease, "eligible", result.Eligible, "reason", result.Reason, "cgroup2", result.CgroupV2Path)
	collector := &Collector{Node: o.NodeName, OnError: func(err error) { log.Error(err, "Reading datapath maps failed") }}
	if o.ZDSSocket != "" {
		collector.ZDSMetrics = zds.NewMetrics()
	}
	collector.Eligible.Store(result.Eligible)

	srv, err := serveMetrics(o.MetricsAddr, collector, log)
	if err != nil {
		return err
	}
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()

	var kube *KubeClients
	var reporter *nodeReporter
	if o.RestConfig != nil {
		if o.NodeName == "" {
			return errors.New("--node-name is required (the downward API's spec.nodeName)")
		}
		kube, err = NewKubeClients(o.RestConfig)
		if err != nil {
			return err
		}
		reporter = startNodeReporter(ctx, kube.Mesh, o.NodeName, log.WithName("meshnode"))
		// Report preflight before touching the kernel.
		reporter.report(MeshNodeStatus(result, nil, o.AgentVersion, time.Now()))
	}

	if !result.Eligible {
		log.Info("Node is not eligible for eBPF redirection; nothing is attached", "reason", result.Reason)
		o.CNI.remove(log, "the node is not eligible for eBPF redirection")
		signalReady(o.Ready)
		<-ctx.Done()
		return nil
	}
	if err := CheckProcRoot(procRootOrDefault(o.ProcRoot)); err != nil {
		// Without the host's processes no pod can be found: say so rather
		// than report a ready datapath that enrols nothing (fail open).
		log.Error(err, "The agent cannot see the host's processes, so it can enrol no pod; nothing is attached and the node falls back")
		st := MeshNodeStatus(result, nil, o.AgentVersion, time.Now())
		st.Eligible, st.Redirection = false, ""
		st.Reason = "the node agent can enrol no pod: " + err.Error()
		reporter.report(st)
		collector.SetNotReady(st.Reason)
		o.CNI.remove(log, "the agent can enrol no pod")
		signalReady(o.Ready)
		<-ctx.Done()
		return nil
	}
	cgroupPath := result.CgroupV2Path
	if o.CgroupPath != "" {
		cgroupPath = o.CgroupPath
	}
	dp, report, err := LoadDatapath(DatapathConfig{
		PinPath:     o.PinPath,
		CgroupPath:  cgroupPath,
		CaptureAddr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), o.CapturePort),
		DNSPort:     dnsPort(o.DNSCapture),
		BypassMark:  o.BypassMark,
	})
	if err != nil {
		log.Error(err, "Loading the eBPF datapath failed; the node falls back")
		st := MeshNodeStatus(result, err, o.AgentVersion, time.Now())
		reporter.report(st)
		collector.SetNotReady(st.Reason)
		o.CNI.remove(log, "the eBPF datapath did not load")
		signalReady(o.Ready)
		<-ctx.Done()
		return nil
	}
	// SIGTERM: release handles and keep every pin and link, unless the node
	// has left eBPF redirection (DetachOnExit).
	defer func() {
		_ = dp.Close()
		if kube == nil {
			return
		}
		readCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		node, err := GetNode(readCtx, kube.Core, o.NodeName)
		detach, why := DetachOnExit(node, err)
		if !detach {
			log.Info("Stopping; datapath stays attached", "reason", why)
			return
		}
		// Pods must start without the plugin once the node has left.
		o.CNI.remove(log, why)
		if err := Uninstall(o.PinPath); err != nil {
			log.Error(err, "Removing the datapath on exit failed", "reason", why)
			return
		}
		log.Info("Removed the datapath on exit", "reason", why, "pinPath", o.PinPath)
	}()
	// Loading parsed (and mapped) the kernel's BTF for CO-RE, several MiB
	// the agent never needs again: let it go now rather than at some later GC.
	releaseMemory()
	log.Info("Datapath ready", "adoptedMaps", report.AdoptedMaps, "links", report.Links, "inboundLinks", len(report.InboundLinks), "pinPath", o.PinPath)

	// The node's own connections to its pods (the kubelet's probes) are
	// never captured inbound.
	if addrs, err := NodeAddrs(o.ProcRoot); err != nil {
		log.Error(err, "Cannot read the node's addresses; the kubelet's probes to captured pods go through the proxy")
	} else if err := dp.SetInboundBypassSources(addrs); err != nil {
		log.Error(err, "Cannot exempt the node's addresses from inbound capture; the kubelet's probes to captured pods go through the proxy")
	} else {
		log.Info("Inbound capture exempts the node's addresses", "addrs", addrs)
	}

	enroller, err := NewEnroller(dp, o.ProcRoot, log.WithName("enroll"))
	if err != nil {
		return err
	}
	var zsrv *zds.Server
	if o.ZDSSocket != "" {
		zsrv = zds.NewServer(zds.Options{Path: o.ZDSSocket, Log: log.WithName("zds"), Metrics: collector.ZDSMetrics})
		enroller.SetHandoff(zsrv)
		collector.SetZDS(zsrv)
	}
	collector.SetDatapath(dp, enroller)
	go enroller.Run(ctx)
	if reporter != nil {
		go reportEnrolment(ctx, enroller, reporter, MeshNodeStatus(result, nil, o.AgentVersion, time.Now()))
	}

	errc := make(chan error, 2)
	// The pods the node has: known once the watcher (or the pods file) has
	// handled every existing one.
	initial := make(chan struct{})
	var once sync.Once
	synced := func() { once.Do(func() { close(initial) }) }
	if kube != nil {
		w := &PodWatcher{Client: kube.Core, NodeName: o.NodeName, NamespaceSelector: o.NamespaceSelector, Enroller: enroller, Log: log.WithName("watch"), Synced: synced}
		go func() { errc <- w.Run(ctx) }()
		if o.CNI.Socket != "" {
			stopCNI, err := startCNI(ctx, o.CNI, &CNIHandler{Pods: w, Enroller: enroller, Log: log.WithName("cni")}, log.WithName("cni"))
			if err != nil {
				return err
			}
			defer stopCNI()
		}
	} else if o.PodsFile != "" {
		go func() { errc <- watchPodsFile(ctx, o.PodsFile, enroller, synced, log.WithName("podsfile")) }()
	} else {
		synced()
	}
	if zsrv != nil {
		go func() {
			select {
			case <-initial:
			case <-ctx.Done():
				return
			}
			// ztunnel drops whatever its first snapshot after a restart
			// of the agent leaves out: find every pod's netns first, and
			// keep the ones still enrolled but not found.
			enroller.Sync(true)
			enroller.KeepUnfound()
			if err := zsrv.Serve(ctx); err != nil {
				errc <- fmt.Errorf("ZDS server: %w", err)
			}
		}()
	}
	signalReady(o.Ready)
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		if err != nil && ctx.Err() == nil {
			return err
		}
		<-ctx.Done()
		return nil
	}
}

// EnrolmentReportInterval is how often the agent counts its wanted and
// enrolled pods; the MeshNode is rewritten only when the counts or the
// waiting pods change.
const EnrolmentReportInterval = 2 * time.Second

// reportEnrolment keeps the MeshNode's enrolment report current, so that
// pods left unenrolled show on the Mesh (Degraded PodsNotEnrolled) instead
// of the node looking healthy while their traffic bypasses the mesh.
func reportEnrolment(ctx context.Context, e *Enroller, r *nodeReporter, base v1alpha1.MeshNodeStatus) {
	tick := time.NewTicker(EnrolmentReportInterval)
	defer tick.Stop()
	var last *v1alpha1.NodeEnrolment
	for {
		wanted, enrolled, waiting := e.Enrolment()
		if cur := EnrolmentStatus(wanted, enrolled, waiting, time.Now()); !sameEnrolment(last, cur) {
			st := base
			st.Enrolment = cur
			r.report(st)
			last = cur
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func signalReady(ch chan<- struct{}) {
	if ch != nil {
		close(ch)
	}
}

func serveMetrics(addr string, c *Collector, log logr.Logger) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(NewRegistry(c), promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	// Ready once the datapath is loaded and enrolment runs. A pod that is
	// slow to enrol does not make the agent unready: that is reported on the
	// MeshNode and the Mesh (PodsNotEnrolled).
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ok, why := c.Ready(); !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	if addr == "" || addr == "0" {
		return srv, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	log.Info("Serving metrics", "addr", ln.Addr().String())
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error(err, "Metrics server stopped")
		}
	}()
	return srv, nil
}

// nodeReporter writes the latest MeshNode status, retrying with backoff
// until it worked (the API server may be down while the datapath runs fine);
// a newer status replaces one not written yet.
type nodeReporter struct {
	latest chan v1alpha1.MeshNodeStatus
}

func startNodeReporter(ctx context.Context, c rest.Interface, nodeName string, log logr.Logger) *nodeReporter {
	r := &nodeReporter{latest: make(chan v1alpha1.MeshNodeStatus, 1)}
	go func() {
		for {
			var st v1alpha1.MeshNodeStatus
			select {
			case <-ctx.Done():
				return
			case st = <-r.latest:
			}
			delay := time.Second
			for {
				err := WriteMeshNode(ctx, c, nodeName, st)
				if err == nil {
					log.Info("MeshNode written", "node", nodeName, "eligible", st.Eligible, "redirection", st.Redirection, "reason", st.Reason)
					break
				}
				log.Error(err, "Writing MeshNode failed; retrying", "node", nodeName, "in", delay.String())
				select {
				case <-ctx.Done():
					return
				case newer := <-r.latest:
					st = newer
				case <-time.After(wait.Jitter(delay, 0.2)):
					delay = min(2*delay, time.Minute)
				}
			}
		}
	}()
	return r
}

func (r *nodeReporter) report(st v1alpha1.MeshNodeStatus) {
	if r == nil {
		return
	}
	select {
	case <-r.latest: // drop the older one not written yet
	default:
	}
	r.latest <- st
}

// watchPodsFile enrolls the pods listed in path and follows its changes.
func watchPodsFile(ctx context.Context, path string, e *Enroller, synced func(), log logr.Logger) error {
	var lastMod time.Time
	current := map[string]bool{}
	first := true
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		st, err := os.Stat(path)
		if err == nil && (first || !st.ModTime().Equal(lastMod)) {
			lastMod = st.ModTime()
			entries, err := readPodsFile(path)
			if err != nil {
				log.Error(err, "Reading pods file failed")
			} else {
				next := map[string]bool{}
				for _, pe := range entries {
					next[pe.ref.UID] = true
					if pe.netns != "" {
						if err := e.EnrollPath(pe.ref, pe.netns); err != nil {
							log.Error(err, "Enrolling pod failed", "pod", pe.ref.String())
						}
					} else {
						e.Want(pe.ref)
					}
				}
				for uid := range current {
					if !next[uid] {
						e.Forget(uid)
					}
				}
				current = next
				if first {
					e.Reconcile()
					synced()
					first = false
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

type podsFileEntry struct {
	ref   PodRef
	netns string
}

func readPodsFile(path string) ([]podsFileEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []podsFileEntry
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		fields := strings.Fields(text)
		ns, name, ok := strings.Cut(fields[0], "/")
		if len(fields) < 2 || len(fields) > 3 || !ok {
			return nil, fmt.Errorf("%s:%d: want \"<namespace>/<name> <uid> [<netns path>]\", got %q", path, line, text)
		}
		e := podsFileEntry{ref: PodRef{Namespace: ns, Name: name, UID: fields[1]}}
		if len(fields) == 3 {
			e.netns = fields[2]
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// releaseMemory collects garbage, lets finalizers and cleanups (such as the
// munmap of the kernel BTF) run, and returns freed memory to the kernel.
func releaseMemory() {
	runtime.GC()
	time.Sleep(10 * time.Millisecond)
	debug.FreeOSMemory()
}

func dnsPort(capture bool) uint16 {
	if capture {
		return DefaultDNSPort
	}
	return 0
}
