// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Loading bpf/xg_trace.bpf.o (the kernel's XDP error tracepoints, as
 * tp_btf programs) and reading its ring buffer for xdpguard trace.
 *
 * Events are copied from the ring buffer into a buffer of our own, then
 * handed out by xg_trace_poll(): libbpf consumes a record before its
 * callback returns, so a caller's array that is full must not be where
 * the callback writes. What our buffer has no room for counts as lost.
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
	struct ring_buffer *rb;
	int lost_fd;
	uint64_t dropped;	/* ours: no room in backlog */
	uint32_t head, count;
	struct xg_trace_event backlog[BACKLOG];
};

static int take(void *ctx, void *data, size_t size)
{
	struct xg_trace *t = ctx;

	if (size < sizeof(struct xg_trace_event))
		return 0;
	if (t->count == BACKLOG) {
		t->dropped++;
		return 0;
	}
	memcpy(&t->backlog[(t->head + t->count) % BACKLOG], data, sizeof(struct xg_trace_event));
	t->count++;
	return 0;
}

void xg_trace_close(struct xg_trace *t)
{
	int i;

	if (!t)
		return;
	ring_buffer__free(t->rb);
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
	t->rb = ring_buffer__new(bpf_object__find_map_fd_by_name(t->obj, "trace_events"), take,
				 t, NULL);
	if (!t->rb) {
		err = -errno;
		goto fail;
	}
	t->lost_fd = bpf_object__find_map_fd_by_name(t->obj, "trace_lost");
	*out = t;
	return 0;
fail:
	xg_trace_close(t);
	return err < 0 ? err : -EINVAL;
}

int xg_trace_poll(struct xg_trace *t, struct xg_trace_event *out, uint32_t max, int timeout_ms)
{
	uint32_t n = 0;
	int err;

	if (!t->count) {
		err = ring_buffer__poll(t->rb, timeout_ms);
		if (err < 0 && err != -EINTR)
			return err;
	}
	while (n < max && t->count) {
		out[n++] = t->backlog[t->head];
		t->head = (t->head + 1) % BACKLOG;
		t->count--;
	}
	return (int)n;
}

uint64_t xg_trace_lost(struct xg_trace *t)
{
	int ncpus = libbpf_num_possible_cpus(), i;
	uint64_t sum = t->dropped, *v;
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
