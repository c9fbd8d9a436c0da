// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Network namespaces, the shared UMEM and its AF_XDP sockets.
 *
 * Sockets come from libxdp's shared-socket API with program loading
 * inhibited: xdpguard's own program and its xg_xsks map do the redirecting.
 * Each (device, queue) gets its own fill and completion ring, which the
 * kernel requires for a UMEM shared across devices or queues.
 *
 * Sockets are registered under (netns cookie, ifindex, queue). An ifindex
 * only names a device inside one namespace, and the appliance's two devices
 * may well carry the same one (the lab's INDEX=4242 case); the cookie is the
 * only per-boot unique name of a namespace.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <linux/ethtool.h>
#include <linux/if_xdp.h>
#include <linux/sockios.h>

#include "xg_internal.h"

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif
#ifndef SOL_XDP
#define SOL_XDP 283
#endif

int xg_netns_enter(int nsfd)
{
	return setns(nsfd, CLONE_NEWNET) ? -errno : 0;
}

int xg_netns_new(void)
{
	int fd;

	if (unshare(CLONE_NEWNET))
		return -errno;
	fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

static int sock_netns_cookie(int fd, uint64_t *cookie)
{
	socklen_t len = sizeof(*cookie);

	return getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, cookie, &len) ?
		       -errno : 0;
}

int xg_netns_cookie(uint64_t *cookie)
{
	int fd, err;

	/* Any socket lives in the namespace of the thread that made it. */
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	err = sock_netns_cookie(fd, cookie);
	close(fd);
	return err;
}

int xg_dev_queues(const char *ifname, uint32_t *rx, uint32_t *tx)
{
	struct ethtool_channels ch = { .cmd = ETHTOOL_GCHANNELS };
	struct ifreq ifr = { 0 };
	int fd, err = 0;

	if (strlen(ifname) >= IF_NAMESIZE)
		return -EINVAL;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	strcpy(ifr.ifr_name, ifname);
	ifr.ifr_data = (void *)&ch;
	if (ioctl(fd, SIOCETHTOOL, &ifr))
		err = -errno;
	close(fd);
	if (err)
		return err;
	*rx = ch.rx_count + ch.combined_count;
	*tx = ch.tx_count + ch.combined_count;
	return 0;
}

static int ethtool(int fd, const char *ifname, void *cmd)
{
	struct ifreq ifr = { 0 };

	strcpy(ifr.ifr_name, ifname);
	ifr.ifr_data = cmd;
	return ioctl(fd, SIOCETHTOOL, &ifr) ? -errno : 0;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && !strcmp(s + n - m, suffix);
}

int xg_dev_xdp_xmit(const char *ifname, uint64_t *sent, uint64_t *errors)
{
	struct ethtool_sset_info *info = NULL;
	struct ethtool_gstrings *names = NULL;
	struct ethtool_stats *stats = NULL;
	uint32_t n, i, found = 0;
	int fd, err;

	if (strlen(ifname) >= IF_NAMESIZE)
		return -EINVAL;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	info = calloc(1, sizeof(*info) + sizeof(uint32_t));
	err = info ? 0 : -ENOMEM;
	if (!err) {
		info->cmd = ETHTOOL_GSSET_INFO;
		info->sset_mask = 1ULL << ETH_SS_STATS;
		err = ethtool(fd, ifname, info);
	}
	if (err)
		goto out;
	n = info->sset_mask ? info->data[0] : 0;
	names = calloc(1, sizeof(*names) + (size_t)n * ETH_GSTRING_LEN);
	stats = calloc(1, sizeof(*stats) + (size_t)n * sizeof(uint64_t));
	if (!names || !stats) {
		err = -ENOMEM;
		goto out;
	}
	names->cmd = ETHTOOL_GSTRINGS;
	names->string_set = ETH_SS_STATS;
	names->len = n;
	stats->cmd = ETHTOOL_GSTATS;
	stats->n_stats = n;
	err = ethtool(fd, ifname, names);
	if (!err)
		err = ethtool(fd, ifname, stats);
	if (err)
		goto out;
	*sent = *errors = 0;
	for (i = 0; i < n; i++) {
		char name[ETH_GSTRING_LEN + 1] = { 0 };

		memcpy(name, names->data + (size_t)i * ETH_GSTRING_LEN, ETH_GSTRING_LEN);
		if (strncmp(name, "tx_queue_", 9))
			continue;
		if (ends_with(name, "_xdp_xmit")) {
			*sent += stats->data[i];
			found = 1;
		} else if (ends_with(name, "_xdp_xmit_errors")) {
			*errors += stats->data[i];
		}
	}
	err = found ? 0 : -ENOENT;
out:
	free(info);
	free(names);
	free(stats);
	close(fd);
	return err;
}

static int is_pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

int xg_umem_create(uint32_t nframes, uint32_t frame_size, uint32_t ring_size,
		   struct xg_umem **out)
{
	struct xg_umem *u;

	if (!nframes || (frame_size != 2048 && frame_size != 4096) || !is_pow2(ring_size))
		return -EINVAL;
	u = calloc(1, sizeof(*u));
	if (!u)
		return -ENOMEM;
	u->nframes = nframes;
	u->frame_size = frame_size;
	u->ring_size = ring_size;
	u->size = (size_t)nframes * frame_size;
	pthread_mutex_init(&u->lock, NULL);

	u->area = mmap(NULL, u->size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (u->area == MAP_FAILED) {
		pthread_mutex_destroy(&u->lock);
		free(u);
		return -ENOMEM;
	}
	*out = u;
	return 0;
}

/*
 * Register the UMEM with the kernel. libxdp registers it on a socket of its
 * own and then binds that very socket as the first XSK; a socket belongs to
 * the namespace of the thread that made it, so this must run in the thread
 * (and namespace) of the first xg_sock_create(), never in the thread that
 * allocated the memory. Caller holds umem->lock.
 */
static int umem_register_locked(struct xg_umem *u)
{
	struct xsk_umem_config cfg = {
		.fill_size = u->ring_size,
		.comp_size = u->ring_size,
		.frame_size = u->frame_size,
		.frame_headroom = 0,
		.flags = 0,
	};

	if (u->xsk_umem)
		return 0;
	return xsk_umem__create(&u->xsk_umem, u->area, u->size, &u->fill0,
				&u->comp0, &cfg);
}

int xg_umem_destroy(struct xg_umem *umem)
{
	int err;

	if (!umem)
		return 0;
	if (umem->socks)
		return -EBUSY;
	if (umem->xsk_umem) {
		err = xsk_umem__delete(umem->xsk_umem);
		if (err)
			return err;
	}
	munmap(umem->area, umem->size);
	pthread_mutex_destroy(&umem->lock);
	free(umem);
	return 0;
}

uint32_t xg_umem_nframes(const struct xg_umem *umem)
{
	return umem->nframes;
}

uint32_t xg_umem_frame_size(const struct xg_umem *umem)
{
	return umem->frame_size;
}

/* Caller holds umem->lock. */
static struct xg_sock *find_locked(const struct xg_umem *umem, uint64_t cookie,
				   int ifindex, uint32_t queue)
{
	struct xg_sock *s;

	for (s = umem->socks; s; s = s->next)
		if (s->netns_cookie == cookie && s->ifindex == ifindex &&
		    s->queue == queue)
			return s;
	return NULL;
}

struct xg_sock *xg_sock_find(const struct xg_umem *umem, uint64_t netns_cookie,
			     int ifindex, uint32_t queue)
{
	struct xg_sock *s;

	pthread_mutex_lock((pthread_mutex_t *)&umem->lock);
	s = find_locked(umem, netns_cookie, ifindex, queue);
	pthread_mutex_unlock((pthread_mutex_t *)&umem->lock);
	return s;
}

int xg_sock_create(struct xg_umem *umem, const char *ifname, uint32_t queue,
		   uint32_t ring_size, uint32_t bind_flags, uint32_t role,
		   struct xg_sock **out)
{
	struct xsk_socket_config cfg = {
		.rx_size = ring_size,
		.tx_size = ring_size,
		.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
		.bind_flags = bind_flags,
	};
	struct xdp_options opts;
	socklen_t optlen = sizeof(opts);
	struct xg_sock *s;
	uint64_t cookie;
	int ifindex, err;

	if (!is_pow2(ring_size) || strlen(ifname) >= IF_NAMESIZE)
		return -EINVAL;
	ifindex = if_nametoindex(ifname);
	if (!ifindex)
		return -ENODEV;
	err = xg_netns_cookie(&cookie);
	if (err)
		return err;

	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->umem = umem;
	s->ifindex = ifindex;
	s->queue = queue;
	s->role = role;
	strcpy(s->ifname, ifname);

	pthread_mutex_lock(&umem->lock);
	if (find_locked(umem, cookie, ifindex, queue)) {
		err = -EEXIST;
		goto fail;
	}
	err = umem_register_locked(umem);
	if (err)
		goto fail;
	if (!umem->socks)
		umem->need_wakeup = !!(bind_flags & XDP_USE_NEED_WAKEUP);
	err = xsk_socket__create_shared(&s->xsk, ifname, queue, umem->xsk_umem,
					&s->rx, &s->tx, &s->fill, &s->comp,
					&cfg);
	if (err)
		goto fail;
	s->fd = xsk_socket__fd(s->xsk);
	/*
	 * The socket's own namespace is the registry key, and it must be the
	 * one the ifindex was resolved in: a socket from another namespace
	 * would have bound whatever device has that ifindex over there.
	 */
	err = sock_netns_cookie(s->fd, &s->netns_cookie);
	if (err)
		goto fail_xsk;
	if (s->netns_cookie != cookie) {
		err = -EXDEV;
		goto fail_xsk;
	}
	if (!getsockopt(s->fd, SOL_XDP, XDP_OPTIONS, &opts, &optlen))
		s->zerocopy = !!(opts.flags & XDP_OPTIONS_ZEROCOPY);
	s->next = umem->socks;
	umem->socks = s;
	pthread_mutex_unlock(&umem->lock);
	*out = s;
	return 0;

fail_xsk:
	xsk_socket__delete(s->xsk);
fail:
	pthread_mutex_unlock(&umem->lock);
	free(s);
	return err;
}

void xg_sock_info(const struct xg_sock *sock, struct xg_sock_info *info)
{
	memset(info, 0, sizeof(*info));
	info->netns_cookie = sock->netns_cookie;
	info->ifindex = sock->ifindex;
	info->queue = sock->queue;
	info->role = sock->role;
	info->zerocopy = sock->zerocopy;
	info->need_wakeup = sock->umem->need_wakeup;
	info->fd = sock->fd;
	memcpy(info->ifname, sock->ifname, sizeof(info->ifname));
}

int xg_sock_stats(const struct xg_sock *sock, struct xg_xsk_stats *stats)
{
	struct xdp_statistics st;
	socklen_t len = sizeof(st);

	memset(&st, 0, sizeof(st));
	if (getsockopt(sock->fd, SOL_XDP, XDP_STATISTICS, &st, &len))
		return -errno;
	stats->rx_dropped = st.rx_dropped;
	stats->rx_invalid_descs = st.rx_invalid_descs;
	stats->tx_invalid_descs = st.tx_invalid_descs;
	stats->rx_ring_full = st.rx_ring_full;
	stats->rx_fill_ring_empty_descs = st.rx_fill_ring_empty_descs;
	stats->tx_ring_empty_descs = st.tx_ring_empty_descs;
	return 0;
}

void xg_sock_destroy(struct xg_sock *sock)
{
	struct xg_umem *umem;
	struct xg_sock **pp;

	if (!sock)
		return;
	umem = sock->umem;
	pthread_mutex_lock(&umem->lock);
	for (pp = &umem->socks; *pp; pp = &(*pp)->next) {
		if (*pp == sock) {
			*pp = sock->next;
			break;
		}
	}
	xsk_socket__delete(sock->xsk);
	pthread_mutex_unlock(&umem->lock);
	free(sock);
}
