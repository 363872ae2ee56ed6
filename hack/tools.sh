#!/usr/bin/env bash
# Builds (or finds cached) every tool the tests need, several at once, and
# prints how long each took. On a cold 2-core machine one after the other
# they take about an hour; side by side about 36 minutes, because most of a
# cold build is downloading, linking and single-package compiles that leave
# a core idle. Each build's output goes to .tmp/tools/<name>.log; a failed
# build prints its log's tail and fails the whole script.
#
# The cluster binaries, Prometheus and istiod start first (the three longest);
# the real node, the registry and SPIRE (the heaviest in memory) follow as
# the first ones finish, so at most three builds share the machine.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
logs="$root/.tmp/tools"
mkdir -p "$logs"

declare -A pid=() began=()
start_build() {
	local name=$1
	began[$name]=$SECONDS
	"$root/hack/$name.sh" >"$logs/$name.log" 2>&1 &
	pid[$name]=$!
}

failed=0
# wait_any waits for one running build to finish and reports it.
wait_any() {
	local name done_pid rc
	wait -n -p done_pid "${pid[@]}"
	rc=$?
	for name in "${!pid[@]}"; do
		[[ ${pid[$name]} == "$done_pid" ]] || continue
		unset "pid[$name]"
		if ((rc == 0)); then
			echo "tools: $name ready after $((SECONDS - began[$name]))s"
		else
			echo "tools: $name FAILED (exit $rc) after $((SECONDS - began[$name]))s; last lines of $logs/$name.log:" >&2
			tail -n 30 "$logs/$name.log" >&2
			failed=1
		fi
	done
}

all=$SECONDS
queue=(node-bins registry spire-bins)
for name in cluster-bins prometheus istiod; do start_build "$name"; done
while ((${#pid[@]})); do
	wait_any
	if ((${#queue[@]})); then
		start_build "${queue[0]}"
		queue=("${queue[@]:1}")
	fi
done
echo "tools: all ready after $((SECONDS - all))s"
exit "$failed"
