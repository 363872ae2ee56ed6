#!/usr/bin/env bash
# Builds CNCF distribution's registry (the reference OCI registry) from the
# pinned module in tools/registry, for the OCI catalog tests. Cached outside
# the clone keyed by the tool module's go.mod and go.sum, like the cluster
# binaries; prints the binary's path.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/hack/lib.sh"
mod="$root/tools/registry"
tool_cache registry "$(cache_key "$mod/go.mod" "$mod/go.sum")"

if ! cache_has registry; then
	echo "Building the OCI registry (distribution) into $cache..." >&2
	cache_begin
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/registry" github.com/distribution/distribution/v3/cmd/registry)
	cache_commit
	echo "Built the OCI registry in $((SECONDS - start))s." >&2
fi

link_bin registry
echo "$root/bin/registry/registry"
