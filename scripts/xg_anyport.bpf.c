// SPDX-License-Identifier: GPL-2.0
/*
 * The lab's any-port origin (scripts/anyport-origin.py): an sk_lookup
 * program in the origin's namespace that hands every TCP connection to any
 * port of the service prefix (169.254.100.0/24, 2001:db8:100::/64) to one
 * listening socket per family, anyport_socks[0] (IPv4) and [1] (IPv6).
 * The prefix is routed as local (AnyIP), so the kernel takes the SYNs; the
 * lookup only says which socket gets them.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} anyport_socks SEC(".maps");

SEC("sk_lookup")
int anyport(struct bpf_sk_lookup *ctx)
{
	struct bpf_sock *sk;
	__u32 key;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == AF_INET &&
	    (bpf_ntohl(ctx->local_ip4) & 0xffffff00) == 0xa9fe6400) /* 169.254.100.0/24 */
		key = 0;
	else if (ctx->family == AF_INET6 && ctx->local_ip6[0] == bpf_htonl(0x20010db8) &&
		 ctx->local_ip6[1] == bpf_htonl(0x01000000)) /* 2001:db8:100::/64 */
		key = 1;
	else
		return SK_PASS;
	sk = bpf_map_lookup_elem(&anyport_socks, &key);
	if (!sk)
		return SK_PASS;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char _license[] SEC("license") = "GPL";
