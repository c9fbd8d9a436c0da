// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Policy maps: fresh LPM tries for atomic list replacement, and bulk
 * updates that use the kernel's batch operations where it has them; the
 * shape of a map, and its whole content, for the maps Python keeps.
 */
#include <unistd.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "xg_shim.h"
#include "xg_rule_hash.h"

uint64_t xg_rule_hash_of(uint64_t hi, uint64_t lo, uint32_t plen, uint32_t v6, uint64_t salt)
{
	return xg_rule_hash(hi, lo, plen, v6, salt);
}

int xg_lpm_create(int v6)
{
	LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);

	/* Must match xg_lpm_v4_map / xg_lpm_v6_map in xdpguard.bpf.c. */
	return bpf_map_create(BPF_MAP_TYPE_LPM_TRIE, v6 ? "xg_lpm_v6" : "xg_lpm_v4",
			      v6 ? sizeof(struct xg_lpm_v6) : sizeof(struct xg_lpm_v4),
			      sizeof(__u32), v6 ? XG_LPM_V6_MAX : XG_LPM_V4_MAX, &opts);
}

int xg_map_probe(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries,
		 uint32_t flags, uint64_t map_extra, int inner_fd)
{
	LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = flags, .map_extra = map_extra);
	int fd;

	if (inner_fd >= 0)
		opts.inner_map_fd = inner_fd;
	fd = bpf_map_create(type, "xg_probe", key_size, value_size, max_entries, &opts);
	if (fd < 0)
		return fd;
	close(fd);
	return 0;
}

int xg_rule_filter_create(const struct xg_rule_filter *filter)
{
	__u32 zero = 0;
	int fd, err;

	/* Must match xg_rule_filter_map in bpf/xg_rules.h. */
	fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, "xg_rule_filter", sizeof(__u32),
			    sizeof(*filter), 1, NULL);
	if (fd < 0)
		return fd;
	err = bpf_map_update_elem(fd, &zero, filter, 0);
	if (err) {
		close(fd);
		return err;
	}
	return fd;
}

static int batch_refused(int err)
{
	/* Map types without batch ops answer -ENOTSUPP (524) or -EINVAL. */
	return err == -EINVAL || err == -524 || err == -EOPNOTSUPP;
}

static int map_sizes(int fd, uint32_t *key_size, uint32_t *value_size)
{
	struct bpf_map_info info = {};
	uint32_t len = sizeof(info);
	int err;

	err = bpf_obj_get_info_by_fd(fd, &info, &len);
	if (err)
		return err;
	*key_size = info.key_size;
	*value_size = info.value_size;
	return 0;
}

int xg_map_update_many(int fd, const void *keys, const void *values,
		       uint32_t count, uint32_t *done)
{
	LIBBPF_OPTS(bpf_map_batch_opts, opts);
	uint32_t n = count, ks, vs, i;
	int err;

	*done = 0;
	if (!count)
		return 0;
	err = bpf_map_update_batch(fd, keys, values, &n, &opts);
	if (!err || !batch_refused(err) || n) {
		*done = n;
		return err;
	}
	err = map_sizes(fd, &ks, &vs);
	if (err)
		return err;
	for (i = 0; i < count; i++) {
		err = bpf_map_update_elem(fd, (const char *)keys + (size_t)i * ks,
					  (const char *)values + (size_t)i * vs, BPF_ANY);
		if (err)
			return err;
		*done = i + 1;
	}
	return 0;
}

int xg_map_delete_many(int fd, const void *keys, uint32_t count, uint32_t *done)
{
	LIBBPF_OPTS(bpf_map_batch_opts, opts);
	uint32_t n = count, ks, vs, i;
	int err;

	*done = 0;
	if (!count)
		return 0;
	err = bpf_map_delete_batch(fd, keys, &n, &opts);
	if (!err || !batch_refused(err) || n) {
		*done = n;
		return err;
	}
	err = map_sizes(fd, &ks, &vs);
	if (err)
		return err;
	for (i = 0; i < count; i++) {
		err = bpf_map_delete_elem(fd, (const char *)keys + (size_t)i * ks);
		if (err)
			return err;
		*done = i + 1;
	}
	return 0;
}

int xg_map_shape(int fd, struct xg_map_shape *out)
{
	struct bpf_map_info info = {};
	uint32_t len = sizeof(info);

	if (bpf_obj_get_info_by_fd(fd, &info, &len))
		return -errno;
	out->type = info.type;
	out->key_size = info.key_size;
	out->value_size = info.value_size;
	out->max_entries = info.max_entries;
	out->flags = info.map_flags;
	out->value_stride = info.value_size;
	switch (info.type) {
	case BPF_MAP_TYPE_PERCPU_HASH:
	case BPF_MAP_TYPE_PERCPU_ARRAY:
	case BPF_MAP_TYPE_LRU_PERCPU_HASH:
	case BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE: {
		int ncpus = libbpf_num_possible_cpus();

		if (ncpus < 0)
			return ncpus;
		out->value_stride = ((info.value_size + 7) & ~7U) * (uint32_t)ncpus;
	}
	}
	return 0;
}

int xg_map_dump(int fd, void *keys, void *values, uint32_t max, uint32_t *count)
{
	LIBBPF_OPTS(bpf_map_batch_opts, opts);
	struct xg_map_shape shape;
	uint32_t n, batch, i = 0;
	uint64_t cursor = 0;
	void *in = NULL;
	char *k = keys, *v = values;
	int err;

	*count = 0;
	err = xg_map_shape(fd, &shape);
	if (err)
		return err;
	/* Batches, while the kernel has them for this map type. */
	for (;;) {
		n = max - *count;
		if (!n)
			return 0;
		batch = n;
		err = bpf_map_lookup_batch(fd, in, &cursor, k + (size_t)*count * shape.key_size,
					   v + (size_t)*count * shape.value_stride, &batch, &opts);
		if (err && err != -ENOENT) {
			if (batch_refused(err) && !*count && !in)
				break;
			return err;
		}
		*count += batch;
		if (err == -ENOENT)
			return 0;
		in = &cursor;
	}
	/* One by one. A key deleted meanwhile ends the walk early. */
	for (i = 0; i < max; i++) {
		char *key = k + (size_t)i * shape.key_size;

		if (bpf_map_get_next_key(fd, i ? key - shape.key_size : NULL, key))
			return errno == ENOENT ? 0 : -errno;
		if (bpf_map_lookup_elem(fd, key, v + (size_t)i * shape.value_stride))
			return errno == ENOENT ? 0 : -errno;
		*count = i + 1;
	}
	return 0;
}

/*
 * xg_dests (an LRU of per-CPU struct xg_dest_counts) whole, each entry's
 * counts summed over the CPUs, by the kernel's batch lookups (a hash
 * changes while it is read: an entry may be missed or seen twice, never
 * torn).
 */
int xg_dests_read(int fd, struct xg_addr *keys, struct xg_dest_counts *sums, uint32_t max,
		  uint32_t *n)
{
	LIBBPF_OPTS(bpf_map_batch_opts, opts);
	int ncpus = libbpf_num_possible_cpus(), err = 0;
	uint32_t got = 0, count, batch = 1024, i, c, j, token = 0;
	struct xg_dest_counts *vals;
	int first = 1;

	*n = 0;
	if (ncpus <= 0)
		return ncpus < 0 ? ncpus : -EINVAL;
	vals = calloc((size_t)batch * ncpus, sizeof(*vals));
	if (!vals)
		return -ENOMEM;
	while (got < max) {
		count = max - got < batch ? max - got : batch;
		err = bpf_map_lookup_batch(fd, first ? NULL : &token, &token, keys + got, vals,
					   &count, &opts);
		if (err && errno != ENOENT) {
			err = -errno;
			break;
		}
		for (i = 0; i < count; i++) {
			struct xg_dest_counts *s = &sums[got + i];

			memset(s, 0, sizeof(*s));
			for (c = 0; c < (uint32_t)ncpus; c++) {
				struct xg_dest_counts *v = &vals[(size_t)i * ncpus + c];

				for (j = 0; j < XG_NR_CLASSES; j++) {
					s->packets[j] += v->packets[j];
					s->bytes[j] += v->bytes[j];
				}
				s->new_dests += v->new_dests;
			}
		}
		got += count;
		first = 0;
		if (err) { /* ENOENT: that was the last batch */
			err = 0;
			break;
		}
	}
	free(vals);
	*n = got;
	return err;
}
