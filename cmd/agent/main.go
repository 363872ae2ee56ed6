// Command agent is meshkeeper's node agent: kernel preflight, the eBPF
// redirection datapath and L4 telemetry for one node. See bpf/README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/meshkeeper/meshkeeper/internal/agent"
	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

var version = "dev"

const usageText = `usage: agent <command> [flags]
  run        preflight, report the node's MeshNode, load or adopt the eBPF datapath,
             enroll the node's pods and serve metrics until SIGTERM (which detaches nothing)
  uninstall  detach and remove every pinned program, map and link, and the CNI plugin (idempotent)
  install-cni  copy the CNI plugin into the CNI bin directory and chain it into the node's conflist once
             (run does this itself and keeps it chained)
  preflight  check this node's kernel for eBPF redirection; prints JSON, exits 3 when ineligible
  version    print the agent version
Run "agent <command> -h" for a command's flags.`

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = run(os.Args[2:])
	case "uninstall":
		err = uninstall(os.Args[2:])
	case "install-cni":
		err = installCNI(os.Args[2:])
	case "preflight":
		err = preflight(os.Args[2:], os.Stdout)
	case "version":
		fmt.Println(version)
	case "-h", "--help", "help":
		fmt.Println(usageText)
	default:
		usage()
	}
	if err != nil {
		if code, ok := err.(exitCode); ok {
			os.Exit(int(code))
		}
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
}

type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit %d", int(e)) }

func usage() {
	fmt.Fprintln(os.Stderr, usageText)
	os.Exit(2)
}

func run(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	o := agent.RunOptions{AgentVersion: version}
	var capturePort, bypassMark uint
	var kubeconfig string
	var noKube bool
	var memLimit int64
	fs.StringVar(&o.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (the MeshNode's name); defaults to $NODE_NAME")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":9102", "address of the /metrics and /healthz endpoint; 0 disables it")
	fs.UintVar(&capturePort, "capture-port", 15001, "the node proxy's capture port on 127.0.0.1 in each enrolled pod's network namespace")
	fs.UintVar(&bypassMark, "bypass-mark", agent.DefaultBypassMark, "SO_MARK of the proxy's own sockets, which are never redirected (ztunnel's is 0x539); must not be 0")
	fs.BoolVar(&o.DNSCapture, "dns-capture", false, "send enrolled pods' DNS (UDP and TCP port 53) to ztunnel's DNS proxy on port 15053 in their netns; only for bundles that enable ztunnel's DNS proxy")
	fs.StringVar(&o.ZDSSocket, "zds-socket", zds.DefaultSocketPath, "unix socket where ztunnel connects for the ZDS hand-off of each enrolled pod's netns (its directory is shared with ztunnel); \"\" hands nothing to ztunnel")
	fs.StringVar(&o.PinPath, "pin-path", agent.DefaultPinPath, "bpffs directory for the pinned maps, programs and links")
	fs.StringVar(&o.ProcRoot, "proc-root", agent.DefaultProcRoot, "the host's procfs, where pods' processes and network namespaces are found (the chart mounts the host's /proc there; /proc for an agent run as a host process)")
	fs.StringVar(&o.CgroupPath, "cgroup-path", "", "cgroup v2 directory to attach to (default: the cgroup2 mount found by preflight)")
	fs.StringVar(&o.NamespaceSelector, "namespace-selector", agent.DefaultNamespaceSelector, "label selector of the namespaces whose pods are redirected")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config, or $KUBECONFIG)")
	fs.BoolVar(&noKube, "no-kube", false, "run without an API server: no MeshNode, pods from --pods-file (tests, debugging)")
	fs.StringVar(&o.PodsFile, "pods-file", "", "with --no-kube: pods to enroll, one \"<namespace>/<name> <uid> [<netns path>]\" per line; re-read when it changes")
	fs.Int64Var(&memLimit, "memory-limit", 24<<20, "Go soft memory limit in bytes unless $GOMEMLIMIT is set; 0 disables")
	var exclude string
	fs.StringVar(&o.CNI.Socket, "cni-socket", "", "unix socket the CNI plugin asks to enrol new pods on (e.g. "+cni.DefaultSocket+"); empty disables CNI-time enrolment")
	fs.StringVar(&o.CNI.HostSocket, "cni-host-socket", "", "the same socket's path on the host, written into the plugin's conf (default --cni-socket)")
	fs.StringVar(&o.CNI.ConfDir, "cni-conf-dir", "", "the node's CNI config directory; when set the plugin is chained into its conflist and kept there")
	fs.StringVar(&o.CNI.BinDir, "cni-bin-dir", "", "the node's CNI bin directory the plugin is copied into")
	fs.StringVar(&o.CNI.PluginBinary, "cni-plugin", "/"+cni.PluginType, "the CNI plugin binary to install (in the agent's image)")
	fs.DurationVar(&o.CNI.Timeout, "cni-timeout", cni.DefaultTimeout, "how long the plugin waits for the agent before it fails a pod's sandbox (fail closed)")
	fs.StringVar(&exclude, "cni-exclude-namespaces", "kube-system,"+os.Getenv("POD_NAMESPACE"), "comma-separated namespaces whose pods the plugin passes without asking the agent, even when the agent is down (default: kube-system and $POD_NAMESPACE, the agent's own)")
	_ = fs.Parse(args)
	o.CNI.ExcludeNamespaces = splitList(exclude)
	if capturePort == 0 || capturePort > 65535 {
		return fmt.Errorf("--capture-port %d: want 1-65535", capturePort)
	}
	o.CapturePort = uint16(capturePort)
	if bypassMark > 0xffffffff {
		return fmt.Errorf("--bypass-mark %d: want a 32-bit SO_MARK", bypassMark)
	}
	o.BypassMark = uint32(bypassMark)
	if err := agent.CheckBypassMark(o.BypassMark); err != nil {
		return fmt.Errorf("--bypass-mark: %w", err)
	}
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set && memLimit > 0 {
		debug.SetMemoryLimit(memLimit)
	}

	o.Log = newLogger()
	klog.SetLogger(o.Log.WithName("client-go"))
	if !noKube {
		cfg, err := restConfig(kubeconfig)
		if err != nil {
			return err
		}
		o.RestConfig = cfg
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := agent.Run(ctx, o); err != nil {
		return err
	}
	o.Log.Info("Stopped")
	return nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		kubeconfig = os.Getenv("KUBECONFIG")
	}
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig and not in a cluster (%w); use --no-kube to run without an API server", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

func uninstall(args []string) error {
	fs := flag.NewFlagSet("uninstall", flag.ExitOnError)
	pinPath := fs.String("pin-path", agent.DefaultPinPath, "bpffs directory the agent pinned to")
	confDir := fs.String("cni-conf-dir", "", "the node's CNI config directory: the plugin's entry is removed from its conflists")
	binDir := fs.String("cni-bin-dir", "", "the node's CNI bin directory: the plugin binary is removed")
	_ = fs.Parse(args)
	// The plugin first: once the datapath is gone it could only fail pods.
	// The datapath goes even when the plugin could not (both errors are
	// reported, and the cleanup pod retries).
	var cniErr error
	if *confDir != "" || *binDir != "" {
		changed, err := cni.Uninstall(*confDir, *binDir)
		for _, c := range changed {
			fmt.Println("meshkeeper CNI plugin removed from", c)
		}
		if err != nil {
			cniErr = fmt.Errorf("remove the CNI plugin: %w", err)
		}
	}
	if err := agent.Uninstall(*pinPath); err != nil {
		return errors.Join(cniErr, err)
	}
	fmt.Println("meshkeeper datapath removed from", *pinPath)
	return cniErr
}

func installCNI(args []string) error {
	fs := flag.NewFlagSet("install-cni", flag.ExitOnError)
	o := cni.InstallOptions{}
	var timeout time.Duration
	var exclude string
	fs.StringVar(&o.ConfDir, "cni-conf-dir", "/etc/cni/net.d", "the node's CNI config directory")
	fs.StringVar(&o.BinDir, "cni-bin-dir", "/opt/cni/bin", "the node's CNI bin directory")
	fs.StringVar(&o.PluginBinary, "cni-plugin", "/"+cni.PluginType, "the CNI plugin binary to install")
	fs.StringVar(&o.Conf.Socket, "cni-host-socket", cni.DefaultSocket, "the agent's socket on the host")
	fs.DurationVar(&timeout, "cni-timeout", cni.DefaultTimeout, "how long the plugin waits for the agent")
	fs.StringVar(&exclude, "cni-exclude-namespaces", "kube-system", "comma-separated namespaces the plugin passes without asking")
	_ = fs.Parse(args)
	o.Conf.Timeout = timeout.String()
	o.Conf.ExcludeNamespaces = splitList(exclude)
	r, err := cni.Install(o)
	if err != nil {
		return err
	}
	fmt.Printf("meshkeeper CNI plugin chained into %s (config changed: %v, binary changed: %v)\n", r.ConfFile, r.ConfChanged, r.BinaryChanged)
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

func preflight(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("preflight", flag.ExitOnError)
	_ = fs.Parse(args)
	r, err := agent.Preflight()
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	_ = enc.Encode(r)
	if !r.Eligible {
		return exitCode(3)
	}
	return nil
}

func newLogger() logr.Logger {
	return zap.New(zap.UseDevMode(false))
}
