package agent

import (
	"context"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
)

// CNIOptions configure CNI-time enrolment.
type CNIOptions struct {
	// Socket is the agent's unix socket, as the agent sees it; "" disables
	// CNI-time enrolment (pods are then found by the /proc scan only).
	Socket string
	// HostSocket is the same socket as the plugin (a host process) sees
	// it, written into the plugin's conf; default Socket.
	HostSocket string
	// ConfDir and BinDir are the node's CNI config and bin directories as
	// the agent sees them; with ConfDir "" the plugin is not installed.
	ConfDir, BinDir string
	// PluginBinary is the plugin in the agent's image.
	PluginBinary string
	// Timeout bounds one ADD in the plugin.
	Timeout time.Duration
	// ExcludeNamespaces pass through the plugin without asking the agent.
	ExcludeNamespaces []string
}

// The agent's CNI metrics: what the plugin asked and how long the agent
// took to answer an ADD (the time it adds to a pod's start).
var (
	cniRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshkeeper_agent_cni_requests_total",
		Help: "CNI plugin requests answered by the agent, by command (ADD, DEL, CHECK) and result (Enrolled, Skipped, Error).",
	}, []string{"command", "result"})
	cniAddSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "meshkeeper_agent_cni_add_duration_seconds",
		Help:    "Time the agent took to answer a CNI ADD: deciding whether the pod is meshed and enrolling it.",
		Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5},
	})
)

func observeCNI(cmd, result string, took time.Duration) {
	cniRequests.WithLabelValues(cmd, result).Inc()
	if cmd == "ADD" {
		cniAddSeconds.Observe(took.Seconds())
	}
}

// CNIReinstallInterval is how often the agent checks that its plugin is
// still chained: a network plugin that rewrites its conflist (at its own
// restart) drops the entry.
const CNIReinstallInterval = 10 * time.Second

func (o CNIOptions) pluginConf() cni.PluginConf {
	sock := o.HostSocket
	if sock == "" {
		sock = o.Socket
	}
	c := cni.PluginConf{Socket: sock, ExcludeNamespaces: o.ExcludeNamespaces}
	if o.Timeout > 0 {
		c.Timeout = o.Timeout.String()
	}
	return c
}

// startCNI serves the plugin, then chains it into the node's CNI config
// (in that order: an ADD never finds the plugin chained and no agent
// listening because of the agent's own start) and keeps it chained until
// ctx ends. stop closes the socket: from then on, new pods of this node
// fail closed until an agent serves again.
func startCNI(ctx context.Context, o CNIOptions, h cni.Handler, log logr.Logger) (stop func(), err error) {
	srv, err := cni.Listen(o.Socket, h, log)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx); err != nil {
			log.Error(err, "CNI socket stopped")
		}
	}()
	log.Info("Serving the CNI plugin", "socket", o.Socket)
	if o.ConfDir != "" {
		go keepCNIInstalled(ctx, o, log)
	}
	return func() {
		cancel()
		<-done
	}, nil
}

func keepCNIInstalled(ctx context.Context, o CNIOptions, log logr.Logger) {
	opts := cni.InstallOptions{ConfDir: o.ConfDir, BinDir: o.BinDir, PluginBinary: o.PluginBinary, Conf: o.pluginConf()}
	tick := time.NewTicker(CNIReinstallInterval)
	defer tick.Stop()
	lastErr := ""
	for {
		r, err := cni.Install(opts)
		switch {
		case err != nil && err.Error() != lastErr:
			log.Error(err, "Chaining the CNI plugin failed; new pods start without CNI-time enrolment (the /proc scan enrols them)", "confDir", o.ConfDir)
			lastErr = err.Error()
		case err == nil:
			if r.ConfChanged || r.BinaryChanged || lastErr != "" {
				log.Info("CNI plugin installed", "confFile", r.ConfFile, "confChanged", r.ConfChanged, "binaryChanged", r.BinaryChanged, "binDir", o.BinDir)
			}
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// remove unchains the plugin and deletes its binary: the node can no
// longer enrol pods (it left eBPF redirection, or the datapath cannot
// run), so the plugin must not hold its pods back.
func (o CNIOptions) remove(log logr.Logger, why string) {
	if o.ConfDir == "" {
		return
	}
	changed, err := cni.Uninstall(o.ConfDir, o.BinDir)
	if err != nil {
		log.Error(err, "Removing the CNI plugin failed", "reason", why)
	}
	if len(changed) > 0 {
		log.Info("Removed the CNI plugin", "reason", why, "changed", changed)
	}
}
