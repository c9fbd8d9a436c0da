// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard's XDP program. One object, loaded once per device:
 *
 *   outer: parse, apply the stateless policy, hand survivors to the AF_XDP
 *          socket of the frame's RX queue;
 *   inner: hand everything to the socket (the origin's replies carry no
 *          policy).
 *
 * Every frame leaves through the single exit of xdpguard_prog(), which counts
 * its reason in xg_stats. Each instance has its own maps, so an instance's
 * counters are one direction's counters.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xdpguard.h"

#define ETH_P_8021Q_BE bpf_htons(ETH_P_8021Q)
#define ETH_P_8021AD_BE bpf_htons(ETH_P_8021AD)
#define XG_MAX_VLAN_TAGS 2

/* Written by the loader before the object is loaded. */
const volatile struct xg_load_cfg xg_cfg = { .role = XG_ROLE_OUTER };

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
	__be16 l3_proto; /* network byte order, after VLAN tags */
	void *l3;
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
	pkt->l3 = c->pos;
	return XG_REASON_REDIRECTED;
}

static __always_inline enum xg_reason parse_ipv4(struct cursor *c, struct pkt *pkt)
{
	struct iphdr *iph = cursor_pull(c, sizeof(*iph));
	__u32 hdr_len;

	if (!iph || iph->version != 4 || iph->ihl < 5)
		return XG_REASON_MALFORMED;
	hdr_len = iph->ihl * 4;
	/* Options: the whole header must be in the frame. */
	if (hdr_len > sizeof(*iph) && !cursor_pull(c, hdr_len - sizeof(*iph)))
		return XG_REASON_MALFORMED;
	if (bpf_ntohs(iph->tot_len) < hdr_len ||
	    (void *)iph + bpf_ntohs(iph->tot_len) > c->end)
		return XG_REASON_MALFORMED;
	return XG_REASON_REDIRECTED;
}

static __always_inline enum xg_reason parse_ipv6(struct cursor *c, struct pkt *pkt)
{
	struct ipv6hdr *ip6h = cursor_pull(c, sizeof(*ip6h));

	if (!ip6h || ip6h->version != 6)
		return XG_REASON_MALFORMED;
	if ((void *)(ip6h + 1) + bpf_ntohs(ip6h->payload_len) > c->end)
		return XG_REASON_MALFORMED;
	return XG_REASON_REDIRECTED;
}

/* The stateless policy of the outer device; XG_REASON_REDIRECTED = passes. */
static __always_inline enum xg_reason outer_policy(struct xdp_md *ctx)
{
	struct cursor c = {
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};
	struct pkt pkt = {};
	enum xg_reason r;

	r = parse_l2(&c, &pkt);
	if (r != XG_REASON_REDIRECTED)
		return r;

	switch (pkt.l3_proto) {
	case bpf_htons(ETH_P_IP):
		return parse_ipv4(&c, &pkt);
	case bpf_htons(ETH_P_IPV6):
		return parse_ipv6(&c, &pkt);
	default:
		/* ARP, ND's carrier and anything else L2: never policed. */
		return XG_REASON_REDIRECTED;
	}
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
		if (reason != XG_REASON_REDIRECTED)
			goto out;
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
