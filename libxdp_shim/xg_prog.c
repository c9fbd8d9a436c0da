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
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/if_link.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "xg_shim.h"

#define XG_PROG_NAME "xdpguard_prog"
#define XG_CFG_VAR "xg_cfg"

struct xg_prog {
	struct bpf_object *obj;
	struct bpf_program *prog;
	int link_fd;
};

/* Copy @cfg over the initial value of the const volatile xg_cfg. */
static int set_load_cfg(struct bpf_object *obj, const struct xg_load_cfg *cfg)
{
	const struct btf_var_secinfo *vsi;
	const struct btf_type *sec, *var;
	struct bpf_map *rodata;
	struct btf *btf;
	const void *init;
	size_t size;
	char *data;
	int id, i, err;

	btf = bpf_object__btf(obj);
	rodata = bpf_object__find_map_by_name(obj, ".rodata");
	if (!btf || !rodata)
		return -ENOENT;
	id = btf__find_by_name_kind(btf, ".rodata", BTF_KIND_DATASEC);
	if (id < 0)
		return id;
	sec = btf__type_by_id(btf, id);
	init = bpf_map__initial_value(rodata, &size);
	if (!init)
		return -ENOENT;

	vsi = btf_var_secinfos(sec);
	for (i = 0; i < btf_vlen(sec); i++, vsi++) {
		var = btf__type_by_id(btf, vsi->type);
		if (strcmp(btf__name_by_offset(btf, var->name_off), XG_CFG_VAR))
			continue;
		if (vsi->size != sizeof(*cfg) || vsi->offset + vsi->size > size)
			return -EINVAL; /* object built from another header */
		data = malloc(size);
		if (!data)
			return -ENOMEM;
		memcpy(data, init, size);
		memcpy(data + vsi->offset, cfg, sizeof(*cfg));
		err = bpf_map__set_initial_value(rodata, data, size);
		free(data);
		return err;
	}
	return -ENOENT;
}

int xg_prog_load(const char *path, const struct xg_load_cfg *cfg,
		 struct xg_prog **out)
{
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
		goto fail;
	}
	p->prog = bpf_object__find_program_by_name(p->obj, XG_PROG_NAME);
	if (!p->prog) {
		err = -ENOENT;
		goto fail;
	}
	err = set_load_cfg(p->obj, cfg);
	if (err)
		goto fail;
	err = bpf_object__load(p->obj);
	if (err)
		goto fail;
	*out = p;
	return 0;
fail:
	bpf_object__close(p->obj);
	free(p);
	return err < 0 ? err : -EINVAL;
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

int xg_prog_test_run(int prog_fd, const void *data, uint32_t size,
		     void *data_out, uint32_t *size_out, uint32_t ingress_ifindex,
		     uint32_t rx_queue, uint32_t *action)
{
	struct xdp_md ctx = {
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
		    .repeat = 1);
	int err;

	err = bpf_prog_test_run_opts(prog_fd, &opts);
	if (err)
		return err < 0 ? err : -err;
	if (data_out)
		*size_out = opts.data_size_out;
	*action = opts.retval;
	return 0;
}

int xg_prog_run_live(int prog_fd, const void *data, uint32_t size,
		     uint32_t ingress_ifindex, uint32_t repeat,
		     uint32_t batch_size)
{
	struct xdp_md ctx = {
		.data_end = size,
		.ingress_ifindex = ingress_ifindex,
	};
	LIBBPF_OPTS(bpf_test_run_opts, opts,
		    .data_in = data,
		    .data_size_in = size,
		    .ctx_in = &ctx,
		    .ctx_size_in = sizeof(ctx),
		    .repeat = repeat,
		    .flags = BPF_F_TEST_XDP_LIVE_FRAMES,
		    .batch_size = batch_size);
	int err;

	err = bpf_prog_test_run_opts(prog_fd, &opts);
	return err < 0 ? err : (err ? -err : 0);
}
