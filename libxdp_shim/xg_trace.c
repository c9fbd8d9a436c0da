// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Loading bpf/xg_trace.bpf.o (the kernel's XDP error tracepoints, as
 * tp_btf programs) and reading its ring buffer (xg_ring.c) for xdpguard
 * trace.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "xg_shim.h"

#define BACKLOG 4096

struct xg_trace {
	struct bpf_object *obj;
	struct bpf_link *links[8];
	int nlinks;
	struct xg_ring *ring;
	int lost_fd;
};

void xg_trace_close(struct xg_trace *t)
{
	int i;

	if (!t)
		return;
	xg_ring_close(t->ring);
	for (i = 0; i < t->nlinks; i++)
		bpf_link__destroy(t->links[i]);
	bpf_object__close(t->obj);
	free(t);
}

int xg_trace_open(const char *path, struct xg_trace **out)
{
	struct bpf_program *prog;
	struct xg_trace *t;
	int err;

	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->obj = bpf_object__open_file(path, NULL);
	if (!t->obj) {
		err = -errno;
		free(t);
		return err;
	}
	err = bpf_object__load(t->obj);
	if (err)
		goto fail;
	bpf_object__for_each_program(prog, t->obj) {
		if (t->nlinks == (int)(sizeof(t->links) / sizeof(t->links[0]))) {
			err = -E2BIG;
			goto fail;
		}
		t->links[t->nlinks] = bpf_program__attach(prog);
		if (!t->links[t->nlinks]) {
			err = -errno;
			goto fail;
		}
		t->nlinks++;
	}
	err = xg_ring_open(bpf_object__find_map_fd_by_name(t->obj, "trace_events"),
			   sizeof(struct xg_trace_event), BACKLOG, &t->ring);
	if (err)
		goto fail;
	t->lost_fd = bpf_object__find_map_fd_by_name(t->obj, "trace_lost");
	*out = t;
	return 0;
fail:
	xg_trace_close(t);
	return err < 0 ? err : -EINVAL;
}

int xg_trace_poll(struct xg_trace *t, struct xg_trace_event *out, uint32_t max, int timeout_ms)
{
	return xg_ring_poll(t->ring, out, max, timeout_ms);
}

uint64_t xg_trace_lost(struct xg_trace *t)
{
	int ncpus = libbpf_num_possible_cpus(), i;
	uint64_t sum = xg_ring_dropped(t->ring), *v;
	uint32_t zero = 0;

	if (ncpus <= 0 || t->lost_fd < 0)
		return sum;
	v = calloc((size_t)ncpus, sizeof(*v));
	if (v && !bpf_map_lookup_elem(t->lost_fd, &zero, v))
		for (i = 0; i < ncpus; i++)
			sum += v[i];
	free(v);
	return sum;
}
