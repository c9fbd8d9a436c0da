// SPDX-License-Identifier: GPL-2.0
/*
 * XDP programs the benchmarks place around the appliance (never part of it;
 * the load comes from xgbench.Generator, an AF_XDP socket):
 *
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
 *   xg_count_synacks  xg_drop_spoofed, counting the SYN-ACKs it drops per
 *            destination /24 (synacks_per_24): what a reflector's victims
 *            would receive.
 *   xg_synack the challenges' limit: every IPv4 TCP SYN answered in place
 *            with a SYN-ACK (addresses and ports swapped, checksum updated
 *            for what changed) and sent back with XDP_TX; no cookie, no
 *            policy, no caps. synack_count counts the answers.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xg_drdos_match.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sink_count SEC(".maps");

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

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);	/* the destination's /24, network order */
	__type(value, __u64);
} synacks_per_24 SEC(".maps");

SEC("xdp")
int xg_count_synacks(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(iph + 1);
	__u64 one = 1, *n;
	__u32 key;

	if ((void *)(iph + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    (iph->daddr & bpf_htonl(0xfffe0000)) != bpf_htonl(0xc6120000))
		return XDP_PASS;
	if (iph->protocol == IPPROTO_TCP && iph->ihl == 5 && (void *)(tcp + 1) <= end &&
	    ((__u8 *)tcp)[13] == 0x12) {
		key = iph->daddr & bpf_htonl(0xffffff00);
		n = bpf_map_lookup_elem(&synacks_per_24, &key);
		if (!n && bpf_map_update_elem(&synacks_per_24, &key, &one, BPF_NOEXIST) == 0)
			return XDP_DROP;
		n = n ? n : bpf_map_lookup_elem(&synacks_per_24, &key); /* another CPU's insert */
		if (n)
			(*n)++;
	}
	return XDP_DROP;
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

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} synack_count SEC(".maps");

/* The one's-complement checksum @csum after a 32-bit word went from @from to @to. */
static __always_inline __u16 csum_replace4(__u16 csum, __be32 from, __be32 to)
{
	__u32 sum = (__u16)~csum;

	sum += (__u16)~from + (__u16)~(from >> 16) + (__u16)to + (__u16)(to >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

SEC("xdp")
int xg_synack(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(iph + 1);
	__u8 mac[ETH_ALEN];
	__be32 addr, old_seq, old_ack, old_word, new_word;
	__be16 port;
	__u32 key = 0;
	__u64 *cnt;

	if ((void *)(tcp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || iph->ihl != 5 ||
	    iph->protocol != IPPROTO_TCP || ((__u8 *)tcp)[13] != 0x02)
		return XDP_PASS;
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	addr = iph->saddr; /* swapped addresses and ports leave the sums as they are */
	iph->saddr = iph->daddr;
	iph->daddr = addr;
	port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	old_seq = tcp->seq;
	old_ack = tcp->ack_seq;
	__builtin_memcpy(&old_word, (__u8 *)tcp + 12, 4);
	tcp->ack_seq = bpf_htonl(bpf_ntohl(old_seq) + 1);
	tcp->seq = bpf_htonl(0x12345678);
	((__u8 *)tcp)[13] = 0x12; /* SYN | ACK */
	__builtin_memcpy(&new_word, (__u8 *)tcp + 12, 4);
	tcp->check = csum_replace4(tcp->check, old_seq, tcp->seq);
	tcp->check = csum_replace4(tcp->check, old_ack, tcp->ack_seq);
	tcp->check = csum_replace4(tcp->check, old_word, new_word);
	cnt = bpf_map_lookup_elem(&synack_count, &key);
	if (cnt)
		(*cnt)++;
	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
