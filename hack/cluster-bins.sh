#!/usr/bin/env bash
# Builds the local cluster's binaries (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok) from the pinned
# modules in tools/cluster, caching them outside the clone keyed by the tool
# module's go.sum, and links bin/cluster to the cached directory.
# A cold build takes ~14 min on 2 cores; a cache hit takes no time.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
mod="$root/tools/cluster"
key="$(cat "$mod/go.mod" "$mod/go.sum" "$mod/etcd/main.go" | sha256sum | cut -c1-16)"
cache="${MESHKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshkeeper}/cluster-bins/$key"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

complete() {
	for b in "${bins[@]}"; do [[ -x "$cache/$b" ]] || return 1; done
}

# Several checkouts (worktrees, a demo beside a test run) may ask at once:
# one builds, the others wait for it instead of building the same thing.
mkdir -p "$(dirname "$cache")"
exec 9>"$(dirname "$cache")/.lock"
flock 9

if ! complete; then
	echo "Building cluster binaries into $cache (cold build: ~14 min on 2 cores)..." >&2
	tmp="$cache.tmp.$$"
	rm -rf "$tmp" && mkdir -p "$tmp"
	ver=v1.37.1
	ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$ver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/component-base/version/verflag.programName=kubernetes"
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
		k8s.io/kubernetes/cmd/kube-apiserver \
		k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler \
		k8s.io/kubernetes/cmd/kubectl \
		sigs.k8s.io/kwok/cmd/kwok \
		./etcd)
	rm -rf "$cache" && mv "$tmp" "$cache"
	echo "Built cluster binaries in $((SECONDS - start))s." >&2
fi

mkdir -p "$root/bin"
ln -sfn "$cache" "$root/bin/cluster"
echo "$root/bin/cluster"
