//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// meshkeeper's node datapath. The cgroup programs are attached once, at the
// cgroup v2 root, so each runs for every socket on the node: it first checks
// that the socket lives in an enrolled network namespace (the `enrolled`
// map, keyed by netns cookie) and is a no-op otherwise. The sk_lookup program
// (inbound capture) is attached to each enrolled pod's netns on its own. See
// README.md for the design.

#include "headers/uapi.h"
#include "headers/bpf_helpers.h"
#include "headers/bpf_endian.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define MAX_PODS 8192
#define MAX_SOCKS 65536
#define MAX_PROXY_CONNS 65536
#define MAX_DNS_SOCKS 16384
#define MAX_POD_ADDRS (4 * MAX_PODS)
#define DNS_PORT 53
#define MAX_BYPASS_SOURCES 256

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

// Value of the `mk_config_v2` array (one entry), written by the agent.
struct config {
	__be32 proxy_ip4; // IPv4 capture address, network byte order; 127.0.0.1
	__be32 proxy_ip6[4]; // IPv6 capture address, network byte order; ::1
	__be16 proxy_port; // outbound capture port, network byte order; 0 disables redirection
	__be16 dns_port; // DNS capture port (15053), network byte order; 0: DNS is not captured
	__u32 bypass_mark; // sockets with this SO_MARK (the proxy's own) are never redirected
};

// An address of either family, network byte order. IPv4 (also an IPv4-mapped
// IPv6 address) is family AF_INET in ip[0], the rest zero.
struct orig_dst {
	__be32 ip[4];
	__be16 port;
	__u16 family;
};

// Value of the `socks_v2` map, keyed by socket cookie: per client socket in an
// enrolled netns, from connect to close.
struct sock_state {
	__u64 start_ns; // when the SYN was about to be sent
	struct orig_dst orig; // set when connect4/6 redirected this socket
	__u8 redirected;
	__u8 counted; // the connect outcome was recorded
	__u8 _pad[2];
};

// Key of the `proxy_conns_v2` map: a redirected connection as both ends see
// it, in the namespace where it lives. The client side writes it (sock_ops,
// before its SYN leaves); the proxy side reads it (getsockopt SO_ORIGINAL_DST
// on the accepted socket, whose local/peer are the client's peer/local).
struct conn_key {
	__u64 netns_cookie;
	__be32 client_ip[4];
	__be32 proxy_ip[4];
	__be16 client_port;
	__be16 proxy_port;
	__u32 family;
};

// Key of `inbound_addrs`: an address of an enrolled pod whose inbound TCP
// goes to the proxy's inbound listener.
struct pod_addr {
	__u32 family;
	__be32 ip[4];
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
} mk_config_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64); // socket cookie
	__type(value, struct sock_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} socks_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROXY_CONNS);
	__type(key, struct conn_key);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} proxy_conns_v2 SEC(".maps");

// UDP sockets whose DNS queries went to the DNS capture port: the server
// they were sent to, so that replies seem to come from it. sock_ops never
// sees UDP sockets, so nothing removes these on close: the LRU recycles them.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_DNS_SOCKS);
	__type(key, __u64); // socket cookie
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_socks SEC(".maps");

// Inbound capture: the addresses of enrolled pods (sk_lookup has no netns
// cookie helper, so the pod is found by the address the SYN is for)...
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_POD_ADDRS);
	__type(key, struct pod_addr);
	__type(value, __u64); // netns cookie
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_addrs SEC(".maps");

// ...and each pod's inbound listener (the proxy's 15006 socket inside the
// pod's netns). The kernel removes an entry when its socket closes.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_PODS);
	__type(key, __u64); // netns cookie
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_listeners SEC(".maps");

// Connections the proxy itself opens inside an enrolled pod (its sockets
// carry the bypass mark), by their 4-tuple and the netns they were opened
// in (a conn_key, the connecting side as client): sk_lookup leaves their
// SYNs alone when they are for that same netns, so that
// ztunnel's connection to the application, which comes from inside the pod
// and may carry the original client's address (IP_TRANSPARENT), is not
// captured back to ztunnel. sk_lookup programs see no mark and no netns
// cookie, so sock_ops records them as they connect and removes them on close.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROXY_CONNS);
	__type(key, struct conn_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bypass_conns SEC(".maps");

// Sources whose inbound connections are never captured: the node's own
// addresses, written by the agent. The kubelet's probes (and every other
// connection from the node's network namespace) reach the application
// directly, as behind istio-cni, which SNATs them to 169.254.7.127 on the
// host and exempts that source in the pod.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BYPASS_SOURCES);
	__type(key, struct pod_addr);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_bypass_src SEC(".maps");

// The kernel's struct sock, reduced to the one field sock_ops reads. The
// ___mk suffix is a CO-RE flavour: the loader relocates sk_err's offset
// against the running kernel's BTF for "struct sock".
struct sock___mk {
	int sk_err;
} __attribute__((preserve_access_index));

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&mk_config_v2, &zero);
	if (!cfg || !cfg->proxy_port)
		return 0;
	return cfg;
}

// A 4-byte read of a context field. clang would merge reads of adjacent
// words (an IPv6 address) into 8-byte loads, which the verifier rejects for
// most context fields.
#define CTX32(field) (*(volatile __u32 *)&(field))

static __always_inline int is_loopback4(__be32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

static __always_inline int is_v4mapped(const volatile __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int is_loopback6(const volatile __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == bpf_htonl(1);
}

// Where a connect or a datagram from an enrolled netns goes instead.
enum capture {
	NOT_OURS = -1, // not a socket of an enrolled netns: nothing to do, nothing to forget
	CAPTURE_NONE = 0,
	CAPTURE_TCP = 1, // outbound TCP: the proxy's outbound port
	CAPTURE_DNS = 2, // DNS (UDP, or TCP to port 53) when DNS capture is on: the DNS port
};

// decide looks at one destination of a socket and returns what to capture
// it to (with the config in *cfg_out), CAPTURE_NONE to leave it alone, or
// NOT_OURS when the socket is not in an enrolled netns (or not TCP/UDP).
static __always_inline int decide(struct bpf_sock_addr *ctx, const struct orig_dst *dst, struct config **cfg_out)
{
	int tcp = ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
	int udp = ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP;
	if (!tcp && !udp)
		return NOT_OURS;
	struct config *cfg = get_config();
	if (!cfg || (udp && !cfg->dns_port))
		return NOT_OURS; // UDP on the node costs one array lookup while DNS capture is off
	__u64 netns = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&enrolled, &netns))
		return NOT_OURS;
	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->bypass_mark && sk->mark == cfg->bypass_mark)
		return CAPTURE_NONE; // the proxy's own socket
	// Loopback stays in the pod (the capture addresses are loopback too).
	if (dst->family == AF_INET ? is_loopback4(dst->ip[0]) : is_loopback6(dst->ip))
		return CAPTURE_NONE;
	*cfg_out = cfg;
	if (cfg->dns_port && dst->port == bpf_htons(DNS_PORT))
		return CAPTURE_DNS;
	return tcp ? CAPTURE_TCP : CAPTURE_NONE;
}

// remember records the original destination of a captured socket: TCP in
// socks_v2 (sock_ops takes it from there), UDP in dns_socks.
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct orig_dst *dst)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (ctx->type == SOCK_DGRAM) {
		bpf_map_update_elem(&dns_socks, &cookie, dst, BPF_ANY);
		return;
	}
	struct sock_state st = {};
	st.orig = *dst;
	st.redirected = 1;
	bpf_map_update_elem(&socks_v2, &cookie, &st, BPF_ANY);
}

// forget drops an earlier redirect of a socket that connects again (after
// AF_UNSPEC) somewhere that is not captured.
static __always_inline void forget(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_delete_elem(&socks_v2, &cookie);
}

static __always_inline __be16 capture_port(const struct config *cfg, int what)
{
	return what == CAPTURE_DNS ? cfg->dns_port : cfg->proxy_port;
}

// addr4 / addr6 redirect an IPv4 / IPv6 sock_addr destination: connect for
// TCP and UDP, sendmsg for unconnected UDP.
static __always_inline void addr4(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	dst.family = AF_INET;
	dst.ip[0] = ctx->user_ip4;
	dst.port = (__be16)ctx->user_port;
	struct config *cfg = 0;
	int what = decide(ctx, &dst, &cfg);
	if (what == NOT_OURS)
		return;
	if (what == CAPTURE_NONE || !cfg) {
		forget(ctx);
		return;
	}
	remember(ctx, &dst);
	ctx->user_ip4 = cfg->proxy_ip4;
	ctx->user_port = capture_port(cfg, what);
}

static __always_inline void addr6(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	int mapped = is_v4mapped(ctx->user_ip6);
	if (mapped) {
		dst.family = AF_INET;
		dst.ip[0] = CTX32(ctx->user_ip6[3]);
	} else {
		dst.family = AF_INET6;
		dst.ip[0] = CTX32(ctx->user_ip6[0]);
		dst.ip[1] = CTX32(ctx->user_ip6[1]);
		dst.ip[2] = CTX32(ctx->user_ip6[2]);
		dst.ip[3] = CTX32(ctx->user_ip6[3]);
	}
	dst.port = (__be16)ctx->user_port;
	struct config *cfg = 0;
	int what = decide(ctx, &dst, &cfg);
	if (what == NOT_OURS)
		return;
	if (what == CAPTURE_NONE || !cfg) {
		forget(ctx);
		return;
	}
	remember(ctx, &dst);
	if (mapped) {
		// ::ffff:127.0.0.1, so that the IPv4 listener gets it.
		CTX32(ctx->user_ip6[3]) = cfg->proxy_ip4;
	} else {
		CTX32(ctx->user_ip6[0]) = cfg->proxy_ip6[0];
		CTX32(ctx->user_ip6[1]) = cfg->proxy_ip6[1];
		CTX32(ctx->user_ip6[2]) = cfg->proxy_ip6[2];
		CTX32(ctx->user_ip6[3]) = cfg->proxy_ip6[3];
	}
	ctx->user_port = capture_port(cfg, what);
}

SEC("cgroup/connect4")
int mk_connect4(struct bpf_sock_addr *ctx)
{
	addr4(ctx);
	return 1;
}

SEC("cgroup/connect6")
int mk_connect6(struct bpf_sock_addr *ctx)
{
	addr6(ctx);
	return 1;
}

// Unconnected UDP: each datagram's destination. Only DNS is captured, so
// for anything else decide returns CAPTURE_NONE.
SEC("cgroup/sendmsg4")
int mk_sendmsg4(struct bpf_sock_addr *ctx)
{
	addr4(ctx);
	return 1;
}

SEC("cgroup/sendmsg6")
int mk_sendmsg6(struct bpf_sock_addr *ctx)
{
	addr6(ctx);
	return 1;
}

static __always_inline struct orig_dst *dns_orig(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_lookup_elem(&dns_socks, &cookie);
}

// A reply from the DNS capture port seems to come from the server the query
// was sent to, as it does behind iptables REDIRECT and conntrack.
SEC("cgroup/recvmsg4")
int mk_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct config *cfg = get_config();
	if (!cfg || !cfg->dns_port || ctx->user_ip4 != cfg->proxy_ip4 || (__be16)ctx->user_port != cfg->dns_port)
		return 1;
	struct orig_dst *orig = dns_orig(ctx);
	if (!orig || orig->family != AF_INET)
		return 1;
	ctx->user_ip4 = orig->ip[0];
	ctx->user_port = orig->port;
	return 1;
}

SEC("cgroup/recvmsg6")
int mk_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct config *cfg = get_config();
	if (!cfg || !cfg->dns_port || (__be16)ctx->user_port != cfg->dns_port)
		return 1;
	struct orig_dst *orig = dns_orig(ctx);
	if (!orig)
		return 1;
	if (is_v4mapped(ctx->user_ip6)) {
		if (orig->family != AF_INET || CTX32(ctx->user_ip6[3]) != cfg->proxy_ip4)
			return 1;
		CTX32(ctx->user_ip6[3]) = orig->ip[0];
	} else {
		if (orig->family != AF_INET6 || CTX32(ctx->user_ip6[0]) != cfg->proxy_ip6[0] || CTX32(ctx->user_ip6[1]) != cfg->proxy_ip6[1] ||
		    CTX32(ctx->user_ip6[2]) != cfg->proxy_ip6[2] || CTX32(ctx->user_ip6[3]) != cfg->proxy_ip6[3])
			return 1;
		CTX32(ctx->user_ip6[0]) = orig->ip[0];
		CTX32(ctx->user_ip6[1]) = orig->ip[1];
		CTX32(ctx->user_ip6[2]) = orig->ip[2];
		CTX32(ctx->user_ip6[3]) = orig->ip[3];
	}
	ctx->user_port = orig->port;
	return 1;
}

// peer_orig is the original destination of a redirected socket: a TCP one
// (socks_v2) or a connected UDP one (dns_socks).
static __always_inline struct orig_dst *peer_orig(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (ctx->type == SOCK_DGRAM)
		return bpf_map_lookup_elem(&dns_socks, &cookie);
	struct sock_state *st = bpf_map_lookup_elem(&socks_v2, &cookie);
	if (!st || !st->redirected)
		return 0;
	return &st->orig;
}

SEC("cgroup/getpeername4")
int mk_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = peer_orig(ctx);
	if (orig && orig->family == AF_INET) {
		ctx->user_ip4 = orig->ip[0];
		ctx->user_port = orig->port;
	}
	return 1;
}

SEC("cgroup/getpeername6")
int mk_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = peer_orig(ctx);
	if (!orig)
		return 1;
	if (orig->family == AF_INET && is_v4mapped(ctx->user_ip6)) {
		CTX32(ctx->user_ip6[3]) = orig->ip[0];
		ctx->user_port = orig->port;
	} else if (orig->family == AF_INET6 && !is_v4mapped(ctx->user_ip6)) {
		CTX32(ctx->user_ip6[0]) = orig->ip[0];
		CTX32(ctx->user_ip6[1]) = orig->ip[1];
		CTX32(ctx->user_ip6[2]) = orig->ip[2];
		CTX32(ctx->user_ip6[3]) = orig->ip[3];
		ctx->user_port = orig->port;
	}
	return 1;
}

struct sockaddr_in___mk {
	__u16 sin_family;
	__be16 sin_port;
	__be32 sin_addr;
	__u8 sin_zero[8];
};

struct sockaddr_in6___mk {
	__u16 sin6_family;
	__be16 sin6_port;
	__be32 sin6_flowinfo;
	__be32 sin6_addr[4];
	__u32 sin6_scope_id;
};

#define PAGE_SIZE 4096

SEC("cgroup/getsockopt")
int mk_getsockopt(struct bpf_sockopt *ctx)
{
	__u32 want;
	if (ctx->level == SOL_IP && ctx->optname == SO_ORIGINAL_DST)
		want = AF_INET;
	else if (ctx->level == SOL_IPV6 && ctx->optname == IP6T_SO_ORIGINAL_DST)
		want = AF_INET6;
	else
		goto pass;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_TCP)
		goto pass;

	// The accepted socket's peer is the client, its local end the proxy.
	struct conn_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	key.proxy_port = bpf_htons((__u16)sk->src_port);
	key.client_port = sk->dst_port;
	if (sk->family == AF_INET) {
		key.family = AF_INET;
		key.client_ip[0] = sk->dst_ip4;
		key.proxy_ip[0] = sk->src_ip4;
	} else {
		__u32 dst[4] = {CTX32(sk->dst_ip6[0]), CTX32(sk->dst_ip6[1]), CTX32(sk->dst_ip6[2]), CTX32(sk->dst_ip6[3])};
		if (is_v4mapped(dst)) {
			key.family = AF_INET;
			key.client_ip[0] = dst[3];
			key.proxy_ip[0] = CTX32(sk->src_ip6[3]);
		} else {
			key.family = AF_INET6;
			key.client_ip[0] = dst[0];
			key.client_ip[1] = dst[1];
			key.client_ip[2] = dst[2];
			key.client_ip[3] = dst[3];
			key.proxy_ip[0] = CTX32(sk->src_ip6[0]);
			key.proxy_ip[1] = CTX32(sk->src_ip6[1]);
			key.proxy_ip[2] = CTX32(sk->src_ip6[2]);
			key.proxy_ip[3] = CTX32(sk->src_ip6[3]);
		}
	}
	struct orig_dst *orig = bpf_map_lookup_elem(&proxy_conns_v2, &key);
	if (!orig || orig->family != want)
		goto pass; // not ours: keep what the kernel (conntrack, if loaded) answered

	if (want == AF_INET) {
		struct sockaddr_in___mk *sin = ctx->optval;
		if ((void *)(sin + 1) > ctx->optval_end)
			goto pass; // caller's buffer is smaller than a sockaddr_in
		sin->sin_family = AF_INET;
		sin->sin_port = orig->port;
		sin->sin_addr = orig->ip[0];
		__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6___mk *sin6 = ctx->optval;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			goto pass;
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = orig->port;
		sin6->sin6_flowinfo = 0;
		sin6->sin6_addr[0] = orig->ip[0];
		sin6->sin6_addr[1] = orig->ip[1];
		sin6->sin6_addr[2] = orig->ip[2];
		sin6->sin6_addr[3] = orig->ip[3];
		sin6->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
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

// Ports an inbound SYN keeps: the proxy's own listeners in the pod (HBONE
// 15008 above all, which must reach the proxy's HBONE listener as it is),
// and Istio's reserved 15020/15021.
static __always_inline int inbound_reserved_port(__u32 port)
{
	switch (port) {
	case 15001:
	case 15006:
	case 15008:
	case 15020:
	case 15021:
	case 15053:
		return 1;
	}
	return 0;
}

// Inbound capture, attached to each enrolled pod's netns (sk_lookup links
// are per netns): a TCP SYN for one of the pod's addresses goes to the
// proxy's inbound listener, unless the proxy itself opened the connection
// (bypass_conns). The accepted socket's local address is the SYN's
// destination, so the proxy knows the original destination as it would
// behind TPROXY. (The pod's other connections to itself are outbound, and
// outbound capture already sent them to the proxy's outbound port.)
SEC("sk_lookup")
int mk_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (inbound_reserved_port(ctx->local_port))
		return SK_PASS;
	struct pod_addr addr = {};
	struct pod_addr src = {};
	struct conn_key tuple = {};
	tuple.client_port = ctx->remote_port;
	tuple.proxy_port = bpf_htons((__u16)ctx->local_port);
	if (ctx->family == AF_INET) {
		addr.family = AF_INET;
		addr.ip[0] = ctx->local_ip4;
		src.family = AF_INET;
		src.ip[0] = ctx->remote_ip4;
		tuple.family = AF_INET;
		tuple.client_ip[0] = ctx->remote_ip4;
		tuple.proxy_ip[0] = ctx->local_ip4;
	} else {
		addr.family = AF_INET6;
		src.family = AF_INET6;
		tuple.family = AF_INET6;
		for (int i = 0; i < 4; i++) {
			addr.ip[i] = CTX32(ctx->local_ip6[i]);
			src.ip[i] = CTX32(ctx->remote_ip6[i]);
			tuple.proxy_ip[i] = addr.ip[i];
			tuple.client_ip[i] = src.ip[i];
		}
	}
	__u64 *netns = bpf_map_lookup_elem(&inbound_addrs, &addr);
	if (!netns)
		return SK_PASS; // not a captured address (a link-local one, say)
	// Only a connection the proxy opened in this very pod (its inbound leg
	// to the application) is left alone. One it opened in another pod's
	// netns (its outbound leg from a client pod on this node) is inbound
	// to this pod like any other, as behind istio-cni, where the mark does
	// not cross the veth.
	tuple.netns_cookie = *netns;
	if (bpf_map_lookup_elem(&bypass_conns, &tuple))
		return SK_PASS; // the proxy's own connection to the application
	if (bpf_map_lookup_elem(&inbound_bypass_src, &src))
		return SK_PASS; // from the node itself: the kubelet's probes
	struct bpf_sock *sk = bpf_map_lookup_elem(&inbound_listeners, netns);
	if (!sk)
		return SK_DROP; // captured pod without a listener: fail closed (RST), never around the proxy
	// Only the proxy's listener: sock_ops put every listener on the inbound
	// port in the map, before its owner could mark it (ztunnel sets its
	// mark right after listen). Another one (the application's own on
	// 15006) is refused rather than handed the pod's inbound traffic.
	struct config *cfg = get_config();
	if (!cfg || !cfg->bypass_mark || sk->mark != cfg->bypass_mark) {
		bpf_sk_release(sk);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
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
	__be16 local_port = bpf_htons((__u16)skops->local_port);
	__be16 remote_port = (__be16)(skops->remote_port >> 16);
	key->client_port = client_side ? local_port : remote_port;
	key->proxy_port = client_side ? remote_port : local_port;
	if (skops->family == AF_INET6) {
		__u32 remote[4] = {CTX32(skops->remote_ip6[0]), CTX32(skops->remote_ip6[1]), CTX32(skops->remote_ip6[2]), CTX32(skops->remote_ip6[3])};
		if (!is_v4mapped(remote)) {
			__u32 local[4] = {CTX32(skops->local_ip6[0]), CTX32(skops->local_ip6[1]), CTX32(skops->local_ip6[2]), CTX32(skops->local_ip6[3])};
			key->family = AF_INET6;
			for (int i = 0; i < 4; i++) {
				key->client_ip[i] = client_side ? local[i] : remote[i];
				key->proxy_ip[i] = client_side ? remote[i] : local[i];
			}
			return;
		}
	}
	// IPv4, or IPv4-mapped on a dual-stack socket (local/remote_ip4 hold it).
	key->family = AF_INET;
	key->client_ip[0] = client_side ? skops->local_ip4 : skops->remote_ip4;
	key->proxy_ip[0] = client_side ? skops->remote_ip4 : skops->local_ip4;
}

// is_capture_port: the local port of a proxy's accepted socket.
static __always_inline int is_capture_port(const struct config *cfg, __u32 local_port)
{
	__be16 p = bpf_htons((__u16)local_port);
	return p == cfg->proxy_port || (cfg->dns_port && p == cfg->dns_port);
}

// is_bypass_sock: the socket carries the proxy's mark.
static __always_inline int is_bypass_sock(struct bpf_sock_ops *skops)
{
	struct config *cfg = get_config();
	struct bpf_sock *sk = skops->sk;
	return cfg && sk && cfg->bypass_mark && sk->mark == cfg->bypass_mark;
}

static __always_inline void on_connect(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	if (!bpf_map_lookup_elem(&enrolled, &netns))
		return;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_state *st = bpf_map_lookup_elem(&socks_v2, &cookie);
	if (!st) {
		struct sock_state fresh = {};
		bpf_map_update_elem(&socks_v2, &cookie, &fresh, BPF_ANY);
		st = bpf_map_lookup_elem(&socks_v2, &cookie);
		if (!st)
			return;
	}
	st->start_ns = bpf_ktime_get_ns();
	st->counted = 0;

	struct conn_key key = {};
	proxy_key(&key, netns, skops, 1);
	if (is_bypass_sock(skops)) {
		struct conn_key tuple = key; // with the connecting socket's netns
		__u8 one = 1;
		bpf_map_update_elem(&bypass_conns, &tuple, &one, BPF_ANY);
	}
	if (st->redirected) {
		// Written before the SYN leaves, so it exists before the proxy can
		// accept this connection.
		struct orig_dst orig = st->orig;
		bpf_map_update_elem(&proxy_conns_v2, &key, &orig, BPF_ANY);
	} else {
		// A direct connection that reuses an old tuple must not inherit it.
		bpf_map_delete_elem(&proxy_conns_v2, &key);
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_state *st = bpf_map_lookup_elem(&socks_v2, &cookie);
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
	if (!cfg || !is_capture_port(cfg, skops->local_port))
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_close(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_state *st = bpf_map_lookup_elem(&socks_v2, &cookie);
	if (!st) {
		// The proxy's accepted socket (or one we never tracked).
		struct config *cfg = get_config();
		if (cfg && is_capture_port(cfg, skops->local_port)) {
			struct conn_key key = {};
			proxy_key(&key, netns, skops, 0);
			bpf_map_delete_elem(&proxy_conns_v2, &key);
		}
		return;
	}

	if (!st->redirected) {
		struct conn_key tuple = {};
		proxy_key(&tuple, netns, skops, 1);
		bpf_map_delete_elem(&bypass_conns, &tuple);
	}
	if (st->redirected && !st->counted) {
		// Never established, so the proxy never got a socket for it whose
		// close would remove the entry: remove it here.
		struct conn_key key = {};
		proxy_key(&key, netns, skops, 1);
		bpf_map_delete_elem(&proxy_conns_v2, &key);
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
	bpf_map_delete_elem(&socks_v2, &cookie);
}

// The proxy's inbound listener: a TCP socket that starts listening on
// INBOUND_PORT goes into inbound_listeners under its netns cookie, which is
// where mk_sk_lookup looks for it. Its mark is not checked here: ztunnel
// marks its listeners only after listen() (std's TcpListener::bind listens
// at once); mk_sk_lookup checks it, when it is set. The kernel hands
// it over here because the agent cannot: ztunnel opens it inside the pod's
// netns, in a process the agent cannot reach (no hostPID). The enrolled map
// is not consulted: ztunnel listens while the agent hands it the netns, just
// before the agent enrols it. The kernel drops the entry when the socket
// closes; a later listener (ztunnel restarted, or a newer one of a node wave)
// replaces it.
#define INBOUND_PORT 15006

static __always_inline void on_listen(struct bpf_sock_ops *skops)
{
	if (skops->local_port != INBOUND_PORT)
		return;
	__u64 netns = bpf_get_netns_cookie(skops);
	bpf_sock_hash_update(skops, &inbound_listeners, &netns, BPF_ANY);
}

SEC("sockops")
int mk_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_listen(skops);
		break;
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
