// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The flow table's maps: xg_flows, an mmapable array of buckets that the
 * XDP programs and the loop share with no syscall per packet, and
 * xg_flowinfo, its SipHash key and size. Both can be pinned, so a table
 * outlives the process that made it: a restart, even after SIGKILL,
 * finds every flow where it was.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <bpf/bpf.h>

#include "xg_shim.h"
#include "xg_flow.h"

struct xg_flowtab {
	int fd[2];		/* enum: 0 = xg_flows, 1 = xg_flowinfo */
	void *mem;
	size_t size;
	struct xg_flow_table info;
};

static const char *const names[2] = { "xg_flows", "xg_flowinfo" };

static int map_info(int fd, struct bpf_map_info *info)
{
	uint32_t len = sizeof(*info);

	memset(info, 0, sizeof(*info));
	return bpf_obj_get_info_by_fd(fd, info, &len) ? -errno : 0;
}

/* The maps of @t are the shape xg_flows/xg_flowinfo have in the object. */
static int check_shape(struct xg_flowtab *t, uint32_t nbuckets)
{
	struct bpf_map_info a, b;
	uint32_t zero = 0;
	int err;

	err = map_info(t->fd[0], &a);
	if (!err)
		err = map_info(t->fd[1], &b);
	if (err)
		return err;
	if (a.type != BPF_MAP_TYPE_ARRAY || a.key_size != 4 ||
	    a.value_size != sizeof(struct xg_flow_bucket) || a.max_entries != nbuckets ||
	    !(a.map_flags & BPF_F_MMAPABLE) || b.type != BPF_MAP_TYPE_ARRAY ||
	    b.key_size != 4 || b.value_size != sizeof(struct xg_flow_table) || b.max_entries != 1)
		return -ESTALE;
	if (bpf_map_lookup_elem(t->fd[1], &zero, &t->info))
		return -errno;
	if (t->info.magic != XG_FLOW_TABLE_MAGIC || t->info.nbuckets != nbuckets)
		return -ESTALE;
	return 0;
}

static int map_memory(struct xg_flowtab *t, uint32_t nbuckets)
{
	long page = sysconf(_SC_PAGESIZE);

	t->size = ((size_t)nbuckets * sizeof(struct xg_flow_bucket) + page - 1) & ~(size_t)(page - 1);
	t->mem = mmap(NULL, t->size, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd[0], 0);
	if (t->mem == MAP_FAILED) {
		t->mem = NULL;
		return -errno;
	}
	return 0;
}

static struct xg_flowtab *flowtab_new(void)
{
	struct xg_flowtab *t = calloc(1, sizeof(*t));

	if (t)
		t->fd[0] = t->fd[1] = -1;
	return t;
}

int xg_flowtab_create(uint32_t nbuckets, struct xg_flowtab **out)
{
	LIBBPF_OPTS(bpf_map_create_opts, mmapable, .map_flags = BPF_F_MMAPABLE);
	struct xg_flowtab *t;
	uint32_t zero = 0;
	int err;

	if (!nbuckets || nbuckets & (nbuckets - 1))
		return -EINVAL;
	t = flowtab_new();
	if (!t)
		return -ENOMEM;
	t->fd[0] = bpf_map_create(BPF_MAP_TYPE_ARRAY, names[0], 4,
				  sizeof(struct xg_flow_bucket), nbuckets, &mmapable);
	t->fd[1] = bpf_map_create(BPF_MAP_TYPE_ARRAY, names[1], 4,
				  sizeof(struct xg_flow_table), 1, NULL);
	if (t->fd[0] < 0 || t->fd[1] < 0) {
		err = t->fd[0] < 0 ? t->fd[0] : t->fd[1];
		goto fail;
	}
	err = map_memory(t, nbuckets);
	if (err)
		goto fail;
	if (getrandom(t->info.key, sizeof(t->info.key), 0) != sizeof(t->info.key)) {
		err = -EIO;
		goto fail;
	}
	t->info.nbuckets = nbuckets;
	t->info.magic = XG_FLOW_TABLE_MAGIC;
	if (bpf_map_update_elem(t->fd[1], &zero, &t->info, 0)) {
		err = -errno;
		goto fail;
	}
	*out = t;
	return 0;
fail:
	xg_flowtab_close(t);
	return err;
}

/* Open the maps pinned in @dir into @t's fds. */
static int open_pins(struct xg_flowtab *t, const char *dir)
{
	char path[4096];
	int i;

	for (i = 0; i < 2; i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		t->fd[i] = bpf_obj_get(path);
		if (t->fd[i] < 0)
			return -errno;
	}
	return 0;
}

int xg_flowtab_open(const char *dir, uint32_t nbuckets, struct xg_flowtab **out)
{
	struct xg_flowtab *t;
	int err;

	t = flowtab_new();
	if (!t)
		return -ENOMEM;
	err = open_pins(t, dir);
	if (!err)
		err = check_shape(t, nbuckets);
	if (!err)
		err = map_memory(t, nbuckets);
	if (err)
		goto fail;
	*out = t;
	return 0;
fail:
	xg_flowtab_close(t);
	return err;
}

/* Put a copy of @f in a free slot of its bucket of @to; 0 if the bucket is full. */
static int place(struct xg_flowtab *to, const struct xg_flow *f, uint32_t now)
{
	struct xg_flow_bucket *b = (struct xg_flow_bucket *)to->mem +
				   (xg_flow_hash(&f->key, to->info.key) & (to->info.nbuckets - 1));
	int i;

	for (i = 0; i < XG_FLOW_WAYS; i++) {
		if (!xg_flow_live(&b->slot[i], now)) {
			b->slot[i] = *f;
			return 1;
		}
	}
	return 0;
}

int xg_flowtab_migrate(const char *dir, struct xg_flowtab *to, uint64_t *moved,
		       uint64_t *left)
{
	struct xg_flowtab *old;
	struct xg_flow_bucket *b;
	struct bpf_map_info a, i;
	uint32_t nb, k, now = xg_tcp_now();
	int s, pass, err;

	*moved = *left = 0;
	old = flowtab_new();
	if (!old)
		return -ENOMEM;
	err = open_pins(old, dir);
	if (!err)
		err = map_info(old->fd[0], &a);
	if (!err)
		err = map_info(old->fd[1], &i);
	if (err)
		goto out;
	k = 0;
	err = -ESTALE;
	if (a.type != BPF_MAP_TYPE_ARRAY || a.value_size != sizeof(struct xg_flow_bucket) ||
	    !(a.map_flags & BPF_F_MMAPABLE) || i.type != BPF_MAP_TYPE_ARRAY ||
	    i.value_size != sizeof(struct xg_flow_table) ||
	    bpf_map_lookup_elem(old->fd[1], &k, &old->info) ||
	    old->info.magic != XG_FLOW_TABLE_MAGIC || old->info.nbuckets != a.max_entries ||
	    !a.max_entries || a.max_entries & (a.max_entries - 1))
		goto out;
	err = map_memory(old, a.max_entries);
	if (err)
		goto out;
	/* Established flows first: in a smaller table they are the ones to keep. */
	for (pass = 0; pass < 2; pass++) {
		for (nb = 0; nb < old->info.nbuckets; nb++) {
			b = (struct xg_flow_bucket *)old->mem + nb;
			for (s = 0; s < XG_FLOW_WAYS; s++) {
				const struct xg_flow *f = &b->slot[s];

				if (!xg_flow_live(f, now) ||
				    (f->state == XG_TCP_ESTABLISHED) != (pass == 0))
					continue;
				if (place(to, f, now))
					(*moved)++;
				else
					(*left)++;
			}
		}
	}
	err = 0;
out:
	xg_flowtab_close(old);
	return err;
}

int xg_flowtab_pin(struct xg_flowtab *t, const char *dir)
{
	char path[4096];
	int i;

	for (i = 0; i < 2; i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
		if (bpf_obj_pin(t->fd[i], path))
			return -errno;
	}
	return 0;
}

int xg_flowtab_fd(const struct xg_flowtab *t, int which)
{
	return which == 0 || which == 1 ? t->fd[which] : -EINVAL;
}

struct xg_flow_bucket *xg_flowtab_buckets(const struct xg_flowtab *t)
{
	return t->mem;
}

const struct xg_flow_table *xg_flowtab_info(const struct xg_flowtab *t)
{
	return &t->info;
}

void xg_flowtab_close(struct xg_flowtab *t)
{
	int i;

	if (!t)
		return;
	if (t->mem)
		munmap(t->mem, t->size);
	for (i = 0; i < 2; i++)
		if (t->fd[i] >= 0)
			close(t->fd[i]);
	free(t);
}

uint64_t xg_siphash_words(const uint64_t *words, uint32_t n, const uint8_t *key, uint32_t c,
			  uint32_t d)
{
	return xg_siphash((const __u64 *)words, (int)n, key, (int)c, (int)d);
}
