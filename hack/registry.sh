#!/usr/bin/env bash
# Builds CNCF distribution's registry (the reference OCI registry) from the
# pinned module in tools/registry, for the OCI catalog tests. Cached outside
# the clone keyed by the tool module's go.mod and go.sum, like the cluster
# binaries; prints the binary's path.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
mod="$root/tools/registry"
key="$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)"
cache="${MESHKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshkeeper}/registry/$key"

mkdir -p "$(dirname "$cache")"
exec 9>"$(dirname "$cache")/.lock"
flock 9

if [[ ! -x "$cache/registry" ]]; then
	echo "Building the OCI registry (distribution) into $cache..." >&2
	tmp="$cache.tmp.$$"
	rm -rf "$tmp" && mkdir -p "$tmp"
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/registry" github.com/distribution/distribution/v3/cmd/registry)
	rm -rf "$cache" && mv "$tmp" "$cache"
	echo "Built the OCI registry in $((SECONDS - start))s." >&2
fi

mkdir -p "$root/bin"
ln -sfn "$cache" "$root/bin/registry"
echo "$root/bin/registry/registry"
