/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The DRDoS comparison's two checks, shared by the XDP floor (xg_bench.bpf.c)
 * and the tc filter (xg_tc.bpf.c) so they are the same code on both paths.
 */
#ifndef XG_DRDOS_MATCH_H
#define XG_DRDOS_MATCH_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>

/* 1 if the frame is an IPv4 fragment or UDP from source port 53. */
static __always_inline int drdos_match(void *data, void *end)
{
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct udphdr *udp;

	if ((void *)(iph + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (iph->frag_off & bpf_htons(0x3fff))
		return 1;
	udp = (void *)iph + iph->ihl * 4;
	return iph->protocol == IPPROTO_UDP && (void *)(udp + 1) <= end &&
	       udp->source == bpf_htons(53);
}

#endif /* XG_DRDOS_MATCH_H */
