#!/usr/bin/env bash
# Builds spire-server and spire-agent from the pinned SPIRE module in
# tools/spire, caching them outside the clone keyed by that module's
# go.mod + go.sum, and links bin/spire to the cached directory.
# A cold build takes ~10 min on 2 cores (~4 GB peak); a cache hit takes no time.
# CGO is on: SPIRE's sqlite datastore is github.com/mattn/go-sqlite3 (gcc).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
mod="$root/tools/spire"
key="$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)"
cache="${MESHKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshkeeper}/spire/$key"
bins=(spire-server spire-agent)

complete() {
	for b in "${bins[@]}"; do [[ -x "$cache/$b" ]] || return 1; done
}

# One build at a time across checkouts; the others wait for it.
mkdir -p "$(dirname "$cache")"
exec 9>"$(dirname "$cache")/.lock"
flock 9

if ! complete; then
	echo "Building spire-server and spire-agent into $cache (cold build: ~10 min on 2 cores)..." >&2
	tmp="$cache.tmp.$$"
	rm -rf "$tmp" && mkdir -p "$tmp"
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=1 go build -trimpath \
		-ldflags "-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=1.13.3" \
		-o "$tmp/" \
		github.com/spiffe/spire/cmd/spire-server \
		github.com/spiffe/spire/cmd/spire-agent)
	rm -rf "$cache" && mv "$tmp" "$cache"
	echo "Built spire-server and spire-agent in $((SECONDS - start))s." >&2
fi

mkdir -p "$root/bin"
ln -sfn "$cache" "$root/bin/spire"
echo "$root/bin/spire"
