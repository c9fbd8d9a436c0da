// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Reading a BPF ring buffer of fixed-size records (xdpguard trace's
 * events, the XDP program's samples) from Python without a callback into
 * it per record.
 *
 * Records are copied from the ring buffer into a backlog of our own, then
 * handed out by xg_ring_poll(): libbpf consumes a record before its
 * callback returns, so a caller's array that is full must not be where
 * the callback writes. What the backlog has no room for counts as dropped.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <bpf/libbpf.h>

#include "xg_shim.h"

struct xg_ring {
	struct ring_buffer *rb;
	uint32_t rec_size, cap;
	uint32_t head, count;
	uint64_t dropped, short_recs;
	uint8_t *backlog;
};

static int take(void *ctx, void *data, size_t size)
{
	struct xg_ring *r = ctx;

	if (size < r->rec_size) {
		r->short_recs++;
		return 0;
	}
	if (r->count == r->cap) {
		r->dropped++;
		return 0;
	}
	memcpy(r->backlog + (size_t)((r->head + r->count) % r->cap) * r->rec_size, data,
	       r->rec_size);
	r->count++;
	return 0;
}

int xg_ring_open(int map_fd, uint32_t rec_size, uint32_t backlog, struct xg_ring **out)
{
	struct xg_ring *r;
	int err;

	if (!rec_size || !backlog || map_fd < 0)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->rec_size = rec_size;
	r->cap = backlog;
	r->backlog = calloc(backlog, rec_size);
	if (!r->backlog) {
		free(r);
		return -ENOMEM;
	}
	r->rb = ring_buffer__new(map_fd, take, r, NULL);
	if (!r->rb) {
		err = -errno;
		free(r->backlog);
		free(r);
		return err < 0 ? err : -EINVAL;
	}
	*out = r;
	return 0;
}

int xg_ring_poll(struct xg_ring *r, void *out, uint32_t max, int timeout_ms)
{
	uint8_t *dst = out;
	uint32_t n = 0;
	int err;

	if (!r->count) {
		err = ring_buffer__poll(r->rb, timeout_ms);
		if (err < 0 && err != -EINTR)
			return err;
	}
	while (n < max && r->count) {
		memcpy(dst + (size_t)n * r->rec_size, r->backlog + (size_t)r->head * r->rec_size,
		       r->rec_size);
		r->head = (r->head + 1) % r->cap;
		r->count--;
		n++;
	}
	return (int)n;
}

uint64_t xg_ring_dropped(const struct xg_ring *r)
{
	return r->dropped + r->short_recs;
}

void xg_ring_close(struct xg_ring *r)
{
	if (!r)
		return;
	ring_buffer__free(r->rb);
	free(r->backlog);
	free(r);
}
