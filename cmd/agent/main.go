// Command agent is meshkeeper's node agent: kernel preflight, the eBPF
// redirection datapath and L4 telemetry for one node. See bpf/README.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/meshkeeper/meshkeeper/internal/agent"
	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

var version = "dev"

const usageText = `usage: agent <command> [flags]
  run        preflight, report the node's MeshNode, load or adopt the eBPF datapath,
             enroll the node's pods and serve metrics until SIGTERM (which detaches nothing)
  uninstall  detach and remove every pinned program, map and link (idempotent)
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
	fs.UintVar(&bypassMark, "bypass-mark", agent.DefaultBypassMark, "SO_MARK of the proxy's own sockets, which are never redirected; 0 disables")
	fs.StringVar(&o.ZDSSocket, "zds-socket", zds.DefaultSocketPath, "unix socket where ztunnel connects for the ZDS hand-off of each enrolled pod's netns (its directory is shared with ztunnel); \"\" hands nothing to ztunnel")
	fs.StringVar(&o.PinPath, "pin-path", agent.DefaultPinPath, "bpffs directory for the pinned maps, programs and links")
	fs.StringVar(&o.ProcRoot, "proc-root", agent.DefaultProcRoot, "the host's procfs, where pods' processes and network namespaces are found (the chart mounts the host's /proc there; /proc for an agent run as a host process)")
	fs.StringVar(&o.CgroupPath, "cgroup-path", "", "cgroup v2 directory to attach to (default: the cgroup2 mount found by preflight)")
	fs.StringVar(&o.NamespaceSelector, "namespace-selector", agent.DefaultNamespaceSelector, "label selector of the namespaces whose pods are redirected")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config, or $KUBECONFIG)")
	fs.BoolVar(&noKube, "no-kube", false, "run without an API server: no MeshNode, pods from --pods-file (tests, debugging)")
	fs.StringVar(&o.PodsFile, "pods-file", "", "with --no-kube: pods to enroll, one \"<namespace>/<name> <uid> [<netns path>]\" per line; re-read when it changes")
	fs.Int64Var(&memLimit, "memory-limit", 24<<20, "Go soft memory limit in bytes unless $GOMEMLIMIT is set; 0 disables")
	_ = fs.Parse(args)
	if capturePort == 0 || capturePort > 65535 {
		return fmt.Errorf("--capture-port %d: want 1-65535", capturePort)
	}
	o.CapturePort = uint16(capturePort)
	o.BypassMark = uint32(bypassMark)
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
	_ = fs.Parse(args)
	if err := agent.Uninstall(*pinPath); err != nil {
		return err
	}
	fmt.Println("meshkeeper datapath removed from", *pinPath)
	return nil
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
