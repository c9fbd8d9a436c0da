/* SPDX-License-Identifier: GPL-2.0 */
/*
 * SYN challenges, answered by the outer program itself (the only place they
 * are answered): included by xdpguard.bpf.c after its flow table, whose
 * xg_flow_exists() it uses.
 *
 * A SYN from a source that has not proved it is real is rewritten in place
 * into a SYN-ACK whose acknowledgment number is a cookie, and sent back
 * (XDP_TX). A real stack in SYN-SENT answers such an unacceptable ACK with
 * <SEQ=SEG.ACK><CTL=RST> (RFC 9293 3.10.7.3) and, on Linux, retransmits its
 * SYN within milliseconds; that RST, checked here with one hash, puts the
 * source in xg_verified for verify_ttl seconds, and its next SYN goes to
 * the loop, which tracks the handshake. The cookie is SipHash-2-4 of the
 * flow key and the time slot under a secret Python rotates (xg_secret: the
 * previous key still checks answers); its low three bits carry the slot (2)
 * and the key's generation (1).
 *
 * Nothing here takes a lock shared between CPUs, and nothing can be made
 * into a reflector:
 *   - one reply per SYN, never longer than the SYN (the frame is cut to
 *     Ethernet + IP + a 20-byte TCP header);
 *   - a cap on replies per source /24 (IPv4) or /48 (IPv6), and one over
 *     all sources: per-CPU token buckets, each with rate / ncpus; a SYN
 *     above a cap is dropped (challenge_rate_limited). The prefixes' buckets
 *     are XG_PREFIX_SLOTS slots of an array, picked by a keyed hash: a
 *     prefix never gets more than its cap, though one may share a slot
 *     (and its cap) with another. An LRU hash of prefixes, exact, cost
 *     40 % of the challenge rate;
 *   - a verified source is held to its own SYN rate while challenges are
 *     on (verified_syn_rate_limited): any live host answers a stray
 *     SYN-ACK with a RST, so a spoofer can get a real host verified, but
 *     not flood under its name; and the SYNs that skip the challenge
 *     because their source is verified have a budget per destination and
 *     one over everyone, beyond which they are challenged like any other
 *     (a spoofer can get many real hosts verified).
 *
 * What a challenge proves: that the address can receive a SYN-ACK and
 * answers it. Not that the host sending SYNs in its name is that host.
 *
 * Auto mode: the per-destination rates (SYNs, and frames handed to the
 * loop for a state check) are per-CPU token buckets too; a destination
 * stays "attacked" XG_AUTO_HOLD_NS after its bucket last ran dry.
 */
#ifndef XG_CHALLENGE_H
#define XG_CHALLENGE_H

#include "xdpguard.h"
#include "xg_flow.h"

#define XG_NANO 1000000000ULL
#define XG_COOKIE_SLOT_SECS 64	/* a cookie is good for one to two slots */
#define XG_AUTO_HOLD_NS (2 * XG_NANO)
#define XG_CHALLENGE_WIN 8192	/* the challenge's window: it carries no data anyway */

/* A per-CPU token bucket: tokens in billionths, refilled by elapsed time. */
struct xg_rate {
	__u64 last_ns;
	__u64 tokens;
};

/*
 * Per destination: auto mode's [0] SYNs and [1] frames judged by state,
 * and [2] SYNs of verified sources that skip the challenge.
 */
struct xg_dest_rate {
	struct xg_rate r[3];
	__u64 until_ns[2];	/* auto: counts as attacked until */
};

#define XG_PREFIX_SLOTS_LOG 14
#define XG_PREFIX_SLOTS (1 << XG_PREFIX_SLOTS_LOG)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_tcp_cfg);
} xg_tcpcfg SEC(".maps");

/* Shared by both program instances and pinned with the flow table, as are
 * xg_verified and xg_verified_bloom. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_cookie_secret);
} xg_secret SEC(".maps");

/* Likewise; the loader sizes it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct xg_addr);
	__type(value, struct xg_verified_src);
} xg_verified SEC(".maps");

/*
 * Which sources may be in xg_verified: a SYN flood's random sources miss
 * there, each lookup a cache miss in a table of several megabytes (140 ns
 * a SYN here, half a challenge's cost). This bit array of a kernel Bloom
 * filter (one hash, a random seed, 64 KiB for 262,144 sources) says "no"
 * to almost all of them first. Sources are only ever added: one that left
 * xg_verified costs a lookup, never a wrong answer. Sized and pinned with
 * xg_verified.
 */
struct {
	__uint(type, BPF_MAP_TYPE_BLOOM_FILTER);
	__uint(max_entries, 65536);
	__type(value, struct xg_addr);
	__uint(map_extra, 1); /* hash functions */
} xg_verified_bloom SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_PREFIX_SLOTS);
	__type(key, __u32);
	__type(value, struct xg_rate);
} xg_chal_prefix SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_rate);
} xg_chal_global SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct xg_addr);
	__type(value, struct xg_dest_rate);
} xg_dest_rates SEC(".maps");

/*
 * The last SYN of each source that its prefix's cap refused a challenge:
 * its port, sequence number and when. A retransmission of it (the same
 * port and sequence number, between XG_RETX_MIN_NS and XG_RETX_MAX_NS
 * later) is challenged past the prefix's cap, never past everyone's: real
 * stacks retransmit an unanswered SYN, and spoofers rarely do, so a flood
 * in the names of a /24's hosts does not starve that /24's real clients.
 * Keyed by source, not by flow: a flood with random ports from a few
 * addresses takes a few entries, and cannot push a real client's out
 * before its retransmission comes (a flow key's LRU of this size was
 * turned over in under a second by 100 kpps).
 */
struct xg_syn_retx {
	__u64 ns;
	__u32 seq;
	__u16 port;
	__u16 pad;
};

#define XG_RETX_MIN_NS (XG_NANO / 4)
#define XG_RETX_MAX_NS (30 * XG_NANO)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct xg_addr);
	__type(value, struct xg_syn_retx);
} xg_syn_retx SEC(".maps");

/* SYNs of verified sources that skip the challenge, to all destinations. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_rate);
} xg_verified_all SEC(".maps");

/*
 * How a challenge leaves: empty, with XDP_TX; holding this very device
 * (written by the loader for a veth), redirected to it. A veth flushes
 * what XDP_TX queued to its peer only if the peer runs an XDP program,
 * where a redirect needs no more than the peer's NAPI (GRO): with XDP_TX
 * a challenge to a host behind a plain veth waits for its next frame.
 */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xg_self SEC(".maps");

/* What monitor mode would have done, per reason (this CPU's share). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_REASON_CAP);
	__type(key, __u32);
	__type(value, struct xg_counter);
} xg_monitor SEC(".maps");

/* What the gate decided for a TCP frame from outside. */
enum xg_gate {
	XG_GATE_LOOP,	/* the AF_XDP path, with the meta flags given */
	XG_GATE_TX,	/* rewritten into a challenge: XDP_TX */
	XG_GATE_DROP,	/* dropped, for the reason given */
};

XG_INLINE __u64 xg_per_cpu(__u32 rate, const struct xg_tcp_cfg *cfg)
{
	__u64 r = rate / (cfg->ncpus ? cfg->ncpus : 1);

	return r ? r : 1;
}

/* Take one token from @b (@rate per second, at most @burst), 1 if there was one. */
XG_INLINE int xg_rate_take(struct xg_rate *b, __u64 rate, __u64 burst, __u64 now)
{
	__u64 cap = burst * XG_NANO, dt;

	if (now > b->last_ns) {
		dt = now - b->last_ns;
		if (dt > 10 * XG_NANO)
			dt = 10 * XG_NANO; /* a full bucket by then; no overflow */
		b->tokens += dt * rate;
		if (b->tokens > cap)
			b->tokens = cap;
		b->last_ns = now;
	}
	if (b->tokens < XG_NANO)
		return 0;
	b->tokens -= XG_NANO;
	return 1;
}

XG_INLINE void xg_monitor_count(enum xg_reason r, __u32 len)
{
	__u32 key = r;
	struct xg_counter *c = bpf_map_lookup_elem(&xg_monitor, &key);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/*
 * Is the destination @addr above its rate for @kind (0: SYNs, 1: frames
 * judged by state)? Counts this frame. A table that cannot take the
 * destination says yes: the checks then apply, which is the safe side.
 */
/* @addr's buckets (made full if new); NULL if the table cannot take it. */
XG_INLINE struct xg_dest_rate *xg_dest_get(const struct xg_tcp_cfg *cfg, const __u8 *addr,
					   __u64 now)
{
	struct xg_dest_rate *d, fresh = {};

	d = bpf_map_lookup_elem(&xg_dest_rates, addr);
	if (d)
		return d;
	fresh.r[0].last_ns = fresh.r[1].last_ns = fresh.r[2].last_ns = now;
	fresh.r[0].tokens = xg_per_cpu(cfg->syn_burst, cfg) * XG_NANO;
	fresh.r[1].tokens = xg_per_cpu(cfg->state_burst, cfg) * XG_NANO;
	fresh.r[2].tokens = xg_per_cpu(cfg->verified_dest_syn_rate, cfg) * XG_NANO;
	bpf_map_update_elem(&xg_dest_rates, addr, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&xg_dest_rates, addr);
}

XG_INLINE int xg_dest_over(const struct xg_tcp_cfg *cfg, const __u8 *addr, int kind, __u64 now)
{
	__u64 rate = xg_per_cpu(kind ? cfg->state_rate : cfg->syn_rate, cfg);
	__u64 burst = xg_per_cpu(kind ? cfg->state_burst : cfg->syn_burst, cfg);
	struct xg_dest_rate *d;

	d = xg_dest_get(cfg, addr, now);
	if (!d)
		return 1;
	kind &= 1;
	if (xg_rate_take(&d->r[kind], rate, burst, now))
		return now < d->until_ns[kind];
	d->until_ns[kind] = now + XG_AUTO_HOLD_NS;
	return 1;
}

/* The xg_chal_prefix slot of @k's source /24 (IPv4) or /48 (IPv6). */
XG_INLINE __u32 xg_prefix_slot(const struct xg_cookie_secret *sec, const struct xg_flow_key *k)
{
	__u64 p = 0;

	if (k->v6) {
		__builtin_memcpy(&p, k->out_addr, 6);
		p |= 1ULL << 63;
	} else {
		__builtin_memcpy(&p, k->out_addr + 12, 3);
	}
	/* Multiply-shift under a random odd multiplier (Dietzfelbinger). */
	return (__u32)((p * sec->prefix_salt) >> (64 - XG_PREFIX_SLOTS_LOG));
}

/*
 * Is the SYN (@k, @seq) one its prefix's cap refused a little while ago,
 * sent again? Otherwise it is noted, for when it is.
 */
XG_INLINE int xg_syn_retransmitted(struct xg_flow_key *k, __u32 seq, __u64 now)
{
	struct xg_syn_retx *r, fresh = { .ns = now, .seq = seq, .port = k->out_port };
	int same;

	r = bpf_map_lookup_elem(&xg_syn_retx, k->out_addr);
	same = r && r->seq == seq && r->port == k->out_port;
	if (same && now - r->ns >= XG_RETX_MIN_NS && now - r->ns <= XG_RETX_MAX_NS) {
		bpf_map_delete_elem(&xg_syn_retx, k->out_addr);
		return 1;
	}
	if (!same || now - r->ns > XG_RETX_MAX_NS)
		bpf_map_update_elem(&xg_syn_retx, k->out_addr, &fresh, BPF_ANY);
	return 0;
}

/*
 * May one more challenge go to @k's source (a SYN of sequence number
 * @seq)? Its prefix's cap, or a retransmission; then everyone's cap.
 */
XG_INLINE int xg_challenge_allowed(const struct xg_tcp_cfg *cfg,
				   const struct xg_cookie_secret *sec,
				   struct xg_flow_key *k, __u32 seq, __u64 now)
{
	__u64 prate = xg_per_cpu(cfg->challenge_prefix_rate, cfg);
	__u64 grate = xg_per_cpu(cfg->challenge_rate, cfg);
	__u32 zero = 0, slot = xg_prefix_slot(sec, k);
	struct xg_rate *b;

	b = bpf_map_lookup_elem(&xg_chal_prefix, &slot);
	if (!b)
		return 0;
	if (!xg_rate_take(b, prate, prate, now) && !xg_syn_retransmitted(k, seq, now))
		return 0;
	b = bpf_map_lookup_elem(&xg_chal_global, &zero);
	return b && xg_rate_take(b, grate, grate, now);
}

/*
 * One SYN of verified source @v: within its rate? The entry is shared by
 * every CPU, so the bucket moves with atomic operations; a refill two CPUs
 * race for goes to one of them.
 */
XG_INLINE int xg_verified_take(struct xg_verified_src *v, const struct xg_tcp_cfg *cfg, __u64 now)
{
	__s64 rate = cfg->verified_syn_rate ? cfg->verified_syn_rate : 1;
	__s64 cap = rate * (__s64)XG_NANO;
	__u64 last = v->last_ns, dt;

	if (now > last && __sync_val_compare_and_swap(&v->last_ns, last, now) == last) {
		dt = now - last;
		if (dt > 10 * XG_NANO)
			dt = 10 * XG_NANO;
		__sync_fetch_and_add(&v->tokens, (__s64)dt * rate);
		if (v->tokens > cap)
			v->tokens = cap; /* a racy clamp only ever lowers the grant */
	}
	if (v->tokens < (__s64)XG_NANO)
		return 0;
	if (__sync_fetch_and_add(&v->tokens, -(__s64)XG_NANO) >= (__s64)XG_NANO)
		return 1;
	__sync_fetch_and_add(&v->tokens, (__s64)XG_NANO); /* another CPU took the last one */
	return 0;
}

/*
 * May a SYN of a verified source to @dst skip the challenge? Within the
 * budget of such SYNs to @dst, and to everyone. A table that cannot take
 * @dst says no: the SYN is challenged, the safe side.
 */
XG_INLINE int xg_verified_budget(const struct xg_tcp_cfg *cfg, const __u8 *dst, __u64 now)
{
	__u64 drate = xg_per_cpu(cfg->verified_dest_syn_rate, cfg);
	__u64 grate = xg_per_cpu(cfg->verified_total_syn_rate, cfg);
	struct xg_dest_rate *d = xg_dest_get(cfg, dst, now);
	struct xg_rate *b;
	__u32 zero = 0;

	if (!d || !xg_rate_take(&d->r[2], drate, drate, now))
		return 0;
	b = bpf_map_lookup_elem(&xg_verified_all, &zero);
	return b && xg_rate_take(b, grate, grate, now);
}

/*
 * SipHash-2-4 of the flow's addresses, ports and the time slot under @key:
 * two words for IPv4, five for IPv6 (the length is hashed too, so the two
 * never meet).
 */
XG_INLINE __u64 xg_cookie_hash(const __u8 *key, const struct xg_flow_key *k, __u32 slot)
{
	__u64 w[5], tail = (__u64)k->out_port | (__u64)k->in_port << 16 | (__u64)slot << 32;
	__u32 a, b;

	if (!k->v6) {
		__builtin_memcpy(&a, k->out_addr + 12, 4);
		__builtin_memcpy(&b, k->in_addr + 12, 4);
		w[0] = a | (__u64)b << 32;
		w[1] = tail;
		return xg_siphash(w, 2, key, 2, 4);
	}
	__builtin_memcpy(w, k->out_addr, 32);
	w[4] = tail;
	return xg_siphash(w, 5, key, 2, 4);
}

/* The cookie for @k now, and the challenge's own sequence number. */
XG_INLINE __u32 xg_cookie_make(const struct xg_cookie_secret *sec, const struct xg_flow_key *k,
			       __u32 now_s, __u32 *isn)
{
	__u32 gen = sec->gen & 1, slot = now_s / XG_COOKIE_SLOT_SECS;
	__u64 h = xg_cookie_hash(sec->key[gen], k, slot);

	*isn = (__u32)(h >> 32);
	return ((__u32)h & ~7U) | (slot & 3) << 1 | gen;
}

/* Did @cookie come from a challenge to @k in this slot or the last? */
XG_INLINE int xg_cookie_check(const struct xg_cookie_secret *sec, const struct xg_flow_key *k,
			      __u32 now_s, __u32 cookie)
{
	__u32 cur = now_s / XG_COOKIE_SLOT_SECS, slot;

	if ((cur & 3) == ((cookie >> 1) & 3))
		slot = cur;
	else if (((cur - 1) & 3) == ((cookie >> 1) & 3))
		slot = cur - 1;
	else
		return 0;
	return ((__u32)xg_cookie_hash(sec->key[cookie & 1], k, slot) & ~7U) == (cookie & ~7U);
}

XG_INLINE __u16 xg_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Rewrite the SYN of @pkt in place into the challenge: the same L2 header
 * (VLAN tags too) with the addresses swapped, a fresh IP header without
 * options or extension headers, a TCP header without options, ACK =
 * @cookie. The frame is cut to that length: never longer than the SYN.
 * Returns 0, or -1 if the frame is not what the parser said (fail closed).
 */
XG_INLINE int xg_build_challenge(struct xdp_md *ctx, struct pkt *pkt, __u32 cookie, __u32 isn)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 l3_off, hl = pkt->h.v6 ? 40 : 20, old_len, new_len, sum = 0, i;
	__u8 src[16], dst[16], mac[6];
	struct tcphdr *tcp;
	__be16 sport, dport;
	__u16 *w;
	void *ip;

	tcp = pkt->h.l4;
	if (!pkt->h.l3 || !tcp || (void *)(tcp + 1) > end)
		return -1;
	sport = tcp->source;
	dport = tcp->dest;
	__builtin_memcpy(src, pkt->key.out_addr, 16); /* the outside end sent the SYN */
	__builtin_memcpy(dst, pkt->key.in_addr, 16);
	l3_off = pkt->h.l3 - data;
	if (l3_off > 64)
		return -1;
	old_len = end - data;
	new_len = l3_off + hl + 20;
	if (new_len > old_len)
		return -1;
	if (bpf_xdp_adjust_tail(ctx, (int)new_len - (int)old_len))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + 12 > end)
		return -1;
	__builtin_memcpy(mac, data, 6);
	__builtin_memcpy(data, data + 6, 6);
	__builtin_memcpy(data + 6, mac, 6);

	/* Restate the bound for the verifier, past a compiler that knows it. */
	asm volatile("" : "+r"(l3_off));
	ip = data + (l3_off & 0x7f);
	if (pkt->h.v6) {
		struct ipv6hdr *ip6h = ip;

		if ((void *)(ip6h + 1) + sizeof(*tcp) > end)
			return -1;
		__builtin_memset(ip6h, 0, sizeof(*ip6h));
		ip6h->version = 6;
		ip6h->payload_len = bpf_htons(sizeof(*tcp));
		ip6h->nexthdr = IPPROTO_TCP;
		ip6h->hop_limit = 64;
		__builtin_memcpy(&ip6h->saddr, dst, 16);
		__builtin_memcpy(&ip6h->daddr, src, 16);
		tcp = (void *)(ip6h + 1);
		w = (__u16 *)&ip6h->saddr;
		for (i = 0; i < 16; i++) /* both addresses */
			sum += w[i];
	} else {
		struct iphdr *iph = ip;

		if ((void *)(iph + 1) + sizeof(*tcp) > end)
			return -1;
		__builtin_memset(iph, 0, sizeof(*iph));
		iph->version = 4;
		iph->ihl = 5;
		iph->tot_len = bpf_htons(sizeof(*iph) + sizeof(*tcp));
		iph->frag_off = bpf_htons(0x4000); /* DF */
		iph->ttl = 64;
		iph->protocol = IPPROTO_TCP;
		__builtin_memcpy(&iph->saddr, dst + 12, 4);
		__builtin_memcpy(&iph->daddr, src + 12, 4);
		w = (__u16 *)iph;
		for (i = 0; i < 10; i++)
			sum += w[i];
		iph->check = xg_csum_fold(sum);
		tcp = (void *)(iph + 1);
		w = (__u16 *)&iph->saddr;
		sum = w[0] + w[1] + w[2] + w[3];
	}
	if ((void *)(tcp + 1) > end)
		return -1;
	__builtin_memset(tcp, 0, sizeof(*tcp));
	tcp->source = dport;
	tcp->dest = sport;
	tcp->seq = bpf_htonl(isn);
	tcp->ack_seq = bpf_htonl(cookie);
	tcp->doff = 5;
	tcp->syn = 1;
	tcp->ack = 1;
	tcp->window = bpf_htons(XG_CHALLENGE_WIN);
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(*tcp));
	w = (__u16 *)tcp;
	for (i = 0; i < 10; i++)
		sum += w[i];
	tcp->check = xg_csum_fold(sum);
	return 0;
}

/*
 * What the gate decided (global functions below fill it: each is verified
 * once, not once per path through the parser and the policy).
 */
struct xg_gate_out {
	__u32 gate;	/* enum xg_gate */
	__u32 why;	/* enum xg_reason, for XG_GATE_DROP */
	__u32 meta;	/* XG_META_* flags for the loop */
	__u32 cookie;	/* XG_GATE_TX: the challenge's ACK number */
	__u32 isn;	/* ... and its sequence number */
};

/*
 * A SYN (no ACK, no RST) from outside, @len bytes, of key @k and sequence
 * number @seq: to the loop,
 * challenged (the cookie and sequence number in @out), or dropped.
 */
__attribute__((noinline)) int xg_syn_judge(struct xg_flow_key *k, __u32 seq, __u32 len,
					    struct xg_gate_out *out)
{
	struct xg_cookie_secret *sec;
	struct xg_verified_src *v;
	struct xg_tcp_cfg *cfg;
	__u32 zero = 0, now_s, mode;
	__u64 now;

	if (!k || !out)
		return 0;
	out->gate = XG_GATE_LOOP;
	cfg = bpf_map_lookup_elem(&xg_tcpcfg, &zero);
	if (!cfg)
		return 0;
	mode = cfg->syn_mode;
	if (mode == XG_MODE_OFF)
		return 0;
	now = xg_clock_ns();
	now_s = now / XG_NANO;
	if (mode == XG_MODE_AUTO && !xg_dest_over(cfg, k->in_addr, 0, now))
		return 0;
	v = bpf_map_peek_elem(&xg_verified_bloom, k->out_addr) ?
		    (struct xg_verified_src *)0 :
		    bpf_map_lookup_elem(&xg_verified, k->out_addr);
	if (v && !xg_seq_before(v->expires, now_s)) {
		if (!xg_verified_take(v, cfg, now)) {
			if (mode == XG_MODE_MONITOR) {
				xg_monitor_count(XG_REASON_VERIFIED_SYN_RATE_LIMITED, len);
				return 0;
			}
			out->gate = XG_GATE_DROP;
			out->why = XG_REASON_VERIFIED_SYN_RATE_LIMITED;
			return 0;
		}
		if (xg_verified_budget(cfg, k->in_addr, now))
			return 0;
		/* Over the verified sources' budget: challenged like anyone. */
	}
	if (mode == XG_MODE_MONITOR) {
		xg_monitor_count(XG_REASON_SYN_CHALLENGED, len);
		return 0;
	}
	sec = bpf_map_lookup_elem(&xg_secret, &zero);
	if (!sec || !xg_challenge_allowed(cfg, sec, k, seq, now)) {
		out->gate = XG_GATE_DROP;
		out->why = XG_REASON_CHALLENGE_RATE_LIMITED;
		return 0;
	}
	out->cookie = xg_cookie_make(sec, k, now_s, &out->isn);
	out->gate = XG_GATE_TX;
	out->why = XG_REASON_SYN_CHALLENGED;
	return 0;
}

/*
 * A RST without ACK from outside, of key @k and sequence number @seq. With
 * challenges off, or of a live flow: the loop's. Carrying the cookie: its
 * source is verified, and it goes no further. Otherwise it answers
 * nothing: dropped (challenge_failed), or, while challenges are only
 * monitored or the learning window is open (it may end a flow opened
 * before the start), forwarded as it is.
 */
__attribute__((noinline)) int xg_rst_judge(struct xg_flow_key *k, __u32 seq, __u32 len,
					    struct xg_gate_out *out)
{
	struct xg_verified_src fresh = {};
	struct xg_cookie_secret *sec;
	struct xg_tcp_cfg *cfg;
	__u32 zero = 0, now_s;
	__u64 now;

	if (!k || !out)
		return 0;
	out->gate = XG_GATE_LOOP;
	cfg = bpf_map_lookup_elem(&xg_tcpcfg, &zero);
	if (!cfg || cfg->syn_mode == XG_MODE_OFF || xg_flow_exists(k))
		return 0;
	now = xg_clock_ns();
	now_s = now / XG_NANO;
	sec = bpf_map_lookup_elem(&xg_secret, &zero);
	if (sec && xg_cookie_check(sec, k, now_s, seq)) {
		fresh.expires = now_s + cfg->verify_ttl;
		fresh.last_ns = now;
		fresh.tokens = (__s64)(cfg->verified_syn_rate ? cfg->verified_syn_rate : 1) * XG_NANO;
		bpf_map_update_elem(&xg_verified, k->out_addr, &fresh, BPF_ANY);
		bpf_map_push_elem(&xg_verified_bloom, k->out_addr, BPF_ANY);
		out->gate = XG_GATE_DROP;
		out->why = XG_REASON_CHALLENGE_PASSED;
		return 0;
	}
	if (cfg->syn_mode == XG_MODE_MONITOR || xg_seq_before(now_s, cfg->learn_until)) {
		if (cfg->syn_mode == XG_MODE_MONITOR)
			xg_monitor_count(XG_REASON_CHALLENGE_FAILED, len);
		out->meta = XG_META_FORWARD;
		return 0;
	}
	out->gate = XG_GATE_DROP;
	out->why = XG_REASON_CHALLENGE_FAILED;
	return 0;
}

/*
 * Is @k's source verified (it answered a challenge, and that has not
 * expired)? The Bloom filter answers almost every stranger first.
 */
__attribute__((noinline)) int xg_source_verified(struct xg_flow_key *k)
{
	struct xg_verified_src *v;

	if (!k || bpf_map_peek_elem(&xg_verified_bloom, k->out_addr))
		return 0;
	v = bpf_map_lookup_elem(&xg_verified, k->out_addr);
	return v && !xg_seq_before(v->expires, xg_clock_ns() / XG_NANO);
}

/* State mode auto: is @k's destination above its rate of frames judged by state? */
__attribute__((noinline)) int xg_state_over(struct xg_flow_key *k)
{
	struct xg_tcp_cfg *cfg;
	__u32 zero = 0;

	if (!k)
		return 1;
	cfg = bpf_map_lookup_elem(&xg_tcpcfg, &zero);
	if (!cfg || cfg->state_mode != XG_MODE_AUTO)
		return 0;
	return xg_dest_over(cfg, k->in_addr, 1, xg_clock_ns());
}

/*
 * The TCP policy XDP applies to a segment from outside that passed the
 * stateless policy and is not forwarded in XDP (fast path), @len bytes.
 * @pkt's key and segment are filled here; a challenge is written over the
 * SYN in place.
 */
XG_INLINE enum xg_gate xg_tcp_gate(struct xdp_md *ctx, struct pkt *pkt, __u32 len,
				   int allowlisted, __u32 *meta_flags, enum xg_reason *why)
{
	struct xg_gate_out out = {};
	__u8 fl = pkt->h.tcp_flags;

	/* An allowlisted source skips every check: the loop only tracks it. */
	if (allowlisted || !pkt->h.l3 || pkt->h.l4_proto != IPPROTO_TCP || !pkt->h.l4 ||
	    (pkt->h.frag & XG_FRAG_ANY))
		return XG_GATE_LOOP;
	if (xg_flow_key_of(&pkt->h, (void *)(long)ctx->data_end, XG_SIDE_OUT, &pkt->key, &pkt->seg))
		return XG_GATE_LOOP;
	if ((fl & (XG_TCP_SYN | XG_TCP_ACK | XG_TCP_RST)) == XG_TCP_SYN) {
		xg_syn_judge(&pkt->key, pkt->seg.seq, len, &out);
		if (out.gate == XG_GATE_TX)
			xg_sample_syn(ctx, len);
		if (out.gate == XG_GATE_TX && xg_build_challenge(ctx, pkt, out.cookie, out.isn)) {
			out.gate = XG_GATE_DROP;
			out.why = XG_REASON_MALFORMED; /* not what the parser said: fail closed */
		}
	} else if ((fl & (XG_TCP_RST | XG_TCP_ACK)) == XG_TCP_RST) {
		xg_rst_judge(&pkt->key, pkt->seg.seq, len, &out);
	} else {
		if (xg_state_over(&pkt->key))
			out.meta = XG_META_STATE_OVER;
		/* A segment of no flow from a verified source is adopted. */
		if (!(fl & (XG_TCP_SYN | XG_TCP_RST)) && xg_source_verified(&pkt->key))
			out.meta |= XG_META_VERIFIED;
	}
	*meta_flags |= out.meta;
	*why = out.why;
	return out.gate;
}

#endif /* XG_CHALLENGE_H */
