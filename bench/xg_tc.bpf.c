// SPDX-License-Identifier: GPL-2.0
/*
 * The DRDoS comparison's tc ingress filter: drop IPv4 fragments and UDP
 * from source port 53 on the skb path. A cls_bpf program in direct-action
 * mode, because this kernel is built without flower, matchall and gact
 * (so u32 has no drop action either); it is also what a tc filter written
 * today would be.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "xg_drdos_match.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xgb_tc_drops SEC(".maps");

SEC("tc")
int xg_tc_drdos(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *cnt;

	if (!drdos_match((void *)(long)skb->data, (void *)(long)skb->data_end))
		return TC_ACT_OK;
	cnt = bpf_map_lookup_elem(&xgb_tc_drops, &key);
	if (cnt)
		(*cnt)++;
	return TC_ACT_SHOT;
}

char _license[] SEC("license") = "GPL";
