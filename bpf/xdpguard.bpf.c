// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard's XDP program. One object, loaded once per device:
 *
 *   outer: parse (bpf/xg_parse.h, the parser the C loop compiles too: a
 *          frame it cannot finish is dropped), apply the stateless policy
 *          to every IP frame (cheapest first: allowlist, blocklist, UDP
 *          source ports, fragments, impossible TCP flags, then the n-tuple
 *          rules and per-source rate limits of bpf/xg_rules.h), forward
 *          what needs no loop to inner itself (the fast path), answer SYN
 *          challenges and check their answers (bpf/xg_challenge.h), and
 *          hand the rest to the AF_XDP socket of the frame's RX queue with
 *          a word for the loop in front (struct xg_meta);
 *   inner: forward verified flows and non-TCP traffic to outer itself,
 *          hand the rest to the socket (the origin's replies carry no
 *          policy).
 *
 * Every frame leaves through the single exit of xdpguard_prog(), which counts
 * its reason in xg_stats. Each instance has its own maps, so an instance's
 * counters are one direction's counters.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xdpguard.h"
#include "xg_flow.h"

/* Written by the loader before the object is loaded. */
const volatile struct xg_load_cfg xg_cfg = { .role = XG_ROLE_OUTER };

/*
 * The clock of flow and challenge times: the coarse one (a tick old, and
 * cheap), or where the kernel lacks it (before 5.11) the precise one. The
 * verifier sees only the branch the loader chose.
 */
static __always_inline __u64 xg_clock_ns(void)
{
	if (xg_cfg.flags & XG_CFG_NO_COARSE)
		return bpf_ktime_get_ns();
	return bpf_ktime_get_coarse_ns();
}

/* What this object was built against; xdpguard checks it before loading. */
const volatile __u32 xg_abi = XG_ABI_VERSION;

/*
 * The inner map definitions below name their key types only through
 * pointers, for which clang emits forward declarations; libbpf then cannot
 * size the keys. Holding the types by value here puts their full layouts
 * in the object's BTF (tests/unit/test_layout.py reads them there too),
 * along with the shared types no map uses yet.
 */
const volatile struct {
	struct xg_lpm_v4 lpm_v4;
	struct xg_lpm_v6 lpm_v6;
	struct xg_meta meta;
	struct xg_summary summary;
	struct xg_flow flow;
	struct xg_verified_src verified;
	struct xg_cookie_secret secret;
	struct xg_tcp_cfg tcp_cfg;
	struct xg_addr addr;
	struct xg_sample sample;
	struct xg_rule_filter rule_filter[0]; /* its layout, not its 32 KiB */
} xg_btf_anchor;

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XG_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xg_xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XG_REASON_CAP);
	__type(key, __u32);
	__type(value, struct xg_counter);
} xg_stats SEC(".maps");

/*
 * The allow- and blocklists: one LPM trie per list and family, reached
 * through a map-of-maps slot (enum xg_list). Python fills a fresh trie and
 * swaps the slot to replace a whole list atomically; the kernel keeps the
 * old trie alive for programs still using it. An empty slot is an empty
 * list and costs one lookup.
 */
struct xg_lpm_v4_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_LPM_V4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_lpm_v4);
	__type(value, __u32);
};

struct xg_lpm_v6_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XG_LPM_V6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xg_lpm_v6);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XG_NR_LISTS);
	__type(key, __u32);
	__array(values, struct xg_lpm_v4_map);
} xg_lists_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XG_NR_LISTS);
	__type(key, __u32);
	__array(values, struct xg_lpm_v6_map);
} xg_lists_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_port_set);
} xg_udp_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_policy);
} xg_policy SEC(".maps");

/* Ethertypes the operator allows beside IP and ARP (xdpguard l2 allow). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_port_set);
} xg_l2_allow SEC(".maps");

/*
 * The fast path (docs/ARCHITECTURE.md): verified flows never leave XDP. The flow table
 * is one map shared by both program instances and the loop (mmap()ed);
 * xg_fastcfg and xg_peer are this instance's: whether it may forward
 * itself, and the device it forwards to (the other one, written from a
 * thread in that device's namespace: a DEVMAP resolves the ifindex in
 * the writer's namespace).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1); /* the loader reuses the table it made */
	__type(key, __u32);
	__type(value, struct xg_flow_bucket);
} xg_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_flow_table);
} xg_flowinfo SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xg_fast_cfg);
} xg_fastcfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xg_peer SEC(".maps");

#include "xg_rules.h"
#include "xg_samples.h"

/* What the policy stages read: the parser's findings and the source as LPM keys. */
struct pkt {
	struct xg_hdrs h;
	struct xg_lpm_v6 key6;
	struct xg_lpm_v4 key4;
	struct xg_flow_key key;	/* the fast path's */
	struct xg_seg seg;
	__u32 stages;		/* xg_policy.stages, as outer_policy() read it */
	__u32 len;		/* of the frame as it arrived */
};

/* @bits: the list's xg_list_bits for (v4, v6), checked against @policy. */
static __always_inline int in_list(struct pkt *pkt, struct xg_policy *policy,
				   __u32 list, __u32 bit_v4, __u32 bit_v6)
{
	void *trie;

	if (!pkt->h.v6) {
		if (!(policy->lists & bit_v4))
			return 0;
		trie = bpf_map_lookup_elem(&xg_lists_v4, &list);
		return trie && bpf_map_lookup_elem(trie, &pkt->key4);
	}
	if (!(policy->lists & bit_v6))
		return 0;
	trie = bpf_map_lookup_elem(&xg_lists_v6, &list);
	return trie && bpf_map_lookup_elem(trie, &pkt->key6);
}

static __always_inline int udp_port_blocked(struct xdp_md *ctx, struct pkt *pkt)
{
	struct udphdr *udp = pkt->h.l4;
	struct xg_port_set *ports;
	__u32 zero = 0;
	__u16 port;

	if (pkt->h.l4_proto != IPPROTO_UDP || !udp ||
	    (void *)(udp + 1) > (void *)(long)ctx->data_end)
		return 0;
	ports = bpf_map_lookup_elem(&xg_udp_ports, &zero);
	if (!ports)
		return 0;
	port = bpf_ntohs(udp->source);
	return (ports->bits[(port >> 6) & (XG_PORT_WORDS - 1)] >> (port & 63)) & 1;
}

/* Whether the operator allowed frames of ethertype @proto (not IP, not ARP). */
static __always_inline int l2_allowed(__u16 proto)
{
	struct xg_port_set *set;
	__u32 zero = 0;

	set = bpf_map_lookup_elem(&xg_l2_allow, &zero);
	if (!set)
		return 0;
	return (set->bits[(proto >> 6) & (XG_PORT_WORDS - 1)] >> (proto & 63)) & 1;
}

/*
 * A frame that is not IP: ARP is judged by its sender's address like an
 * IP frame by its source (a blocked host must not poison the origin's
 * neighbour table); other ethertypes pass only if allowed.
 */
static __always_inline enum xg_reason l2_policy(struct xdp_md *ctx, struct pkt *pkt,
						struct xg_policy *policy)
{
	__u8 *arp = pkt->h.arp;

	if (pkt->h.l3_proto != ETH_P_ARP)
		return l2_allowed(pkt->h.l3_proto) ? XG_REASON_REDIRECTED : XG_REASON_L2_OTHER;
	if (!arp || (void *)(arp + 28) > (void *)(long)ctx->data_end)
		return XG_REASON_MALFORMED; /* cannot happen: parsed */
	pkt->key4.prefixlen = 32;
	__builtin_memcpy(pkt->key4.addr, arp + 14, 4); /* the sender's IPv4 address */
	if (in_list(pkt, policy, XG_LIST_ALLOW, XG_LISTS_ALLOW_V4, XG_LISTS_ALLOW_V6))
		return XG_REASON_ALLOWLIST;
	if (in_list(pkt, policy, XG_LIST_BLOCK, XG_LISTS_BLOCK_V4, XG_LISTS_BLOCK_V6))
		return XG_REASON_BLOCKLIST;
	return XG_REASON_REDIRECTED;
}

/* The source address of a parsed IP frame as the tries' keys. */
static __always_inline void source_keys(struct xdp_md *ctx, struct pkt *pkt)
{
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6h = pkt->h.l3;
	struct iphdr *iph = pkt->h.l3;

	if (pkt->h.v6) {
		if ((void *)(ip6h + 1) > end)
			return;
		pkt->key6.prefixlen = 128;
		__builtin_memcpy(pkt->key6.addr, &ip6h->saddr, 16);
	} else {
		if ((void *)(iph + 1) > end)
			return;
		pkt->key4.prefixlen = 32;
		__builtin_memcpy(pkt->key4.addr, &iph->saddr, 4);
	}
}

/*
 * The stateless policy of the outer device; XG_REASON_REDIRECTED = passes.
 * Source-based policy applies to every IP frame, neighbour discovery
 * included: a blocked source's ND is dropped, everyone else's passes; and
 * to ARP by its sender's address. Any other L2 frame is dropped unless its
 * ethertype is allowed (l2_policy()).
 */
static __always_inline enum xg_reason outer_policy(struct xdp_md *ctx, struct pkt *pkt,
						   enum xg_reason r)
{
	struct xg_policy *policy;
	__u32 zero = 0;

	if (r != XG_REASON_REDIRECTED)
		return r; /* fail closed: no list can vouch for what is not understood */
	policy = bpf_map_lookup_elem(&xg_policy, &zero);
	if (!policy)
		return XG_REASON_MALFORMED; /* cannot happen: an array slot */
	if (!pkt->h.l3)
		return l2_policy(ctx, pkt, policy);
	if (!(xg_cfg.flags & XG_CFG_NO_SAMPLES) &&
	    (policy->lists & (XG_LISTS_PROTECT_V4 | XG_LISTS_PROTECT_V6)))
		xg_dest_see(ctx, &pkt->h, policy->lists, pkt->len);
	if (policy->lists)
		source_keys(ctx, pkt);

	/* Cheapest first; an allowlisted source skips everything after. */
	if (in_list(pkt, policy, XG_LIST_ALLOW, XG_LISTS_ALLOW_V4, XG_LISTS_ALLOW_V6))
		return XG_REASON_ALLOWLIST;
	if (in_list(pkt, policy, XG_LIST_BLOCK, XG_LISTS_BLOCK_V4, XG_LISTS_BLOCK_V6))
		return XG_REASON_BLOCKLIST;
	if (udp_port_blocked(ctx, pkt))
		return XG_REASON_UDP_SRC_PORT;
	if ((pkt->h.frag & XG_FRAG_ANY) && policy->frag_policy == XG_FRAG_DROP)
		return XG_REASON_FRAGMENT;
	pkt->stages = policy->stages;
	return xg_judge_l4(&pkt->h);
}

/*
 * The rule stages (bpf/xg_rules.h) of a frame outer_policy() passed, if
 * they hold anything: its verdict. Called where a drop leaves at once, so
 * that the verifier's walk of what follows does not double.
 */
static __always_inline enum xg_reason outer_rules(struct xdp_md *ctx, struct pkt *pkt)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 info = pkt->h.l4_proto | pkt->h.frag << 8 | pkt->h.v6 << 16, stages;
	__u32 l3_off, l4_off, l3_len;
	struct ipv6hdr *ip6h = pkt->h.l3;
	struct iphdr *iph = pkt->h.l3;
	__u64 hi = 0, lo = 0;

	/* The destination, for the filter: most frames need no rule at all. */
	if (pkt->h.v6) {
		if ((void *)(ip6h + 1) > end)
			return XG_REASON_MALFORMED; /* cannot happen: parsed */
		hi = bpf_be64_to_cpu(*(__u64 *)&ip6h->daddr);
		lo = bpf_be64_to_cpu(*((__u64 *)&ip6h->daddr + 1));
	} else {
		if ((void *)(iph + 1) > end)
			return XG_REASON_MALFORMED;
		hi = (__u64)bpf_ntohl(iph->daddr) << 32;
	}
	/*
	 * Offsets now, as numbers: a packet pointer must not live across the
	 * call. The barrier keeps data a whole pointer (spilled 32 bits of it
	 * would be refused).
	 */
	asm volatile("" : "+r"(data));
	l3_off = pkt->h.l3 - data;
	l4_off = pkt->h.l4 ? pkt->h.l4 - data : 0;
	l3_len = pkt->h.l3_end - pkt->h.l3;
	stages = xg_rules_wanted(info | (pkt->stages & 0xff) << 24, hi, lo);
	if (!stages)
		return XG_REASON_REDIRECTED;
	return xg_rules_stage(ctx, l3_off, l4_off, l3_len, info | (stages & 0xff) << 24);
}

/*
 * A bucket lock is held for a few dozen instructions, usually by the program
 * on the other device noting the flow's reverse direction on the other
 * core. XDP waits for it: a segment sent to the loop instead arrives after
 * its successors, and the receiver's duplicate ACKs make the sender
 * retransmit (with one try, an iperf3 stream had 0.06 % of its segments
 * reordered so, and retransmitted about 1 % of all it sent). Most waits
 * take under 64 tries; an interrupt or a VM exit in the holder's critical
 * section makes a few last a thousand. Bounded, because the holder may be
 * the loop, preempted on this very core until this poll ends: after a wait
 * that failed, this core tries each lock once for XG_FAST_LOCK_BACKOFF_NS
 * instead of spinning again for every frame.
 */
#define XG_FAST_LOCK_TRIES 4096
#define XG_FAST_LOCK_BACKOFF_NS 50000

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64); /* until when (ktime, ns) this core does not wait */
} xg_lock_backoff SEC(".maps");

/* Take @b's lock, waiting a bounded while; 1 if taken. */
static __always_inline int bucket_lock(struct xg_flow_bucket *b)
{
	__u32 zero = 0, tries;
	__u64 *backoff, now;

	if (__sync_val_compare_and_swap(&b->lock, 0, 1) == 0)
		return 1;
	backoff = bpf_map_lookup_elem(&xg_lock_backoff, &zero);
	if (!backoff)
		return 0;
	now = bpf_ktime_get_ns();
	if (now < *backoff)
		return 0;
	for (tries = 1; tries < XG_FAST_LOCK_TRIES; tries++)
		if (__sync_val_compare_and_swap(&b->lock, 0, 1) == 0)
			return 1;
	*backoff = now + XG_FAST_LOCK_BACKOFF_NS;
	return 0;
}

/* @k's bucket of the flow table; NULL while there is no table. */
static __always_inline struct xg_flow_bucket *flow_bucket(const struct xg_flow_key *k)
{
	struct xg_flow_table *info;
	__u32 zero = 0, idx;

	info = bpf_map_lookup_elem(&xg_flowinfo, &zero);
	if (!info || info->magic != XG_FLOW_TABLE_MAGIC || !info->nbuckets)
		return (struct xg_flow_bucket *)0;
	idx = xg_flow_hash(k, info->key) & (info->nbuckets - 1);
	return bpf_map_lookup_elem(&xg_flows, &idx);
}

/*
 * A TCP segment (@k, @s, @len bytes from side @x) of a flow the loop
 * verified, in its window: note it (the loop's view stays true) and say
 * yes. Anything else, including a bucket lock bucket_lock() could not
 * get, is the loop's: no. A global function, so the verifier checks it
 * once and not once per path through the parser.
 */
__attribute__((noinline)) int xg_fast_tcp(struct xg_flow_key *k, struct xg_seg *s, __u32 len,
					   int x)
{
	struct xg_flow_bucket *b;
	struct xg_flow *f;
	__u32 now;
	int ok;

	if (!k || !s)
		return 0;
	b = flow_bucket(k);
	if (!b || !bucket_lock(b))
		return 0;
	now = xg_clock_ns() / 1000000000;
	f = xg_flow_find(b, k, now);
	ok = f && f->state == XG_TCP_ESTABLISHED &&
	     (f->flags & (XG_FLOW_FAST | XG_FLOW_REOPEN)) == XG_FLOW_FAST &&
	     xg_flow_in_window(f, x & 1, s);
	if (ok) {
		f->last_seen = now;
		xg_flow_note(f, x & 1, s, len);
	}
	__sync_lock_test_and_set(&b->lock, 0);
	return ok;
}

/*
 * Does @k have a live flow? Yes too if its bucket stays locked: the loop
 * then judges the frame, which is the safe side.
 */
__attribute__((noinline)) int xg_flow_exists(struct xg_flow_key *k)
{
	struct xg_flow_bucket *b;
	int found;

	if (!k)
		return 1;
	b = flow_bucket(k);
	if (!b)
		return 0; /* no table: nothing is tracked */
	if (!bucket_lock(b))
		return 1;
	found = !!xg_flow_find(b, k, xg_clock_ns() / 1000000000);
	__sync_lock_test_and_set(&b->lock, 0);
	return found;
}

#include "xg_challenge.h"

/*
 * May this frame, which passed the policy, skip the loop? Non-TCP: yes
 * (no state to keep). TCP: only a segment without SYN, FIN or RST of a
 * verified flow, in its window, while TCP state is enforced (not in
 * monitor mode, not learning) and never a fragment.
 */
static __always_inline int fast_path(struct xdp_md *ctx, struct pkt *pkt, int x)
{
	struct xg_fast_cfg *cfg;
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&xg_fastcfg, &zero);
	if (!cfg || !(cfg->flags & XG_FAST_ON))
		return 0;
	if (!pkt->h.l3 || pkt->h.l4_proto != IPPROTO_TCP)
		return 1;
	if (!(cfg->flags & XG_FAST_TCP) || (pkt->h.frag & XG_FRAG_ANY) || !pkt->h.l4 ||
	    (pkt->h.tcp_flags & (XG_TCP_SYN | XG_TCP_FIN | XG_TCP_RST)))
		return 0;
	if (xg_flow_key_of(&pkt->h, (void *)(long)ctx->data_end, x, &pkt->key, &pkt->seg))
		return 0;
	return xg_fast_tcp(&pkt->key, &pkt->seg, ctx->data_end - ctx->data, x);
}

/*
 * Put the word for the loop (struct xg_meta) in front of the frame, and,
 * loaded with XG_CFG_SUMMARY, the parser's findings in front of that;
 * *@front grows by what went in. -1 if there is no room: the frame must
 * then not reach the loop, which would take its first bytes for the word.
 */
static __always_inline int push_word(struct xdp_md *ctx, struct pkt *pkt, __u8 reason,
				     __u32 flags, __u32 *front)
{
	struct xg_summary sum = {};
	struct xg_meta *word;
	void *data;

	if (xg_cfg.flags & XG_CFG_SUMMARY)
		xg_summarise(&pkt->h, (void *)(long)ctx->data, reason, &sum);
	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(*word)))
		return -1;
	*front += sizeof(*word);
	word = (void *)(long)ctx->data;
	if ((void *)(word + 1) > (void *)(long)ctx->data_end)
		return -1;
	word->flags = flags;
	word->magic = XG_META_MAGIC;
	if (!(xg_cfg.flags & XG_CFG_SUMMARY))
		return 0;
	sum.flags = flags;
	sum.magic = XG_META_MAGIC;
	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct xg_meta)))
		return -1;
	*front += sizeof(struct xg_meta);
	data = (void *)(long)ctx->data;
	if (data + sizeof(sum) > (void *)(long)ctx->data_end)
		return -1;
	__builtin_memcpy(data, &sum, sizeof(sum));
	return 0;
}

SEC("xdp")
int xdpguard_prog(struct xdp_md *ctx)
{
	__u32 len = ctx->data_end - ctx->data;
	enum xg_reason reason = XG_REASON_REDIRECTED, why = XG_REASON_REDIRECTED;
	struct xg_counter *cnt;
	struct pkt pkt; /* each stage writes what the next reads */
	enum xg_reason parsed, ruled;
	int action = XDP_DROP, fast, pass;
	__u32 key, meta_flags, front = 0;

	parsed = xg_parse((void *)(long)ctx->data, (void *)(long)ctx->data_end, &pkt.h);
	if (xg_cfg.role == XG_ROLE_OUTER) {
		pkt.stages = 0;
		pkt.len = len;
		reason = outer_policy(ctx, &pkt, parsed);
		if (reason == XG_REASON_REDIRECTED && pkt.stages) {
			ruled = outer_rules(ctx, &pkt);
			if (ruled != XG_REASON_REDIRECTED) {
				reason = ruled;
				goto out; /* XDP_DROP */
			}
		}
		pass = reason == XG_REASON_REDIRECTED || reason == XG_REASON_ALLOWLIST;
		fast = pass && fast_path(ctx, &pkt, XG_SIDE_OUT);
	} else {
		/* No policy on the origin's side: a frame the parser cannot
		 * finish is only not fast. */
		pass = 1;
		fast = parsed == XG_REASON_REDIRECTED && fast_path(ctx, &pkt, XG_SIDE_IN);
	}
	if (fast) {
		action = bpf_redirect_map(&xg_peer, 0, 0);
		if (action == XDP_REDIRECT) {
			reason = XG_REASON_FAST_PATH;
			goto out;
		}
		/* No peer (being changed): the AF_XDP path, as for any frame. */
	}
	meta_flags = reason == XG_REASON_ALLOWLIST ? XG_META_ALLOWLISTED : 0;
	if (xg_cfg.role == XG_ROLE_OUTER && pass) {
		switch (xg_tcp_gate(ctx, &pkt, len, reason == XG_REASON_ALLOWLIST, &meta_flags,
				    &why)) {
		case XG_GATE_TX:
			reason = why;
			action = bpf_redirect_map(&xg_self, 0, XDP_TX);
			goto out;
		case XG_GATE_DROP:
			reason = why;
			pass = 0;
			break;
		default:
			break;
		}
	}
	/*
	 * The word goes in front only now: the policy, the fast path and the
	 * challenge read the frame where it starts.
	 */
	if (xg_cfg.role == XG_ROLE_OUTER && (pass || (xg_cfg.flags & XG_CFG_SUMMARY)) &&
	    push_word(ctx, &pkt, reason, meta_flags, &front) && pass) {
		reason = XG_REASON_NO_HEADROOM;
		pass = 0;
	}
	if (!pass) {
		action = XDP_DROP;
		goto out;
	}

	/* The fallback action applies when no socket sits at this index. */
	action = bpf_redirect_map(&xg_xsks, ctx->rx_queue_index, XDP_DROP);
	if (action != XDP_REDIRECT)
		reason = XG_REASON_NO_SOCKET;
out:
	key = reason;
	cnt = bpf_map_lookup_elem(&xg_stats, &key);
	if (cnt) {
		cnt->packets++;
		cnt->bytes += len;
		if (xg_sample_due(cnt))
			xg_sample_take(ctx, cnt, key, front, len);
	}
	return action;
}

char _license[] SEC("license") = "GPL";
