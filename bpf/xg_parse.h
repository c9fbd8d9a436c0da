/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * xdpguard's one header parser. The XDP program (xdpguard.bpf.c) and the C
 * loop (libxdp_shim/) both compile this file, so they cannot disagree on
 * where a frame's L4 header is, whether it is a fragment, or whether it
 * could be parsed at all (tests/bpf/test_parser_parity.py holds them to it).
 *
 * It walks Ethernet, up to XG_MAX_VLAN 802.1Q/802.1ad tags, IPv4 (options
 * skipped, AH walked) and IPv6 with up to XG_MAX_EXT extension headers
 * (Hop-by-Hop, Routing, Fragment, Destination Options, AH, Mobility, HIP,
 * Shim6, the experimental 253/254). It fails closed: a frame it cannot
 * finish is not "not TCP", it is a drop reason:
 *
 *   XG_REASON_MALFORMED         a header truncated, a length that does not
 *                               fit, Hop-by-Hop anywhere but first, two
 *                               Fragment headers, a first fragment that
 *                               does not carry its whole L4 header, a
 *                               fragment at offset 8 over a TCP header, a
 *                               protocol number nobody assigned
 *   XG_REASON_EXT_HEADER_LIMIT  more VLAN tags or extension headers than
 *                               the parser walks
 *
 * Lengths are judged against the IP header's own length, not the frame's
 * (Ethernet pads short frames), and every pointer against the frame's end.
 *
 * Written for both compilers: plain C with one cursor, bounded loops, and
 * a bounds check before every read, which is what the verifier needs.
 */
#ifndef XG_PARSE_H
#define XG_PARSE_H

#ifdef __bpf__
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#define XG_INLINE static __always_inline
/* Not unrolled: a short program stays in the instruction cache. */
#define XG_NO_UNROLL _Pragma("clang loop unroll(disable)")
#define xg_ntohs(x) bpf_ntohs(x)
#define xg_htons(x) bpf_htons(x)
#define xg_ntohl(x) bpf_ntohl(x)
#else
/* glibc's netinet/in.h first: the kernel headers then skip their copies. */
#include <netinet/in.h>
#include <arpa/inet.h>
#define XG_INLINE static inline __attribute__((always_inline))
#define XG_NO_UNROLL
#define xg_ntohs(x) ntohs(x)
#define xg_htons(x) htons(x)
#define xg_ntohl(x) ntohl(x)
#endif

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>

#include "xdpguard.h"

/* The limits the parser walks to; beyond them a frame is dropped. */
#define XG_MAX_VLAN 2
#define XG_MAX_EXT 8

/* Ethertypes of a VLAN tag (802.1Q, 802.1ad, the pre-standard QinQ). */
#define XG_ETH_P_QINQ1 0x9100

/* IPv6 extension headers without a libc or uapi name. */
#define XG_NEXTHDR_HIP 139
#define XG_NEXTHDR_SHIM6 140
#define XG_NEXTHDR_EXP1 253
#define XG_NEXTHDR_EXP2 254
#define XG_NEXTHDR_NONE 59

#define XG_IP_MF 0x2000
#define XG_IP_OFFSET 0x1fff
#define XG_IP6_MF 0x0001
#define XG_IP6_OFFSET 0xfff8

/* TCP flag bits of byte 13 of the header. */
#define XG_TCP_FIN 0x01
#define XG_TCP_SYN 0x02
#define XG_TCP_RST 0x04
#define XG_TCP_PSH 0x08
#define XG_TCP_ACK 0x10
#define XG_TCP_URG 0x20
#define XG_TCP_FLAG_BITS 0x3f

/* The kernel's struct vlan_hdr (linux/if_vlan.h is not uapi). */
struct vlan_hdr {
	__be16 h_vlan_TCI;
	__be16 h_vlan_encapsulated_proto;
};

/* The kernel's struct frag_hdr (net/ipv6.h is not uapi). */
struct xg_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;	/* offset in 8-byte units << 3, M flag in bit 0 */
	__be32 identification;
};

/* What the parser found. Pointers point into the frame. */
struct xg_hdrs {
	void *l3;		/* IPv4 or IPv6 header; NULL if the frame is not IP */
	void *arp;		/* an Ethernet/IPv4 ARP frame's header; else NULL */
	void *l3_end;		/* end of the IP packet (its own length) */
	void *l4;		/* the L4 header; NULL for a later fragment */
	__u16 l3_proto;		/* ethertype after the VLAN tags, host order */
	__u8 l4_proto;		/* IPPROTO_* after the header chain */
	__u8 frag;		/* enum xg_frag_bits */
	__u8 tcp_flags;		/* byte 13 of the TCP header (TCP only) */
	__u8 hop_limit;		/* IPv4 TTL or IPv6 hop limit */
	__u8 v6;
	__u8 pad;
};

/* Where the parser stands in the frame. */
struct xg_cursor {
	void *pos;
	void *end;
};

/* A pointer to the next @len bytes, advancing past them; NULL if short. */
XG_INLINE void *xg_pull(struct xg_cursor *c, __u32 len)
{
	void *p = c->pos;

	if (p + len > c->end)
		return (void *)0;
	c->pos = p + len;
	return p;
}

XG_INLINE int xg_is_vlan(__u16 proto)
{
	return proto == ETH_P_8021Q || proto == ETH_P_8021AD || proto == XG_ETH_P_QINQ1;
}

/*
 * Protocol numbers IANA never assigned (143-252) or reserved (255): no
 * stack sends them, so a chain that names one is not understood.
 */
XG_INLINE int xg_is_unassigned(__u8 proto)
{
	return (proto >= 143 && proto <= 252) || proto == 255;
}

/* IPv6 next-header values the parser walks as extension headers. */
XG_INLINE int xg_is_ext(__u8 next)
{
	switch (next) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_MH:
	case XG_NEXTHDR_HIP:
	case XG_NEXTHDR_SHIM6:
	case XG_NEXTHDR_EXP1:
	case XG_NEXTHDR_EXP2:
		return 1;
	}
	return 0;
}

/* The L4 header at c->pos of a frame that is not a later fragment. */
XG_INLINE enum xg_reason xg_parse_l4(struct xg_cursor *c, struct xg_hdrs *h)
{
	struct tcphdr *tcp;
	struct udphdr *udp;
	__u32 doff;

	h->l4 = c->pos;
	if (xg_is_unassigned(h->l4_proto))
		return XG_REASON_MALFORMED;
	switch (h->l4_proto) {
	case IPPROTO_TCP:
		tcp = c->pos;
		if ((void *)(tcp + 1) > c->end || (void *)(tcp + 1) > h->l3_end)
			return XG_REASON_MALFORMED;
		doff = tcp->doff * 4;
		if (doff < sizeof(*tcp) || (void *)tcp + doff > h->l3_end)
			return XG_REASON_MALFORMED;
		h->tcp_flags = ((__u8 *)tcp)[13];
		return XG_REASON_REDIRECTED;
	case IPPROTO_UDP:
		udp = c->pos;
		if ((void *)(udp + 1) > c->end || (void *)(udp + 1) > h->l3_end ||
		    xg_ntohs(udp->len) < sizeof(*udp))
			return XG_REASON_MALFORMED;
		return XG_REASON_REDIRECTED;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		/* Type, code and checksum at the least (ND is judged on them). */
		if (c->pos + 4 > c->end || c->pos + 4 > h->l3_end)
			return XG_REASON_MALFORMED;
		return XG_REASON_REDIRECTED;
	}
	return XG_REASON_REDIRECTED;
}

XG_INLINE enum xg_reason xg_parse_ipv4(struct xg_cursor *c, struct xg_hdrs *h)
{
	struct iphdr *iph = xg_pull(c, sizeof(*iph));
	struct ip_auth_hdr *ah;
	__u32 hlen, tot_len;
	__u16 frag;
	int i;

	if (!iph)
		return XG_REASON_MALFORMED;
	h->l3 = iph;
	hlen = iph->ihl * 4;
	tot_len = xg_ntohs(iph->tot_len);
	if (iph->version != 4 || hlen < sizeof(*iph) || tot_len < hlen ||
	    (void *)iph + tot_len > c->end)
		return XG_REASON_MALFORMED;
	h->l3_end = (void *)iph + tot_len;
	h->hop_limit = iph->ttl;
	c->pos = (void *)iph + hlen;
	h->l4_proto = iph->protocol;

	frag = xg_ntohs(iph->frag_off);
	if (frag & (XG_IP_MF | XG_IP_OFFSET))
		h->frag |= XG_FRAG_ANY;
	if (frag & XG_IP_MF)
		h->frag |= XG_FRAG_MORE;
	if (frag & XG_IP_OFFSET) {
		h->frag |= XG_FRAG_LATER;
		/* RFC 1858: a fragment at offset 8 can rewrite TCP's flags. */
		if ((frag & XG_IP_OFFSET) == 1 && h->l4_proto == IPPROTO_TCP)
			return XG_REASON_MALFORMED;
		return XG_REASON_REDIRECTED;
	}

	/* AH in IPv4: its length counts 4-byte words, minus 2. */
	XG_NO_UNROLL
	for (i = 0; i < XG_MAX_EXT; i++) {
		if (h->l4_proto != IPPROTO_AH)
			return xg_parse_l4(c, h);
		ah = c->pos;
		if ((void *)ah + 2 > c->end)
			return XG_REASON_MALFORMED;
		hlen = (ah->hdrlen + 2) * 4;
		if (c->pos + hlen > h->l3_end || !xg_pull(c, hlen))
			return XG_REASON_MALFORMED;
		h->l4_proto = ah->nexthdr;
	}
	return h->l4_proto == IPPROTO_AH ? XG_REASON_EXT_HEADER_LIMIT : xg_parse_l4(c, h);
}

XG_INLINE enum xg_reason xg_parse_ipv6(struct xg_cursor *c, struct xg_hdrs *h)
{
	struct ipv6hdr *ip6h = xg_pull(c, sizeof(*ip6h));
	struct ipv6_opt_hdr *opt;
	struct xg_frag_hdr *fh;
	__u32 len;
	__u16 frag;
	__u8 next;
	int i;

	if (!ip6h)
		return XG_REASON_MALFORMED;
	h->l3 = ip6h;
	h->v6 = 1;
	if (ip6h->version != 6 ||
	    (void *)(ip6h + 1) + xg_ntohs(ip6h->payload_len) > c->end)
		return XG_REASON_MALFORMED;
	h->l3_end = (void *)(ip6h + 1) + xg_ntohs(ip6h->payload_len);
	h->hop_limit = ip6h->hop_limit;
	next = ip6h->nexthdr;

	XG_NO_UNROLL
	for (i = 0; i < XG_MAX_EXT; i++) {
		if (!xg_is_ext(next))
			break;
		opt = c->pos;
		if ((void *)(opt + 1) > c->end || (void *)(opt + 1) > h->l3_end)
			return XG_REASON_MALFORMED;
		switch (next) {
		case IPPROTO_HOPOPTS:
			/* RFC 8200 4.1: only right after the IPv6 header. */
			if (i)
				return XG_REASON_MALFORMED;
			len = (opt->hdrlen + 1) * 8;
			break;
		case IPPROTO_FRAGMENT:
			if (h->frag & XG_FRAG_ANY)
				return XG_REASON_MALFORMED; /* one per packet */
			fh = c->pos;
			if ((void *)(fh + 1) > c->end || (void *)(fh + 1) > h->l3_end)
				return XG_REASON_MALFORMED;
			frag = xg_ntohs(fh->frag_off);
			h->frag |= XG_FRAG_ANY;
			if (frag & XG_IP6_MF)
				h->frag |= XG_FRAG_MORE;
			if (frag & XG_IP6_OFFSET) {
				/* The rest of the chain is in the first fragment. */
				h->frag |= XG_FRAG_LATER;
				h->l4_proto = fh->nexthdr;
				if ((frag & XG_IP6_OFFSET) == 8 && fh->nexthdr == IPPROTO_TCP)
					return XG_REASON_MALFORMED;
				return XG_REASON_REDIRECTED;
			}
			len = sizeof(*fh);
			break;
		case IPPROTO_AH:
			len = (opt->hdrlen + 2) * 4;
			break;
		default:
			len = (opt->hdrlen + 1) * 8;
		}
		if (c->pos + len > h->l3_end || !xg_pull(c, len))
			return XG_REASON_MALFORMED;
		next = opt->nexthdr;
	}
	if (xg_is_ext(next))
		return XG_REASON_EXT_HEADER_LIMIT;
	h->l4_proto = next;
	return xg_parse_l4(c, h);
}

/*
 * ARP: the policy judges its sender's address, so it must be there. Only
 * Ethernet/IPv4 ARP exists on an Ethernet link; anything else is not
 * understood.
 */
XG_INLINE enum xg_reason xg_parse_arp(struct xg_cursor *c, struct xg_hdrs *h)
{
	__u8 *arp = xg_pull(c, 28);

	if (!arp)
		return XG_REASON_MALFORMED;
	/* hardware type 1, protocol 0x0800, lengths 6 and 4 */
	if (arp[0] != 0 || arp[1] != 1 || arp[2] != 0x08 || arp[3] != 0 || arp[4] != 6 ||
	    arp[5] != 4)
		return XG_REASON_MALFORMED;
	h->arp = arp;
	return XG_REASON_REDIRECTED;
}

/*
 * Parse the frame [@data, @data_end) into @h (zeroed first). Returns
 * XG_REASON_REDIRECTED when the frame could be parsed (h->l3 is NULL for a
 * frame that is not IP: ARP, in h->arp, and the rest of L2, by its
 * ethertype in h->l3_proto), else the reason to drop
 * it: XG_REASON_MALFORMED or XG_REASON_EXT_HEADER_LIMIT.
 */
XG_INLINE enum xg_reason xg_parse(void *data, void *data_end, struct xg_hdrs *h)
{
	struct xg_cursor c = { .pos = data, .end = data_end };
	struct ethhdr *eth;
	struct vlan_hdr *vlan;
	__u16 proto;
	int i;

	__builtin_memset(h, 0, sizeof(*h));
	eth = xg_pull(&c, sizeof(*eth));
	if (!eth)
		return XG_REASON_MALFORMED;
	proto = xg_ntohs(eth->h_proto);
	for (i = 0; i < XG_MAX_VLAN; i++) {
		if (!xg_is_vlan(proto))
			break;
		vlan = xg_pull(&c, sizeof(*vlan));
		if (!vlan)
			return XG_REASON_MALFORMED;
		proto = xg_ntohs(vlan->h_vlan_encapsulated_proto);
	}
	if (xg_is_vlan(proto))
		return XG_REASON_EXT_HEADER_LIMIT;
	h->l3_proto = proto;
	if (proto == ETH_P_IP)
		return xg_parse_ipv4(&c, h);
	if (proto == ETH_P_IPV6)
		return xg_parse_ipv6(&c, h);
	if (proto == ETH_P_ARP)
		return xg_parse_arp(&c, h);
	return XG_REASON_REDIRECTED;
}

/*
 * The checks of a parsed frame that are not about its shape: TCP flag
 * combinations no stack sends. XG_REASON_MALFORMED or XG_REASON_REDIRECTED.
 */
XG_INLINE enum xg_reason xg_judge_l4(const struct xg_hdrs *h)
{
	__u8 f = h->tcp_flags & XG_TCP_FLAG_BITS;

	if (!h->l4 || h->l4_proto != IPPROTO_TCP)
		return XG_REASON_REDIRECTED;
	if (!f)
		return XG_REASON_MALFORMED; /* null scan */
	if ((f & XG_TCP_SYN) && (f & (XG_TCP_FIN | XG_TCP_RST)))
		return XG_REASON_MALFORMED;
	if ((f & XG_TCP_FIN) && (f & XG_TCP_RST))
		return XG_REASON_MALFORMED;
	/* Only a SYN or a RST may come without ACK (RFC 9293 3.10.7). */
	if (!(f & XG_TCP_ACK) && (f & (XG_TCP_FIN | XG_TCP_PSH | XG_TCP_URG)))
		return XG_REASON_MALFORMED;
	return XG_REASON_REDIRECTED;
}

/* What the parser found, as xg_classify() and XG_CFG_SUMMARY say it. */
XG_INLINE void xg_summarise(const struct xg_hdrs *h, void *data, __u8 reason,
			    struct xg_summary *m)
{
	m->l4_off = h->l4 ? (__u16)(h->l4 - data) : 0;
	m->l4_proto = h->l3 ? h->l4_proto : 0;
	m->tcp_flags = h->tcp_flags;
	m->frag = h->frag;
	m->reason = reason;
	m->l3_off = h->l3 ? (__u16)(h->l3 - data) : 0;
}

#endif /* XG_PARSE_H */
