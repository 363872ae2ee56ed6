/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The few kernel UAPI definitions meshkeeper's programs use, copied from
 * include/uapi/linux/{types,bpf,in,in6,socket,tcp}.h so that generation does
 * not depend on the build host's kernel headers. The context structs are
 * part of the stable BPF ABI: fields are only ever appended.
 */
#ifndef __MESHKEEPER_UAPI_H__
#define __MESHKEEPER_UAPI_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u64 __be64;
typedef __u32 __wsum;

#define __bpf_md_ptr(type, name) \
	union {                  \
		type name;       \
		__u64 : 64;      \
	} __attribute__((aligned(8)))

enum bpf_map_type {
	BPF_MAP_TYPE_UNSPEC = 0,
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_SOCKHASH = 18,
};

/* flags for bpf_map_update_elem */
#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_EXIST 2

/* map_flags */
#define BPF_F_NO_PREALLOC (1U << 0)

struct bpf_sock {
	__u32 bound_dev_if;
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 mark;
	__u32 priority;
	__u32 src_ip4;
	__u32 src_ip6[4];
	__u32 src_port; /* host byte order */
	__be16 dst_port; /* network byte order */
	__u16 : 16;
	__u32 dst_ip4;
	__u32 dst_ip6[4];
	__u32 state;
	__s32 rx_queue_mapping;
};

struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4; /* network byte order */
	__u32 user_ip6[4]; /* network byte order */
	__u32 user_port; /* network byte order */
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	__bpf_md_ptr(struct bpf_sock *, sk);
};

struct bpf_sock_ops {
	__u32 op;
	union {
		__u32 args[4];
		__u32 reply;
		__u32 replylong[4];
	};
	__u32 family;
	__u32 remote_ip4; /* network byte order */
	__u32 local_ip4; /* network byte order */
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network byte order, in the upper 16 bits */
	__u32 local_port; /* host byte order */
	__u32 is_fullsock;
	__u32 snd_cwnd;
	__u32 srtt_us;
	__u32 bpf_sock_ops_cb_flags;
	__u32 state;
	__u32 rtt_min;
	__u32 snd_ssthresh;
	__u32 rcv_nxt;
	__u32 snd_nxt;
	__u32 snd_una;
	__u32 mss_cache;
	__u32 ecn_flags;
	__u32 rate_delivered;
	__u32 rate_interval_us;
	__u32 packets_out;
	__u32 retrans_out;
	__u32 total_retrans;
	__u32 segs_in;
	__u32 data_segs_in;
	__u32 segs_out;
	__u32 data_segs_out;
	__u32 lost_out;
	__u32 sacked_out;
	__u32 sk_txhash;
	__u64 bytes_received;
	__u64 bytes_acked;
	__bpf_md_ptr(struct bpf_sock *, sk);
	__bpf_md_ptr(void *, skb_data);
	__bpf_md_ptr(void *, skb_data_end);
	__u32 skb_len;
	__u32 skb_tcp_flags;
};

struct bpf_sockopt {
	__bpf_md_ptr(struct bpf_sock *, sk);
	__bpf_md_ptr(void *, optval);
	__bpf_md_ptr(void *, optval_end);
	__s32 level;
	__s32 optname;
	__s32 optlen;
	__s32 retval;
};

struct bpf_sk_lookup {
	union {
		__bpf_md_ptr(struct bpf_sock *, sk); /* Selected socket */
		__u64 cookie; /* Non-zero if socket was selected in PROG_TEST_RUN */
	};
	__u32 family; /* Protocol family (AF_INET, AF_INET6) */
	__u32 protocol; /* IP protocol (IPPROTO_TCP, IPPROTO_UDP) */
	__u32 remote_ip4; /* Network byte order */
	__u32 remote_ip6[4]; /* Network byte order */
	__be16 remote_port; /* Network byte order */
	__u16 : 16; /* Zero padding */
	__u32 local_ip4; /* Network byte order */
	__u32 local_ip6[4]; /* Network byte order */
	__u32 local_port; /* Host byte order */
	__u32 ingress_ifindex; /* The arriving interface. Determined by inet_iif. */
};

/* sk_lookup verdicts */
enum sk_action {
	SK_DROP = 0,
	SK_PASS,
};

/* bpf_sock_ops_cb_flags */
enum {
	BPF_SOCK_OPS_RTO_CB_FLAG = (1 << 0),
	BPF_SOCK_OPS_RETRANS_CB_FLAG = (1 << 1),
	BPF_SOCK_OPS_STATE_CB_FLAG = (1 << 2),
	BPF_SOCK_OPS_RTT_CB_FLAG = (1 << 3),
};

/* sock_ops->op */
enum {
	BPF_SOCK_OPS_VOID,
	BPF_SOCK_OPS_TIMEOUT_INIT,
	BPF_SOCK_OPS_RWND_INIT,
	BPF_SOCK_OPS_TCP_CONNECT_CB,
	BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
	BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
	BPF_SOCK_OPS_NEEDS_ECN,
	BPF_SOCK_OPS_BASE_RTT,
	BPF_SOCK_OPS_RTO_CB,
	BPF_SOCK_OPS_RETRANS_CB,
	BPF_SOCK_OPS_STATE_CB,
	BPF_SOCK_OPS_TCP_LISTEN_CB,
};

/* TCP states as reported to sock_ops (same values as the kernel's). */
enum {
	BPF_TCP_ESTABLISHED = 1,
	BPF_TCP_SYN_SENT,
	BPF_TCP_SYN_RECV,
	BPF_TCP_FIN_WAIT1,
	BPF_TCP_FIN_WAIT2,
	BPF_TCP_TIME_WAIT,
	BPF_TCP_CLOSE,
	BPF_TCP_CLOSE_WAIT,
	BPF_TCP_LAST_ACK,
	BPF_TCP_LISTEN,
	BPF_TCP_CLOSING,
	BPF_TCP_NEW_SYN_RECV,
};

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SOL_IP 0
#define SOL_IPV6 41
/* linux/netfilter_ipv4.h */
#define SO_ORIGINAL_DST 80
/* linux/netfilter_ipv6/ip6_tables.h */
#define IP6T_SO_ORIGINAL_DST 80

/* errno values sock_ops reads from sk_err */
#define EPIPE 32
#define ENETUNREACH 101
#define ECONNRESET 104
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define EHOSTUNREACH 113

#endif /* __MESHKEEPER_UAPI_H__ */
