// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The tests' and benchmarks' traffic generator (never part of the data
 * path): a TX-only AF_XDP socket in copy mode on the device that sends,
 * with a UMEM of its own. Copy mode works on every device and every
 * kernel with AF_XDP, and unlike BPF_PROG_RUN's live frames it is not
 * refused by locked-down kernels. The kernel copies a frame when it sends
 * it, so a frame's bytes may be rewritten as soon as its completion comes
 * back: the varied fields (source, source port, fragment) are written just
 * before each frame goes on the ring, with its checksums kept right.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <linux/if_xdp.h>

#include "xg_internal.h"

enum {
	GEN_FRAMES = 4096,
	GEN_FRAME_SIZE = 2048,
	GEN_RING = 2048,
	GEN_BATCH = 64,
};

struct xg_gen {
	struct xsk_umem *umem;
	struct xsk_socket *xsk;
	struct xsk_ring_prod fill, tx;
	struct xsk_ring_cons comp;
	void *area;
	struct xg_gen_cfg cfg;
	uint32_t len;		/* the template's */
	uint32_t l3, l4;	/* offsets of the IPv4 and L4 headers; 0: none */
	uint8_t l4_proto;
	uint64_t free[GEN_FRAMES];
	uint32_t nfree;
	uint64_t queued, sent;	/* frames put on the TX ring / completed */
	uint64_t rnd;
	int stop;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint32_t next_rnd(struct xg_gen *g)
{
	/* xorshift64*: the generator's own, seeded, so a run can be repeated. */
	g->rnd ^= g->rnd >> 12;
	g->rnd ^= g->rnd << 25;
	g->rnd ^= g->rnd >> 27;
	return (uint32_t)((g->rnd * 0x2545f4914f6cdd1dull) >> 32);
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* RFC 1624: @check after 16-bit word @old became @new (all network order). */
static uint16_t csum_replace(uint16_t check, uint16_t old, uint16_t new)
{
	uint32_t sum = (uint16_t)~check + (uint16_t)~old + new;

	return csum_fold(sum);
}

static void ip_checksum(uint8_t *ip, uint32_t ihl)
{
	uint32_t sum = 0, i;
	uint16_t w;

	ip[10] = ip[11] = 0;
	for (i = 0; i < ihl; i += 2) {
		memcpy(&w, ip + i, 2);
		sum += w;
	}
	w = csum_fold(sum);
	memcpy(ip + 10, &w, 2);
}

/* Rewrite the 16-bit word at @p to @val, keeping the L4 checksum at @check right. */
static void set_word(uint8_t *p, uint16_t val, uint8_t *check)
{
	uint16_t old, c;

	memcpy(&old, p, 2);
	memcpy(p, &val, 2);
	if (!check)
		return;
	memcpy(&c, check, 2);
	c = csum_replace(c, old, val);
	memcpy(check, &c, 2);
}

/* Where the L4 checksum of the template sits; NULL: none to keep right. */
static uint8_t *l4_check(struct xg_gen *g, uint8_t *f)
{
	uint16_t c;

	if (!g->l4)
		return NULL;
	if (g->l4_proto == IPPROTO_TCP && g->l4 + 18 <= g->len)
		return f + g->l4 + 16;
	if (g->l4_proto == IPPROTO_UDP && g->l4 + 8 <= g->len) {
		memcpy(&c, f + g->l4 + 6, 2);
		return c ? f + g->l4 + 6 : NULL; /* 0: no checksum (IPv4) */
	}
	return NULL;
}

/* Frame @addr as the @seq-th frame of the run; its length. */
static uint32_t vary(struct xg_gen *g, uint64_t addr, uint64_t seq)
{
	uint8_t *f = (uint8_t *)g->area + addr;
	uint8_t *ip = f + g->l3, *check;
	uint32_t r, ihl, len = g->len;
	uint16_t w;

	memcpy(f, g->cfg.frame, g->len);
	if (!g->l3)
		return len;
	ihl = (ip[0] & 0xf) * 4;
	if (g->cfg.random_len_min) {
		len = g->cfg.random_len_min + next_rnd(g) % (g->len - g->cfg.random_len_min + 1);
		w = htons((uint16_t)(len - g->l3));
		memcpy(ip + 2, &w, 2);
		w = htons((uint16_t)(len - g->l4));
		memcpy(f + g->l4 + 4, &w, 2);
		memset(f + g->l4 + 6, 0, 2); /* no UDP checksum: set_word() keeps it so */
		ip_checksum(ip, ihl);
	}
	if (g->cfg.mix_fragments && (seq & 1)) {
		/* The smallest later fragment: 8 bytes at offset 1480. */
		w = htons(28);
		memcpy(ip + 2, &w, 2);
		w = htons(1480 / 8);
		memcpy(ip + 6, &w, 2);
		ip_checksum(ip, ihl);
		return len;
	}
	if (!g->cfg.random_saddr && !g->cfg.random_sport && !g->cfg.random_host_bits &&
	    !g->cfg.random_dst_bits)
		return len;
	r = next_rnd(g);
	check = l4_check(g, f);
	if (g->cfg.random_saddr || g->cfg.random_host_bits) {
		/* A host of 198.18.0.0/15 (the lab's spoofed sources), or of the
		 * template's own network. */
		uint32_t saddr, mask = g->cfg.random_host_bits ?
			(1u << g->cfg.random_host_bits) - 1 : 0x1ffff;

		memcpy(&saddr, ip + 12, 4);
		saddr = g->cfg.random_host_bits ? ntohl(saddr) : 0xc6120000u;
		saddr = htonl((saddr & ~mask) | (r & mask));
		set_word(ip + 12, (uint16_t)saddr, check);
		set_word(ip + 14, (uint16_t)(saddr >> 16), check);
		ip_checksum(ip, ihl);
	}
	if (g->cfg.random_sport && g->l4)
		set_word(f + g->l4, htons(1024 + (r >> 17) % 60000), check);
	if (g->cfg.random_dst_bits) {
		uint32_t daddr, mask = (1u << g->cfg.random_dst_bits) - 1;

		memcpy(&daddr, ip + 16, 4);
		daddr = htonl((ntohl(daddr) & ~mask) | (next_rnd(g) & mask));
		set_word(ip + 16, (uint16_t)daddr, check);
		set_word(ip + 18, (uint16_t)(daddr >> 16), check);
		ip_checksum(ip, ihl);
	}
	return len;
}

int xg_gen_create(const char *ifname, uint32_t queue, const struct xg_gen_cfg *cfg,
		  struct xg_gen **out)
{
	struct xsk_umem_config ucfg = {
		.fill_size = GEN_RING,
		.comp_size = GEN_RING,
		.frame_size = GEN_FRAME_SIZE,
	};
	struct xsk_socket_config scfg = {
		.tx_size = GEN_RING,
		.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
		.bind_flags = XDP_COPY,
	};
	size_t size = (size_t)GEN_FRAMES * GEN_FRAME_SIZE;
	const uint8_t *t = cfg->frame;
	struct xg_gen *g;
	uint32_t i;
	int err;

	if (cfg->len < 14 || cfg->len > GEN_FRAME_SIZE || cfg->len > sizeof(cfg->frame))
		return -EINVAL;
	g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->cfg = *cfg;
	g->len = cfg->len;
	g->rnd = cfg->seed ? cfg->seed : 0x9e3779b97f4a7c15ull;
	if (t[12] == 0x08 && t[13] == 0x00 && g->len >= 34 && (t[14] >> 4) == 4) {
		g->l3 = 14;
		g->l4_proto = t[23];
		/* Only a first fragment (or none) has the L4 header. */
		if (!(t[20] & 0x1f) && !t[21])
			g->l4 = 14 + (t[14] & 0xf) * 4;
		if (g->l4 + 4 > g->len)
			g->l4 = 0;
	}
	if (cfg->random_host_bits > 24 || cfg->random_dst_bits > 24) {
		free(g);
		return -EINVAL;
	}
	if (cfg->random_len_min && (!g->l4 || g->l4_proto != IPPROTO_UDP || cfg->mix_fragments ||
				    cfg->random_len_min < g->l4 + 8 || cfg->random_len_min > g->len)) {
		free(g);
		return -EINVAL; /* an IPv4 UDP template, no shorter than its headers */
	}
	if ((cfg->random_saddr || cfg->random_host_bits || cfg->random_dst_bits ||
	     cfg->mix_fragments) && !g->l3) {
		free(g);
		return -EINVAL; /* only an IPv4 template can vary so */
	}
	g->area = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (g->area == MAP_FAILED) {
		free(g);
		return -ENOMEM;
	}
	err = xsk_umem__create(&g->umem, g->area, size, &g->fill, &g->comp, &ucfg);
	if (err)
		goto fail_area;
	err = xsk_socket__create(&g->xsk, ifname, queue, g->umem, NULL, &g->tx, &scfg);
	if (err)
		goto fail_umem;
	for (i = 0; i < GEN_FRAMES; i++)
		g->free[g->nfree++] = (uint64_t)i * GEN_FRAME_SIZE;
	*out = g;
	return 0;

fail_umem:
	xsk_umem__delete(g->umem);
fail_area:
	munmap(g->area, size);
	free(g);
	return err < 0 ? err : -err;
}

static void reap(struct xg_gen *g)
{
	uint32_t i, n, idx;

	n = xsk_ring_cons__peek(&g->comp, GEN_RING, &idx);
	for (i = 0; i < n; i++)
		g->free[g->nfree++] = *xsk_ring_cons__comp_addr(&g->comp, idx + i);
	if (n) {
		xsk_ring_cons__release(&g->comp, n);
		__atomic_store_n(&g->sent, g->sent + n, __ATOMIC_RELAXED);
	}
}

/* Copy mode sends only from sendto(), a bounded number of frames per call. */
static int kick(struct xg_gen *g)
{
	if (sendto(xsk_socket__fd(g->xsk), NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0)
		return 0;
	switch (errno) {
	case EAGAIN:
	case EBUSY:
	case ENOBUFS:
		return 0;
	default:
		return -errno;
	}
}

int xg_gen_send(struct xg_gen *g, uint64_t count, uint64_t pps, uint32_t max_ms)
{
	uint64_t start = now_ns(), deadline = start + (uint64_t)max_ms * 1000000ull;
	uint64_t base = g->queued, done = 0, due, n, i, t, last;
	struct timespec nap;
	uint32_t idx;
	int err;

	while (done < count && !__atomic_load_n(&g->stop, __ATOMIC_RELAXED)) {
		reap(g);
		t = now_ns();
		if (max_ms && t > deadline)
			break;
		n = count - done;
		if (pps) {
			due = (t - start) * pps / 1000000000ull + 1;
			if (due <= done) {
				/* Ahead of the rate: wait for the next frame's time. */
				nap.tv_sec = 0;
				nap.tv_nsec = 1000000000ull / pps;
				if (nap.tv_nsec > 1000000)
					nap.tv_nsec = 1000000;
				err = g->sent < g->queued ? kick(g) : 0;
				if (err)
					return err;
				nanosleep(&nap, NULL);
				continue;
			}
			if (n > due - done)
				n = due - done;
		}
		if (n > GEN_BATCH)
			n = GEN_BATCH;
		if (n > g->nfree)
			n = g->nfree;
		if (n)
			n = xsk_ring_prod__reserve(&g->tx, n, &idx);
		for (i = 0; i < n; i++) {
			struct xdp_desc *d = xsk_ring_prod__tx_desc(&g->tx, idx + i);

			d->addr = g->free[--g->nfree];
			d->options = 0;
			d->len = vary(g, d->addr, base + done + i);
		}
		if (n) {
			xsk_ring_prod__submit(&g->tx, n);
			done += n;
			g->queued += n;
		}
		err = kick(g);
		if (err)
			return err;
	}
	/* What is on the ring goes out: wait while the kernel makes progress. */
	last = now_ns();
	while (g->sent < g->queued) {
		i = g->sent;
		reap(g);
		t = now_ns();
		if (g->sent != i)
			last = t;
		else if (t - last > 1000000000ull)
			return -ETIMEDOUT;
		err = kick(g);
		if (err)
			return err;
	}
	return 0;
}

uint64_t xg_gen_sent(const struct xg_gen *g)
{
	return __atomic_load_n(&g->sent, __ATOMIC_RELAXED);
}

void xg_gen_stop(struct xg_gen *g)
{
	__atomic_store_n(&g->stop, 1, __ATOMIC_RELAXED);
}

void xg_gen_close(struct xg_gen *g)
{
	if (!g)
		return;
	xsk_socket__delete(g->xsk);
	xsk_umem__delete(g->umem);
	munmap(g->area, (size_t)GEN_FRAMES * GEN_FRAME_SIZE);
	free(g);
}
