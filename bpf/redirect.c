//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// meshkeeper's node datapath. Attached once at the cgroup v2 root, so every
// program runs for every socket on the node: each one first checks that the
// socket lives in an enrolled network namespace (the `enrolled` map, keyed
// by netns cookie) and is a no-op otherwise. See README.md for the design.

#include "headers/uapi.h"
#include "headers/bpf_helpers.h"
#include "headers/bpf_endian.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define MAX_PODS 8192
#define MAX_SOCKS 65536
#define MAX_PROXY_CONNS 65536

// Outcome of a connection, index into pod_stats.results.
enum result {
	RESULT_OK = 0,
	RESULT_REFUSED = 1,
	RESULT_RESET = 2,
	RESULT_TIMEOUT = 3,
	RESULT_ERROR = 4,
	RESULT_MAX = 5,
};

// Connect latency buckets: bucket i counts latencies <= 2^i microseconds
// (and > 2^(i-1)); the last bucket counts everything above 2^(LAT_BUCKETS-2).
#define LAT_BUCKETS 25

// Value of the `enrolled` map: an enrolled pod's network namespace and its
// L4 telemetry. The agent creates the entry (zeroed, with the pod UID) when it
// enrols the pod and deletes it when the pod goes.
struct pod_info {
	__u8 pod_uid[40]; // NUL-padded
	__u64 results[RESULT_MAX];
	__u64 latency_sum_ns;
	__u64 latency_buckets[LAT_BUCKETS];
};

// Value of the `mk_config` array (one entry), written by the agent.
struct config {
	__be32 proxy_ip4; // capture address, network byte order; 127.0.0.1
	__be16 proxy_port; // capture port, network byte order; 0 disables redirection
	__u16 _pad;
	__u32 bypass_mark; // sockets with this SO_MARK (the proxy's own) are never redirected; 0 = none
	__u32 _pad2;
};

// An original destination, both fields in network byte order.
struct orig_dst {
	__be32 ip4;
	__be16 port;
	__u16 _pad;
};

// Value of the `socks` map, keyed by socket cookie: per client socket in an
// enrolled netns, from connect to close.
struct sock_state {
	__u64 start_ns; // when the SYN was about to be sent
	struct orig_dst orig; // set when connect4/6 redirected this socket
	__u8 redirected;
	__u8 counted; // the connect outcome was recorded
	__u8 _pad[6];
};

// Key of the `proxy_conns` map: a redirected connection as both ends see it,
// in the namespace where it lives. The client side writes it (sock_ops, before
// its SYN leaves); the proxy side reads it (getsockopt SO_ORIGINAL_DST on the
// accepted socket, whose local/peer are the client's peer/local).
struct conn_key {
	__u64 netns_cookie;
	__be32 client_ip4;
	__be32 proxy_ip4;
	__be16 client_port;
	__be16 proxy_port;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__type(key, __u64); // netns cookie
	__type(value, struct pod_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mk_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64); // socket cookie
	__type(value, struct sock_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROXY_CONNS);
	__type(key, struct conn_key);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} proxy_conns SEC(".maps");

// The kernel's struct sock, reduced to the one field sock_ops reads. The
// ___mk suffix is a CO-RE flavour: the loader relocates sk_err's offset
// against the running kernel's BTF for "struct sock".
struct sock___mk {
	int sk_err;
} __attribute__((preserve_access_index));

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&mk_config, &zero);
	if (!cfg || !cfg->proxy_port)
		return 0;
	return cfg;
}

static __always_inline int is_loopback(__be32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

// redirect4 decides for one IPv4 destination of a connect from an enrolled
// netns, records the original destination and returns the capture address
// in *cfg_out, or returns 0 to leave the connect alone.
static __always_inline int redirect4(struct bpf_sock_addr *ctx, __be32 dst_ip, __be16 dst_port, struct config **cfg_out)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	__u64 netns = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&enrolled, &netns))
		return 0;
	struct config *cfg = get_config();
	if (!cfg)
		return 0;

	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct bpf_sock *sk = ctx->sk;
	int bypass = (dst_ip == cfg->proxy_ip4 && dst_port == cfg->proxy_port) || is_loopback(dst_ip) ||
		     (sk && cfg->bypass_mark && sk->mark == cfg->bypass_mark);
	if (bypass) {
		// A socket may connect again after AF_UNSPEC: forget an earlier redirect.
		bpf_map_delete_elem(&socks, &cookie);
		return 0;
	}

	struct sock_state st = {};
	st.orig.ip4 = dst_ip;
	st.orig.port = dst_port;
	st.redirected = 1;
	bpf_map_update_elem(&socks, &cookie, &st, BPF_ANY);
	*cfg_out = cfg;
	return 1;
}

SEC("cgroup/connect4")
int mk_connect4(struct bpf_sock_addr *ctx)
{
	struct config *cfg = 0;
	if (redirect4(ctx, ctx->user_ip4, (__be16)ctx->user_port, &cfg) && cfg) {
		ctx->user_ip4 = cfg->proxy_ip4;
		ctx->user_port = cfg->proxy_port;
	}
	return 1;
}

// IPv4-mapped IPv6 (::ffff:a.b.c.d) from dual-stack sockets; native IPv6
// destinations are not redirected.
static __always_inline int is_v4mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

SEC("cgroup/connect6")
int mk_connect6(struct bpf_sock_addr *ctx)
{
	if (!is_v4mapped(ctx))
		return 1;
	struct config *cfg = 0;
	if (redirect4(ctx, ctx->user_ip6[3], (__be16)ctx->user_port, &cfg) && cfg) {
		ctx->user_ip6[3] = cfg->proxy_ip4;
		ctx->user_port = cfg->proxy_port;
	}
	return 1;
}

static __always_inline struct sock_state *redirected_sock(void *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_state *st = bpf_map_lookup_elem(&socks, &cookie);
	if (!st || !st->redirected)
		return 0;
	return st;
}

SEC("cgroup/getpeername4")
int mk_getpeername4(struct bpf_sock_addr *ctx)
{
	struct sock_state *st = redirected_sock(ctx);
	if (st) {
		ctx->user_ip4 = st->orig.ip4;
		ctx->user_port = st->orig.port;
	}
	return 1;
}

SEC("cgroup/getpeername6")
int mk_getpeername6(struct bpf_sock_addr *ctx)
{
	struct sock_state *st = redirected_sock(ctx);
	if (st && is_v4mapped(ctx)) {
		ctx->user_ip6[3] = st->orig.ip4;
		ctx->user_port = st->orig.port;
	}
	return 1;
}

struct sockaddr_in___mk {
	__u16 sin_family;
	__be16 sin_port;
	__be32 sin_addr;
	__u8 sin_zero[8];
};

#define PAGE_SIZE 4096

SEC("cgroup/getsockopt")
int mk_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		goto pass;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_TCP)
		goto pass;

	struct conn_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	key.client_ip4 = sk->dst_ip4;
	key.client_port = sk->dst_port;
	key.proxy_ip4 = sk->src_ip4;
	key.proxy_port = bpf_htons((__u16)sk->src_port);
	struct orig_dst *orig = bpf_map_lookup_elem(&proxy_conns, &key);
	if (!orig)
		goto pass; // not ours: keep what the kernel (conntrack, if loaded) answered

	struct sockaddr_in___mk *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		goto pass; // caller's buffer is smaller than a sockaddr_in
	sin->sin_family = AF_INET;
	sin->sin_port = orig->port;
	sin->sin_addr = orig->ip4;
	__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
	ctx->optlen = sizeof(*sin);
	// Keep clang from merging the two adjacent 4-byte context stores into
	// one 8-byte store, which the verifier rejects.
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;

pass:
	// Buffers over a page are not copied in; optlen 0 hands the kernel's
	// answer back untouched on every kernel version.
	if (ctx->optlen > PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}

static __always_inline __u32 latency_bucket(__u64 ns)
{
	__u64 us = ns / 1000;
	if (us <= 1)
		return 0;
	// ceil(log2(us)) without loops
	__u64 v = us - 1;
	__u32 r = 0;
	if (v >> 32) {
		v >>= 32;
		r += 32;
	}
	if (v >> 16) {
		v >>= 16;
		r += 16;
	}
	if (v >> 8) {
		v >>= 8;
		r += 8;
	}
	if (v >> 4) {
		v >>= 4;
		r += 4;
	}
	if (v >> 2) {
		v >>= 2;
		r += 2;
	}
	if (v >> 1) {
		r += 1;
	}
	r += 1;
	if (r > LAT_BUCKETS - 1)
		r = LAT_BUCKETS - 1;
	return r;
}

static __always_inline void count(struct pod_info *pod, __u32 result)
{
	if (result < RESULT_MAX)
		__sync_fetch_and_add(&pod->results[result], 1);
}

static __always_inline int sk_error(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct sock___mk *ks = (struct sock___mk *)bpf_skc_to_tcp_sock(sk);
	if (!ks)
		return 0;
	return ks->sk_err;
}

static __always_inline void proxy_key(struct conn_key *key, __u64 netns, struct bpf_sock_ops *skops, int client_side)
{
	key->netns_cookie = netns;
	if (client_side) {
		key->client_ip4 = skops->local_ip4;
		key->client_port = bpf_htons((__u16)skops->local_port);
		key->proxy_ip4 = skops->remote_ip4;
		key->proxy_port = (__be16)(skops->remote_port >> 16);
	} else {
		key->client_ip4 = skops->remote_ip4;
		key->client_port = (__be16)(skops->remote_port >> 16);
		key->proxy_ip4 = skops->local_ip4;
		key->proxy_port = bpf_htons((__u16)skops->local_port);
	}
}

static __always_inline void on_connect(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	if (!bpf_map_lookup_elem(&enrolled, &netns))
		return;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_state *st = bpf_map_lookup_elem(&socks, &cookie);
	if (!st) {
		struct sock_state fresh = {};
		bpf_map_update_elem(&socks, &cookie, &fresh, BPF_ANY);
		st = bpf_map_lookup_elem(&socks, &cookie);
		if (!st)
			return;
	}
	st->start_ns = bpf_ktime_get_ns();
	st->counted = 0;

	struct conn_key key = {};
	proxy_key(&key, netns, skops, 1);
	if (st->redirected) {
		// Written before the SYN leaves, so it exists before the proxy can
		// accept this connection.
		struct orig_dst orig = st->orig;
		bpf_map_update_elem(&proxy_conns, &key, &orig, BPF_ANY);
	} else {
		// A direct connection that reuses an old tuple must not inherit it.
		bpf_map_delete_elem(&proxy_conns, &key);
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_state *st = bpf_map_lookup_elem(&socks, &cookie);
	if (!st || st->counted)
		return;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct pod_info *pod = bpf_map_lookup_elem(&enrolled, &netns);
	if (!pod)
		return;
	st->counted = 1;
	__u64 lat = bpf_ktime_get_ns() - st->start_ns;
	count(pod, RESULT_OK);
	__sync_fetch_and_add(&pod->latency_sum_ns, lat);
	__u32 b = latency_bucket(lat);
	if (b < LAT_BUCKETS)
		__sync_fetch_and_add(&pod->latency_buckets[b], 1);
}

// The proxy's side of a redirected connection: watch it so its proxy_conns
// entry goes when it closes.
static __always_inline void on_passive(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	if (!bpf_map_lookup_elem(&enrolled, &netns))
		return;
	struct config *cfg = get_config();
	if (!cfg || bpf_htons((__u16)skops->local_port) != cfg->proxy_port)
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_close(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_state *st = bpf_map_lookup_elem(&socks, &cookie);
	if (!st) {
		// The proxy's accepted socket (or one we never tracked).
		struct config *cfg = get_config();
		if (cfg && bpf_htons((__u16)skops->local_port) == cfg->proxy_port) {
			struct conn_key key = {};
			proxy_key(&key, netns, skops, 0);
			bpf_map_delete_elem(&proxy_conns, &key);
		}
		return;
	}

	if (st->redirected && !st->counted) {
		// Never established, so the proxy never got a socket for it whose
		// close would remove the entry: remove it here.
		struct conn_key key = {};
		proxy_key(&key, netns, skops, 1);
		bpf_map_delete_elem(&proxy_conns, &key);
	}

	struct pod_info *pod = bpf_map_lookup_elem(&enrolled, &netns);
	if (pod) {
		int err = sk_error(skops);
		if (!st->counted) {
			// Never established.
			switch (err) {
			case ECONNREFUSED:
			case ECONNRESET:
				count(pod, RESULT_REFUSED);
				break;
			case ETIMEDOUT:
			case 0: // the application gave up waiting and closed it
				count(pod, RESULT_TIMEOUT);
				break;
			default:
				count(pod, RESULT_ERROR);
			}
		} else if (err == ECONNRESET || err == EPIPE) {
			count(pod, RESULT_RESET);
		} else if (err == ETIMEDOUT) {
			count(pod, RESULT_TIMEOUT);
		}
	}
	bpf_map_delete_elem(&socks, &cookie);
}

SEC("sockops")
int mk_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_connect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_passive(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			on_close(skops);
		break;
	}
	return 1;
}
