#!/usr/bin/env bash
# Builds pilot-discovery (istiod) from the pinned istio.io/istio
# pseudo-version in tools/istiod, caching it outside the clone keyed by that
# module's go.mod + go.sum and this script, and links bin/istiod to the cached
# directory. The tests in test/istiod run it as a host process against the
# test cluster. A cold build takes ~5 min on an idle 2-core machine (longer
# when it is busy; a ~190 MB binary); a cache hit takes no time.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/hack/lib.sh"
mod="$root/tools/istiod"
tool_cache istiod "$(cache_key "$mod/go.mod" "$mod/go.sum" "$0")"
bins=(pilot-discovery)

if ! cache_has "${bins[@]}"; then
	echo "Building pilot-discovery into $cache (cold build: ~5 min on 2 cores)..." >&2
	cache_begin
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/" \
		istio.io/istio/pilot/cmd/pilot-discovery)
	cache_commit
	echo "Built pilot-discovery in $((SECONDS - start))s." >&2
fi

link_bin istiod
echo "$root/bin/istiod"
