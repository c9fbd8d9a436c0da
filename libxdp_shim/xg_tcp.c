// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * TCP flow protection for the hot loop: passive bidirectional tracking and
 * out-of-state drops. SYN challenges, the verified sources and the
 * per-destination rates of auto mode live in XDP (bpf/xg_challenge.h): a
 * SYN that reaches the loop passed them, and the frame's metadata says
 * what XDP found (XG_META_STATE_OVER, XG_META_FORWARD).
 *
 * Every worker shares one flow table: the two directions of a connection
 * may arrive on different queues (each end's stack picks its own TX queue).
 * The table is open addressing with buckets of XG_WAYS slots; a key lives in
 * exactly one bucket, chosen by SipHash under a random key so that nobody
 * can aim a flood at one bucket. Each bucket has a spinlock held for a few
 * dozen instructions. Expiry is lazy (a slot idle longer than its state's
 * timeout is free), and a full bucket gives up its oldest non-established
 * flow, never an established one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>

#include "xg_flow.h"
#include "xg_tcp.h"

#define XG_WAYS 8
#define ADOPTED_WIN (1U << 30)	/* windows of a flow picked up mid-stream: unknown */
#define NO_WSCALE XG_NO_WSCALE

#define TH_FIN XG_TCP_FIN
#define TH_SYN XG_TCP_SYN
#define TH_RST XG_TCP_RST
#define TH_ACK XG_TCP_ACK

/*
 * The sources and source prefixes at or over their flow quota, as the last
 * xg_tcp_quota() found them. Two copies: the workers read the one @cur
 * names while the next is written, then @cur flips.
 */
#define XG_QUOTA_SET 64

struct xg_quota_set {
	uint32_t nsrc, npfx;
	uint8_t src[XG_QUOTA_SET][16];
	uint8_t pfx[XG_QUOTA_SET][16];
};

struct xg_tcp {
	/* The flow table: ours, or a BPF map's memory the XDP programs share. */
	struct xg_flow_bucket *flows;
	int own_flows;
	uint32_t flow_mask;		/* buckets - 1 */
	uint8_t flow_key[16];		/* SipHash key of the flow table (the table's own) */
	struct xg_tcp_cfg cfg;		/* fields read one by one */
	uint64_t evictions;
	struct xg_quota_set quota[2];
	uint32_t quota_cur;
};

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
}

/* ---- parsing ---- */

struct pkt {
	struct xg_hdrs h;	/* the parser's findings */
	struct xg_seg seg;
	uint8_t wscale;		/* NO_WSCALE if the SYN offers none */
};

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
 * from @side, xg_flow.h) filled in; TCP_FRAGMENT for any fragment of a TCP
 * segment; BAD_FRAME and the reason in *@why for a frame the parser could
 * not finish; NOT_TCP for the rest.
 */
static int parse(uint8_t *frame, uint32_t len, int side, struct pkt *p,
		 struct xg_flow_key *k, enum xg_reason *why)
{
	enum xg_reason r;
	uint8_t *l4;
	uint32_t doff;

	r = xg_parse(frame, frame + len, &p->h);
	if (r != XG_REASON_REDIRECTED) {
		*why = r;
		return BAD_FRAME;
	}
	if (!p->h.l3 || p->h.l4_proto != IPPROTO_TCP)
		return NOT_TCP;
	if (p->h.frag & XG_FRAG_ANY)
		return TCP_FRAGMENT;
	if (xg_flow_key_of(&p->h, frame + len, side, k, &p->seg))
		return NOT_TCP; /* cannot happen: xg_parse() checked the headers */
	l4 = p->h.l4;
	doff = (l4[12] >> 4) * 4;
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

/* ---- flow quotas ---- */

/* The /24 (IPv4) or /48 (IPv6) of a flow key's address, as an address. */
static void prefix_of(const uint8_t *addr, int v6, uint8_t out[16])
{
	memcpy(out, addr, 16);
	if (v6)
		memset(out + 6, 0, 10);
	else
		out[15] = 0;
}

/* Is @k's source, or its prefix, at or over its quota? Lock-free. */
static int over_quota(struct xg_tcp *t, const struct xg_flow_key *k)
{
	const struct xg_quota_set *q =
		&t->quota[__atomic_load_n(&t->quota_cur, __ATOMIC_ACQUIRE) & 1];
	uint8_t pfx[16];
	uint32_t i;

	if (!q->nsrc && !q->npfx)
		return 0;
	for (i = 0; i < q->nsrc && i < XG_QUOTA_SET; i++)
		if (!memcmp(q->src[i], k->out_addr, 16))
			return 1;
	prefix_of(k->out_addr, k->v6, pfx);
	for (i = 0; i < q->npfx && i < XG_QUOTA_SET; i++)
		if (!memcmp(q->pfx[i], pfx, 16))
			return 1;
	return 0;
}

/*
 * A slot for a new flow: a free or expired one; else a flow of a source
 * over its quota, the one idle longest; else the oldest flow that is not
 * established; else the established flow idle longest if it has been
 * idle XG_IDLE_EVICTABLE seconds (its connection, if it still lives, is
 * adopted again when it talks: XG_META_VERIFIED). NULL if the bucket holds
 * only established flows busier than that. Caller holds b->lock.
 */
static struct xg_flow *flow_slot(struct xg_tcp *t, struct xg_flow_bucket *b, uint32_t now)
{
	struct xg_flow *victim = NULL, *idle = NULL, *hog = NULL;
	int i;

	for (i = 0; i < XG_WAYS; i++) {
		struct xg_flow *f = &b->slot[i];

		if (!xg_flow_live(f, now))
			return f;
		if (over_quota(t, &f->key) &&
		    (!hog || xg_seq_before(f->last_seen, hog->last_seen)))
			hog = f;
		if (f->state != XG_TCP_ESTABLISHED) {
			if (!victim || xg_seq_before(f->last_seen, victim->last_seen))
				victim = f;
		} else if ((int32_t)(now - f->last_seen) >= XG_IDLE_EVICTABLE &&
			   (!idle || xg_seq_before(f->last_seen, idle->last_seen))) {
			idle = f;
		}
	}
	if (hog)
		victim = hog;
	if (!victim)
		victim = idle;
	if (victim)
		__atomic_fetch_add(&t->evictions, 1, __ATOMIC_RELAXED);
	return victim;
}

static void flow_init(struct xg_flow *f, const struct xg_flow_key *k, uint8_t state,
		      uint16_t flags, uint32_t now)
{
	memset(f, 0, sizeof(*f));
	f->key = *k;
	f->state = state;
	f->flags = flags;
	f->wscale[0] = f->wscale[1] = NO_WSCALE;
	f->last_seen = now;
}

/* ---- what a segment may change ---- */

static uint32_t sum16(const uint8_t *p, uint32_t n, uint32_t sum)
{
	uint32_t i;

	for (i = 0; i + 1 < n; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	return sum;
}

/*
 * Whether the TCP checksum of @p is right (over its IP packet's own
 * length). Only segments that would change a flow's state are checked:
 * the checksum costs a pass over the payload.
 */
static int csum_ok(const struct pkt *p)
{
	const uint8_t *l3 = p->h.l3, *l4 = p->h.l4;
	uint32_t len = (uint32_t)((const uint8_t *)p->h.l3_end - l4), sum;

	if (p->h.v6) {
		sum = sum16(l3 + 8, 32, 0);
		sum += len >> 16;
		sum += len & 0xffff;
		sum += IPPROTO_TCP;
	} else {
		sum = sum16(l3 + 12, 8, 0);
		sum += IPPROTO_TCP + len;
	}
	sum = sum16(l4, len, sum);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

/*
 * Whether a RST from outside is at the sequence number the origin expects
 * next (RFC 5961 3.2): what it acknowledged last, or, if the origin has
 * not yet acknowledged all the outside sent, the end of that. Caller
 * holds the flow's bucket lock.
 */
static int rst_exact(const struct xg_flow *f, const struct xg_seg *s)
{
	if ((f->flags & XG_FLOW_ACKED_IN) && s->seq == f->acked[XG_SIDE_IN])
		return 1;
	return (f->flags & XG_FLOW_END_OUT) && s->seq == f->end[XG_SIDE_OUT];
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
 * a flow opened before the start. In auto mode XDP said whether the
 * destination is above its rate (@meta: XG_META_STATE_OVER). An
 * allowlisted source (XG_META_ALLOWLISTED) skips the check altogether.
 */
static enum xg_tcp_verdict out_of_state(struct xg_tcp *t, uint32_t meta, enum xg_reason reason,
					uint32_t len, int learning, struct xg_worker_stats *st)
{
	uint32_t mode = cfg_get(&t->cfg.state_mode);

	if (meta & XG_META_ALLOWLISTED)
		return XG_V_FORWARD;
	if (mode != XG_MODE_OFF && learning)
		mode = XG_MODE_MONITOR;
	if (mode == XG_MODE_ON || (mode == XG_MODE_AUTO && (meta & XG_META_STATE_OVER))) {
		count(&st->reasons[reason], len);
		return XG_V_DROP;
	}
	if (mode != XG_MODE_OFF)
		count(&st->monitor[reason], len);
	return XG_V_FORWARD;
}

/*
 * A SYN that passed XDP's challenge, for a tuple with no live flow (or a closed
 * one, which a new connection replaces as in conntrack): track it. @b is
 * @k's bucket, unlocked: hashed once per frame.
 */
static enum xg_tcp_verdict new_syn(struct xg_tcp *t, struct xg_flow_bucket *b, uint32_t len,
				   uint32_t meta, const struct pkt *p, const struct xg_flow_key *k,
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
	if (!(meta & XG_META_ALLOWLISTED) && over_quota(t, k)) {
		unlock(&b->lock);
		count(&st->reasons[XG_REASON_FLOW_QUOTA], len);
		return XG_V_DROP;
	}
	if (!f)
		f = flow_slot(t, b, now->s);
	if (!f) {
		unlock(&b->lock);
		if (meta & XG_META_ALLOWLISTED)
			return XG_V_FORWARD; /* untracked, but never dropped */
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
				   uint32_t meta, const struct xg_clock *now,
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

	if (meta & XG_META_FORWARD)
		return XG_V_FORWARD;
	switch (parse(frame, *len, x, &p, &k, &why)) {
	case NOT_TCP:
		return XG_V_FORWARD;
	case BAD_FRAME:
		/* XDP drops these already; the loop fails closed all the same. */
		count(&st->reasons[why], *len);
		return XG_V_DROP;
	case TCP_FRAGMENT:
		return out_of_state(t, meta, XG_REASON_TCP_FRAGMENT, *len,
				    xg_seq_before(now->s, cfg_get(&t->cfg.learn_until)), st);
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
		 * Anything else is a new connection, or claims to be: it went
		 * through XDP's challenge like any SYN, and a live flow of the
		 * tuple stays as it is (new_syn()). An established origin
		 * answers such a SYN with a challenge ACK (RFC 5961 4).
		 */
		unlock(&b->lock);
		return new_syn(t, b, *len, meta, &p, &k, now, st);
	}

	if (!f) {
		if ((learning || (meta & XG_META_VERIFIED)) && !(p.seg.flags & (TH_SYN | TH_RST)) &&
		    csum_ok(&p)) {
			/*
			 * Adopt a flow that was open before we started, or one
			 * of a verified source that lost its flow (evicted
			 * while idle): never cut a real connection for that.
			 */
			f = flow_slot(t, b, now->s);
			if (f) {
				flow_init(f, &k, XG_TCP_LEARNING,
					  XG_FLOW_ADOPTED | (learning ? 0 : XG_FLOW_VOUCHED), now->s);
				f->maxwin[0] = f->maxwin[1] = ADOPTED_WIN;
				xg_flow_note(f, x, &p.seg, *len);
			}
			unlock(&b->lock);
			return XG_V_FORWARD;
		}
		unlock(&b->lock);
		if ((p.seg.flags & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK))
			return out_of_state(t, meta, XG_REASON_TCP_SYNACK_REFLECTION, *len,
					    learning, st);
		/*
		 * A bare RST of no flow answered a challenge or was judged in
		 * XDP; one that reaches the loop lost its flow on the way.
		 */
		return out_of_state(t, meta, XG_REASON_TCP_NO_FLOW, *len, learning, st);
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
		if (learning || (f->flags & XG_FLOW_VOUCHED))
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
	return out_of_state(t, meta, why, *len, 0, st);

accept:
	/*
	 * A segment whose checksum is wrong goes on (the origin drops it) and
	 * teaches nothing: it may be anyone's.
	 */
	if ((p.seg.flags & (TH_RST | TH_FIN)) && !csum_ok(&p)) {
		unlock(&b->lock);
		return XG_V_FORWARD;
	}
	/*
	 * RFC 5961 3: only a RST at exactly the sequence number the origin
	 * expects next ends the flow; one elsewhere in the window goes on for
	 * the origin to answer with a challenge ACK, and changes nothing here
	 * (a blind attacker who knows the 4-tuple must not cut the connection
	 * on the origin's behalf).
	 */
	if (p.seg.flags & TH_RST) {
		if (!rst_exact(f, &p.seg)) {
			unlock(&b->lock);
			return XG_V_FORWARD;
		}
		f->state = XG_TCP_CLOSED;
	} else if ((p.seg.flags & TH_FIN) && f->state == XG_TCP_ESTABLISHED) {
		f->state = XG_TCP_CLOSING;
	}
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
		 uint32_t meta, uint32_t now_s, struct xg_worker_stats *st)
{
	struct xg_clock now = { .s = now_s };

	if (!from_outside) {
		xg_tcp_inside(tcp, frame, *len, &now);
		return XG_V_FORWARD;
	}
	return xg_tcp_outside(tcp, frame, len, meta, &now, st);
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
		      const struct xg_tcp_cfg *cfg, struct xg_tcp **out)
{
	struct xg_tcp *t;

	t = aligned_alloc(64, (sizeof(*t) + 63) & ~63UL);
	if (!t)
		return -ENOMEM;
	memset(t, 0, sizeof(*t));
	t->own_flows = !flows;
	t->flows = flows ? flows : aligned_alloc(64, (size_t)nf * sizeof(*t->flows));
	if (!t->flows) {
		xg_tcp_destroy(t);
		return -ENOMEM;
	}
	if (t->own_flows)
		memset(t->flows, 0, (size_t)nf * sizeof(*t->flows));
	t->flow_mask = nf - 1;
	if (!flow_key && getrandom(t->flow_key, 16, 0) != 16) {
		xg_tcp_destroy(t);
		return -EIO;
	}
	if (flow_key)
		memcpy(t->flow_key, flow_key, 16);
	t->cfg = *cfg;
	*out = t;
	return 0;
}

int xg_tcp_create(uint32_t max_flows, const struct xg_tcp_cfg *cfg, struct xg_tcp **out)
{
	if (!max_flows || max_flows > (1U << 30))
		return -EINVAL;
	return tcp_create(NULL, buckets_for(max_flows), NULL, cfg, out);
}

int xg_tcp_create_shared(struct xg_flowtab *ft, const struct xg_tcp_cfg *cfg,
			 struct xg_tcp **out)
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
	return tcp_create(xg_flowtab_buckets(ft), info->nbuckets, info->key, cfg, out);
}

void xg_tcp_destroy(struct xg_tcp *tcp)
{
	if (!tcp)
		return;
	if (tcp->own_flows)
		free(tcp->flows);
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

uint32_t xg_tcp_scan(struct xg_tcp *tcp, struct xg_tcp_counts *counts, struct xg_flow *top,
		     uint32_t ntop)
{
	uint32_t now = xg_tcp_now(), b, i, n = 0, j;

	memset(counts, 0, sizeof(*counts));
	counts->capacity = (uint64_t)(tcp->flow_mask + 1) * XG_WAYS;
	counts->evictions = __atomic_load_n(&tcp->evictions, __ATOMIC_RELAXED);
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
	return n;
}

/* ---- flow quotas: who holds more than its share ---- */

#define CMS_WIDTH 65536	/* counters per row of the count-min sketches */
#define CANDIDATES 256

struct cms {
	uint32_t row[2][CMS_WIDTH];
};

static uint32_t cms_slot(const uint8_t *addr, int row)
{
	uint64_t a, b;

	memcpy(&a, addr, 8);
	memcpy(&b, addr + 8, 8);
	/* Multiply-shift hashes: the sketch only has to overestimate. */
	return (uint32_t)(((a ^ (row ? 0x9e3779b97f4a7c15ull : 0xc2b2ae3d27d4eb4full)) *
			   0xbf58476d1ce4e5b9ull + b * (row ? 0x94d049bb133111ebull : 0xff51afd7ed558ccdull)) >> 48);
}

/* Count @addr; its estimate now (at least its true count). */
static uint32_t cms_add(struct cms *c, const uint8_t *addr)
{
	uint32_t x = ++c->row[0][cms_slot(addr, 0)], y = ++c->row[1][cms_slot(addr, 1)];

	return x < y ? x : y;
}

struct candidates {
	uint32_t n;
	uint8_t addr[CANDIDATES][16];
	uint64_t count[CANDIDATES];
};

static int cand_find(const struct candidates *c, const uint8_t *addr)
{
	uint32_t i;

	for (i = 0; i < c->n; i++)
		if (!memcmp(c->addr[i], addr, 16))
			return (int)i;
	return -1;
}

static void cand_add(struct candidates *c, const uint8_t *addr)
{
	if (c->n < CANDIDATES && cand_find(c, addr) < 0)
		memcpy(c->addr[c->n++], addr, 16);
}

int xg_tcp_quota(struct xg_tcp *t, struct xg_tcp_quota_report *rep)
{
	uint64_t capacity = (uint64_t)(t->flow_mask + 1) * XG_WAYS;
	uint32_t now = xg_tcp_now(), b, i, qs, qp, next;
	struct candidates *cs, *cp;
	struct xg_quota_set *out;
	struct cms *sk;
	uint8_t pfx[16];
	int j;

	qs = cfg_get(&t->cfg.source_flow_quota);
	qp = cfg_get(&t->cfg.prefix_flow_quota);
	if (!qs)
		qs = capacity / 8 ? (uint32_t)(capacity / 8) : 1;
	if (!qp)
		qp = capacity / 4 ? (uint32_t)(capacity / 4) : 1;
	sk = calloc(2, sizeof(*sk));
	cs = calloc(1, sizeof(*cs));
	cp = calloc(1, sizeof(*cp));
	if (!sk || !cs || !cp) {
		free(sk);
		free(cs);
		free(cp);
		return -ENOMEM;
	}
	/* One pass with sketches: who may hold its quota. */
	for (b = 0; b <= t->flow_mask; b++) {
		for (i = 0; i < XG_WAYS; i++) {
			const struct xg_flow *f = &t->flows[b].slot[i];

			if (!xg_flow_live(f, now))
				continue;
			if (cms_add(&sk[0], f->key.out_addr) >= qs)
				cand_add(cs, f->key.out_addr);
			prefix_of(f->key.out_addr, f->key.v6, pfx);
			if (cms_add(&sk[1], pfx) >= qp)
				cand_add(cp, pfx);
		}
	}
	/* A second, exact, for those alone. */
	if (cs->n || cp->n) {
		for (b = 0; b <= t->flow_mask; b++) {
			for (i = 0; i < XG_WAYS; i++) {
				const struct xg_flow *f = &t->flows[b].slot[i];

				if (!xg_flow_live(f, now))
					continue;
				j = cand_find(cs, f->key.out_addr);
				if (j >= 0)
					cs->count[j]++;
				prefix_of(f->key.out_addr, f->key.v6, pfx);
				j = cand_find(cp, pfx);
				if (j >= 0)
					cp->count[j]++;
			}
		}
	}
	next = (__atomic_load_n(&t->quota_cur, __ATOMIC_ACQUIRE) + 1) & 1;
	out = &t->quota[next];
	memset(out, 0, sizeof(*out));
	memset(rep, 0, sizeof(*rep));
	rep->source_quota = qs;
	rep->prefix_quota = qp;
	for (i = 0; i < cs->n; i++) {
		if (cs->count[i] > rep->top_source)
			rep->top_source = cs->count[i];
		if (cs->count[i] >= qs && out->nsrc < XG_QUOTA_SET)
			memcpy(out->src[out->nsrc++], cs->addr[i], 16);
	}
	for (i = 0; i < cp->n; i++) {
		if (cp->count[i] > rep->top_prefix)
			rep->top_prefix = cp->count[i];
		if (cp->count[i] >= qp && out->npfx < XG_QUOTA_SET)
			memcpy(out->pfx[out->npfx++], cp->addr[i], 16);
	}
	rep->sources_over = out->nsrc;
	rep->prefixes_over = out->npfx;
	__atomic_store_n(&t->quota_cur, next, __ATOMIC_RELEASE);
	free(sk);
	free(cs);
	free(cp);
	return 0;
}
