// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard's XDP program. One object, loaded once per device:
 *
 *   outer: parse, apply the stateless policy (cheapest first: allowlist,
 *          blocklist, UDP source ports, fragments, malformed headers), hand
 *          survivors to the AF_XDP socket of the frame's RX queue;
 *   inner: hand everything to the socket (the origin's replies carry no
 *          policy).
 *
 * Every frame leaves through the single exit of xdpguard_prog(), which counts
 * its reason in xg_stats. Each instance has its own maps, so an instance's
 * counters are one direction's counters.
 */
#include <linux/bpf.h>
#include <linux/icmpv6.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xdpguard.h"

#define ETH_P_8021Q_BE bpf_htons(ETH_P_8021Q)
#define ETH_P_8021AD_BE bpf_htons(ETH_P_8021AD)
#define XG_MAX_VLAN_TAGS 2
#define XG_MAX_IPV6_EXT 4
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define TCP_FLAG_BITS 0x3f
#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_PSH 0x08
#define F_ACK 0x10
#define F_URG 0x20
/* ICMPv6 types of neighbour discovery (RFC 4861): router solicitation .. redirect. */
#define ND_FIRST_TYPE 133
#define ND_LAST_TYPE 137

/* Written by the loader before the object is loaded. */
const volatile struct xg_load_cfg xg_cfg = { .role = XG_ROLE_OUTER };

/*
 * The inner map definitions below name their key types only through
 * pointers, for which clang emits forward declarations; libbpf then cannot
 * size the keys. Holding the types by value here puts their full layouts
 * in the object's BTF (tests/unit/test_layout.py reads them there too),
 * along with the shared types no map uses yet.
 */
const volatile struct {
	struct xg_lpm_v4 lpm_v4;
	struct xg_lpm_v6 lpm_v6;
	struct xg_meta meta;
	/* Kept by the loop today; laid out for BPF maps tomorrow. */
	struct xg_flow flow;
	struct xg_verified verified;
} xg_btf_anchor;

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XG_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xg_xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_REASON_CAP);
	__type(key, __u32);
	__type(value, struct xg_counter);
} xg_stats SEC(".maps");

/*
 * The allow- and blocklists: one LPM trie per list and family, reached
 * through a map-of-maps slot (enum xg_list). Python fills a fresh trie and
 * swaps the slot to replace a whole list atomically; the kernel keeps the
 * old trie alive for programs still using it. An empty slot is an empty
 * list and costs one lookup.
 */
struct xg_lpm_v4_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_LPM_V4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_lpm_v4);
	__type(value, __u32);
};

struct xg_lpm_v6_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_LPM_V6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_lpm_v6);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XG_NR_LISTS);
	__type(key, __u32);
	__array(values, struct xg_lpm_v4_map);
} xg_lists_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XG_NR_LISTS);
	__type(key, __u32);
	__array(values, struct xg_lpm_v6_map);
} xg_lists_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_port_set);
} xg_udp_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_policy);
} xg_policy SEC(".maps");

/* Where the parser stands in the frame. */
struct cursor {
	void *pos;
	void *end;
};

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* What the parser learnt; the policy stages read it. */
struct pkt {
	__be16 l3_proto;	/* network byte order, after VLAN tags */
	__u8 l4_proto;		/* IPPROTO_*, after IPv6 extension headers */
	__u8 fragment;		/* any fragment (IPv4 MF/offset, IPv6 header) */
	__u8 later_fragment;	/* a fragment without the L4 header */
	__u8 l3_bad;		/* IPv4/IPv6 header fields impossible */
	__u8 hop_limit;		/* IPv6 */
	void *l4;		/* NULL if unknown (later fragment, bad L3) */
	struct xg_lpm_v6 key6;	/* source address as an LPM key */
	struct xg_lpm_v4 key4;
};

/* Return a pointer to the next @len bytes and advance, or NULL if short. */
static __always_inline void *cursor_pull(struct cursor *c, __u32 len)
{
	void *p = c->pos;

	if (p + len > c->end)
		return NULL;
	c->pos = p + len;
	return p;
}

static __always_inline enum xg_reason parse_l2(struct cursor *c, struct pkt *pkt)
{
	struct ethhdr *eth;
	struct vlan_hdr *vlan;
	__be16 proto;
	int i;

	eth = cursor_pull(c, sizeof(*eth));
	if (!eth)
		return XG_REASON_MALFORMED;
	proto = eth->h_proto;

#pragma unroll
	for (i = 0; i < XG_MAX_VLAN_TAGS; i++) {
		if (proto != ETH_P_8021Q_BE && proto != ETH_P_8021AD_BE)
			break;
		vlan = cursor_pull(c, sizeof(*vlan));
		if (!vlan)
			return XG_REASON_MALFORMED;
		proto = vlan->proto;
	}
	pkt->l3_proto = proto;
	return XG_REASON_REDIRECTED;
}

/*
 * Only a missing fixed header is fatal here (no source to look up); field
 * checks are recorded in pkt->l3_bad and judged by the malformed stage.
 */
static __always_inline enum xg_reason parse_ipv4(struct cursor *c, struct pkt *pkt)
{
	struct iphdr *iph = cursor_pull(c, sizeof(*iph));
	__u32 hdr_len, tot_len;
	__u16 frag;

	if (!iph)
		return XG_REASON_MALFORMED;
	pkt->key4.prefixlen = 32;
	__builtin_memcpy(pkt->key4.addr, &iph->saddr, 4);

	hdr_len = iph->ihl * 4;
	tot_len = bpf_ntohs(iph->tot_len);
	if (iph->version != 4 || hdr_len < sizeof(*iph) || tot_len < hdr_len ||
	    (void *)iph + hdr_len > c->end || (void *)iph + tot_len > c->end) {
		pkt->l3_bad = 1;
		return XG_REASON_REDIRECTED;
	}
	frag = bpf_ntohs(iph->frag_off);
	pkt->fragment = !!(frag & (IP_MF | IP_OFFSET));
	pkt->later_fragment = !!(frag & IP_OFFSET);
	pkt->l4_proto = iph->protocol;
	if (!pkt->later_fragment)
		pkt->l4 = (void *)iph + hdr_len;
	return XG_REASON_REDIRECTED;
}

struct ipv6_opt_hdr_min {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3, M flag in bit 0 */
	__be32 id;
};

static __always_inline enum xg_reason parse_ipv6(struct cursor *c, struct pkt *pkt)
{
	struct ipv6hdr *ip6h = cursor_pull(c, sizeof(*ip6h));
	struct ipv6_opt_hdr_min *opt;
	struct ipv6_frag_hdr *fh;
	__u8 next;
	int i;

	if (!ip6h)
		return XG_REASON_MALFORMED;
	pkt->key6.prefixlen = 128;
	__builtin_memcpy(pkt->key6.addr, &ip6h->saddr, 16);
	pkt->hop_limit = ip6h->hop_limit;

	if (ip6h->version != 6 ||
	    (void *)(ip6h + 1) + bpf_ntohs(ip6h->payload_len) > c->end) {
		pkt->l3_bad = 1;
		return XG_REASON_REDIRECTED;
	}

	next = ip6h->nexthdr;
#pragma unroll
	for (i = 0; i < XG_MAX_IPV6_EXT; i++) {
		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			opt = c->pos;
			if ((void *)(opt + 1) > c->end ||
			    !cursor_pull(c, (opt->hdrlen + 1) * 8)) {
				pkt->l3_bad = 1;
				return XG_REASON_REDIRECTED;
			}
			next = opt->nexthdr;
			break;
		case IPPROTO_FRAGMENT:
			fh = cursor_pull(c, sizeof(*fh));
			if (!fh) {
				pkt->l3_bad = 1;
				return XG_REASON_REDIRECTED;
			}
			pkt->fragment = 1;
			pkt->later_fragment = !!(bpf_ntohs(fh->frag_off) & ~7);
			next = fh->nexthdr;
			break;
		default:
			goto done;
		}
	}
done:
	pkt->l4_proto = next;
	if (!pkt->later_fragment)
		pkt->l4 = c->pos;
	return XG_REASON_REDIRECTED;
}

/* Neighbour discovery is link plumbing, like ARP: never policed. */
static __always_inline int is_ndisc(struct cursor *c, struct pkt *pkt)
{
	struct icmp6hdr *icmp = pkt->l4;

	/* RFC 4861: ND messages carry hop limit 255, proof they are on-link. */
	if (pkt->l3_proto != bpf_htons(ETH_P_IPV6) || pkt->l4_proto != IPPROTO_ICMPV6 ||
	    pkt->fragment || pkt->hop_limit != 255 || !icmp ||
	    (void *)(icmp + 1) > c->end)
		return 0;
	return icmp->icmp6_type >= ND_FIRST_TYPE && icmp->icmp6_type <= ND_LAST_TYPE;
}

/* @bits: the list's xg_list_bits for (v4, v6), checked against @policy. */
static __always_inline int in_list(struct pkt *pkt, struct xg_policy *policy,
				   __u32 list, __u32 bit_v4, __u32 bit_v6)
{
	void *trie;

	if (pkt->l3_proto == bpf_htons(ETH_P_IP)) {
		if (!(policy->lists & bit_v4))
			return 0;
		trie = bpf_map_lookup_elem(&xg_lists_v4, &list);
		return trie && bpf_map_lookup_elem(trie, &pkt->key4);
	}
	if (!(policy->lists & bit_v6))
		return 0;
	trie = bpf_map_lookup_elem(&xg_lists_v6, &list);
	return trie && bpf_map_lookup_elem(trie, &pkt->key6);
}

static __always_inline int udp_port_blocked(struct cursor *c, struct pkt *pkt)
{
	struct udphdr *udp = pkt->l4;
	struct xg_port_set *ports;
	__u32 zero = 0;
	__u16 port;

	if (pkt->l4_proto != IPPROTO_UDP || !udp || (void *)(udp + 1) > c->end)
		return 0;
	ports = bpf_map_lookup_elem(&xg_udp_ports, &zero);
	if (!ports)
		return 0;
	port = bpf_ntohs(udp->source);
	return (ports->bits[(port >> 6) & (XG_PORT_WORDS - 1)] >> (port & 63)) & 1;
}

static __always_inline int tcp_flags_impossible(__u8 f)
{
	f &= TCP_FLAG_BITS;
	if (!f)
		return 1; /* null scan */
	if ((f & F_SYN) && (f & (F_FIN | F_RST)))
		return 1;
	if ((f & F_FIN) && (f & F_RST))
		return 1;
	/* Only a SYN or a RST may come without ACK (RFC 9293 3.10.7). */
	if (!(f & F_ACK) && (f & (F_FIN | F_PSH | F_URG)))
		return 1;
	return 0;
}

static __always_inline int l4_malformed(struct cursor *c, struct pkt *pkt)
{
	struct tcphdr *tcp = pkt->l4;
	struct udphdr *udp = pkt->l4;

	if (!pkt->l4)
		return 0; /* later fragment: no L4 header to judge */
	if (pkt->l4_proto == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > c->end || tcp->doff < 5 ||
		    (void *)tcp + tcp->doff * 4 > c->end)
			return 1;
		return tcp_flags_impossible(((__u8 *)tcp)[13]);
	}
	if (pkt->l4_proto == IPPROTO_UDP)
		return (void *)(udp + 1) > c->end || bpf_ntohs(udp->len) < sizeof(*udp);
	return 0;
}

/* The stateless policy of the outer device; XG_REASON_REDIRECTED = passes. */
static __always_inline enum xg_reason outer_policy(struct xdp_md *ctx)
{
	struct cursor c = {
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};
	struct xg_policy *policy;
	struct pkt pkt = {};
	enum xg_reason r;
	__u32 zero = 0;

	policy = bpf_map_lookup_elem(&xg_policy, &zero);
	if (!policy)
		return XG_REASON_REDIRECTED; /* cannot happen: an array slot */
	r = parse_l2(&c, &pkt);
	if (r != XG_REASON_REDIRECTED)
		return r;
	if (pkt.l3_proto == bpf_htons(ETH_P_IP))
		r = parse_ipv4(&c, &pkt);
	else if (pkt.l3_proto == bpf_htons(ETH_P_IPV6))
		r = parse_ipv6(&c, &pkt);
	else
		return XG_REASON_REDIRECTED; /* ARP and other L2: never policed */
	if (r != XG_REASON_REDIRECTED)
		return r;
	if (!pkt.l3_bad && is_ndisc(&c, &pkt))
		return XG_REASON_REDIRECTED;

	/* Cheapest first; an allowlisted source skips everything after. */
	if (in_list(&pkt, policy, XG_LIST_ALLOW, XG_LISTS_ALLOW_V4, XG_LISTS_ALLOW_V6))
		return XG_REASON_ALLOWLIST;
	if (in_list(&pkt, policy, XG_LIST_BLOCK, XG_LISTS_BLOCK_V4, XG_LISTS_BLOCK_V6))
		return XG_REASON_BLOCKLIST;
	if (!pkt.l3_bad && udp_port_blocked(&c, &pkt))
		return XG_REASON_UDP_SRC_PORT;
	if (pkt.fragment && policy->frag_policy == XG_FRAG_DROP)
		return XG_REASON_FRAGMENT;
	if (pkt.l3_bad || l4_malformed(&c, &pkt))
		return XG_REASON_MALFORMED;
	return XG_REASON_REDIRECTED;
}

SEC("xdp")
int xdpguard_prog(struct xdp_md *ctx)
{
	__u32 len = ctx->data_end - ctx->data;
	enum xg_reason reason = XG_REASON_REDIRECTED;
	struct xg_counter *cnt;
	__u32 key;
	int action = XDP_DROP;

	if (xg_cfg.role == XG_ROLE_OUTER) {
		reason = outer_policy(ctx);
		if (reason != XG_REASON_REDIRECTED && reason != XG_REASON_ALLOWLIST)
			goto out;
		/* Tell the loop what it cannot see itself. Without room for the
		 * metadata (a driver without support) the loop finds no magic
		 * and treats the frame as not allowlisted. */
		if (!bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct xg_meta))) {
			struct xg_meta *meta = (void *)(long)ctx->data_meta;

			if ((void *)(meta + 1) <= (void *)(long)ctx->data) {
				meta->flags = reason == XG_REASON_ALLOWLIST ? XG_META_ALLOWLISTED : 0;
				meta->magic = XG_META_MAGIC;
			}
		}
	}

	/* The fallback action applies when no socket sits at this index. */
	action = bpf_redirect_map(&xg_xsks, ctx->rx_queue_index, XDP_DROP);
	if (action != XDP_REDIRECT)
		reason = XG_REASON_NO_SOCKET;
out:
	key = reason;
	cnt = bpf_map_lookup_elem(&xg_stats, &key);
	if (cnt) {
		cnt->packets++;
		cnt->bytes += len;
	}
	return action;
}

char _license[] SEC("license") = "GPL";
