#!/usr/bin/env bash
# Builds the Prometheus server (cmd/prometheus) from the pinned module in
# tools/prometheus (github.com/prometheus/prometheus, the same version the
# main module uses for promql/promqltest), caching it outside the clone keyed
# by the tool module's go.mod and go.sum, and links bin/prometheus to it.
# make test and make demo run it; nothing is downloaded prebuilt.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/hack/lib.sh"
mod="$root/tools/prometheus"
# Leave out every service-discovery plugin (AWS, Azure, GCE, ...), which are
# most of the build, except Kubernetes SD: the shipped scrape config
# (config/prometheus) is tested as shipped, with pod discovery against the
# local cluster's API server (test/scrape).
tags=remove_all_sd,enable_kubernetes_sd
tool_cache prometheus "$( (cat "$mod/go.mod" "$mod/go.sum"; echo "$tags") | cache_key)"

if ! cache_has prometheus; then
	echo "Building prometheus into $cache (cold build: a few minutes on 2 cores)..." >&2
	cache_begin
	ver="$(cd "$mod" && go list -m -f '{{.Version}}' github.com/prometheus/prometheus)"
	ldflags="-s -w -X github.com/prometheus/common/version.Version=$ver -X github.com/prometheus/common/version.Branch=module"
	start=$SECONDS
	(cd "$mod" && CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp/prometheus" \
		github.com/prometheus/prometheus/cmd/prometheus)
	cache_commit
	echo "Built prometheus $ver in $((SECONDS - start))s." >&2
fi

link_bin prometheus prometheus
echo "$root/bin/prometheus"
