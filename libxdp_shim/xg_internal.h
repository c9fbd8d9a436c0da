/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Private to libxdp_shim: the object layouts behind xg_shim.h's handles. */
#ifndef XG_INTERNAL_H
#define XG_INTERNAL_H

#include <net/if.h>
#include <pthread.h>
#include <xdp/xsk.h>

#include "xg_shim.h"

struct xg_umem {
	struct xsk_umem *xsk_umem;
	void *area;
	size_t size;
	uint32_t nframes;
	uint32_t frame_size;
	uint32_t ring_size;
	/*
	 * Bound with XDP_USE_NEED_WAKEUP (the first socket's choice, which
	 * every later one inherits): else the kernel never says when to kick,
	 * and the loop kicks whenever a TX ring holds frames.
	 */
	int need_wakeup;
	/*
	 * libxdp maps the first fill/completion pair at UMEM registration and
	 * copies it into the first socket's rings; later sockets map their own.
	 */
	struct xsk_ring_prod fill0;
	struct xsk_ring_cons comp0;
	/* Registry of sockets, keyed by (netns cookie, ifindex, queue). */
	pthread_mutex_t lock;
	struct xg_sock *socks;
};

struct xg_sock {
	struct xg_sock *next; /* in umem->socks */
	struct xg_umem *umem;
	struct xsk_socket *xsk;
	struct xsk_ring_cons rx;
	struct xsk_ring_prod tx;
	struct xsk_ring_prod fill;
	struct xsk_ring_cons comp;
	uint64_t netns_cookie;
	int ifindex;
	uint32_t queue;
	uint32_t role;
	uint32_t zerocopy;
	int fd;
	char ifname[IF_NAMESIZE];
};

#endif /* XG_INTERNAL_H */
