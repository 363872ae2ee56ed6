#!/usr/bin/env bash
# Builds the binaries of the test cluster's real nodes: kubelet and
# kube-proxy (tools/node, the same pinned k8s.io/kubernetes as tools/cluster)
# and containerd, ctr and the runc shim (tools/containerd). They are cached
# outside the clone under a key of their own (the two modules and this
# script), so adding them leaves the cluster-bins cache untouched, and
# bin/node links to the cached directory. runc and the CNI plugins come from
# Debian (apt: runc containernetworking-plugins; .ci/run installs them).
# Cold build: ~2-3 min on 2 cores with a warm module cache; a hit takes no time.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/hack/lib.sh"
tool_cache node-bins "$(cache_key "$root/tools/node/go.mod" "$root/tools/node/go.sum" \
	"$root/tools/containerd/go.mod" "$root/tools/containerd/go.sum" "$0")"
bins=(kubelet kube-proxy containerd ctr containerd-shim-runc-v2)

if ! cache_has "${bins[@]}"; then
	echo "Building real-node binaries into $cache..." >&2
	cache_begin
	ver=v1.37.1
	ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$ver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/component-base/version/verflag.programName=kubernetes"
	start=$SECONDS
	(cd "$root/tools/node" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
		k8s.io/kubernetes/cmd/kubelet \
		k8s.io/kubernetes/cmd/kube-proxy)
	echo "Built kubelet, kube-proxy in $((SECONDS - start))s." >&2
	cstart=$SECONDS
	cver=v2.4.2
	(cd "$root/tools/containerd" && CGO_ENABLED=0 go build -trimpath -tags no_btrfs,no_devmapper,no_zfs \
		-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$cver" -o "$tmp/" \
		github.com/containerd/containerd/v2/cmd/containerd \
		github.com/containerd/containerd/v2/cmd/ctr \
		github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2)
	echo "Built containerd, ctr, containerd-shim-runc-v2 in $((SECONDS - cstart))s." >&2
	cache_commit
	echo "Built real-node binaries in $((SECONDS - start))s." >&2
fi

for tool in runc /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback; do
	command -v "$tool" >/dev/null || echo "warning: $tool missing (apt-get install runc containernetworking-plugins)" >&2
done

link_bin node
echo "$root/bin/node"
