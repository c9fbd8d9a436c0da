// SPDX-License-Identifier: GPL-2.0
/*
 * Small XDP programs that tell what the running kernel can do
 * (xdpguard/features.py): a feature is there if the program that uses it
 * loads. bpftool's feature probe is not asked: it has listed helpers that
 * the verifier then refused. One program is loaded at a time.
 *
 *   xg_probe_fwd   redirects every frame to the device in xg_probe_to[0]
 *                  (a DEVMAP): the fast path's test that a device takes
 *                  frames redirected by XDP, with real frames sent through
 *                  a veth pair in a namespace of the probe's own.
 *   xg_probe_pass  XDP_PASS: gives a veth of the probe NAPI.
 *   probe_*        one helper or instruction each, never attached.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xg_probe_to SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xg_probe_xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xg_probe_word SEC(".maps");

SEC("xdp")
int xg_probe_fwd(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xg_probe_to, 0, 0);
}

SEC("xdp")
int xg_probe_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int probe_adjust_head(struct xdp_md *ctx)
{
	return bpf_xdp_adjust_head(ctx, -8) ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int probe_adjust_tail(struct xdp_md *ctx)
{
	return bpf_xdp_adjust_tail(ctx, -1) ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int probe_load_bytes(struct xdp_md *ctx)
{
	__u8 buf[4];

	return bpf_xdp_load_bytes(ctx, 0, buf, sizeof(buf)) ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int probe_ktime_coarse(struct xdp_md *ctx)
{
	return bpf_ktime_get_coarse_ns() ? XDP_PASS : XDP_DROP;
}

SEC("xdp")
int probe_cmpxchg(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *w = bpf_map_lookup_elem(&xg_probe_word, &zero);

	if (!w)
		return XDP_DROP;
	return __sync_val_compare_and_swap(w, 0, 1) ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int probe_xskmap(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xg_probe_xsks, ctx->rx_queue_index, XDP_DROP);
}

SEC("xdp")
int probe_loops(struct xdp_md *ctx)
{
	__u32 i, n = ctx->rx_queue_index & 7, sum = 0;

	for (i = 0; i < n; i++)
		sum += i;
	return sum ? XDP_PASS : XDP_DROP;
}

/* A BPF-to-BPF call to a global function, verified on its own. */
__attribute__((noinline)) int probe_callee(struct xdp_md *ctx)
{
	return ctx ? XDP_PASS : XDP_DROP;
}

SEC("xdp")
int probe_calls(struct xdp_md *ctx)
{
	return probe_callee(ctx);
}

char _license[] SEC("license") = "GPL";
