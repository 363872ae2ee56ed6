#!/usr/bin/env bash
# Turns `go test -bench 'Connect|AgentRSS'` output (./internal/agent,
# bench_test.go) on stdin or in the files given into the markdown table of
# the README: per path the median over its rounds (direct, direct#01, ...)
# of conns/s, p50 and p99 latency; "vs direct" is the median over the rounds
# of the path's conns/s relative to direct's in the same round (the paths of
# a round run back to back, so this pairs them under the same machine load);
# and a line for the agent's RSS. `make bench-datapath` pipes into it.
set -euo pipefail

exec awk '
function median(list,    n, v, i, j, t) {
	n = split(list, v, " ")
	for (i = 2; i <= n; i++)           # insertion sort, numerically
		for (j = i; j > 1 && v[j-1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j-1]; v[j-1] = t }
	if (n % 2) return v[(n + 1) / 2]
	return (v[n / 2] + v[n / 2 + 1]) / 2
}
function add(key, val) { vals[key] = (key in vals) ? vals[key] " " val : val }

/^cpu: / { cpu = substr($0, 6) }

/^BenchmarkConnect\// {
	name = $1
	sub(/^BenchmarkConnect\//, "", name)
	if (match(name, /-[0-9]+$/)) { procs = substr(name, RSTART + 1); name = substr(name, 1, RSTART - 1) }
	round = 0
	if (match(name, /#[0-9]+$/)) { round = substr(name, RSTART + 1) + 0; name = substr(name, 1, RSTART - 1) }
	if (!(name in rounds)) order[++npaths] = name
	rounds[name]++
	ops = $2
	for (i = 3; i < NF; i += 2) {
		add(name SUBSEP $(i + 1), $i)
		if ($(i + 1) == "conns/s") conns[name, round] = $i
	}
}

/^BenchmarkAgentRSS250/ {
	for (i = 3; i < NF; i += 2) {
		if ($(i + 1) == "RSS-MiB") rss = $i
		if ($(i + 1) == "anon-RSS-MiB") anon = $i
		if ($(i + 1) == "peak-RSS-MiB") peak = $i
	}
}

END {
	if (npaths > 0) {
		print "| path | conns/s | p50 µs | p99 µs | CPU µs/conn | BPF ns/conn | vs direct |"
		print "|---|---:|---:|---:|---:|---:|---:|"
		for (k = 1; k <= npaths; k++) {
			p = order[k]
			vs = "—"
			base = (p ~ /^inbound-/) ? "inbound-direct" : "direct"
			if (p != base) {
				ratios = ""
				for (key in conns) {
					split(key, kr, SUBSEP)
					if (kr[1] == p && ((base, kr[2]) in conns) && conns[base, kr[2]] > 0)
						ratios = ratios " " conns[key] / conns[base, kr[2]]
				}
				if (ratios != "") vs = sprintf("%+.1f%%", (median(ratios) - 1) * 100)
			}
			cpuc = (p SUBSEP "cpu-µs/conn") in vals ? sprintf("%.1f", median(vals[p SUBSEP "cpu-µs/conn"])) : "—"
			bpfc = (p SUBSEP "bpf-ns/conn") in vals ? sprintf("%.0f", median(vals[p SUBSEP "bpf-ns/conn"])) : "—"
			printf "| %s | %.0f | %.1f | %.1f | %s | %s | %s |\n", p, median(vals[p SUBSEP "conns/s"]), median(vals[p SUBSEP "p50-µs"]), median(vals[p SUBSEP "p99-µs"]), cpuc, bpfc, vs
		}
		print ""
		printf "Medians of %d interleaved rounds of %d connections per path (one client; latency is connect + first byte of the reply); CPU: user+system time of the benchmark process (client and proxy, and the kernel work done for them) per connection; BPF: run time of the datapath programs per connection (kernel BPF stats); vs direct: median of the per-round conns/s ratios to direct (inbound paths: to inbound-direct)", rounds[order[1]], ops
		if (cpu != "") printf "; cpu: %s", cpu
		if (procs != "") printf ", GOMAXPROCS %s", procs
		print "."
	}
	if (rss != "") {
		if (npaths > 0) print ""
		printf "Agent RSS with 250 enrolled netns: %.1f MiB (%.1f MiB anonymous, the rest pages of the binary and libc; peak %.1f MiB).\n", rss, anon, peak
	}
	if (npaths == 0 && rss == "") { print "benchtable: no BenchmarkConnect or BenchmarkAgentRSS250 results in the input" > "/dev/stderr"; exit 1 }
}
' "$@"
