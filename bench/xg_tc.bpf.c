// SPDX-License-Identifier: GPL-2.0
/*
 * The DRDoS comparison's tc ingress filter: drop IPv4 fragments and UDP
 * from source port 53 on the skb path. A cls_bpf program in direct-action
 * mode, because this kernel is built without flower, matchall and gact
 * (so u32 has no drop action either); it is also what a tc filter written
 * today would be.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xgb_tc_drops SEC(".maps");

SEC("tc")
int xg_tc_drdos(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct udphdr *udp;
	__u32 key = 0;
	__u64 *cnt;

	if ((void *)(iph + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (iph->frag_off & bpf_htons(0x3fff))
		goto drop;
	udp = (void *)iph + iph->ihl * 4;
	if (iph->protocol == IPPROTO_UDP && (void *)(udp + 1) <= end &&
	    udp->source == bpf_htons(53))
		goto drop;
	return TC_ACT_OK;
drop:
	cnt = bpf_map_lookup_elem(&xgb_tc_drops, &key);
	if (cnt)
		(*cnt)++;
	return TC_ACT_SHOT;
}

char _license[] SEC("license") = "GPL";
