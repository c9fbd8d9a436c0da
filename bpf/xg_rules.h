/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The outer program's n-tuple rules and per-source rate limits, after the
 * lists, the UDP source ports and the fragment policy (bpf/xdpguard.h has
 * the layouts and the walk; xdpguard/rules.py fills the maps).
 *
 * A rule's components are FlowSpec's, evaluated as RFC 8955 says: within
 * a component, terms ANDed together bind tighter than the ORs between
 * them; all of a rule's components must match; a component the frame has
 * no field for (ports of a later fragment, ICMP type of UDP) does not
 * match. The first matching rule in RFC 8955 order decides, once:
 * drop, accept (no further rule), or a rate (accept while its bucket has
 * room, drop above). The per-source limits apply after the rules, to
 * whatever they let through, accepted frames included.
 *
 * Both stages, the walk of a list and a rule's terms are global
 * functions, each verified once, and the terms are evaluated without
 * branches, so that the verifier's work does not multiply with the
 * bounds.
 */
#ifndef XG_RULES_H
#define XG_RULES_H

#include "xg_rule_hash.h"

_Static_assert(sizeof(((struct xg_rule_list *)0)->entry) / 4 == XG_RULE_LIST_MAX,
	       "xg_rule_list.entry holds XG_RULE_LIST_MAX entries");
_Static_assert(sizeof(((struct xg_rule *)0)->terms) / 4 == XG_RULE_TERMS,
	       "xg_rule.terms holds XG_RULE_TERMS terms");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_RULES_MAX + 2); /* a prefix per rule, and the roots */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_rule_key);
	__type(value, struct xg_rule_list);
} xg_rule_index SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XG_RULES_MAX);
	__type(key, __u32);
	__type(value, struct xg_rule);
} xg_rules SEC(".maps");

struct xg_rule_filter_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_rule_filter);
};

/* Python fills a fresh filter and swaps the slot: a frame sees one whole. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct xg_rule_filter_map);
} xg_rule_filters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_RULES_MAX);
	__type(key, __u32);
	__type(value, struct xg_rule_stats);
} xg_rule_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_RULES_MAX);
	__type(key, __u32);
	__type(value, struct xg_rate_state);
} xg_rule_rate SEC(".maps");

/* The frame's fields for the rules: off the stack, which the walk's calls share. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_rule_pkt);
} xg_rule_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_RATELIMITS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_rule_key);
	__type(value, struct xg_ratelimit);
} xg_rl_index SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_RATELIMITS_MAX);
	__type(key, __u32);
	__type(value, struct xg_rate_state);
} xg_rl_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, XG_RATELIMIT_SOURCES);
	__type(key, struct xg_rl_src_key);
	__type(value, struct xg_rate_state);
} xg_rl_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_RATELIMITS_MAX);
	__type(key, __u32);
	__type(value, struct xg_rule_stats);
} xg_rl_stats SEC(".maps");

/* Where an IP header can start: behind Ethernet and the VLAN tags the parser walks. */
#define XG_MAX_L3_OFF 64

/*
 * What the rules read of a frame, gathered once (rule_fields()): each
 * component's field by its number, so that a term is evaluated without a
 * branch (the verifier then walks a rule's terms in one straight line).
 */
struct xg_rule_pkt {
	__u16 val[16];		/* by enum xg_rule_comp */
	__u16 val2[16];		/* the same, but a port component's is the other port */
	__u32 have;		/* bit c: the frame has component c's field */
	__u32 wire_len;		/* the frame, for byte rates and counters */
	__u8 family;		/* 4 or 6 */
	__u8 pad[3];
	__u32 hit;		/* what struct xg_sample.rule says of the verdict */
	__u8 src[16];		/* 8-byte aligned, for source_in() */
	__u8 dst[16];
	/* Scratch of the stages, off the stack too. */
	__u8 l3[40];		/* a copy of the IP header */
	__u8 l4[16];		/* ... and of the L4 header's first bytes */
	struct xg_rule_key key;
	struct xg_rl_src_key skey;
	struct xg_rate_state zero;
};

/*
 * Gather @p from the frame in @ctx: its IP header at @l3_off, @l3_len
 * bytes long; its L4 header at @l4_off (0: none); @h_frag, @proto and @v6
 * as the parser found them. 0, or -1 if the frame is shorter than that.
 */
static __always_inline int rule_fields(struct xdp_md *ctx, __u32 l3_off, __u32 l4_off,
				       __u32 l3_len, __u8 h_frag, __u8 proto, int v6,
				       struct xg_rule_pkt *p)
{
	struct ipv6hdr *ip6h = (void *)p->l3;
	struct iphdr *iph = (void *)p->l3;
	__u16 frag = 0, sport, dport;
	__u8 *l4 = p->l4;
	int c;

	/* The fields read below are all written; the rest is scratch. */
	__builtin_memset(p, 0, offsetof(struct xg_rule_pkt, wire_len));
	if (l3_off > XG_MAX_L3_OFF || l4_off > 0xffff)
		return -1;
	/* Copies, read with a helper: no packet pointer arithmetic to prove. */
	if (bpf_xdp_load_bytes(ctx, l3_off, p->l3, v6 ? sizeof(*ip6h) : sizeof(*iph)))
		return -1;
	p->wire_len = ctx->data_end - ctx->data;
	if (h_frag & XG_FRAG_LATER)
		frag |= XG_RF_ISF;
	else if (h_frag & XG_FRAG_ANY)
		frag |= XG_RF_FF;
	if ((h_frag & (XG_FRAG_LATER | XG_FRAG_MORE)) == XG_FRAG_LATER)
		frag |= XG_RF_LF;
	if (v6) {
		p->family = 6;
		p->val[XG_RC_DSCP] = ((ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4)) >> 2;
		__builtin_memcpy(p->src, &ip6h->saddr, 16);
		__builtin_memcpy(p->dst, &ip6h->daddr, 16);
	} else {
		p->family = 4;
		p->val[XG_RC_DSCP] = iph->tos >> 2;
		if (bpf_ntohs(iph->frag_off) & 0x4000)
			frag |= XG_RF_DF;
		__builtin_memcpy(p->src, &iph->saddr, 4);
		__builtin_memcpy(p->dst, &iph->daddr, 4);
	}
	p->val[XG_RC_PROTO] = proto;
	p->val[XG_RC_LENGTH] = l3_len;
	p->val[XG_RC_FRAGMENT] = frag;
	p->have = 1 << XG_RC_PROTO | 1 << XG_RC_LENGTH | 1 << XG_RC_DSCP | 1 << XG_RC_FRAGMENT;
	if (l4_off && !(h_frag & XG_FRAG_LATER)) { /* a later fragment has no L4 fields */
		switch (proto) {
		case IPPROTO_TCP:
			if (bpf_xdp_load_bytes(ctx, l4_off, l4, 14))
				return -1;
			p->val[XG_RC_TCP_FLAGS] = l4[13];
			p->have |= 1 << XG_RC_TCP_FLAGS;
			goto ports;
		case IPPROTO_UDP:
			if (bpf_xdp_load_bytes(ctx, l4_off, l4, 4))
				return -1;
ports:
			sport = (l4[0] << 8) | l4[1];
			dport = (l4[2] << 8) | l4[3];
			p->val[XG_RC_PORT] = sport;
			p->val2[XG_RC_PORT] = dport;
			p->val[XG_RC_SPORT] = sport;
			p->val[XG_RC_DPORT] = dport;
			p->have |= 1 << XG_RC_PORT | 1 << XG_RC_SPORT | 1 << XG_RC_DPORT;
			break;
		case IPPROTO_ICMP:
		case IPPROTO_ICMPV6:
			if (proto != (v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP))
				break;
			if (bpf_xdp_load_bytes(ctx, l4_off, l4, 2))
				return -1;
			p->val[XG_RC_ICMP_TYPE] = l4[0];
			p->val[XG_RC_ICMP_CODE] = l4[1];
			p->have |= 1 << XG_RC_ICMP_TYPE | 1 << XG_RC_ICMP_CODE;
			break;
		}
	}
	for (c = 0; c < 16; c++)
		if (c != XG_RC_PORT)
			p->val2[c] = p->val[c];
	return 0;
}

/*
 * Hide @x's value from the compiler, which would otherwise turn the
 * arithmetic below back into compares and branches.
 */
#define XG_OPAQUE(x) asm volatile("" : "+r"(x))

/* 1 if @a < @b, else 0, for 16-bit values, without a branch. */
static __always_inline __u32 lt16(__u32 a, __u32 b)
{
	__u32 d = a - b;

	XG_OPAQUE(d);
	return d >> 31;
}

/* 1 if @x is not 0, else 0, for 16-bit values, without a branch. */
static __always_inline __u32 nz16(__u32 x)
{
	__u32 d = 0 - x;

	XG_OPAQUE(d);
	return d >> 31;
}

/* Term @t on field value @v (bit 0 of the result), without a branch. */
static __always_inline __u32 term_true(__u32 op, __u32 value, __u32 bitmask, __u32 v)
{
	__u32 lt = lt16(v, value), gt = lt16(value, v), eq = 1 ^ (lt | gt);
	__u32 num = ((op >> 2) & lt) | ((op >> 1) & gt) | (op & eq);
	__u32 x = v & value, all = 1 ^ nz16(x ^ value), any = nz16(x);
	__u32 bits = ((op & all) | ((op ^ 1) & any)) ^ (op >> 1);

	return ((bitmask & bits) | ((bitmask ^ 1) & num)) & 1;
}

/* Does @r's source prefix hold the frame's source? */
static __always_inline int source_in(const struct xg_rule *r, const struct xg_rule_pkt *p)
{
	const __u64 *a = (const __u64 *)p->src, *b = (const __u64 *)r->src;
	const __u64 *m = (const __u64 *)r->src_mask;

	return !(((a[0] ^ b[0]) & m[0]) | ((a[1] ^ b[1]) & m[1]));
}

/*
 * Does rule @r hold for @p: its source, and all its components, each an
 * OR of AND groups of terms (a port component is evaluated for each port
 * and holds if either does)? Straight-line arithmetic per term, and a
 * global function, so the verifier walks it once for every rule. The
 * walk's state is bits of @st, to keep it in registers.
 */
enum {
	ST_ANY = 1,	/* an AND group of the component held (first port) */
	ST_GROUP = 2,	/* the current AND group holds so far */
	ST_ANY2 = 4,	/* the same for the second port */
	ST_GROUP2 = 8,
	ST_HAVE = 16,	/* the frame has the component's field */
	ST_FAIL = 32,	/* a component before did not hold */
};

static __always_inline __u32 component_held(__u32 st)
{
	return (st >> 4) & (st | st >> 1 | st >> 2 | st >> 3) & 1;
}

__attribute__((noinline)) int xg_rule_holds(const struct xg_rule *r, const struct xg_rule_pkt *p)
{
	__u32 i, n, comp = 0, vv = 0, st = 0;

	if (!r || !p)
		return 0;
	if (!source_in(r, p))
		return 0;
	n = r->nterms;
	XG_NO_UNROLL
	for (i = 0; i < XG_RULE_TERMS; i++) {
		const struct xg_rule_term *t = &r->terms[i];
		__u32 c = t->comp & 15, op = t->op, value = t->value;
		__u32 change = nz16(c ^ comp), keep, start, bitmask, g;

		if (i >= n)
			break;
		keep = 0 - (change ^ 1); /* all ones: the same component goes on */
		/* A new component: the one before is complete. */
		st |= (change & nz16(i) & (component_held(st) ^ 1)) * ST_FAIL;
		comp = c;
		vv = (vv & keep) | ((p->val[c] | (__u32)p->val2[c] << 16) & ~keep);
		st = (st & (keep | ~(ST_HAVE | ST_ANY | ST_ANY2))) |
		     (((p->have >> c) & 1) * ST_HAVE & ~keep);
		/* Not ANDed with the term before: the group before is complete. */
		start = change | (((op >> 6) & 1) ^ 1);
		st |= (st >> 1) & (start & (change ^ 1)) * (ST_ANY | ST_ANY2);
		bitmask = 1 ^ nz16((c ^ XG_RC_TCP_FLAGS) & (c ^ XG_RC_FRAGMENT));
		g = ((st >> 1) | start) & term_true(op, value, bitmask, vv & 0xffff);
		g |= (((st >> 3) | start) & term_true(op, value, bitmask, vv >> 16)) << 2;
		st = (st & ~(ST_GROUP | ST_GROUP2)) | (g << 1);
	}
	if (!n)
		return 1;
	return !(st & ST_FAIL) && component_held(st);
}

/* GCRA: may @cost units pass a bucket due at *@tat? If so it is charged. */
static __always_inline int rate_take(__u64 *tat, __u64 interval, __u32 cost, __u64 now)
{
	__u64 t = *tat;

	if (t > now + XG_RATE_TAU_NS)
		return 0;
	if (t < now)
		t = now;
	*tat = t + ((interval * cost) >> XG_RATE_SHIFT);
	return 1;
}

static __always_inline int bloom_has(const struct xg_rule_filter *f, __u64 h)
{
	__u32 a = h & (XG_RULE_BLOOM_WORDS * 64 - 1), b = (h >> 24) & (XG_RULE_BLOOM_WORDS * 64 - 1);

	return (f->bits[a >> 6] >> (a & 63) & 1) && (f->bits[b >> 6] >> (b & 63) & 1);
}

/*
 * Which of @info's stages (bits 24-31, enum xg_stage_bits) a frame to
 * destination @hi:@lo needs: the rules only if the filter says its
 * destination may have some. @info as for xg_rules_stage(). Scalars only:
 * verified once.
 */
__attribute__((noinline)) __u32 xg_rules_wanted(__u32 info, __u64 hi, __u64 lo)
{
	__u32 stages = info >> 24, v6 = (info >> 16) & 1, zero = 0, i, n;
	__u32 rules = v6 ? XG_STAGES_RULES_V6 : XG_STAGES_RULES_V4;
	__u32 out = stages & (v6 ? XG_STAGES_RATELIMITS_V6 : XG_STAGES_RATELIMITS_V4);
	const struct xg_rule_filter *f;
	void *inner;

	if (!(stages & rules))
		return out;
	inner = bpf_map_lookup_elem(&xg_rule_filters, &zero);
	f = inner ? bpf_map_lookup_elem(inner, &zero) : (void *)0;
	if (!f || f->root[v6 & 1])
		return out | rules; /* no filter (being set up): walk */
	n = f->nlens[v6 & 1];
	for (i = 0; i < XG_RULE_LENS; i++) {
		if (i >= n)
			break;
		if (bloom_has(f, xg_rule_hash(hi, lo, f->lens[v6 & 1][i], v6, f->salt)))
			return out | rules;
	}
	return out;
}

/*
 * The first rule of @list that holds for @p: its slot, or -1. A plain
 * loop, not bpf_loop(): a callback per rule costs an indirect call each
 * (25 ns a rule here, with the retpolines), the loop a few. A global
 * function: the verifier walks its 64 turns once.
 */
__attribute__((noinline)) int xg_rule_walk(const struct xg_rule_list *list,
					   const struct xg_rule_pkt *p)
{
	__u32 i, n, entry, slot;
	const struct xg_rule *r;

	if (!list || !p)
		return -1;
	n = list->n;
	XG_NO_UNROLL
	for (i = 0; i < XG_RULE_LIST_MAX; i++) {
		if (i >= n)
			break;
		entry = list->entry[i];
		slot = entry & 0xffff;
		r = bpf_map_lookup_elem(&xg_rules, &slot);
		if (!r || r->tag != entry >> 16)
			continue; /* a slot being reused: not this entry's rule */
		/* The cheap rejections first: the protocol, the fields the rule needs. */
		if ((r->proto && r->proto != p->val[XG_RC_PROTO]) || (r->need & ~p->have))
			continue;
		if (r->q_comp) {
			__u16 v = p->val[r->q_comp & 15], v2 = p->val2[r->q_comp & 15];

			if ((v < r->q_lo || v > r->q_hi) && (v2 < r->q_lo || v2 > r->q_hi))
				continue;
		}
		if (!r->nterms && !r->src_len)
			return slot;
		if (xg_rule_holds(r, p))
			return slot;
	}
	return -1;
}

/* The rule stage: XG_REASON_REDIRECTED (no rule, accept, in rate) or its drop reason. */
static __always_inline int rules_judge(struct xg_rule_pkt *p)
{
	struct xg_rule_key *key = &p->key;
	struct xg_rule_stats *st;
	struct xg_rate_state *rs;
	struct xg_rule_list *list;
	struct xg_rule *r;
	__u32 d, cost;
	int slot = -1;

	key->family = p->family;
	key->prefixlen = 8 + (p->family == 6 ? 128 : 32);
	__builtin_memcpy(key->addr, p->dst, 16);
	for (d = 0; d < XG_RULE_DEPTH; d++) {
		list = bpf_map_lookup_elem(&xg_rule_index, key);
		if (!list)
			return XG_REASON_REDIRECTED;
		slot = xg_rule_walk(list, p);
		if (slot >= 0)
			break;
		if (list->prefixlen <= 8)
			return XG_REASON_REDIRECTED;
		key->prefixlen = list->prefixlen - 1;
	}
	if (slot < 0)
		return XG_REASON_REDIRECTED;
	key->prefixlen = slot; /* a u32 in map memory, for the lookups' keys */
	r = bpf_map_lookup_elem(&xg_rules, &key->prefixlen);
	st = bpf_map_lookup_elem(&xg_rule_stats, &key->prefixlen);
	if (!r || !st)
		return XG_REASON_REDIRECTED; /* cannot happen: array slots */
	st->packets++;
	st->bytes += p->wire_len;
	p->hit = key->prefixlen + 1;
	switch (r->action) {
	case XG_RULE_ACCEPT:
		return XG_REASON_REDIRECTED;
	case XG_RULE_RATE_BYTES:
	case XG_RULE_RATE_PACKETS:
		rs = bpf_map_lookup_elem(&xg_rule_rate, &key->prefixlen);
		cost = r->action == XG_RULE_RATE_BYTES ? p->wire_len : 1;
		if (rs && rate_take(&rs->tat, r->interval, cost, bpf_ktime_get_ns()))
			return XG_REASON_REDIRECTED;
		st->dropped_packets++;
		st->dropped_bytes += p->wire_len;
		return XG_REASON_RULE_RATE_LIMITED;
	default: /* drop, and an action this program does not know */
		st->dropped_packets++;
		st->dropped_bytes += p->wire_len;
		return XG_REASON_RULE_DROP;
	}
}

/* The per-source rate limits: XG_REASON_REDIRECTED, or SOURCE_RATE_LIMITED. */
static __always_inline int ratelimit_judge(struct xg_rule_pkt *p)
{
	struct xg_rule_key *key = &p->key;
	struct xg_rl_src_key *skey = &p->skey;
	struct xg_rate_state *rs;
	struct xg_ratelimit *rl;
	struct xg_rule_stats *st;
	__u64 now, t1, t2;
	__u32 id;
	int ok;

	key->family = p->family;
	key->prefixlen = 8 + (p->family == 6 ? 128 : 32);
	__builtin_memcpy(key->addr, p->src, 16);
	rl = bpf_map_lookup_elem(&xg_rl_index, key);
	if (!rl)
		return XG_REASON_REDIRECTED;
	id = rl->id;
	p->hit = id + 1;
	if (rl->flags & XG_RL_PER_SOURCE) {
		skey->id = rl->id;
		skey->tag = rl->tag;
		skey->family = p->family;
		__builtin_memcpy(skey->addr, p->src, 16);
		rs = bpf_map_lookup_elem(&xg_rl_src, skey);
		if (!rs) {
			bpf_map_update_elem(&xg_rl_src, skey, &p->zero, BPF_NOEXIST);
			rs = bpf_map_lookup_elem(&xg_rl_src, skey);
		}
	} else {
		rs = bpf_map_lookup_elem(&xg_rl_state, &id);
	}
	st = bpf_map_lookup_elem(&xg_rl_stats, &id);
	if (st) {
		st->packets++;
		st->bytes += p->wire_len;
	}
	/* No bucket to charge (cannot happen): fail closed. */
	ok = 0;
	if (rs) {
		now = bpf_ktime_get_ns();
		t1 = rs->tat;
		t2 = rs->tat_bytes;
		ok = (!rl->pps_interval || rate_take(&t1, rl->pps_interval, 1, now)) &&
		     (!rl->bps_interval || rate_take(&t2, rl->bps_interval, p->wire_len, now));
		if (ok) {
			rs->tat = t1;
			rs->tat_bytes = t2;
		}
	}
	if (ok)
		return XG_REASON_REDIRECTED;
	if (st) {
		st->dropped_packets++;
		st->dropped_bytes += p->wire_len;
	}
	return XG_REASON_SOURCE_RATE_LIMITED;
}

/*
 * Both stages for one frame that passed the policy before them: its
 * verdict (XG_REASON_REDIRECTED: on it goes). @info packs what the parser
 * found: the L4 protocol (bits 0-7), enum xg_frag_bits (8-15), IPv6 (16),
 * and xg_policy.stages (24-31). Scalars only, so that the verifier checks
 * it once and not once per path through the parser.
 */
__attribute__((noinline)) int xg_rules_stage(struct xdp_md *ctx, __u32 l3_off, __u32 l4_off,
					     __u32 l3_len, __u32 info)
{
	__u32 stages = info >> 24, zero = 0;
	int v6 = (info >> 16) & 1, r;
	struct xg_rule_pkt *p;

	p = bpf_map_lookup_elem(&xg_rule_scratch, &zero);
	if (!ctx || !p)
		return XG_REASON_MALFORMED; /* cannot happen */
	p->hit = 0;
	if (rule_fields(ctx, l3_off, l4_off, l3_len, (info >> 8) & 0xff, info & 0xff, v6, p))
		return XG_REASON_MALFORMED; /* cannot happen: the parser read as far */
	if (stages & (v6 ? XG_STAGES_RULES_V6 : XG_STAGES_RULES_V4)) {
		r = rules_judge(p);
		if (r != XG_REASON_REDIRECTED)
			return r;
	}
	if (stages & (v6 ? XG_STAGES_RATELIMITS_V6 : XG_STAGES_RATELIMITS_V4))
		return ratelimit_judge(p);
	return XG_REASON_REDIRECTED;
}

/* struct xg_sample.rule of a frame this CPU's rule stages just judged @reason. */
static __always_inline __u32 xg_rule_hit(__u32 reason)
{
	struct xg_rule_pkt *p;
	__u32 zero = 0;

	if (reason != XG_REASON_RULE_DROP && reason != XG_REASON_RULE_RATE_LIMITED &&
	    reason != XG_REASON_SOURCE_RATE_LIMITED)
		return 0;
	p = bpf_map_lookup_elem(&xg_rule_scratch, &zero);
	return p ? p->hit : 0;
}

#endif /* XG_RULES_H */
