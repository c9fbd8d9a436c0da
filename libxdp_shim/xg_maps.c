// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Policy maps: fresh LPM tries for atomic list replacement, and bulk
 * updates that use the kernel's batch operations where it has them.
 */
#include <errno.h>
#include <bpf/bpf.h>

#include "xg_shim.h"

int xg_lpm_create(int v6)
{
	LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);

	/* Must match xg_lpm_v4_map / xg_lpm_v6_map in xdpguard.bpf.c. */
	return bpf_map_create(BPF_MAP_TYPE_LPM_TRIE, v6 ? "xg_lpm_v6" : "xg_lpm_v4",
			      v6 ? sizeof(struct xg_lpm_v6) : sizeof(struct xg_lpm_v4),
			      sizeof(__u32), v6 ? XG_LPM_V6_MAX : XG_LPM_V4_MAX, &opts);
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
