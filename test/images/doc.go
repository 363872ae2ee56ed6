// Package images builds the container images the test cluster's real nodes
// run, without a registry or a Docker engine: each is one Go binary of this
// repository in a single layer, written as an image tarball with
// go-containerregistry and imported into the node's containerd (see
// test/cluster). Names live under meshkeeper.test/ so that none can be
// mistaken for an upstream image.
//
//   - pause: the pod sandbox (pause/), a tiny program that sleeps until
//     it is signalled and reaps orphaned children, as the upstream pause does;
//   - workload: a test client and server that count their connections
//     (workload/), plus the capture-port listener standing in for ztunnel's
//     in-pod listener;
//   - ztunnel-stand-in: a stand-in for the ztunnel DaemonSet that serves its
//     readiness endpoint and nothing else (ztunnel-stand-in/);
//   - agent: the node agent, cmd/agent, exactly as shipped.
package images
