/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What XDP shows of what it judges (xdpguard capture, top, protect):
 *
 *   samples: 1 in N frames of each verdict reason (N per reason, in
 *            xg_sample_cfg), the first XG_SAMPLE_BYTES bytes of each with
 *            its verdict, on one ring buffer both instances share, under
 *            one cap in samples per second;
 *   per destination: frames from outside to a protected address, per
 *            protocol class, per address (an LRU) and per protected prefix.
 *
 * Neither changes a verdict. The per-frame cost is a compare in the
 * reason's counter (struct xg_counter.sample_at, sample_gen) and a load
 * from xg_sample_cfg; everything else runs for the sampled frames only.
 * Loaded with XG_CFG_NO_SAMPLES, the verifier removes all of it.
 */
#ifndef XG_SAMPLES_H
#define XG_SAMPLES_H

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, XG_SAMPLE_RING);
} xg_samples SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_sample_cfg);
} xg_sample_cfg SEC(".maps");

/*
 * xg_sample_cfg.gen, where every frame reads it: a global of a section of
 * its own (a map both instances share, ".data.samples"), read without a
 * map lookup. xdpguard writes it after the configuration.
 */
volatile __u32 xg_sample_gen SEC(".data.samples") = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_sample_state);
} xg_sample_state SEC(".maps");

/* The protected prefixes, each to its index in xg_protect_stats. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_PROTECT_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_lpm_v4);
	__type(value, __u32);
} xg_protect_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_PROTECT_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_lpm_v6);
	__type(value, __u32);
} xg_protect_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_PROTECT_MAX);
	__type(key, __u32);
	__type(value, struct xg_dest_counts);
} xg_protect_stats SEC(".maps");

/*
 * Per destination address, IPv4 as ::ffff:a.b.c.d. An LRU: an attack on
 * more addresses than it holds evicts the quietest (xdpguard counts the
 * evictions as new_dests minus the entries).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, XG_DEST_MAX); /* --max-dests */
	__type(key, struct xg_addr);
	__type(value, struct xg_dest_counts);
} xg_dests SEC(".maps");

/* xg_sample_take()'s @reason: the SYN a challenge is about to be written over. */
#define XG_SAMPLE_SYN_AS_IT_CAME (1U << 31)

/*
 * Sample the frame in @ctx, judged @reason (@cnt: its counter on this CPU),
 * @front bytes from its start (the words pushed in front for the loop),
 * @len bytes long as it arrived: its reason's turn came (xg_sample_due());
 * if the cap allows. A challenge is sampled as the SYN it answers, by the
 * gate (@reason with XG_SAMPLE_SYN_AS_IT_CAME), not at the exit. A global
 * function: verified once (its arguments are not walked per path of the
 * caller), called for one frame in N.
 */
__attribute__((noinline)) int xg_sample_take(struct xdp_md *ctx, struct xg_counter *cnt,
					     __u32 reason, __u32 front, __u32 len)
{
	__u32 zero = 0, every, n, slot = reason & (XG_REASON_CAP - 1);
	struct xg_sample_state *st;
	struct xg_sample_cfg *cfg;
	struct xg_sample *rec;
	__u64 now, tat, next;

	if (!ctx || !cnt || reason == XG_REASON_SYN_CHALLENGED)
		return 0; /* the exit's turn of a challenge: the gate took it */
	cfg = bpf_map_lookup_elem(&xg_sample_cfg, &zero);
	st = bpf_map_lookup_elem(&xg_sample_state, &zero);
	if (!cfg || !st)
		return 0;
	every = cfg->every[reason & (XG_REASON_CAP - 1)];
	cnt->sample_gen = xg_sample_gen;
	if (!every) {
		cnt->sample_at = ~0ULL; /* until the rates change */
		return 0;
	}
	cnt->sample_at = cnt->packets + every;

	/* The cap, one bucket for every CPU: a lost race is a sample capped. */
	now = bpf_ktime_get_ns();
	tat = st->tat;
	if (tat > now + cfg->burst_ns || !cfg->interval_ns)
		goto capped;
	next = (tat < now ? now : tat) + cfg->interval_ns;
	if (__sync_val_compare_and_swap(&st->tat, tat, next) != tat)
		goto capped;

	rec = bpf_ringbuf_reserve(&xg_samples, sizeof(*rec), 0);
	if (!rec) {
		__sync_fetch_and_add(&st->ring_full, 1);
		return 0;
	}
	n = len < XG_SAMPLE_BYTES ? len : XG_SAMPLE_BYTES;
	if (n < 1 || bpf_xdp_load_bytes(ctx, front, rec->data, n)) {
		bpf_ringbuf_discard(rec, BPF_RB_NO_WAKEUP);
		return 0;
	}
	rec->ts_ns = now;
	rec->len = len;
	rec->rule = xg_rule_hit(slot);
	rec->every = every;
	rec->reason = slot;
	rec->dir = xg_cfg.role == XG_ROLE_OUTER ? XG_DIR_IN : XG_DIR_OUT;
	rec->caplen = n;
	rec->pad = 0;
	bpf_ringbuf_submit(rec, 0);
	__sync_fetch_and_add(&st->taken, 1);
	return 1;
capped:
	__sync_fetch_and_add(&st->capped, 1);
	return 0;
}

/*
 * Is the frame just counted in @cnt this CPU's one in N of its reason?
 * The per-frame cost of sampling.
 */
static __always_inline int xg_sample_due(const struct xg_counter *cnt)
{
	if (xg_cfg.flags & XG_CFG_NO_SAMPLES)
		return 0;
	return cnt->packets >= cnt->sample_at || cnt->sample_gen != xg_sample_gen;
}

/*
 * A SYN about to be answered with a challenge, which is written over it:
 * sampled now, as it arrived (its count is taken at the program's exit).
 */
static __always_inline void xg_sample_syn(struct xdp_md *ctx, __u32 len)
{
	__u32 key = XG_REASON_SYN_CHALLENGED;
	struct xg_counter *cnt;

	if (xg_cfg.flags & XG_CFG_NO_SAMPLES)
		return;
	cnt = bpf_map_lookup_elem(&xg_stats, &key);
	if (cnt && xg_sample_due(cnt))
		xg_sample_take(ctx, cnt, key | XG_SAMPLE_SYN_AS_IT_CAME, 0, len);
}

/* The protocol class of a parsed IP frame. */
static __always_inline __u32 xg_dest_class(const struct xg_hdrs *h)
{
	if (h->frag & XG_FRAG_ANY)
		return XG_CLASS_FRAGMENT;
	switch (h->l4_proto) {
	case IPPROTO_TCP:
		return (h->tcp_flags & (XG_TCP_SYN | XG_TCP_ACK)) == XG_TCP_SYN ? XG_CLASS_SYN
										  : XG_CLASS_TCP;
	case IPPROTO_UDP:
		return XG_CLASS_UDP;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return XG_CLASS_ICMP;
	default:
		return XG_CLASS_OTHER;
	}
}

/*
 * Count a frame from outside, @len bytes, to @hi, @lo (struct xg_addr's
 * two words as they lie in memory, IPv4 mapped) if the address is in a
 * protected prefix. @info: the protocol class (bits 0-7), IPv6 (8),
 * xg_policy.lists (16-31). An address seen before finds its prefix in its
 * own entry: the trie is asked only for a new one. Scalars only, so that
 * the verifier walks it once and not once per path through the parser.
 */
__attribute__((noinline)) int xg_dest_note(__u64 hi, __u64 lo, __u32 info, __u32 len)
{
	__u32 class = info & 0xff, idx, *found;
	struct xg_dest_counts *c, *p;
	struct xg_lpm_v6 key6;
	struct xg_lpm_v4 key4;
	struct xg_addr addr;

	if (!(info & ((info & (1 << 8) ? XG_LISTS_PROTECT_V6 : XG_LISTS_PROTECT_V4) << 16)))
		return 0;
	__builtin_memcpy(addr.addr, &hi, 8);
	__builtin_memcpy(addr.addr + 8, &lo, 8);
	c = bpf_map_lookup_elem(&xg_dests, &addr);
	if (c && c->prefix) {
		idx = c->prefix - 1;
	} else {
		if (info & (1 << 8)) {
			key6.prefixlen = 128;
			__builtin_memcpy(key6.addr, addr.addr, 16);
			found = bpf_map_lookup_elem(&xg_protect_v6, &key6);
		} else {
			key4.prefixlen = 32;
			__builtin_memcpy(key4.addr, addr.addr + 12, 4);
			found = bpf_map_lookup_elem(&xg_protect_v4, &key4);
		}
		if (!found)
			return 0;
		idx = *found;
	}
	class = class < XG_NR_CLASSES ? class : XG_CLASS_OTHER;
	p = bpf_map_lookup_elem(&xg_protect_stats, &idx);
	if (!p)
		return 0;
	p->packets[class]++;
	p->bytes[class] += len;
	if (!c) {
		struct xg_dest_counts fresh = {};

		fresh.packets[class] = 1;
		fresh.bytes[class] = len;
		fresh.prefix = idx + 1;
		/* Another CPU may have put it there meanwhile: then count there. */
		if (!bpf_map_update_elem(&xg_dests, &addr, &fresh, BPF_NOEXIST)) {
			p->new_dests++;
			return 0;
		}
		c = bpf_map_lookup_elem(&xg_dests, &addr);
		if (!c)
			return 0;
	}
	c->prefix = idx + 1;
	c->packets[class]++;
	c->bytes[class] += len;
	return 0;
}

/* A frame from outside that passed the parser: count it, if protected. */
static __always_inline void xg_dest_see(struct xdp_md *ctx, const struct xg_hdrs *h, __u32 lists,
					__u32 len)
{
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6h = h->l3;
	struct iphdr *iph = h->l3;
	__u64 hi, lo;
	__u32 d;

	if (h->v6) {
		if ((void *)(ip6h + 1) > end)
			return;
		__builtin_memcpy(&hi, &ip6h->daddr, 8);
		__builtin_memcpy(&lo, (__u8 *)&ip6h->daddr + 8, 8);
	} else {
		if ((void *)(iph + 1) > end)
			return;
		d = iph->daddr;
		hi = 0;
		/* Bytes 8-15 of ::ffff:a.b.c.d, in memory order. */
		lo = bpf_cpu_to_be64(0xffff00000000ULL) | (__u64)d << (__BYTE_ORDER__ ==
			__ORDER_LITTLE_ENDIAN__ ? 32 : 0);
	}
	xg_dest_note(hi, lo, xg_dest_class(h) | h->v6 << 8 | lists << 16, len);
}

#endif /* XG_SAMPLES_H */
