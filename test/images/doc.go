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
//   - ztunnel-stand-in: a test double of ztunnel (ztunnel-stand-in/): a ZDS
//     client of the node agent that listens on 15001/15006/15008 inside each
//     pod netns it is handed, proxies to the original destination with
//     ztunnel's in-pod mark and counts connections per pod; ready only once
//     it got the agent's snapshot;
//   - agent: the node agent, cmd/agent, exactly as shipped.
package images
