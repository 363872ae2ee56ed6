#!/usr/bin/env bash
# Builds spire-server and spire-agent from the pinned SPIRE module in
# tools/spire, caching them outside the clone keyed by that module's
# go.mod + go.sum, and links bin/spire to the cached directory.
# A cold build takes ~10 min on 2 cores (~4 GB peak); a cache hit takes no time.
# CGO is on: SPIRE's sqlite datastore is github.com/mattn/go-sqlite3 (gcc).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/hack/lib.sh"
mod="$root/tools/spire"
tool_cache spire "$(cache_key "$mod/go.mod" "$mod/go.sum")"
bins=(spire-server spire-agent)

if ! cache_has "${bins[@]}"; then
	echo "Building spire-server and spire-agent into $cache (cold build: ~10 min on 2 cores)..." >&2
	cache_begin
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=1 go build -trimpath \
		-ldflags "-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=1.13.3" \
		-o "$tmp/" \
		github.com/spiffe/spire/cmd/spire-server \
		github.com/spiffe/spire/cmd/spire-agent)
	cache_commit
	echo "Built spire-server and spire-agent in $((SECONDS - start))s." >&2
fi

link_bin spire
echo "$root/bin/spire"
