// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The parser of bpf/xg_parse.h as C callers see it: the same code the XDP
 * program runs, for the parity tests, the fuzzers and tools.
 */
#include <string.h>

#include "xg_parse.h"
#include "xg_shim.h"

void xg_classify(const uint8_t *frame, uint32_t len, struct xg_summary *out)
{
	void *data = (void *)frame;
	struct xg_hdrs h;
	enum xg_reason r;

	memset(out, 0, sizeof(*out));
	r = xg_parse(data, data + len, &h);
	if (r == XG_REASON_REDIRECTED && h.l3)
		r = xg_judge_l4(&h);
	else if (r == XG_REASON_REDIRECTED && h.l3_proto != ETH_P_ARP)
		r = XG_REASON_L2_OTHER; /* no ethertype is allowed in an empty policy */
	xg_summarise(&h, data, r, out);
}

/*
 * The frames samples were cut from are longer than their first bytes: the
 * parser checks the IP lengths against the frame's end, so each sample is
 * parsed in a frame of its original length whose missing bytes are zero.
 */
#define KEYS_FRAME 16384

static void keys_of(const struct xg_sample *s, uint8_t *frame, struct xg_sample_keys *k)
{
	uint32_t len = s->len < KEYS_FRAME ? s->len : KEYS_FRAME;
	uint32_t cap = s->caplen < len ? s->caplen : len;
	uint8_t *end = frame + cap;
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	struct xg_hdrs h;
	uint16_t *ports;

	memset(k, 0, sizeof(*k));
	memcpy(frame, s->data, cap);
	memset(frame + cap, 0, len - cap);
	memset(&h, 0, sizeof(h));
	xg_parse(frame, frame + len, &h);
	k->l3_proto = h.l3_proto;
	if (!h.l3)
		return;
	if (h.v6) {
		ip6h = h.l3;
		if ((uint8_t *)(ip6h + 1) > end)
			return;
		memcpy(k->src, &ip6h->saddr, 16);
		memcpy(k->dst, &ip6h->daddr, 16);
		k->flags = XG_KEYS_IP | XG_KEYS_V6;
	} else {
		iph = h.l3;
		if ((uint8_t *)(iph + 1) > end)
			return;
		k->src[10] = k->src[11] = k->dst[10] = k->dst[11] = 0xff;
		memcpy(k->src + 12, &iph->saddr, 4);
		memcpy(k->dst + 12, &iph->daddr, 4);
		k->flags = XG_KEYS_IP;
	}
	k->proto = h.l4_proto;
	k->tcp_flags = h.tcp_flags;
	k->ttl = h.hop_limit;
	k->frag = h.frag;
	if (h.l3_end > h.l3)
		k->ip_len = (uint16_t)((uint8_t *)h.l3_end - (uint8_t *)h.l3);
	ports = h.l4;
	if (ports && (uint8_t *)(ports + 2) <= end &&
	    (h.l4_proto == IPPROTO_TCP || h.l4_proto == IPPROTO_UDP)) {
		k->sport = xg_ntohs(ports[0]);
		k->dport = xg_ntohs(ports[1]);
		k->flags |= XG_KEYS_PORTS;
	}
}

void xg_sample_keys(const struct xg_sample *s, uint32_t n, struct xg_sample_keys *out)
{
	static __thread uint8_t frame[KEYS_FRAME];
	uint32_t i;

	for (i = 0; i < n; i++)
		keys_of(&s[i], frame, &out[i]);
}
