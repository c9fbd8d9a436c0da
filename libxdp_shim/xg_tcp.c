// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * TCP flow protection for the hot loop: passive bidirectional tracking,
 * SYN challenges with keyed cookies, and per-destination rate thresholds.
 *
 * Every worker shares one flow table: the two directions of a connection
 * may arrive on different queues (each end's stack picks its own TX queue).
 * The table is open addressing with buckets of XG_WAYS slots; a key lives in
 * exactly one bucket, chosen by SipHash under a random key so that nobody
 * can aim a flood at one bucket. Each bucket has a spinlock held for a few
 * dozen instructions. Expiry is lazy (a slot idle longer than its state's
 * timeout is free), and a full bucket gives up its oldest non-established
 * flow, never an established one.
 *
 * Challenge: a SYN from an unverified source is rewritten in place into a
 * SYN-ACK whose acknowledgment number is a cookie; a real stack in SYN-SENT
 * answers such an unacceptable ACK with <SEQ=SEG.ACK><CTL=RST> (RFC 9293
 * 3.10.7.3) and, on Linux, retransmits its SYN within milliseconds. The
 * cookie carries its time slot's low bits and the key generation, so the
 * RST is verified with one hash.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/random.h>

#include "xg_flow.h"
#include "xg_tcp.h"

#define XG_WAYS 8
#define COOKIE_SLOT_SECS 64	/* a cookie is good for one to two slots */
#define AUTO_HOLD_SECS 2	/* auto mode keeps acting this long after the rate falls */
#define ADOPTED_WIN (1U << 30)	/* windows of a flow picked up mid-stream: unknown */
#define NO_WSCALE XG_NO_WSCALE

#define TH_FIN XG_TCP_FIN
#define TH_SYN XG_TCP_SYN
#define TH_RST XG_TCP_RST
#define TH_ACK XG_TCP_ACK

struct verified_bucket {
	uint32_t lock;
	uint32_t pad;
	struct xg_verified slot[XG_WAYS];
} __attribute__((aligned(64)));

/* A destination's rate of SYNs and of out-of-state frames (auto mode). */
struct dest {
	uint8_t addr[16];
	uint64_t last_ms;
	int64_t tokens[2];	/* milli-tokens: [0] SYN, [1] state */
	uint32_t until[2];	/* acting until (seconds) */
};

#define DEST_BUCKETS 1024
#define DEST_WAYS 4

struct dest_bucket {
	uint32_t lock;
	uint32_t pad;
	struct dest slot[DEST_WAYS];
} __attribute__((aligned(64)));

struct xg_tcp {
	/* The flow table: ours, or a BPF map's memory the XDP programs share. */
	struct xg_flow_bucket *flows;
	int own_flows;
	uint32_t flow_mask;		/* buckets - 1 */
	struct verified_bucket *verified;
	uint32_t verified_mask;
	struct dest_bucket dests[DEST_BUCKETS];
	uint8_t table_key[16];		/* SipHash key of the verified and rate tables */
	uint8_t flow_key[16];		/* ... of the flow table (the table's own) */
	struct xg_tcp_cfg cfg;		/* fields read one by one */
	/* Cookie secrets: [gen] is current, [!gen] the previous. Seqlock. */
	uint32_t secret_seq;
	uint32_t secret_gen;
	uint8_t secret[2][16];
	uint64_t evictions;
};

/* ---- SipHash (Aumasson and Bernstein), c-d rounds (XG_SIPROUND: xg_flow.h) ---- */

static uint64_t load64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v; /* little-endian hosts only, like the rest of the shim */
}

static uint64_t siphash(const uint8_t key[16], const void *data, size_t len, int c, int d)
{
	uint64_t k0 = load64(key), k1 = load64(key + 8);
	uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
	uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
	const uint8_t *p = data, *end = p + (len & ~7UL);
	uint64_t b = (uint64_t)len << 56, m;
	int i;

	for (; p != end; p += 8) {
		m = load64(p);
		v3 ^= m;
		for (i = 0; i < c; i++)
			XG_SIPROUND;
		v0 ^= m;
	}
	for (i = 0; i < (int)(len & 7); i++)
		b |= (uint64_t)p[i] << (8 * i);
	v3 ^= b;
	for (i = 0; i < c; i++)
		XG_SIPROUND;
	v0 ^= b;
	v2 ^= 0xff;
	for (i = 0; i < d; i++)
		XG_SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- small helpers ---- */

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static void lock(uint32_t *l)
{
	while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(l, __ATOMIC_RELAXED))
			cpu_relax();
}

static void unlock(uint32_t *l)
{
	__atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

static uint32_t cfg_get(const uint32_t *field)
{
	return __atomic_load_n(field, __ATOMIC_RELAXED);
}

uint32_t xg_tcp_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (uint32_t)ts.tv_sec;
}

void xg_clock_read(struct xg_clock *c)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	c->s = (uint32_t)ts.tv_sec;
	c->ms = (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint16_t csum_fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static uint64_t csum_add(uint64_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	return sum;
}

/* ---- parsing ---- */

struct pkt {
	struct xg_hdrs h;	/* the parser's findings */
	uint8_t *end;		/* of the frame */
	uint8_t *l3;
	uint8_t *tcp;
	uint32_t l2_len;
	int v6;
	struct xg_seg seg;
	uint8_t wscale;		/* NO_WSCALE if the SYN offers none */
	const uint8_t *src, *dst;
	uint16_t sport, dport;	/* network order */
};

static const uint8_t v4mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

static void addr16(uint8_t out[16], const uint8_t *addr, int v6)
{
	if (v6) {
		memcpy(out, addr, 16);
	} else {
		memcpy(out, v4mapped, 12);
		memcpy(out + 12, addr, 4);
	}
}

static uint8_t syn_wscale(const uint8_t *opt, const uint8_t *end)
{
	while (opt < end) {
		if (*opt == 0)
			break;
		if (*opt == 1) {
			opt++;
			continue;
		}
		if (opt + 1 >= end || opt[1] < 2 || opt + opt[1] > end)
			break;
		if (opt[0] == 3 && opt[1] == 3)
			return opt[2] > 14 ? 14 : opt[2];
		opt += opt[1];
	}
	return NO_WSCALE;
}

enum { NOT_TCP, TCP_SEGMENT, TCP_FRAGMENT, BAD_FRAME };

/*
 * Find the TCP header of a frame with the parser the XDP program uses
 * (bpf/xg_parse.h): TCP_SEGMENT, @p and the flow's key @k (for a frame
 * from @side, xg_flow.h) filled in; TCP_FRAGMENT (only the addresses in
 * @p filled in) for any fragment of a TCP segment; BAD_FRAME and the
 * reason in *@why for a frame the parser could not finish; NOT_TCP for the
 * rest.
 */
static int parse(uint8_t *frame, uint32_t len, int side, struct pkt *p,
		 struct xg_flow_key *k, enum xg_reason *why)
{
	enum xg_reason r;
	uint8_t *l4, *l3;
	uint32_t doff;

	r = xg_parse(frame, frame + len, &p->h);
	if (r != XG_REASON_REDIRECTED) {
		*why = r;
		return BAD_FRAME;
	}
	if (!p->h.l3 || p->h.l4_proto != IPPROTO_TCP)
		return NOT_TCP;
	p->end = frame + len;
	l3 = p->h.l3;
	p->l3 = l3;
	p->l2_len = (uint32_t)(l3 - frame);
	p->v6 = p->h.v6;
	p->src = l3 + (p->h.v6 ? 8 : 12);
	p->dst = l3 + (p->h.v6 ? 24 : 16);
	if (p->h.frag & XG_FRAG_ANY)
		return TCP_FRAGMENT;
	if (xg_flow_key_of(&p->h, p->end, side, k, &p->seg))
		return NOT_TCP; /* cannot happen: xg_parse() checked the headers */
	l4 = p->h.l4;
	doff = (l4[12] >> 4) * 4;
	p->tcp = l4;
	p->sport = side == XG_SIDE_OUT ? k->out_port : k->in_port;
	p->dport = side == XG_SIDE_OUT ? k->in_port : k->out_port;
	p->wscale = p->seg.flags & TH_SYN ? syn_wscale(l4 + 20, l4 + doff) : NO_WSCALE;
	return TCP_SEGMENT;
}

/* ---- the flow table ---- */

/*
 * XDP may forward a flow's segments itself (XG_FLOW_FAST) while it is
 * established and the loop saw its handshake: its source passed the SYN
 * gate, and its windows are known. Adopted flows stay with the loop.
 * Caller holds the bucket's lock.
 */
static void fast_follows(struct xg_flow *f)
{
	if (f->state == XG_TCP_ESTABLISHED && !(f->flags & XG_FLOW_ADOPTED))
		f->flags |= XG_FLOW_FAST;
	else
		f->flags &= ~XG_FLOW_FAST;
}

static struct xg_flow_bucket *flow_bucket(struct xg_tcp *t, const struct xg_flow_key *k)
{
	return &t->flows[xg_flow_hash(k, t->flow_key) & t->flow_mask];
}

/*
 * A slot for a new flow: a free or expired one, else the oldest flow that
 * is not established. NULL if the bucket holds only established flows.
 * Caller holds b->lock.
 */
static struct xg_flow *flow_slot(struct xg_tcp *t, struct xg_flow_bucket *b, uint32_t now)
{
	struct xg_flow *victim = NULL;
	int i;

	for (i = 0; i < XG_WAYS; i++) {
		struct xg_flow *f = &b->slot[i];

		if (!xg_flow_live(f, now))
			return f;
		if (f->state != XG_TCP_ESTABLISHED &&
		    (!victim || xg_seq_before(f->last_seen, victim->last_seen)))
			victim = f;
	}
	if (victim)
		__atomic_fetch_add(&t->evictions, 1, __ATOMIC_RELAXED);
	return victim;
}

static void flow_init(struct xg_flow *f, const struct xg_flow_key *k, uint8_t state,
		      uint8_t flags, uint32_t now)
{
	memset(f, 0, sizeof(*f));
	f->key = *k;
	f->state = state;
	f->flags = flags;
	f->wscale[0] = f->wscale[1] = NO_WSCALE;
	f->last_seen = now;
}

/* ---- verified sources ---- */

static struct verified_bucket *verified_bucket(struct xg_tcp *t, const uint8_t addr[16])
{
	return &t->verified[siphash(t->table_key, addr, 16, 1, 3) & t->verified_mask];
}

static int verified(struct xg_tcp *t, const uint8_t addr[16], uint32_t now)
{
	struct verified_bucket *b = verified_bucket(t, addr);
	int i, found = 0;

	lock(&b->lock);
	for (i = 0; i < XG_WAYS && !found; i++)
		found = b->slot[i].expires && !xg_seq_before(b->slot[i].expires, now) &&
			!memcmp(b->slot[i].addr, addr, 16);
	unlock(&b->lock);
	return found;
}

static void verified_add(struct xg_tcp *t, const uint8_t addr[16], uint32_t until)
{
	struct verified_bucket *b = verified_bucket(t, addr);
	struct xg_verified *slot = NULL;
	int i;

	lock(&b->lock);
	for (i = 0; i < XG_WAYS; i++) {
		struct xg_verified *v = &b->slot[i];

		if (v->expires && !memcmp(v->addr, addr, 16)) {
			slot = v;
			break;
		}
		/* Else the slot expiring first (an empty one expires at 0). */
		if (!slot || xg_seq_before(v->expires, slot->expires))
			slot = v;
	}
	memcpy(slot->addr, addr, 16);
	slot->expires = until;
	unlock(&b->lock);
}

/* ---- per-destination rates (auto mode) ---- */

/*
 * Is @addr above its rate for @kind (0: SYNs, 1: out-of-state frames)?
 * Counts one frame against a token bucket of the configured rate and
 * burst; once empty, the destination counts as attacked until
 * AUTO_HOLD_SECS after the last frame that found it empty.
 */
static int dest_over(struct xg_tcp *t, const uint8_t addr[16], int kind,
		     const struct xg_clock *now)
{
	struct dest_bucket *b = &t->dests[siphash(t->table_key, addr, 16, 1, 3) % DEST_BUCKETS];
	uint32_t rate[2] = { cfg_get(&t->cfg.syn_rate), cfg_get(&t->cfg.state_rate) };
	uint32_t burst[2] = { cfg_get(&t->cfg.syn_burst), cfg_get(&t->cfg.state_burst) };
	int64_t cap[2] = { (int64_t)(burst[0] ? burst[0] : 1) * 1000,
			   (int64_t)(burst[1] ? burst[1] : 1) * 1000 };
	struct dest *d = NULL, *lru = NULL;
	int i, over;

	lock(&b->lock);
	for (i = 0; i < DEST_WAYS; i++) {
		if (b->slot[i].last_ms && !memcmp(b->slot[i].addr, addr, 16)) {
			d = &b->slot[i];
			break;
		}
		if (!lru || b->slot[i].last_ms < lru->last_ms)
			lru = &b->slot[i];
	}
	if (!d) {
		d = lru;
		memset(d, 0, sizeof(*d));
		memcpy(d->addr, addr, 16);
		d->tokens[0] = cap[0];
		d->tokens[1] = cap[1];
		d->last_ms = now->ms ? now->ms : 1;
	}
	if (now->ms > d->last_ms) {
		for (i = 0; i < 2; i++) {
			/* rate tokens/s = rate milli-tokens/ms */
			d->tokens[i] += (int64_t)(now->ms - d->last_ms) * rate[i];
			if (d->tokens[i] > cap[i])
				d->tokens[i] = cap[i];
		}
		d->last_ms = now->ms;
	}
	if (d->tokens[kind] >= 1000) {
		d->tokens[kind] -= 1000;
		over = xg_seq_before(now->s, d->until[kind]);
	} else {
		d->until[kind] = now->s + AUTO_HOLD_SECS;
		over = 1;
	}
	unlock(&b->lock);
	return over;
}

/* ---- cookies ---- */

static void secret_read(struct xg_tcp *t, uint32_t gen, uint8_t key[16])
{
	uint32_t seq;

	do {
		seq = __atomic_load_n(&t->secret_seq, __ATOMIC_ACQUIRE);
		memcpy(key, t->secret[gen & 1], 16);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
	} while ((seq & 1) || seq != __atomic_load_n(&t->secret_seq, __ATOMIC_RELAXED));
}

static uint64_t cookie_hash(struct xg_tcp *t, uint32_t gen, const struct xg_flow_key *k,
			    uint32_t slot)
{
	struct {
		struct xg_flow_key k;
		uint32_t slot;
	} in;
	uint8_t key[16];

	in.k = *k;
	in.slot = slot;
	secret_read(t, gen, key);
	return siphash(key, &in, sizeof(in), 2, 4);
}

/* The cookie for @k now; its low 3 bits are the slot (2) and generation (1). */
static uint32_t cookie_make(struct xg_tcp *t, const struct xg_flow_key *k, uint32_t now,
			    uint32_t *isn)
{
	uint32_t gen = __atomic_load_n(&t->secret_gen, __ATOMIC_ACQUIRE) & 1;
	uint32_t slot = now / COOKIE_SLOT_SECS;
	uint64_t h = cookie_hash(t, gen, k, slot);

	*isn = (uint32_t)(h >> 32);
	return ((uint32_t)h & ~7U) | (slot & 3) << 1 | gen;
}

static int cookie_check(struct xg_tcp *t, const struct xg_flow_key *k, uint32_t now,
			uint32_t cookie)
{
	uint32_t cur = now / COOKIE_SLOT_SECS, slot;

	if ((cur & 3) == ((cookie >> 1) & 3))
		slot = cur;
	else if (((cur - 1) & 3) == ((cookie >> 1) & 3))
		slot = cur - 1;
	else
		return 0;
	return ((uint32_t)cookie_hash(t, cookie & 1, k, slot) & ~7U) == (cookie & ~7U);
}

/*
 * Rewrite the SYN in @p into the challenge SYN-ACK, in place: addresses and
 * ports swapped, no options, acknowledgment = cookie. Returns the new frame
 * length.
 */
static uint32_t build_challenge(uint8_t *frame, const struct pkt *p, uint32_t cookie,
				uint32_t isn)
{
	uint8_t mac[6], src[16], dst[16], *ip = p->l3, *tcp;
	uint16_t sport = p->sport, dport = p->dport, sum;
	uint32_t alen = p->v6 ? 16 : 4, hl = p->v6 ? 40 : 20;
	uint64_t ps;

	memcpy(src, p->src, alen);
	memcpy(dst, p->dst, alen);
	memcpy(mac, frame, 6);
	memcpy(frame, frame + 6, 6);
	memcpy(frame + 6, mac, 6);

	memset(ip, 0, hl + 20);
	if (p->v6) {
		ip[0] = 0x60;
		ip[5] = 20;	/* payload length */
		ip[6] = 6;	/* TCP */
		ip[7] = 64;	/* hop limit */
		memcpy(ip + 8, dst, 16);
		memcpy(ip + 24, src, 16);
	} else {
		ip[0] = 0x45;
		ip[3] = 40;	/* total length */
		ip[6] = 0x40;	/* DF */
		ip[8] = 64;	/* TTL */
		ip[9] = 6;
		memcpy(ip + 12, dst, 4);
		memcpy(ip + 16, src, 4);
		sum = csum_fold(csum_add(0, ip, 20));
		ip[10] = sum >> 8;
		ip[11] = sum & 0xff;
	}
	tcp = ip + hl;
	memcpy(tcp, &dport, 2);
	memcpy(tcp + 2, &sport, 2);
	tcp[4] = isn >> 24;
	tcp[5] = isn >> 16;
	tcp[6] = isn >> 8;
	tcp[7] = isn;
	tcp[8] = cookie >> 24;
	tcp[9] = cookie >> 16;
	tcp[10] = cookie >> 8;
	tcp[11] = cookie;
	tcp[12] = 5 << 4;
	tcp[13] = TH_SYN | TH_ACK;
	tcp[14] = 0x20; /* window 8192 */
	/* Pseudo-header: addresses, protocol, TCP length. */
	ps = csum_add(0, ip + (p->v6 ? 8 : 12), 2 * alen);
	ps += 6 + 20;
	sum = csum_fold(csum_add(ps, tcp, 20));
	tcp[16] = sum >> 8;
	tcp[17] = sum & 0xff;
	return p->l2_len + hl + 20;
}

/* ---- verdicts ---- */

static void count(struct xg_counter *c, uint32_t len)
{
	c->packets++;
	c->bytes += len;
}

/*
 * An out-of-state frame from outside under the state mode: drop it (and
 * count @reason), or let it pass and count what would have happened. A
 * frame of no tracked flow is not dropped while @learning: it may belong to
 * a flow opened before the start.
 */
static enum xg_tcp_verdict out_of_state(struct xg_tcp *t, const uint8_t dst[16],
					enum xg_reason reason, uint32_t len, int learning,
					const struct xg_clock *now, struct xg_worker_stats *st)
{
	uint32_t mode = cfg_get(&t->cfg.state_mode);

	if (mode != XG_MODE_OFF && learning)
		mode = XG_MODE_MONITOR;
	if (mode == XG_MODE_ON || (mode == XG_MODE_AUTO && dest_over(t, dst, 1, now))) {
		count(&st->reasons[reason], len);
		return XG_V_DROP;
	}
	if (mode != XG_MODE_OFF)
		count(&st->monitor[reason], len);
	return XG_V_FORWARD;
}

/*
 * Whether a SYN from outside may pass: XG_V_REPLY when it was rewritten
 * into a challenge (unverified source, challenges on for its destination),
 * else XG_V_FORWARD (monitor mode counts what it would have done).
 */
static enum xg_tcp_verdict syn_gate(struct xg_tcp *t, uint8_t *frame, uint32_t *len,
				    const struct pkt *p, const struct xg_flow_key *k,
				    int allowlisted, const struct xg_clock *now,
				    struct xg_worker_stats *st)
{
	uint32_t mode = cfg_get(&t->cfg.syn_mode), cookie, isn;
	int challenge = 0;

	if (mode == XG_MODE_AUTO)
		challenge = dest_over(t, k->in_addr, 0, now);
	else if (mode == XG_MODE_ON || mode == XG_MODE_MONITOR)
		challenge = 1;
	if (!challenge || allowlisted || verified(t, k->out_addr, now->s))
		return XG_V_FORWARD;
	if (mode == XG_MODE_MONITOR) {
		count(&st->monitor[XG_REASON_SYN_CHALLENGED], *len);
		return XG_V_FORWARD;
	}
	count(&st->reasons[XG_REASON_SYN_CHALLENGED], *len);
	cookie = cookie_make(t, k, now->s, &isn);
	*len = build_challenge(frame, p, cookie, isn);
	return XG_V_REPLY;
}

/*
 * A SYN that passed the gate, for a tuple with no live flow (or a closed
 * one, which a new connection replaces as in conntrack): track it. @b is
 * @k's bucket, unlocked: hashed once per frame.
 */
static enum xg_tcp_verdict new_syn(struct xg_tcp *t, struct xg_flow_bucket *b, uint32_t len,
				   const struct pkt *p, const struct xg_flow_key *k,
				   const struct xg_clock *now, struct xg_worker_stats *st)
{
	struct xg_flow *f;

	lock(&b->lock);
	f = xg_flow_find(b, k, now->s);
	if (f && f->state != XG_TCP_CLOSED) {
		/*
		 * Not overwritten, whatever its state: a possible reopen,
		 * which replaces the flow only when the origin's SYN-ACK
		 * confirms it (xg_tcp_inside()). Until then the flow keeps
		 * its windows, so a spoofed SYN with a live tuple cuts
		 * nothing.
		 */
		f->flags |= XG_FLOW_REOPEN;
		f->reopen_isn = p->seg.seq;
		f->reopen_wscale = p->wscale;
		unlock(&b->lock);
		return XG_V_FORWARD;
	}
	if (!f)
		f = flow_slot(t, b, now->s);
	if (!f) {
		unlock(&b->lock);
		count(&st->reasons[XG_REASON_FLOW_TABLE_FULL], len);
		return XG_V_DROP;
	}
	flow_init(f, k, XG_TCP_SYN_SENT, 0, now->s);
	f->isn[XG_SIDE_OUT] = p->seg.seq;
	f->wscale[XG_SIDE_OUT] = p->wscale;
	xg_flow_note(f, XG_SIDE_OUT, &p->seg, len);
	unlock(&b->lock);
	return XG_V_FORWARD;
}

enum xg_tcp_verdict xg_tcp_outside(struct xg_tcp *t, uint8_t *frame, uint32_t *len,
				   int allowlisted, const struct xg_clock *now,
				   struct xg_worker_stats *st)
{
	const int x = XG_SIDE_OUT;
	struct xg_flow_key k;
	struct xg_flow_bucket *b;
	struct xg_flow *f;
	enum xg_reason why;
	struct pkt p;
	uint8_t state;
	int learning;

	switch (parse(frame, *len, x, &p, &k, &why)) {
	case NOT_TCP:
		return XG_V_FORWARD;
	case BAD_FRAME:
		/* XDP drops these already; the loop fails closed all the same. */
		count(&st->reasons[why], *len);
		return XG_V_DROP;
	case TCP_FRAGMENT:
		addr16(k.in_addr, p.dst, p.v6);
		return out_of_state(t, k.in_addr, XG_REASON_TCP_FRAGMENT, *len,
				    xg_seq_before(now->s, cfg_get(&t->cfg.learn_until)), now, st);
	}
	learning = xg_seq_before(now->s, cfg_get(&t->cfg.learn_until));

	b = flow_bucket(t, &k);
	lock(&b->lock);
	f = xg_flow_find(b, &k, now->s);
	state = f ? f->state : XG_TCP_FREE;

	if ((p.seg.flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN) {
		/* A retransmitted SYN of a flow being opened passes as the first did. */
		if (f && f->state <= XG_TCP_SYN_RECV && !(f->flags & XG_FLOW_INSIDE_INIT) &&
		    f->isn[x] == p.seg.seq) {
			f->last_seen = now->s;
			xg_flow_note(f, x, &p.seg, *len);
			unlock(&b->lock);
			return XG_V_FORWARD;
		}
		/*
		 * Anything else is a new connection, or claims to be: it goes
		 * through the challenge like any SYN, and a live flow of the
		 * tuple stays as it is (new_syn()). An established origin
		 * answers such a SYN with a challenge ACK (RFC 5961 4).
		 */
		unlock(&b->lock);
		if (syn_gate(t, frame, len, &p, &k, allowlisted, now, st) == XG_V_REPLY)
			return XG_V_REPLY;
		return new_syn(t, b, *len, &p, &k, now, st);
	}

	if (!f) {
		if (learning && !(p.seg.flags & (TH_SYN | TH_RST))) {
			/* Adopt a flow that was open before we started. */
			f = flow_slot(t, b, now->s);
			if (f) {
				flow_init(f, &k, XG_TCP_LEARNING, XG_FLOW_ADOPTED, now->s);
				f->maxwin[0] = f->maxwin[1] = ADOPTED_WIN;
				xg_flow_note(f, x, &p.seg, *len);
			}
			unlock(&b->lock);
			return XG_V_FORWARD;
		}
		unlock(&b->lock);
		if ((p.seg.flags & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK))
			return out_of_state(t, k.in_addr, XG_REASON_TCP_SYNACK_REFLECTION, *len,
					    learning, now, st);
		/* A bare RST is how a real stack answers a challenge. */
		if ((p.seg.flags & (TH_RST | TH_ACK)) == TH_RST &&
		    cfg_get(&t->cfg.syn_mode) != XG_MODE_OFF) {
			if (cookie_check(t, &k, now->s, p.seg.seq)) {
				verified_add(t, k.out_addr, now->s + cfg_get(&t->cfg.verify_ttl));
				count(&st->reasons[XG_REASON_CHALLENGE_PASSED], *len);
				return XG_V_DROP;
			}
			/* While learning it may end a flow opened before the start. */
			if (cfg_get(&t->cfg.syn_mode) == XG_MODE_MONITOR || learning) {
				count(&st->monitor[XG_REASON_CHALLENGE_FAILED], *len);
				return XG_V_FORWARD;
			}
			count(&st->reasons[XG_REASON_CHALLENGE_FAILED], *len);
			return XG_V_DROP;
		}
		return out_of_state(t, k.in_addr, XG_REASON_TCP_NO_FLOW, *len, learning, now, st);
	}

	why = XG_REASON_TCP_OUT_OF_WINDOW;
	switch (state) {
	case XG_TCP_SYN_SENT:
		/* Only the inside side may answer a SYN it sent with a SYN-ACK. */
		if ((p.seg.flags & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK)) {
			if (!(f->flags & XG_FLOW_INSIDE_INIT) ||
			    p.seg.ack != f->isn[XG_SIDE_IN] + 1) {
				why = XG_REASON_TCP_SYNACK_REFLECTION;
				break;
			}
			f->state = XG_TCP_SYN_RECV;
			f->isn[x] = p.seg.seq;
			f->wscale[x] = p.wscale;
			if (f->wscale[0] != NO_WSCALE && f->wscale[1] != NO_WSCALE)
				f->flags |= XG_FLOW_WSCALE;
			f->last_seen = now->s;
			xg_flow_note(f, x, &p.seg, *len);
			unlock(&b->lock);
			return XG_V_FORWARD;
		}
		if (p.seg.flags & TH_RST)
			goto in_window_check;
		break;
	case XG_TCP_SYN_RECV:
		if (!(f->flags & XG_FLOW_INSIDE_INIT) && (p.seg.flags & TH_ACK) &&
		    !(p.seg.flags & TH_SYN) && p.seg.ack == f->isn[XG_SIDE_IN] + 1) {
			f->state = XG_TCP_ESTABLISHED;
			goto accept;
		}
		if (p.seg.flags & TH_SYN)
			break;
		goto in_window_check;
	case XG_TCP_LEARNING:
		if (learning)
			goto accept;
		why = XG_REASON_TCP_NO_FLOW;
		break;
	default:
in_window_check:
		if (p.seg.flags & TH_SYN) {
			why = XG_REASON_TCP_SYNACK_REFLECTION;
			break;
		}
		if (xg_flow_in_window(f, x, &p.seg))
			goto accept;
		break;
	}
	unlock(&b->lock);
	return out_of_state(t, k.in_addr, why, *len, 0, now, st);

accept:
	if (p.seg.flags & TH_RST)
		f->state = XG_TCP_CLOSED;
	else if ((p.seg.flags & TH_FIN) && f->state == XG_TCP_ESTABLISHED)
		f->state = XG_TCP_CLOSING;
	f->last_seen = now->s;
	xg_flow_note(f, x, &p.seg, *len);
	fast_follows(f);
	unlock(&b->lock);
	return XG_V_FORWARD;
}

void xg_tcp_inside(struct xg_tcp *t, const uint8_t *frame, uint32_t len,
		   const struct xg_clock *now)
{
	const int x = XG_SIDE_IN, y = XG_SIDE_OUT;
	struct xg_flow_key k;
	struct xg_flow_bucket *b;
	enum xg_reason why;
	struct xg_flow *f;
	struct pkt p;

	if (parse((uint8_t *)frame, len, x, &p, &k, &why) != TCP_SEGMENT)
		return;
	b = flow_bucket(t, &k);
	lock(&b->lock);
	f = xg_flow_find(b, &k, now->s);

	if ((p.seg.flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN) {
		/* The origin opens a connection of its own. */
		if (!f || f->state != XG_TCP_SYN_SENT || f->isn[x] != p.seg.seq) {
			if (!f)
				f = flow_slot(t, b, now->s);
			if (f) {
				flow_init(f, &k, XG_TCP_SYN_SENT, XG_FLOW_INSIDE_INIT, now->s);
				f->isn[x] = p.seg.seq;
				f->wscale[x] = p.wscale;
			}
		}
	} else if (!f) {
		/*
		 * The origin only talks on real connections: adopt, whatever
		 * the learning window says (this is what keeps a restart from
		 * cutting connections the origin is still using).
		 */
		f = (p.seg.flags & TH_RST) ? NULL : flow_slot(t, b, now->s);
		if (f) {
			flow_init(f, &k, XG_TCP_ESTABLISHED, XG_FLOW_ADOPTED, now->s);
			f->maxwin[0] = f->maxwin[1] = ADOPTED_WIN;
			/* What the origin acks, the outside has sent; what it
			 * sends, the outside will ack. */
			xg_flow_set_end(f, y, p.seg.ack);
			xg_flow_set_acked(f, y, p.seg.seq);
		}
	} else if ((f->flags & XG_FLOW_REOPEN) && f->reopen_isn + 1 == p.seg.ack &&
		   (p.seg.flags & (TH_SYN | TH_ACK | TH_RST)) == (TH_SYN | TH_ACK) &&
		   !(f->state == XG_TCP_SYN_SENT && p.seg.ack == f->isn[y] + 1)) {
		/* The origin took the SYN that claimed a reopen: a new flow. */
		uint32_t isn = f->reopen_isn;
		uint8_t wscale = f->reopen_wscale;

		flow_init(f, &k, XG_TCP_SYN_RECV, 0, now->s);
		f->isn[y] = isn;
		f->wscale[y] = wscale;
		xg_flow_set_end(f, y, isn + 1);
		f->isn[x] = p.seg.seq;
		f->wscale[x] = p.wscale;
		if (f->wscale[0] != NO_WSCALE && f->wscale[1] != NO_WSCALE)
			f->flags |= XG_FLOW_WSCALE;
	} else if (f->state == XG_TCP_SYN_SENT && !(f->flags & XG_FLOW_INSIDE_INIT) &&
		   (p.seg.flags & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK) &&
		   p.seg.ack == f->isn[y] + 1) {
		f->state = XG_TCP_SYN_RECV;
		f->isn[x] = p.seg.seq;
		f->wscale[x] = p.wscale;
		if (f->wscale[0] != NO_WSCALE && f->wscale[1] != NO_WSCALE)
			f->flags |= XG_FLOW_WSCALE;
	} else if (f->state == XG_TCP_SYN_RECV && (f->flags & XG_FLOW_INSIDE_INIT) &&
		   (p.seg.flags & TH_ACK) && p.seg.ack == f->isn[y] + 1) {
		f->state = XG_TCP_ESTABLISHED;
	} else if (f->state == XG_TCP_LEARNING) {
		f->state = XG_TCP_ESTABLISHED;
		if (!(f->flags & xg_acked_bit(y)))
			xg_flow_set_acked(f, y, p.seg.seq);
	}
	if (f) {
		if (p.seg.flags & TH_RST)
			f->state = XG_TCP_CLOSED;
		else if ((p.seg.flags & TH_FIN) && f->state == XG_TCP_ESTABLISHED)
			f->state = XG_TCP_CLOSING;
		f->last_seen = now->s;
		xg_flow_note(f, x, &p.seg, len);
		fast_follows(f);
	}
	unlock(&b->lock);
}

/* ---- the C API of xg_shim.h ---- */

int xg_tcp_judge(struct xg_tcp *tcp, uint8_t *frame, uint32_t *len, int from_outside,
		 int allowlisted, uint32_t now_s, uint64_t now_ms, struct xg_worker_stats *st)
{
	struct xg_clock now = { .s = now_s, .ms = now_ms };

	if (!from_outside) {
		xg_tcp_inside(tcp, frame, *len, &now);
		return XG_V_FORWARD;
	}
	return xg_tcp_outside(tcp, frame, len, allowlisted, &now, st);
}

static uint32_t buckets_for(uint32_t entries)
{
	uint32_t n = 1;

	while ((uint64_t)n * XG_WAYS < entries)
		n <<= 1;
	return n;
}

/*
 * The stage around a flow table of @nf buckets at @flows (NULL: allocate
 * one, owned) hashed under @flow_key (NULL: a random one).
 */
static int tcp_create(struct xg_flow_bucket *flows, uint32_t nf, const uint8_t *flow_key,
		      uint32_t max_verified, const struct xg_tcp_cfg *cfg, struct xg_tcp **out)
{
	uint32_t nv;
	struct xg_tcp *t;

	if (!max_verified || max_verified > (1U << 28))
		return -EINVAL;
	t = aligned_alloc(64, (sizeof(*t) + 63) & ~63UL);
	if (!t)
		return -ENOMEM;
	memset(t, 0, sizeof(*t));
	nv = buckets_for(max_verified);
	t->own_flows = !flows;
	t->flows = flows ? flows : aligned_alloc(64, (size_t)nf * sizeof(*t->flows));
	t->verified = aligned_alloc(64, (size_t)nv * sizeof(*t->verified));
	if (!t->flows || !t->verified) {
		xg_tcp_destroy(t);
		return -ENOMEM;
	}
	if (t->own_flows)
		memset(t->flows, 0, (size_t)nf * sizeof(*t->flows));
	memset(t->verified, 0, (size_t)nv * sizeof(*t->verified));
	t->flow_mask = nf - 1;
	t->verified_mask = nv - 1;
	if (getrandom(t->table_key, sizeof(t->table_key), 0) != sizeof(t->table_key) ||
	    getrandom(t->secret[0], sizeof(t->secret[0]), 0) != sizeof(t->secret[0]) ||
	    (!flow_key && getrandom(t->flow_key, 16, 0) != 16)) {
		xg_tcp_destroy(t);
		return -EIO;
	}
	if (flow_key)
		memcpy(t->flow_key, flow_key, 16);
	memcpy(t->secret[1], t->secret[0], 16);
	t->cfg = *cfg;
	*out = t;
	return 0;
}

int xg_tcp_create(uint32_t max_flows, uint32_t max_verified, const struct xg_tcp_cfg *cfg,
		  struct xg_tcp **out)
{
	if (!max_flows || max_flows > (1U << 30))
		return -EINVAL;
	return tcp_create(NULL, buckets_for(max_flows), NULL, max_verified, cfg, out);
}

int xg_tcp_create_shared(struct xg_flowtab *ft, uint32_t max_verified,
			 const struct xg_tcp_cfg *cfg, struct xg_tcp **out)
{
	const struct xg_flow_table *info = xg_flowtab_info(ft);
	struct xg_flow_bucket *b = xg_flowtab_buckets(ft);
	uint32_t i;

	if (!info->nbuckets || info->nbuckets & (info->nbuckets - 1))
		return -EINVAL;
	/*
	 * A table restored from its pin may carry a lock its last user held
	 * when it was killed. Nothing else uses the table yet (the programs
	 * are not attached): free them all.
	 */
	for (i = 0; i < info->nbuckets; i++)
		__atomic_store_n(&b[i].lock, 0, __ATOMIC_RELEASE);
	return tcp_create(xg_flowtab_buckets(ft), info->nbuckets, info->key, max_verified, cfg,
			  out);
}

void xg_tcp_destroy(struct xg_tcp *tcp)
{
	if (!tcp)
		return;
	if (tcp->own_flows)
		free(tcp->flows);
	free(tcp->verified);
	free(tcp);
}

void xg_tcp_configure(struct xg_tcp *tcp, const struct xg_tcp_cfg *cfg)
{
	const uint32_t *src = (const uint32_t *)cfg;
	uint32_t *dst = (uint32_t *)&tcp->cfg;
	size_t i;

	for (i = 0; i < sizeof(*cfg) / sizeof(uint32_t); i++)
		__atomic_store_n(&dst[i], src[i], __ATOMIC_RELAXED);
}

void xg_tcp_config(const struct xg_tcp *tcp, struct xg_tcp_cfg *cfg)
{
	const uint32_t *src = (const uint32_t *)&tcp->cfg;
	uint32_t *dst = (uint32_t *)cfg;
	size_t i;

	for (i = 0; i < sizeof(*cfg) / sizeof(uint32_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void xg_tcp_rotate_secret(struct xg_tcp *tcp, const uint8_t *key)
{
	uint32_t next = !(__atomic_load_n(&tcp->secret_gen, __ATOMIC_RELAXED) & 1);

	__atomic_fetch_add(&tcp->secret_seq, 1, __ATOMIC_ACQ_REL);
	memcpy(tcp->secret[next], key, 16);
	__atomic_fetch_add(&tcp->secret_seq, 1, __ATOMIC_ACQ_REL);
	__atomic_store_n(&tcp->secret_gen, next, __ATOMIC_RELEASE);
}

uint32_t xg_tcp_scan(struct xg_tcp *tcp, struct xg_tcp_counts *counts, struct xg_flow *top,
		     uint32_t ntop)
{
	uint32_t now = xg_tcp_now(), b, i, n = 0, j;

	memset(counts, 0, sizeof(*counts));
	counts->capacity = (uint64_t)(tcp->flow_mask + 1) * XG_WAYS;
	counts->evictions = __atomic_load_n(&tcp->evictions, __ATOMIC_RELAXED);
	counts->verified_capacity = (uint64_t)(tcp->verified_mask + 1) * XG_WAYS;
	for (b = 0; b <= tcp->flow_mask; b++) {
		struct xg_flow_bucket *bk = &tcp->flows[b];

		lock(&bk->lock);
		for (i = 0; i < XG_WAYS; i++) {
			struct xg_flow *f = &bk->slot[i];

			if (!xg_flow_live(f, now)) {
				counts->states[XG_TCP_FREE]++;
				continue;
			}
			counts->states[f->state]++;
			counts->fast += !!(f->flags & XG_FLOW_FAST);
			if (!ntop)
				continue;
			/* Keep @top sorted by packets, busiest first. */
			if (n < ntop)
				n++;
			else if (f->packets <= top[n - 1].packets)
				continue;
			for (j = n - 1; j > 0 && top[j - 1].packets < f->packets; j--)
				top[j] = top[j - 1];
			top[j] = *f;
		}
		unlock(&bk->lock);
	}
	for (b = 0; b <= tcp->verified_mask; b++) {
		struct verified_bucket *bk = &tcp->verified[b];

		lock(&bk->lock);
		for (i = 0; i < XG_WAYS; i++)
			counts->verified += bk->slot[i].expires &&
					    !xg_seq_before(bk->slot[i].expires, now);
		unlock(&bk->lock);
	}
	return n;
}

uint32_t xg_tcp_verified(struct xg_tcp *tcp, struct xg_verified *out, uint32_t max)
{
	uint32_t now = xg_tcp_now(), b, i, n = 0;

	for (b = 0; b <= tcp->verified_mask && n < max; b++) {
		struct verified_bucket *bk = &tcp->verified[b];

		lock(&bk->lock);
		for (i = 0; i < XG_WAYS && n < max; i++)
			if (bk->slot[i].expires && !xg_seq_before(bk->slot[i].expires, now))
				out[n++] = bk->slot[i];
		unlock(&bk->lock);
	}
	return n;
}

void xg_tcp_verified_add(struct xg_tcp *tcp, const uint8_t *addr, uint32_t expires)
{
	verified_add(tcp, addr, expires);
}

void xg_tcp_verified_clear(struct xg_tcp *tcp)
{
	uint32_t b;

	for (b = 0; b <= tcp->verified_mask; b++) {
		struct verified_bucket *bk = &tcp->verified[b];

		lock(&bk->lock);
		memset(bk->slot, 0, sizeof(bk->slot));
		unlock(&bk->lock);
	}
}
