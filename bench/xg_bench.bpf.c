// SPDX-License-Identifier: GPL-2.0
/*
 * XDP programs the benchmarks place around the appliance (never part of it):
 *
 *   xg_gen   packet generator, run with BPF_PROG_RUN in live-frame mode on
 *            the client's device: a run sends the template frame out of that
 *            device with XDP_TX, optionally with a fresh source. Each BPF_PROG_RUN
 *            call costs an RCU grace period (the kernel swaps the XDP
 *            dispatcher), so the load is paced inside one long call instead:
 *            only gen_tx_ratio/2^32 of the runs transmit, the rest drop,
 *            and gen_sent counts what left.
 *   xg_sink  counts and drops what reaches the origin's device, so the
 *            forwarded rate is measured without the origin's stack.
 *   xg_pass  XDP_PASS, so a veth accepts XDP_TX frames from its peer when
 *            the kernel itself forwards (the bridge baseline).
 *   xg_drdos the DRDoS comparison's floor: a minimal hand-written filter that
 *            only drops IPv4 fragments and UDP from source port 53.
 *   xg_devmap the fast path's limit: every frame redirected to the device in
 *            fwd_peer[0] (a DEVMAP), nothing looked at.
 *   xg_devmap_read  the same, but it reads the bytes of the Ethernet, IPv4
 *            and UDP headers: what any forwarder that looks at headers pays
 *            (the cache lines of a frame another core wrote), and the bare
 *            forwarder does not.
 *
 * Live-frame pages are recycled without being reset, so a generator that
 * varies a frame writes every field it varies, on every run.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xg_drdos_match.h"

/* Set before load by bench/xgbench.py. */
const volatile __u32 gen_random_saddr; /* host part of 198.18.0.0/15 */
const volatile __u32 gen_random_sport;
const volatile __u32 gen_tx_ratio = 0xffffffff; /* fraction of runs sent, of 2^32 */
/*
 * gen_mix: every other frame becomes the smallest later IPv4 fragment
 * (8 bytes at offset 1480). The IPv4 total length, fragment field and
 * checksum of both variants come precomputed, so the checksum stays right
 * for receivers that verify it (the kernel's IP layer does).
 */
const volatile __u32 gen_mix;
const volatile __u16 gen_a_tot_len, gen_a_frag_off, gen_a_check; /* network order */
const volatile __u16 gen_b_tot_len, gen_b_frag_off, gen_b_check;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} gen_sent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sink_count SEC(".maps");

SEC("xdp")
int xg_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct udphdr *udp;
	__u32 rnd, key = 0;
	__u64 *sent;

	if (gen_tx_ratio != 0xffffffff && bpf_get_prandom_u32() > gen_tx_ratio)
		return XDP_DROP;
	sent = bpf_map_lookup_elem(&gen_sent, &key);
	if (!sent)
		return XDP_DROP;
	(*sent)++;
	if (gen_mix) {
		if ((void *)(iph + 1) > end)
			return XDP_DROP;
		if (*sent & 1) {
			iph->tot_len = gen_b_tot_len;
			iph->frag_off = gen_b_frag_off;
			iph->check = gen_b_check;
		} else {
			iph->tot_len = gen_a_tot_len;
			iph->frag_off = gen_a_frag_off;
			iph->check = gen_a_check;
		}
		return XDP_TX;
	}
	if (!gen_random_saddr && !gen_random_sport)
		return XDP_TX;
	if ((void *)(iph + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_TX;
	rnd = bpf_get_prandom_u32();
	if (gen_random_saddr) {
		/* The IPv4 checksum is left stale on purpose: nothing on the
		 * path checks it, and recomputing it would slow the generator. */
		iph->saddr = bpf_htonl(0xc6120000 | (rnd & 0x1ffff)); /* 198.18/15 */
	}
	udp = (void *)iph + iph->ihl * 4;
	if (gen_random_sport && (void *)(udp + 1) <= end)
		udp->source = bpf_htons(1024 + (rnd >> 17) % 60000);
	return XDP_TX;
}

SEC("xdp")
int xg_sink(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 *cnt = bpf_map_lookup_elem(&sink_count, &key);

	if (cnt)
		(*cnt)++;
	return XDP_DROP;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drdos_count SEC(".maps");

SEC("xdp")
int xg_drdos(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 *cnt;

	if (!drdos_match((void *)(long)ctx->data, (void *)(long)ctx->data_end))
		return XDP_PASS;
	cnt = bpf_map_lookup_elem(&drdos_count, &key);
	if (cnt)
		(*cnt)++;
	return XDP_DROP;
}

/*
 * On the client's device: drop what is addressed to the spoofed benchmark
 * range (198.18.0.0/15). The lab's client host stands in for every spoofed
 * source, and answers to them (challenge SYN-ACKs) would otherwise flood
 * its stack, where on the internet they go elsewhere.
 */
SEC("xdp")
int xg_drop_spoofed(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);

	if ((void *)(iph + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IP) &&
	    (iph->daddr & bpf_htonl(0xfffe0000)) == bpf_htonl(0xc6120000))
		return XDP_DROP;
	return XDP_PASS;
}

SEC("xdp")
int xg_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fwd_peer SEC(".maps");

SEC("xdp")
int xg_devmap(struct xdp_md *ctx)
{
	return bpf_redirect_map(&fwd_peer, 0, XDP_DROP);
}

SEC("xdp")
int xg_devmap_read(struct xdp_md *ctx)
{
	__u8 *p = (void *)(long)ctx->data;

	if ((void *)(p + 42) > (void *)(long)ctx->data_end || (p[0] ^ p[14] ^ p[34] ^ p[41]) == 0x5a)
		return XDP_DROP; /* never: the lab's MACs start 02 */
	return bpf_redirect_map(&fwd_peer, 0, XDP_DROP);
}

char _license[] SEC("license") = "GPL";
