/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The flow table as both its users see it: the XDP programs (the fast
 * path) and the C loop (libxdp_shim/xg_tcp.c). One copy of each rule a
 * frame is held to, compiled by both:
 *
 *   xg_siphash()         SipHash-c-d of whole words (the table's, the cookies')
 *   xg_flow_hash()       where a key lives (SipHash-1-3 under the table's key)
 *   xg_flow_live()       whether a slot still holds a flow (idle timeouts)
 *   xg_flow_find()       the live flow of a key in its bucket
 *   xg_flow_in_window()  netfilter's tcp_in_window() checks
 *   xg_flow_note()       what a segment teaches about its sender's side
 *
 * Callers hold the bucket's lock. Sequence numbers are host order; times
 * are coarse monotonic seconds (CLOCK_MONOTONIC_COARSE in C,
 * bpf_ktime_get_coarse_ns() in XDP: the same clock).
 */
#ifndef XG_FLOW_H
#define XG_FLOW_H

#include "xg_parse.h"

#define XG_MIN_WIN 65535U	/* window floor for the sequence checks */
#define XG_NO_WSCALE 0xff

/* What the window rules read of a TCP segment. */
struct xg_seg {
	__u32 seq;
	__u32 ack;
	__u32 payload;		/* bytes after the TCP header */
	__u16 win;		/* unscaled, as on the wire */
	__u8 flags;		/* byte 13 */
	__u8 pad;
};

XG_INLINE int xg_seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

XG_INLINE __u32 xg_seq_max(__u32 a, __u32 b)
{
	return xg_seq_before(a, b) ? b : a;
}

/*
 * An established flow idle this long (seconds) may give its slot to a new
 * flow when its bucket is full; until then no new flow takes it.
 */
#define XG_IDLE_EVICTABLE 600

/*
 * Idle timeouts by state (seconds): how long an unanswered state may sit.
 * An established connection may stay idle for days (SSH, databases, long
 * polls): its flow stays as long as conntrack's does, and gives way
 * earlier only to a new flow of a full bucket (XG_IDLE_EVICTABLE).
 */
XG_INLINE __u32 xg_flow_timeout(__u8 state)
{
	switch (state) {
	case XG_TCP_SYN_SENT:
	case XG_TCP_SYN_RECV:
	case XG_TCP_LEARNING:
		return 20;
	case XG_TCP_ESTABLISHED:
		return 5 * 86400;
	case XG_TCP_CLOSING:
		return 30;
	case XG_TCP_CLOSED:
		return 5;
	}
	return 0;
}

/*
 * Signed: each user reads the clock once per batch, so another may have
 * stamped the flow a second "later" than this one's now.
 */
XG_INLINE int xg_flow_live(const struct xg_flow *f, __u32 now)
{
	return f->state != XG_TCP_FREE &&
	       (__s32)(now - f->last_seen) <= (__s32)xg_flow_timeout(f->state);
}

XG_INLINE int xg_key_equal(const struct xg_flow_key *a, const struct xg_flow_key *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	__u32 diff = 0;
	int i;

	for (i = 0; i < (int)(sizeof(*a) / 4); i++)
		diff |= x[i] ^ y[i];
	return !diff;
}

#define XG_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define XG_SIPROUND                                                            \
	do {                                                                   \
		v0 += v1; v1 = XG_ROTL(v1, 13); v1 ^= v0; v0 = XG_ROTL(v0, 32); \
		v2 += v3; v3 = XG_ROTL(v3, 16); v3 ^= v2;                       \
		v0 += v3; v3 = XG_ROTL(v3, 21); v3 ^= v0;                       \
		v2 += v1; v1 = XG_ROTL(v1, 17); v1 ^= v2; v2 = XG_ROTL(v2, 32); \
	} while (0)

/*
 * SipHash-c-d (Aumasson and Bernstein) of @n 64-bit words under @key, for
 * constant @n, @c and @d. Little-endian hosts.
 */
XG_INLINE __u64 xg_siphash(const __u64 *words, const int n, const __u8 key[16], const int c,
			   const int d)
{
	__u64 k0, k1, v0, v1, v2, v3, m;
	int i, j;

	__builtin_memcpy(&k0, key, 8);
	__builtin_memcpy(&k1, key + 8, 8);
	v0 = 0x736f6d6570736575ULL ^ k0;
	v1 = 0x646f72616e646f6dULL ^ k1;
	v2 = 0x6c7967656e657261ULL ^ k0;
	v3 = 0x7465646279746573ULL ^ k1;
	for (i = 0; i < n; i++) {
		m = words[i];
		v3 ^= m;
		for (j = 0; j < c; j++)
			XG_SIPROUND;
		v0 ^= m;
	}
	m = (__u64)(n * 8) << 56;
	v3 ^= m;
	for (j = 0; j < c; j++)
		XG_SIPROUND;
	v0 ^= m;
	v2 ^= 0xff;
	for (j = 0; j < d; j++)
		XG_SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

/*
 * SipHash-1-3 of a flow key (40 bytes: five words) under @key: the bucket
 * an attacker cannot aim at without the key. A pinned table outlives the
 * program that made it, so this never changes.
 */
XG_INLINE __u64 xg_flow_hash(const struct xg_flow_key *k, const __u8 key[16])
{
	__u64 words[5];

	__builtin_memcpy(words, k, sizeof(words));
	return xg_siphash(words, 5, key, 1, 3);
}

/*
 * The live flow of @k in @b, or NULL. A dead slot holding @k is freed on
 * the way (its state was only kept by its timeout).
 */
XG_INLINE struct xg_flow *xg_flow_find(struct xg_flow_bucket *b, const struct xg_flow_key *k,
				       __u32 now)
{
	int i;

	for (i = 0; i < XG_FLOW_WAYS; i++) {
		struct xg_flow *f = &b->slot[i];

		if (f->state != XG_TCP_FREE && xg_key_equal(&f->key, k)) {
			if (xg_flow_live(f, now))
				return f;
			f->state = XG_TCP_FREE;
			return (struct xg_flow *)0;
		}
	}
	return (struct xg_flow *)0;
}

/* Per side (enum xg_side): which flag says its field holds a value. */
XG_INLINE __u16 xg_end_bit(int x)
{
	return x ? XG_FLOW_END_IN : XG_FLOW_END_OUT;
}

XG_INLINE __u16 xg_acked_bit(int x)
{
	return x ? XG_FLOW_ACKED_IN : XG_FLOW_ACKED_OUT;
}

/*
 * A first value is taken as is, later ones only if they move forward in
 * sequence space (no starting value is "before" every ISN).
 */
XG_INLINE void xg_flow_set_end(struct xg_flow *f, int x, __u32 end)
{
	f->end[x & 1] = (f->flags & xg_end_bit(x)) ? xg_seq_max(f->end[x & 1], end) : end;
	f->flags |= xg_end_bit(x);
}

XG_INLINE void xg_flow_set_acked(struct xg_flow *f, int x, __u32 ack)
{
	f->acked[x & 1] = (f->flags & xg_acked_bit(x)) ? xg_seq_max(f->acked[x & 1], ack) : ack;
	f->flags |= xg_acked_bit(x);
}

XG_INLINE __u32 xg_seg_end(const struct xg_seg *s)
{
	return s->seq + s->payload + !!(s->flags & XG_TCP_SYN) + !!(s->flags & XG_TCP_FIN);
}

/* What the segment @s of @len bytes says about its sender's side @x. */
XG_INLINE void xg_flow_note(struct xg_flow *f, int x, const struct xg_seg *s, __u32 len)
{
	__u32 win = s->win;

	x &= 1;
	if (!(s->flags & XG_TCP_SYN) && (f->flags & XG_FLOW_WSCALE) && f->wscale[x] <= 14)
		win <<= f->wscale[x];
	xg_flow_set_end(f, x, xg_seg_end(s));
	if (s->flags & XG_TCP_ACK)
		xg_flow_set_acked(f, x, s->ack);
	if (win > f->maxwin[x])
		f->maxwin[x] = win;
	f->packets++;
	f->bytes += len;
}

/*
 * The window checks of netfilter's tcp_in_window(), sender @x:
 *   seq + len <= what the receiver last acked + its window,
 *   seq >= what the sender sent so far - the receiver's window,
 *   ack <= what the receiver sent, ack >= that - the sender's window.
 */
XG_INLINE int xg_flow_in_window(const struct xg_flow *f, int x, const struct xg_seg *s)
{
	int y = !x;
	__u32 wx = f->maxwin[x & 1] > XG_MIN_WIN ? f->maxwin[x & 1] : XG_MIN_WIN;
	__u32 wy = f->maxwin[y] > XG_MIN_WIN ? f->maxwin[y] : XG_MIN_WIN;

	if (xg_seq_before(f->acked[y] + wy, xg_seg_end(s)))
		return 0;
	if (xg_seq_before(s->seq, f->end[x & 1] - wy))
		return 0;
	if (s->flags & XG_TCP_ACK) {
		if (xg_seq_before(f->end[y], s->ack))
			return 0;
		if (xg_seq_before(s->ack, f->end[y] - wx))
			return 0;
	}
	return 1;
}

/*
 * The key and segment of a TCP frame the parser read (@h: a TCP segment,
 * not a fragment), seen from side @x (XG_SIDE_OUT: it came from outside).
 * IPv4 addresses become ::ffff:a.b.c.d. Returns 0, or -1 if a header is
 * beyond @data_end (cannot happen after xg_parse(): for the verifier).
 */
XG_INLINE int xg_flow_key_of(const struct xg_hdrs *h, void *data_end, int x,
			     struct xg_flow_key *k, struct xg_seg *s)
{
	struct tcphdr *tcp = h->l4;
	__u8 *src, *dst, *a, *b;
	__u32 alen, doff;

	__builtin_memset(k, 0, sizeof(*k));
	if ((void *)(tcp + 1) > data_end)
		return -1;
	if (h->v6) {
		struct ipv6hdr *ip6h = h->l3;

		if ((void *)(ip6h + 1) > data_end)
			return -1;
		src = (__u8 *)&ip6h->saddr;
		dst = (__u8 *)&ip6h->daddr;
		alen = 16;
		k->v6 = 1;
	} else {
		struct iphdr *iph = h->l3;

		if ((void *)(iph + 1) > data_end)
			return -1;
		src = (__u8 *)&iph->saddr;
		dst = (__u8 *)&iph->daddr;
		alen = 4;
	}
	a = x == XG_SIDE_OUT ? src : dst; /* the outside endpoint */
	b = x == XG_SIDE_OUT ? dst : src;
	if (alen == 16) {
		__builtin_memcpy(k->out_addr, a, 16);
		__builtin_memcpy(k->in_addr, b, 16);
	} else {
		k->out_addr[10] = k->out_addr[11] = 0xff;
		k->in_addr[10] = k->in_addr[11] = 0xff;
		__builtin_memcpy(k->out_addr + 12, a, 4);
		__builtin_memcpy(k->in_addr + 12, b, 4);
	}
	k->out_port = x == XG_SIDE_OUT ? tcp->source : tcp->dest;
	k->in_port = x == XG_SIDE_OUT ? tcp->dest : tcp->source;
	doff = tcp->doff * 4;
	s->seq = xg_ntohl(tcp->seq);
	s->ack = xg_ntohl(tcp->ack_seq);
	s->win = xg_ntohs(tcp->window);
	s->flags = h->tcp_flags;
	s->payload = (__u32)(h->l3_end - h->l4) - doff;
	s->pad = 0;
	return 0;
}

#endif /* XG_FLOW_H */
