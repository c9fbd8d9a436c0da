// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Loading, attaching and test-running the XDP program.
 *
 * Attachment is a BPF link rather than a netlink "set": the kernel releases
 * a link when its last fd closes, so a killed daemon never leaves a program
 * that redirects into sockets that no longer exist, and a netlink-attached
 * program of someone else makes link creation fail with -EBUSY instead of
 * being replaced.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/if_link.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "xg_shim.h"

struct xg_prog {
	struct bpf_object *obj;
	struct bpf_program *prog;
	int link_fd;
	int loaded;
};

int xg_prog_open(const char *path, const char *prog_name, struct xg_prog **out)
{
	struct bpf_program *other;
	struct xg_prog *p;
	int err;

	if (access(path, R_OK))
		return -errno;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->link_fd = -1;
	p->obj = bpf_object__open_file(path, NULL);
	if (!p->obj) {
		err = -errno;
		free(p);
		return err;
	}
	p->prog = bpf_object__find_program_by_name(p->obj, prog_name);
	if (!p->prog) {
		bpf_object__close(p->obj);
		free(p);
		return -ENOENT;
	}
	bpf_object__for_each_program(other, p->obj)
		bpf_program__set_autoload(other, other == p->prog);
	*out = p;
	return 0;
}

/*
 * libbpf's messages, kept for xg_libbpf_log(): the end of what was said,
 * in a ring of bytes. The verifier's log of a failed load is long; its
 * end says why.
 */
static struct {
	pthread_mutex_t lock;
	char buf[65536];
	size_t len;	/* bytes held, at most sizeof(buf) */
	size_t head;	/* where the next byte goes */
	int on;
} xg_log = { .lock = PTHREAD_MUTEX_INITIALIZER };

static int keep_libbpf_log(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[4096];
	int n, i;

	if (level == LIBBPF_DEBUG)
		return 0;
	n = vsnprintf(line, sizeof(line), fmt, ap);
	if (n < 0)
		return n;
	if (n >= (int)sizeof(line))
		n = sizeof(line) - 1;
	pthread_mutex_lock(&xg_log.lock);
	for (i = 0; i < n; i++) {
		xg_log.buf[xg_log.head] = line[i];
		xg_log.head = (xg_log.head + 1) % sizeof(xg_log.buf);
	}
	xg_log.len += n;
	if (xg_log.len > sizeof(xg_log.buf))
		xg_log.len = sizeof(xg_log.buf);
	pthread_mutex_unlock(&xg_log.lock);
	return n;
}

size_t xg_libbpf_log(char *buf, size_t size)
{
	size_t n, start, i;

	pthread_mutex_lock(&xg_log.lock);
	if (!xg_log.on) {
		libbpf_set_print(keep_libbpf_log);
		xg_log.on = 1;
	}
	n = xg_log.len < size - 1 ? xg_log.len : size - 1;
	start = (xg_log.head + sizeof(xg_log.buf) - n) % sizeof(xg_log.buf);
	for (i = 0; i < n; i++)
		buf[i] = xg_log.buf[(start + i) % sizeof(xg_log.buf)];
	buf[n] = 0;
	xg_log.len = 0;
	pthread_mutex_unlock(&xg_log.lock);
	return n;
}

/*
 * Where the .rodata variable @var sits in the object's initial .rodata
 * image: *@init (libbpf's copy) and *@len its size. Returns the variable's
 * offset, -ENOENT or -EINVAL (its size is not @size).
 */
static int rodata_var(struct xg_prog *prog, const char *var, size_t size,
		      const void **init, size_t *len)
{
	const struct btf_var_secinfo *vsi;
	const struct btf_type *sec, *v;
	struct bpf_map *rodata;
	struct btf *btf;
	int id, i;

	btf = bpf_object__btf(prog->obj);
	rodata = bpf_object__find_map_by_name(prog->obj, ".rodata");
	if (!btf || !rodata)
		return -ENOENT;
	id = btf__find_by_name_kind(btf, ".rodata", BTF_KIND_DATASEC);
	if (id < 0)
		return -ENOENT;
	sec = btf__type_by_id(btf, id);
	*init = bpf_map__initial_value(rodata, len);
	if (!*init)
		return -ENOENT;

	vsi = btf_var_secinfos(sec);
	for (i = 0; i < btf_vlen(sec); i++, vsi++) {
		v = btf__type_by_id(btf, vsi->type);
		if (strcmp(btf__name_by_offset(btf, v->name_off), var))
			continue;
		if (vsi->size != size || vsi->offset + vsi->size > *len)
			return -EINVAL;
		return (int)vsi->offset;
	}
	return -ENOENT;
}

int xg_prog_set_rodata(struct xg_prog *prog, const char *var, const void *value,
		       size_t size)
{
	struct bpf_map *rodata;
	const void *init;
	size_t len;
	char *data;
	int off, err;

	if (prog->loaded)
		return -EBUSY;
	off = rodata_var(prog, var, size, &init, &len);
	if (off < 0)
		return off;
	rodata = bpf_object__find_map_by_name(prog->obj, ".rodata");
	data = malloc(len);
	if (!data)
		return -ENOMEM;
	memcpy(data, init, len);
	memcpy(data + off, value, size);
	err = bpf_map__set_initial_value(rodata, data, len);
	free(data);
	return err;
}

int xg_prog_get_rodata(struct xg_prog *prog, const char *var, void *value, size_t size)
{
	const void *init;
	size_t len;
	int off;

	off = rodata_var(prog, var, size, &init, &len);
	if (off < 0)
		return off;
	memcpy(value, (const char *)init + off, size);
	return 0;
}

/* The object's map @name, while it can still be changed: 0, -EBUSY or -ENOENT. */
static int map_to_set(struct xg_prog *prog, const char *name, struct bpf_map **map)
{
	if (prog->loaded)
		return -EBUSY;
	*map = bpf_object__find_map_by_name(prog->obj, name);
	return *map ? 0 : -ENOENT;
}

int xg_prog_reuse_map(struct xg_prog *prog, const char *name, int fd)
{
	struct bpf_map *map;
	int err = map_to_set(prog, name, &map);

	return err ? err : bpf_map__reuse_fd(map, fd);
}

int xg_prog_set_max_entries(struct xg_prog *prog, const char *name, uint32_t max_entries)
{
	struct bpf_map *map;
	int err = map_to_set(prog, name, &map);

	return err ? err : bpf_map__set_max_entries(map, max_entries);
}

int xg_prog_load(struct xg_prog *prog)
{
	int err;

	if (prog->loaded)
		return -EBUSY;
	err = bpf_object__load(prog->obj);
	if (err)
		return err < 0 ? err : -EINVAL;
	prog->loaded = 1;
	return 0;
}

int xg_prog_fd(const struct xg_prog *prog)
{
	return bpf_program__fd(prog->prog);
}

int xg_prog_map_fd(const struct xg_prog *prog, const char *name)
{
	struct bpf_map *map = bpf_object__find_map_by_name(prog->obj, name);

	return map ? bpf_map__fd(map) : -ENOENT;
}

int xg_prog_attach(struct xg_prog *prog, int ifindex, uint32_t xdp_flags)
{
	LIBBPF_OPTS(bpf_link_create_opts, opts, .flags = xdp_flags);
	int fd;

	if (prog->link_fd >= 0)
		return -EEXIST;
	fd = bpf_link_create(bpf_program__fd(prog->prog), ifindex, BPF_XDP,
			     &opts);
	if (fd < 0)
		return fd;
	prog->link_fd = fd;
	return 0;
}

int xg_prog_detach(struct xg_prog *prog)
{
	if (prog->link_fd < 0)
		return -ENOENT;
	close(prog->link_fd);
	prog->link_fd = -1;
	return 0;
}

int xg_prog_link_ifindex(const struct xg_prog *prog)
{
	struct bpf_link_info info;
	__u32 len = sizeof(info);
	int err;

	if (prog->link_fd < 0)
		return -ENOENT;
	memset(&info, 0, sizeof(info));
	err = bpf_obj_get_info_by_fd(prog->link_fd, &info, &len);
	if (err)
		return err;
	return (int)info.xdp.ifindex;
}

void xg_prog_close(struct xg_prog *prog)
{
	if (!prog)
		return;
	if (prog->link_fd >= 0)
		close(prog->link_fd);
	bpf_object__close(prog->obj);
	free(prog);
}

int xg_xdp_query(int ifindex, uint32_t *prog_id, uint32_t *mode)
{
	LIBBPF_OPTS(bpf_xdp_query_opts, opts);
	int err;

	err = bpf_xdp_query(ifindex, 0, &opts);
	if (err)
		return err < 0 ? err : -err;
	*prog_id = opts.prog_id;
	*mode = opts.attach_mode;
	return 0;
}

int xg_netns_link(int prog_fd, int netns_fd)
{
	int fd = bpf_link_create(prog_fd, netns_fd, BPF_SK_LOOKUP, NULL);

	return fd < 0 ? -errno : fd;
}

int xg_xdp_link_id(int ifindex, uint32_t prog_id, uint32_t *link_id)
{
	struct bpf_link_info info;
	uint32_t id = 0, len;
	int fd, err;

	while (!bpf_link_get_next_id(id, &id)) {
		fd = bpf_link_get_fd_by_id(id);
		if (fd < 0)
			continue; /* gone meanwhile */
		memset(&info, 0, sizeof(info));
		len = sizeof(info);
		err = bpf_obj_get_info_by_fd(fd, &info, &len);
		close(fd);
		if (err)
			continue;
		if (info.type == BPF_LINK_TYPE_XDP && info.prog_id == prog_id &&
		    (int)info.xdp.ifindex == ifindex) {
			*link_id = id;
			return 0;
		}
	}
	return -ENOENT;
}

int xg_prog_test_run(int prog_fd, const void *data, uint32_t size, uint32_t meta_len,
		     void *data_out, uint32_t *size_out, uint32_t ingress_ifindex,
		     uint32_t rx_queue, uint32_t repeat, uint32_t *action,
		     uint32_t *duration_ns)
{
	struct xdp_md ctx = {
		.data = meta_len,
		.data_end = size,
		.ingress_ifindex = ingress_ifindex,
		.rx_queue_index = rx_queue,
	};
	LIBBPF_OPTS(bpf_test_run_opts, opts,
		    .data_in = data,
		    .data_size_in = size,
		    .data_out = data_out,
		    .data_size_out = data_out ? *size_out : 0,
		    .ctx_in = &ctx,
		    .ctx_size_in = sizeof(ctx),
		    .repeat = repeat ? repeat : 1);
	int err;

	err = bpf_prog_test_run_opts(prog_fd, &opts);
	if (err)
		return err < 0 ? err : -err;
	if (data_out)
		*size_out = opts.data_size_out;
	*action = opts.retval;
	if (duration_ns)
		*duration_ns = opts.duration;
	return 0;
}
