/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Private to libxdp_shim: the TCP stage as the hot loop calls it. */
#ifndef XG_TCP_H
#define XG_TCP_H

#include <stdint.h>

#include "xg_shim.h"

/* One reading of the clock per burst. */
struct xg_clock {
	uint32_t s;	/* coarse monotonic seconds (xg_tcp_now()) */
};

void xg_clock_read(struct xg_clock *c);

/*
 * A frame that came in from outside (outer RX), with what XDP said of it
 * (@meta: XG_META_* flags). Counts its verdict in @st. Does not block
 * beyond a bucket spinlock held for a few dozen instructions.
 */
enum xg_tcp_verdict xg_tcp_outside(struct xg_tcp *t, uint8_t *frame, uint32_t *len,
				   uint32_t meta, const struct xg_clock *now,
				   struct xg_worker_stats *st);

/* A frame from inside (inner RX): updates flow state, always forwarded. */
void xg_tcp_inside(struct xg_tcp *t, const uint8_t *frame, uint32_t len,
		   const struct xg_clock *now);

#endif /* XG_TCP_H */
