// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The hot loop: one worker per queue index moves descriptors between the
 * outer and the inner socket of that queue.
 *
 * Per step: reap completions -> top up fill rings -> outer RX, each frame
 * judged by the TCP stage (xg_tcp.c): passed to inner TX or dropped ->
 * inner RX (which only feeds the flow table) to outer TX -> kick TX where
 * the ring asks -> poll() if nothing happened. Frames are forwarded by
 * handing the very descriptor that came off one socket's RX ring to a TX
 * ring: all sockets share the UMEM, so nothing is copied.
 *
 * Everything is allocated in xg_worker_create(); the loop itself never
 * allocates, logs or blocks except in the idle poll().
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>

#include "xg_internal.h"
#include "xg_tcp.h"

enum { OUTER = XG_ROLE_OUTER, INNER = XG_ROLE_INNER, NR_SIDES = 2 };

/* Bounded so a TX ring that refuses to drain cannot pin the loop. */
#define XG_MAX_KICKS 8

struct xg_worker {
	struct xg_umem *umem;
	struct xg_sock *sock[NR_SIDES];
	struct xg_tcp *tcp;	/* NULL: no TCP stage */
	struct xg_clock now;	/* read once per step */
	uint32_t flags;
	uint32_t nframes;
	uint64_t frame_mask;

	/* The worker's private frames that are in no ring. */
	uint64_t *free_stack;
	uint32_t nfree;

	/*
	 * Descriptors exchanged with the kernel, per socket. They give the
	 * frame account an independent view of what the kernel holds.
	 */
	uint64_t fill_given[NR_SIDES];
	uint64_t rx_taken[NR_SIDES];
	uint64_t tx_given[NR_SIDES];
	uint64_t comp_taken[NR_SIDES];

	int stop;
	int running;
	uint32_t checked_s;	/* when the sockets were last checked */
	uint32_t acct_req;
	uint32_t acct_done;
	struct xg_frame_account acct;

	struct xg_worker_stats stats;
};

static inline void free_push(struct xg_worker *w, uint64_t addr)
{
	w->free_stack[w->nfree++] = addr & w->frame_mask;
}

/* Entries the kernel has not yet consumed / we have not yet consumed. */
static inline uint32_t ring_used(const uint32_t *producer,
				 const uint32_t *consumer)
{
	return __atomic_load_n(producer, __ATOMIC_ACQUIRE) -
	       __atomic_load_n(consumer, __ATOMIC_ACQUIRE);
}

static uint32_t reap_completions(struct xg_worker *w, int side)
{
	struct xg_sock *s = w->sock[side];
	uint32_t i, n, idx;

	n = xsk_ring_cons__peek(&s->comp, s->umem->ring_size, &idx);
	if (!n)
		return 0;
	for (i = 0; i < n; i++)
		free_push(w, *xsk_ring_cons__comp_addr(&s->comp, idx + i));
	xsk_ring_cons__release(&s->comp, n);
	w->comp_taken[side] += n;
	/* Completions of side X are frames sent by direction towards X. */
	w->stats.dir[side == OUTER ? XG_DIR_OUT : XG_DIR_IN].completions += n;
	return n;
}

static void refill(struct xg_worker *w, int side)
{
	struct xg_sock *s = w->sock[side];
	uint32_t i, n, idx = 0;
	int dir = side == OUTER ? XG_DIR_IN : XG_DIR_OUT;

	n = xsk_prod_nb_free(&s->fill, s->umem->ring_size);
	/* Top up in batches: a ring kept full to the last slot costs a
	 * producer update per frame for nothing. */
	if (n < XG_BATCH)
		return;
	if (n > w->nfree) {
		w->stats.dir[dir].fill_short++;
		n = w->nfree;
		if (!n)
			return;
	}
	xsk_ring_prod__reserve(&s->fill, n, &idx);
	for (i = 0; i < n; i++)
		*xsk_ring_prod__fill_addr(&s->fill, idx + i) =
			w->free_stack[--w->nfree];
	xsk_ring_prod__submit(&s->fill, n);
	w->fill_given[side] += n;

	if (xsk_ring_prod__needs_wakeup(&s->fill)) {
		w->stats.dir[dir].fill_wakeups++;
		recvfrom(s->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
	}
}

/* Put @n descriptors on @s's TX ring; those that find no room are freed. */
static uint32_t transmit(struct xg_worker *w, int side, const struct xdp_desc *descs,
			 uint32_t n)
{
	struct xg_sock *s = w->sock[side];
	uint32_t i, room, idx = 0;
	struct xdp_desc *t;

	room = n ? xsk_prod_nb_free(&s->tx, n) : 0;
	if (room > n)
		room = n;
	if (room)
		xsk_ring_prod__reserve(&s->tx, room, &idx);
	for (i = 0; i < room; i++) {
		t = xsk_ring_prod__tx_desc(&s->tx, idx + i);
		t->addr = descs[i].addr;
		t->len = descs[i].len;
		t->options = 0;
	}
	for (; i < n; i++)
		free_push(w, descs[i].addr);
	if (room) {
		xsk_ring_prod__submit(&s->tx, room);
		w->tx_given[side] += room;
	}
	return room;
}

/*
 * Judge one frame of direction @dir (at *@addr, *@len bytes). Only TCP
 * frames from outside can be dropped; frames from inside feed the flow
 * table and pass. A frame from outside carries the XDP program's word in
 * front (struct xg_meta); it is taken off here, in *@addr and *@len.
 */
static enum xg_tcp_verdict judge(struct xg_worker *w, int dir, uint64_t *addr, uint32_t *len)
{
	uint8_t *frame = (uint8_t *)w->umem->area + *addr;
	struct xg_meta word;

	if (dir == XG_DIR_OUT) {
		if (w->tcp && !(w->flags & XG_WORKER_NO_POLICY))
			xg_tcp_inside(w->tcp, frame, *len, &w->now);
		return XG_V_FORWARD;
	}
	/*
	 * Only the XDP program puts frames into the sockets, and it puts the
	 * word in front of each; a frame without it came from elsewhere and
	 * cannot be judged.
	 */
	if (*len < sizeof(word))
		goto bad;
	memcpy(&word, frame, sizeof(word));
	if (word.magic != XG_META_MAGIC)
		goto bad;
	*addr += sizeof(word);
	*len -= sizeof(word);
	if (!w->tcp || (w->flags & XG_WORKER_NO_POLICY))
		return XG_V_FORWARD;
	return xg_tcp_outside(w->tcp, frame + sizeof(word), len, word.flags, &w->now,
			      &w->stats);
bad:
	w->stats.reasons[XG_REASON_MALFORMED].packets++;
	w->stats.reasons[XG_REASON_MALFORMED].bytes += *len;
	return XG_V_DROP;
}

/*
 * Move up to one batch from @from's RX ring: what passes goes to @to's TX
 * ring as the very same descriptor. Frames that find no room on a TX ring
 * are freed and counted: a slow peer must cost us frames, never stall the
 * RX ring (which would stall the kernel).
 */
static uint32_t forward(struct xg_worker *w, int from, int to, int dir)
{
	struct xg_sock *src = w->sock[from];
	struct xg_dir_stats *st = &w->stats.dir[dir];
	struct xdp_desc pass[XG_BATCH];
	uint32_t i, n, npass = 0, sent, idx_rx;
	const struct xdp_desc *d;
	uint64_t addr;
	uint32_t len;

	n = xsk_ring_cons__peek(&src->rx, XG_BATCH, &idx_rx);
	if (!n)
		return 0;
	w->rx_taken[from] += n;
	st->rx_packets += n;

	for (i = 0; i < n; i++) {
		d = xsk_ring_cons__rx_desc(&src->rx, idx_rx + i);
		addr = d->addr;
		len = d->len;
		st->rx_bytes += len;
		switch (judge(w, dir, &addr, &len)) {
		case XG_V_FORWARD:
			pass[npass].addr = addr;
			pass[npass++].len = len;
			break;
		default:
			free_push(w, addr);
			st->dropped++;
		}
	}
	xsk_ring_cons__release(&src->rx, n);

	sent = transmit(w, to, pass, npass);
	st->tx_packets += sent;
	st->tx_ring_full += npass - sent;
	for (i = 0; i < sent; i++)
		st->tx_bytes += pass[i].len;
	return n;
}

static void fail(struct xg_worker *w, int side, int err)
{
	if (!w->stats.error) {
		w->stats.error_role = side;
		w->stats.error = err;
	}
	__atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
}

/*
 * In copy mode the kernel sends only from sendto() and poll(), a limited
 * number of frames per call; it says so by leaving need_wakeup set. Returns
 * whether frames are still waiting that another kick could move now.
 */
static int kick_tx(struct xg_worker *w, int side)
{
	struct xg_sock *s = w->sock[side];
	int dir = side == OUTER ? XG_DIR_OUT : XG_DIR_IN;
	int kicks;

	for (kicks = 0; kicks < XG_MAX_KICKS; kicks++) {
		if (!ring_used(s->tx.producer, s->tx.consumer))
			return 0;
		if (s->umem->need_wakeup && !xsk_ring_prod__needs_wakeup(&s->tx))
			return 1;
		w->stats.dir[dir].tx_wakeups++;
		if (sendto(s->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0)
			continue;
		switch (errno) {
		case EAGAIN:	/* the per-call budget ran out */
			continue;
		case ENETDOWN:
			/* Administratively down: the frames wait on the
			 * ring, and the loop may sleep until traffic or up. */
			w->stats.tx_down++;
			return 0;
		case ENXIO:
			/* Unbound: the device is gone. */
			fail(w, side, -ENODEV);
			return 0;
		default:
			/* EBUSY/ENOBUFS: the device is busy; try again. */
			return 1;
		}
	}
	return !!ring_used(s->tx.producer, s->tx.consumer);
}

/*
 * The kernel unbinds an AF_XDP socket whose device is unregistered (deleted
 * or moved to another namespace) and sets the socket's error; poll() then
 * reports nothing, so the loop asks. Once a second, two syscalls.
 */
static void check_sockets(struct xg_worker *w)
{
	int side, err;
	socklen_t len;

	if (w->now.s == w->checked_s)
		return;
	w->checked_s = w->now.s;
	for (side = 0; side < NR_SIDES; side++) {
		err = 0;
		len = sizeof(err);
		if (getsockopt(w->sock[side]->fd, SOL_SOCKET, SO_ERROR, &err, &len))
			fail(w, side, -errno);
		else if (err)	/* only ever set by the unbind */
			fail(w, side, -ENODEV);
	}
}

static void take_account(struct xg_worker *w, struct xg_frame_account *a)
{
	uint64_t held_rx = 0, held_tx = 0;
	int side;

	memset(a, 0, sizeof(*a));
	a->total = w->nframes;
	a->free = w->nfree;
	for (side = 0; side < NR_SIDES; side++) {
		struct xg_sock *s = w->sock[side];

		a->fill += ring_used(s->fill.producer, s->fill.consumer);
		a->rx += ring_used(s->rx.producer, s->rx.consumer);
		a->tx += ring_used(s->tx.producer, s->tx.consumer);
		a->completion += ring_used(s->comp.producer, s->comp.consumer);
		held_rx += w->fill_given[side] - w->rx_taken[side];
		held_tx += w->tx_given[side] - w->comp_taken[side];
	}
	a->in_flight_rx = (int64_t)held_rx - (int64_t)(a->fill + a->rx);
	a->in_flight_tx = (int64_t)held_tx - (int64_t)(a->tx + a->completion);
	a->in_flight = a->in_flight_rx + a->in_flight_tx;
	a->consistent = a->free + held_rx + held_tx == a->total &&
			a->in_flight_rx >= 0 && a->in_flight_tx >= 0;
}

static void idle_poll(struct xg_worker *w)
{
	struct pollfd pfd[NR_SIDES] = {
		{ .fd = w->sock[OUTER]->fd, .events = POLLIN },
		{ .fd = w->sock[INNER]->fd, .events = POLLIN },
	};

	w->stats.polls++;
	poll(pfd, NR_SIDES, XG_IDLE_POLL_MS);
}

int xg_worker_run(struct xg_worker *w)
{
	uint32_t work, req;

	if (__atomic_exchange_n(&w->running, 1, __ATOMIC_ACQ_REL))
		return -EALREADY;

	while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
		xg_clock_read(&w->now);
		work = reap_completions(w, OUTER);
		work += reap_completions(w, INNER);
		refill(w, OUTER);
		refill(w, INNER);
		work += forward(w, OUTER, INNER, XG_DIR_IN);
		work += forward(w, INNER, OUTER, XG_DIR_OUT);
		work += kick_tx(w, INNER);
		work += kick_tx(w, OUTER);

		/* Nothing is in the loop's hands here: a true account. */
		req = __atomic_load_n(&w->acct_req, __ATOMIC_ACQUIRE);
		if (req != w->acct_done) {
			take_account(w, &w->acct);
			__atomic_store_n(&w->acct_done, req, __ATOMIC_RELEASE);
		}

		w->stats.loops++;
		check_sockets(w);
		if (!work)
			idle_poll(w);
	}

	__atomic_store_n(&w->running, 0, __ATOMIC_RELEASE);
	return w->stats.error;
}

void xg_worker_stop(struct xg_worker *w)
{
	__atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
}

const struct xg_worker_stats *xg_worker_stats(const struct xg_worker *w)
{
	return &w->stats;
}

int xg_worker_account(struct xg_worker *w, struct xg_frame_account *out,
		      int timeout_ms)
{
	struct timespec tick = { .tv_nsec = 1000 * 1000 };
	uint32_t req;
	int waited;

	if (!__atomic_load_n(&w->running, __ATOMIC_ACQUIRE)) {
		take_account(w, out);
		return 0;
	}
	req = __atomic_add_fetch(&w->acct_req, 1, __ATOMIC_ACQ_REL);
	for (waited = 0; waited <= timeout_ms; waited++) {
		if (__atomic_load_n(&w->acct_done, __ATOMIC_ACQUIRE) == req) {
			*out = w->acct;
			return 0;
		}
		if (!__atomic_load_n(&w->running, __ATOMIC_ACQUIRE)) {
			take_account(w, out);
			return 0;
		}
		nanosleep(&tick, NULL);
	}
	return -ETIMEDOUT;
}

int xg_worker_create(struct xg_umem *umem, struct xg_sock *outer,
		     struct xg_sock *inner, uint32_t first_frame,
		     uint32_t nframes, uint32_t flags, struct xg_worker **out)
{
	struct xg_worker *w;
	uint32_t i;

	if (outer->umem != umem || inner->umem != umem ||
	    outer->queue != inner->queue || !nframes ||
	    (uint64_t)first_frame + nframes > umem->nframes ||
	    nframes < 2 * umem->ring_size)
		return -EINVAL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->free_stack = calloc(nframes, sizeof(*w->free_stack));
	if (!w->free_stack) {
		free(w);
		return -ENOMEM;
	}
	w->umem = umem;
	w->sock[OUTER] = outer;
	w->sock[INNER] = inner;
	w->flags = flags;
	w->nframes = nframes;
	w->frame_mask = ~((uint64_t)umem->frame_size - 1);
	/* Pushed in reverse so the first frames handed out are the lowest. */
	for (i = nframes; i-- > 0;)
		free_push(w, (uint64_t)(first_frame + i) * umem->frame_size);

	refill(w, OUTER);
	refill(w, INNER);
	*out = w;
	return 0;
}

int xg_worker_set_tcp(struct xg_worker *w, struct xg_tcp *tcp)
{
	if (__atomic_load_n(&w->running, __ATOMIC_ACQUIRE))
		return -EBUSY;
	w->tcp = tcp;
	return 0;
}

void xg_worker_destroy(struct xg_worker *w)
{
	if (!w)
		return;
	free(w->free_stack);
	free(w);
}
