# shellcheck shell=bash
# Shared by the hack/ build scripts. Every tool is built from a pinned Go
# module and cached outside the clone under a key of its inputs (the tool
# module's go.mod and go.sum, and whatever else changes the build), one build
# at a time across checkouts: the others wait for it instead of building the
# same thing. A build goes into a temporary directory that is moved in place
# only once complete, so a killed build leaves no half-filled cache.

# cache_key FILE...: a key made of these files' contents (standard input
# with no files).
cache_key() { cat "$@" | sha256sum | cut -c1-16; }

# tool_cache NAME KEY: sets $cache to NAME's cached directory for KEY and
# holds the lock of NAME's caches until the script exits.
tool_cache() {
	cache="${MESHKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshkeeper}/$1/$2"
	mkdir -p "$(dirname "$cache")"
	exec 9>"$(dirname "$cache")/.lock"
	flock 9
}

# cache_has BIN...: whether every BIN is in $cache.
cache_has() {
	local b
	for b in "$@"; do [[ -x "$cache/$b" ]] || return 1; done
}

# cache_begin: a fresh temporary directory $tmp to build into.
cache_begin() {
	tmp="$cache.tmp.$$"
	rm -rf "$tmp" && mkdir -p "$tmp"
}

# cache_commit: $tmp becomes $cache.
cache_commit() { rm -rf "$cache" && mv "$tmp" "$cache"; }

# link_bin NAME [PATH]: bin/NAME links to $cache (or to PATH inside it).
link_bin() {
	mkdir -p "$root/bin"
	ln -sfn "$cache${2:+/$2}" "$root/bin/$1"
}
