// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard trace: the kernel's XDP errors as they happen, from its own
 * tracepoints, attached as BTF-typed programs (tp_btf: CO-RE against
 * bpf/vmlinux.h, made from the running kernel's BTF at build time; no
 * kernel headers, no kprobes):
 *
 *   xdp_exception    an XDP action the driver could not carry out
 *   xdp_redirect_err a redirect that failed (no target, a full AF_XDP ring)
 *   xdp_devmap_xmit  a DEVMAP's bulk transmit, reported when it dropped
 *                    frames or failed (a veth whose peer has no NAPI)
 *
 * Each becomes a struct xg_trace_event on a ring buffer; events the buffer
 * has no room for are counted in trace_lost.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "xdpguard.h"

/* The event's layout in the object's BTF, for tests/unit/test_layout.py. */
const volatile struct xg_trace_event xg_trace_anchor;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} trace_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} trace_lost SEC(".maps");

static __always_inline struct xg_trace_event *event(__u32 kind, const struct net_device *dev)
{
	struct xg_trace_event *e = bpf_ringbuf_reserve(&trace_events, sizeof(*e), 0);
	__u32 zero = 0;
	__u64 *lost;

	if (!e) {
		lost = bpf_map_lookup_elem(&trace_lost, &zero);
		if (lost)
			(*lost)++;
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->kind = kind;
	e->ifindex = dev->ifindex;
	e->netns_cookie = dev->nd_net.net->net_cookie;
	return e;
}

SEC("tp_btf/xdp_exception")
int BPF_PROG(trace_exception, const struct net_device *dev, const struct bpf_prog *xdp, u32 act)
{
	struct xg_trace_event *e = event(XG_TRACE_EXCEPTION, dev);

	if (!e)
		return 0;
	e->act = act;
	e->prog_id = xdp->aux->id;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/xdp_redirect_err")
int BPF_PROG(trace_redirect_err, const struct net_device *dev, const struct bpf_prog *xdp,
	     const void *tgt, int err, enum bpf_map_type map_type, u32 map_id, u32 index)
{
	struct xg_trace_event *e = event(XG_TRACE_REDIRECT_ERR, dev);

	if (!e)
		return 0;
	e->err = err;
	e->prog_id = xdp ? xdp->aux->id : 0;
	e->map_type = map_type;
	e->map_id = map_id;
	e->index = index;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/xdp_devmap_xmit")
int BPF_PROG(trace_devmap_xmit, const struct net_device *from_dev,
	     const struct net_device *to_dev, int sent, int drops, int err)
{
	struct xg_trace_event *e;

	if (!drops && !err)
		return 0;
	e = event(XG_TRACE_DEVMAP_XMIT, from_dev);
	if (!e)
		return 0;
	e->to_ifindex = to_dev->ifindex;
	e->to_netns_cookie = to_dev->nd_net.net->net_cookie;
	e->sent = sent;
	e->drops = drops;
	e->err = err;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char _license[] SEC("license") = "GPL";
