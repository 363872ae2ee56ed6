// Real nodes
//
// Options.RealNode adds one node with a real kubelet, containerd, runc and
// the CNI reference plugins on this machine, next to the kwok nodes. Its
// pods are real processes in real network namespaces. The binaries come from
// hack/node-bins.sh (bin/node), runc and the CNI plugins from Debian.
//
// # Network: nothing leaves the machine
//
// The harness creates a Linux bridge of its own, mkbr0, with 10.213.0.1/24
// (RealNodeBridgeIP). The CNI config it writes (bridge + host-local, in the
// node's own state directory) gives pods addresses from 10.213.0.0/24 and
// exactly two routes: the pod subnet on the bridge, and the Service range
// (10.0.0.0/24, envtest's) through the bridge's address. Pods get no default
// route and there is no masquerading, so a pod can reach other pods, the
// host's address on mkbr0 and Service IPs, and nothing else.
//
// Pods reach the API server the way they do on any cluster: in-cluster
// clients (the node agent) use the `kubernetes` Service's ClusterIP,
// 10.0.0.1:443. For that:
//   - kube-apiserver binds only to 10.213.0.1 (not 127.0.0.1, not all
//     interfaces) and advertises that address, so the `kubernetes` endpoint
//     is 10.213.0.1:<port>; the harness's own clients use the same address,
//     which is local to this machine;
//   - kube-proxy (iptables mode, the real one from k8s.io/kubernetes) runs for
//     the real node and DNATs 10.0.0.1:443 to that endpoint;
//   - the serving certificate is the harness's own (envtest's covers only
//     localhost), with 10.213.0.1, 10.0.0.1, 127.0.0.1 and the
//     kubernetes.default.svc names; its CA is the cluster's root CA that
//     kube-controller-manager publishes into every namespace
//     (kube-root-ca.crt), so pods verify the API server as usual.
//
// The kubelet serves on 10.213.0.1 too (anonymous, AlwaysAllow: it is
// reachable only from this machine), so `kubectl exec` and `logs` work.
// kube-apiserver reaches it, and webhooks or aggregated APIs served by pods
// on the real node, through its egress proxy (egress.go), which allows the
// pod network and the bridge address only while a real node runs.
//
// # Scheduling
//
// The real node carries the taint RealNodeTaint (meshkeeper.dev/real-node,
// NoSchedule). The node DaemonSets of the bundles tolerate every taint, so
// ztunnel and the node agent land on it; istiod and spire-server tolerate
// none and stay on the kwok nodes. Test workloads tolerate it explicitly.
// kwok manages only the nodes annotated kwok.x-k8s.io/node=fake, never the
// real one.
//
// # Leaving the machine as found
//
// Only one real node runs on a machine at a time (a flock on
// /run/meshkeeper-realnode.lock; a second one waits): kubelet and kube-proxy
// own host-wide iptables chains. Stop, and Start on behalf of a run that
// died, undo everything: containers (runc delete), shims, containerd and
// kubelet mounts (pod volumes, rootfs, netns bind mounts), network
// namespaces, the bridge and its veths, the KUBE-* and CNI-* iptables chains
// and tables that were not there before, conntrack entries of the pod and
// Service ranges, the kubepods cgroups, sysctls the kubelet and kube-proxy
// changed, host paths that pods created (/var/run/ztunnel) and the bpffs
// mount and meshkeeper pins if the harness mounted bpffs. TestRealNodeCleanup
// checks it.

package cluster
