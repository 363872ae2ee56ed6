// Command demo runs meshkeeper's main job on a local cluster: it starts etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler and three kwok fake
// nodes (all built from pinned modules), a real Prometheus on 127.0.0.1
// scraping a stand-in workload, and the operator. It applies the sample Mesh
// (made quick: version 1.26, seconds of bake) and streams `kubectl get mesh`
// until it is Ready; then an upgrade to 1.27 whose canary namespace breaks
// its SLO is rolled back by itself, and an upgrade to 1.28 goes through
// 1.27, node waves then namespace waves, and a switch to Sidecar moves the
// namespaces wave by wave. Then it waits for Ctrl-C (or exits
// with --exit-when-done; --install-only stops after the install).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meshkeeper/meshkeeper/test/cluster"
	"github.com/meshkeeper/meshkeeper/test/localmesh"
)

func main() {
	managerBin := flag.String("manager", "bin/manager", "manager binary")
	binDir := flag.String("cluster-bins", "bin/cluster", "directory of the cluster binaries")
	exitWhenDone := flag.Bool("exit-when-done", false, "stop everything at the end instead of waiting for Ctrl-C")
	installOnly := flag.Bool("install-only", false, "skip the rollouts: stop after the Mesh is Ready")
	flag.Parse()
	if err := run(*managerBin, *binDir, *exitWhenDone, *installOnly); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(managerBin, binDir string, exitWhenDone, installOnly bool) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	workDir := filepath.Join(root, ".tmp", "demo")
	_ = os.RemoveAll(workDir)
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return err
	}
	managerBin, _ = filepath.Abs(managerBin)
	binDir, _ = filepath.Abs(binDir)

	step := func(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }
	start := time.Now()
	step("Starting a local cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok with 3 nodes")
	c, err := cluster.Start(ctx, cluster.Options{
		BinDir: binDir,
		LogDir: workDir,
		Nodes: []cluster.Node{
			{Name: "node-a", KernelVersion: "6.1.0-28-amd64", Labels: map[string]string{"pool": "canary"}},
			{Name: "node-b", KernelVersion: "5.15.0-130-generic"},
			{Name: "node-c", KernelVersion: "5.4.0-216-generic"},
		},
	})
	if err != nil {
		return err
	}
	defer func() {
		step("Stopping the cluster")
		_ = c.Stop()
	}()
	kubeconfig := filepath.Join(workDir, "kubeconfig")
	if err := copyFile(c.KubeconfigPath, kubeconfig); err != nil {
		return err
	}
	step("Cluster up in %s", time.Since(start).Round(time.Millisecond))

	step("Installing meshkeeper (CRDs, webhook) and starting the operator; log: %s", filepath.Join(workDir, "manager.log"))
	m, err := localmesh.Install(ctx, c, localmesh.Options{ManagerBin: managerBin, RepoRoot: root, LogDir: workDir})
	if err != nil {
		return err
	}
	defer func() { _ = m.Stop() }()

	tb := &demoTB{dir: workDir}
	defer tb.close()
	s, err := startSLOs(ctx, tb)
	if err != nil {
		return err
	}
	if s != nil {
		step("Prometheus %s scraping a stand-in workload (meshkeeper_agent_connections_total for shop and shop-staging)", s.srv.URL)
	}
	step("Applying config/samples/namespaces.yaml (shop, shop-staging with mesh=on; legacy without)")
	if out, stderr, err := c.Kubectl(ctx, "apply", "-f", filepath.Join(root, "config", "samples", "namespaces.yaml")); err != nil {
		return fmt.Errorf("apply namespaces: %w: %s", err, stderr)
	} else {
		fmt.Print(indent(out))
	}
	mesh, changes, err := demoMesh(root, s)
	if err != nil {
		return err
	}
	step("Applying config/samples/mesh.yaml with demo settings: %s", changes)
	if err := applyMesh(ctx, c, workDir, mesh); err != nil {
		return err
	}

	step("Watching kubectl get mesh until Ready")
	last := ""
	for {
		out, _, err := c.Kubectl(ctx, "get", "mesh")
		if err == nil && out != last {
			fmt.Print(indent(out))
			last = out
		}
		if _, _, err := c.Kubectl(ctx, "wait", "--for=condition=Ready", "mesh/default", "--timeout=1s"); err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	step("Mesh default is Ready, %s after start", time.Since(start).Round(time.Millisecond))
	for _, view := range []struct {
		what string
		args []string
	}{
		{"the Mesh", []string{"get", "mesh"}},
		{"namespaces (meshkeeper labels the selected ones)", []string{"get", "ns", "-L", "mesh,istio.io/dataplane-mode", "-l", "kubernetes.io/metadata.name in (shop,shop-staging,legacy)"}},
		{"nodes (kernel decides eBPF or the iptables fallback)", []string{"get", "nodes", "-o",
			"custom-columns=NAME:.metadata.name,KERNEL:.status.nodeInfo.kernelVersion,REDIRECTION:.metadata.labels.meshkeeper\\.dev/redirection"}},
		{"mesh components and where they run", []string{"get", "pods", "-n", "istio-system", "-o",
			"custom-columns=COMPONENT:.metadata.labels.meshkeeper\\.dev/component,POD:.metadata.name,NODE:.spec.nodeName,PHASE:.status.phase"}},
	} {
		if out, _, err := c.Kubectl(ctx, view.args...); err == nil {
			fmt.Printf("--- %s\n%s", view.what, indent(out))
		}
	}
	if !installOnly {
		if err := rollouts(ctx, c, s, step); err != nil {
			return err
		}
		step("Done, %s after start", time.Since(start).Round(time.Millisecond))
	}
	if exitWhenDone {
		return nil
	}
	fmt.Printf(`
Poke at it from another terminal:
    export KUBECONFIG=%s
    export PATH=%s:$PATH
    kubectl get mesh                          # MODE, INSTALLED, TARGET, READY, STEP
    kubectl describe mesh default             # conditions and events
    kubectl get mesh default -o yaml          # status.plan, status.rollout, status.history
    kubectl label ns legacy mesh=on           # meshkeeper enrolls it
    kubectl label ns shop mesh-               # meshkeeper removes only its own label
    kubectl apply -f test/e2e/testdata/invalid/waves-decreasing.yaml   # refused, naming the field
    tail -f %s

Press Ctrl-C here to stop the operator and the cluster.
`, kubeconfig, binDir, filepath.Join(workDir, "manager.log"))
	<-ctx.Done()
	fmt.Println()
	return nil
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}

func copyFile(src, dst string) error {
	raw, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, raw, 0o600)
}
