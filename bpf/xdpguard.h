/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Definitions shared by the XDP program (xdpguard.bpf.c), the C shim
 * (libxdp_shim/) and Python (through ffi.cdef()). Everything between the
 * cffi:begin and cffi:end markers is read verbatim by all three, so it must
 * stay free of preprocessor directives: cffi's cdef() rejects them. Sizes are
 * enum constants for the same reason.
 *
 * tests/unit/test_layout.py checks that the object's BTF and the cffi view
 * agree on every struct and enum value below.
 */
#ifndef XDPGUARD_H
#define XDPGUARD_H

#ifndef __VMLINUX_H__ /* bpf/xg_trace.bpf.c has the kernel's own types */
#include <linux/types.h>
#endif

/* cffi:begin */

enum {
	/*
	 * Bumped when anything below changes meaning or shape. The BPF object
	 * carries it (xg_abi), and so does the compiled shim; xdpguard refuses
	 * to start when either differs from xdpguard.defs.ABI_VERSION.
	 */
	XG_ABI_VERSION = 8,
	/* Capacity of the per-queue maps; a device may use fewer. */
	XG_MAX_QUEUES = 64,
	/*
	 * Capacity of every per-reason counter array. Fixed so that adding a
	 * reason never resizes a map.
	 */
	XG_REASON_CAP = 64,
	/*
	 * Capacity of one list's LPM trie (memory is taken per entry, not up
	 * front: the tries are BPF_F_NO_PREALLOC).
	 */
	XG_LPM_V4_MAX = 4194304,
	XG_LPM_V6_MAX = 1048576,
	/* UDP source ports as a bitmap: 65536 bits in 64-bit words. */
	XG_PORT_WORDS = 1024,
};

/* Slots of the xg_lists_v4/v6 map-of-maps: one LPM trie per list. */
enum xg_list {
	XG_LIST_ALLOW = 0,
	XG_LIST_BLOCK = 1,
	XG_NR_LISTS = 2,
};

enum xg_frag_policy {
	XG_FRAG_PASS = 0,
	XG_FRAG_DROP = 1,
};

/*
 * Bits of xg_policy.lists: which list tries hold entries. An empty list
 * costs no lookup. Userspace sets a bit only after the trie has entries and
 * clears it before emptying the trie, so a bit is never clear while an entry
 * should be enforced.
 */
enum xg_list_bits {
	XG_LISTS_ALLOW_V4 = 1,
	XG_LISTS_ALLOW_V6 = 2,
	XG_LISTS_BLOCK_V4 = 4,
	XG_LISTS_BLOCK_V6 = 8,
	/* Protected prefixes (xdpguard protect): count per destination. */
	XG_LISTS_PROTECT_V4 = 16,
	XG_LISTS_PROTECT_V6 = 32,
};

/* Which device a program instance (and a socket) serves. */
enum xg_role {
	XG_ROLE_OUTER = 0, /* untrusted side: policy applies */
	XG_ROLE_INNER = 1, /* the origin's side: everything is forwarded */
};

/*
 * Why a frame got its verdict. Append-only: the numbers are read by counters
 * and scripts, so a retired reason keeps its number forever. Python derives
 * the stable snake_case names ("XG_REASON_NO_SOCKET" -> "no_socket").
 */
enum xg_reason {
	/* Handed to the AF_XDP socket of the frame's RX queue. */
	XG_REASON_REDIRECTED = 0,
	/* No socket is bound to this RX queue: dropped. */
	XG_REASON_NO_SOCKET = 1,
	/* Headers truncated or impossible: dropped. */
	XG_REASON_MALFORMED = 2,
	/* Source in the allowlist: passed, every later check skipped. */
	XG_REASON_ALLOWLIST = 3,
	/* Source in the blocklist: dropped. */
	XG_REASON_BLOCKLIST = 4,
	/* UDP from a source port of the reflection set: dropped. */
	XG_REASON_UDP_SRC_PORT = 5,
	/* IPv4 fragment or IPv6 fragment header, policy "drop": dropped. */
	XG_REASON_FRAGMENT = 6,
	/*
	 * Verdicts of the AF_XDP loop's TCP stage on frames from outside,
	 * counted per worker. The frame itself is always dropped.
	 */
	/* Not a SYN and no tracked flow (ACK or RST floods, stray segments). */
	XG_REASON_TCP_NO_FLOW = 7,
	/* Tracked flow, sequence or acknowledgment outside its window. */
	XG_REASON_TCP_OUT_OF_WINDOW = 8,
	/* A SYN-ACK from outside that answers nothing sent from inside. */
	XG_REASON_TCP_SYNACK_REFLECTION = 9,
	/* A SYN from an unverified source, answered with a cookie SYN-ACK. */
	XG_REASON_SYN_CHALLENGED = 10,
	/* The RST answering a challenge carried the cookie: source verified. */
	XG_REASON_CHALLENGE_PASSED = 11,
	/* A RST without ACK and without a flow whose cookie did not verify. */
	XG_REASON_CHALLENGE_FAILED = 12,
	/* A new flow found its bucket full of established flows. */
	XG_REASON_FLOW_TABLE_FULL = 13,
	/*
	 * A fragment of a TCP segment from outside: no flow can be checked
	 * (later fragments carry no TCP header), and real stacks do not
	 * fragment TCP (DF and path MTU discovery, MSS on IPv6).
	 */
	XG_REASON_TCP_FRAGMENT = 14,
	/*
	 * More VLAN tags or IPv6 extension headers than the parser walks
	 * (bpf/xg_parse.h): the frame cannot be judged, so it is dropped.
	 */
	XG_REASON_EXT_HEADER_LIMIT = 15,
	/*
	 * Forwarded by XDP itself to the other device (a DEVMAP): non-TCP
	 * traffic that passed the policy, and segments of flows the loop
	 * verified. Never in the UMEM.
	 */
	XG_REASON_FAST_PATH = 16,
	/*
	 * A SYN that would have been challenged, but the challenges to its
	 * source's /24 (IPv4) or /48 (IPv6), or to everyone, are at their
	 * cap: dropped, so that xdpguard is no reflector.
	 */
	XG_REASON_CHALLENGE_RATE_LIMITED = 17,
	/* A SYN from a verified source above its SYN rate: dropped. */
	XG_REASON_VERIFIED_SYN_RATE_LIMITED = 18,
	/* The first n-tuple rule the frame matched says drop (bpf/xg_rules.h). */
	XG_REASON_RULE_DROP = 19,
	/* The first rule the frame matched limits its rate, and it is above. */
	XG_REASON_RULE_RATE_LIMITED = 20,
	/* The source's rate limit (xdpguard ratelimit) is exceeded. */
	XG_REASON_SOURCE_RATE_LIMITED = 21,
	/*
	 * No room in front of the frame for the word the loop needs
	 * (struct xg_meta): the loop could not judge it, so it is dropped.
	 * Drivers with XDP leave 256 bytes; this counts one that does not.
	 */
	XG_REASON_NO_HEADROOM = 22,
	/*
	 * A frame that is neither IP (VLAN and QinQ tags included) nor ARP,
	 * of an ethertype the operator did not allow (xdpguard l2), MPLS and
	 * 802.3/LLC/SNAP frames among them: no policy can see what it
	 * carries, so it is dropped.
	 */
	XG_REASON_L2_OTHER = 23,
	/*
	 * A new flow of a source, or a source /24 or /48, that already holds
	 * its quota of the flow table (source_flow_quota, prefix_flow_quota):
	 * refused, so that no one fills the table for everyone else.
	 */
	XG_REASON_FLOW_QUOTA = 24,
};

/*
 * Which stage counts each reason, as masks with bit N for reason N: the XDP
 * program (xg_stats, one verdict per frame it sees) or the AF_XDP loop (its
 * worker counters, a verdict only for frames it drops or answers). A
 * reason appended to enum xg_reason is added to them in the same change
 * (tests/unit/test_reasons.py checks that every reason has a stage); beyond
 * reason 31 the masks grow a second word. Each stage has counters of its
 * own, so a reason in both is never counted twice for one frame.
 */
enum xg_reason_stage {
	XG_STAGE_XDP = (1 << XG_REASON_REDIRECTED) | (1 << XG_REASON_NO_SOCKET) |
		       (1 << XG_REASON_MALFORMED) | (1 << XG_REASON_ALLOWLIST) |
		       (1 << XG_REASON_BLOCKLIST) | (1 << XG_REASON_UDP_SRC_PORT) |
		       (1 << XG_REASON_FRAGMENT) | (1 << XG_REASON_EXT_HEADER_LIMIT) |
		       (1 << XG_REASON_FAST_PATH) | (1 << XG_REASON_SYN_CHALLENGED) |
		       (1 << XG_REASON_CHALLENGE_PASSED) | (1 << XG_REASON_CHALLENGE_FAILED) |
		       (1 << XG_REASON_CHALLENGE_RATE_LIMITED) |
		       (1 << XG_REASON_VERIFIED_SYN_RATE_LIMITED) |
		       (1 << XG_REASON_RULE_DROP) | (1 << XG_REASON_RULE_RATE_LIMITED) |
		       (1 << XG_REASON_SOURCE_RATE_LIMITED) | (1 << XG_REASON_NO_HEADROOM) |
		       (1 << XG_REASON_L2_OTHER),
	/* The loop parses with the same parser and fails closed the same way. */
	XG_STAGE_LOOP = (1 << XG_REASON_MALFORMED) | (1 << XG_REASON_EXT_HEADER_LIMIT) |
			(1 << XG_REASON_TCP_NO_FLOW) | (1 << XG_REASON_TCP_OUT_OF_WINDOW) |
			(1 << XG_REASON_TCP_SYNACK_REFLECTION) | (1 << XG_REASON_FLOW_TABLE_FULL) |
			(1 << XG_REASON_TCP_FRAGMENT) | (1 << XG_REASON_FLOW_QUOTA),
};

/*
 * The word the XDP program puts in front of every frame it hands to a
 * socket: it moves the frame's start back by sizeof(struct xg_meta)
 * (bpf_xdp_adjust_head, which every kernel with XDP allows, unlike
 * bpf_xdp_adjust_meta) and the loop takes it off again. Only the XDP
 * program puts frames into the sockets, so every frame there has it.
 */
enum {
	XG_META_MAGIC = 0x78676d33, /* "xgm3": the word is there */
	XG_META_ALLOWLISTED = 1,    /* the source matched the allowlist */
	/*
	 * State mode auto: the destination is above its rate of frames sent
	 * to the loop for a state check, so out-of-state frames are dropped.
	 */
	XG_META_STATE_OVER = 2,
	/*
	 * Forward without a state check: a RST of no flow that is not a
	 * challenge's answer, let through because SYN challenges are only
	 * monitored or the learning window is open.
	 */
	XG_META_FORWARD = 4,
	/*
	 * The source is verified (it answered a challenge): a segment of no
	 * tracked flow is adopted (its flow was evicted or lost), not dropped.
	 */
	XG_META_VERIFIED = 8,
};

/* Fragment state of a frame, as bits. */
enum xg_frag_bits {
	XG_FRAG_ANY = 1,	/* a fragment: IPv4 MF or offset, or an IPv6 Fragment header */
	XG_FRAG_LATER = 2,	/* offset is not 0: no L4 header in this frame */
	XG_FRAG_MORE = 4,	/* more fragments follow (IPv4 MF, the IPv6 M flag) */
};

struct xg_meta {
	__u32 flags;		/* XG_META_* */
	__u32 magic;		/* XG_META_MAGIC */
};

/*
 * What the parser found in a frame and the verdict it got: what
 * xg_classify() says, and what the program puts in front of every frame,
 * ahead of the word, when loaded with XG_CFG_SUMMARY (for the tests that
 * hold XDP and the C parser to the same answers).
 */
struct xg_summary {
	__u16 l3_off;		/* offset of the IP header in the frame; 0: not IP */
	__u16 l4_off;		/* offset of the L4 header; 0: none (later fragment, not IP) */
	__u8 l4_proto;		/* IPPROTO_* after the header chain */
	__u8 tcp_flags;		/* byte 13 of the TCP header */
	__u8 frag;		/* enum xg_frag_bits */
	__u8 reason;		/* the XDP verdict, enum xg_reason */
	/* The word that follows, as struct xg_meta (zero from xg_classify()). */
	__u32 flags;
	__u32 magic;
};

/* Value of the per-CPU per-reason counter array. */
struct xg_counter {
	__u64 packets;
	__u64 bytes;
	/*
	 * XDP's samples (bpf/xg_samples.h): this CPU samples the reason's
	 * next frame once @packets reaches @sample_at, or at once when
	 * xg_sample_cfg.gen is no longer @sample_gen (the rates changed).
	 * In the same line as the counts, so that the per-frame check
	 * touches nothing more. The loop leaves them zero.
	 */
	__u64 sample_at;
	__u32 sample_gen;
	__u32 pad;
};

/* TCP flow states, as tracked by the loop (and one day by XDP). */
enum xg_tcp_state {
	XG_TCP_FREE = 0,	/* an empty slot */
	XG_TCP_SYN_SENT = 1,	/* the initiator's SYN seen */
	XG_TCP_SYN_RECV = 2,	/* the responder's SYN-ACK seen */
	XG_TCP_ESTABLISHED = 3,	/* the initiator's ACK of the responder's ISN seen */
	XG_TCP_CLOSING = 4,	/* a FIN seen */
	XG_TCP_CLOSED = 5,	/* an in-window RST seen */
	XG_TCP_LEARNING = 6,	/* mid-stream, seen from outside only (learning window) */
	XG_TCP_NR_STATES = 7,
};

/* The two sides of a flow: index of the per-side fields of struct xg_flow. */
enum xg_side {
	XG_SIDE_OUT = 0,	/* the outside endpoint (client, or server the origin called) */
	XG_SIDE_IN = 1,		/* the inside endpoint (the origin) */
};

enum xg_flow_flags {
	XG_FLOW_INSIDE_INIT = 1, /* the inside side sent the SYN */
	XG_FLOW_ADOPTED = 2,	 /* picked up mid-stream: windows are not known */
	XG_FLOW_WSCALE = 4,	 /* both SYNs offered window scaling */
	/*
	 * Which per-side sequence fields hold a value: a first value is taken
	 * as is, later ones only if they move forward in sequence space (no
	 * starting value is "before" every ISN).
	 */
	XG_FLOW_END_OUT = 8,
	XG_FLOW_END_IN = 16,
	XG_FLOW_ACKED_OUT = 32,
	XG_FLOW_ACKED_IN = 64,
	/*
	 * A SYN from outside claimed the tuple of this live flow: a possible
	 * reopen (reopen_isn), taken only if the origin answers it.
	 */
	XG_FLOW_REOPEN = 128,
	/*
	 * Set by the loop on a flow whose handshake it saw (so its source
	 * passed any challenge) once it is established: XDP may forward its
	 * segments that carry no SYN, FIN or RST and fall in the window.
	 * Cleared when the flow leaves ESTABLISHED.
	 */
	XG_FLOW_FAST = 256,
	/*
	 * Adopted mid-stream outside the learning window because its source
	 * is verified (a flow evicted while idle, or lost): its segments are
	 * accepted as the learning window's are until the origin answers.
	 */
	XG_FLOW_VOUCHED = 512,
};

/*
 * A flow's key, canonical whatever the direction of the frame: outside
 * endpoint first. IPv4 addresses are stored as ::ffff:a.b.c.d.
 */
struct xg_flow_key {
	__u8 out_addr[16];
	__u8 in_addr[16];
	__be16 out_port;
	__be16 in_port;
	__u32 v6;
};

/*
 * A tracked TCP flow. Per-side arrays are indexed by enum xg_side.
 * Sequence numbers are host order; times are coarse monotonic seconds.
 */
struct xg_flow {
	struct xg_flow_key key;
	__u8 state;		/* enum xg_tcp_state */
	__u8 wscale[2];		/* window scale shift per side (with XG_FLOW_WSCALE) */
	__u8 reopen_wscale;	/* with XG_FLOW_REOPEN: the SYN's window scale */
	__u16 flags;		/* enum xg_flow_flags */
	__u16 pad;
	__u32 last_seen;
	__u32 isn[2];		/* initial sequence number */
	__u32 end[2];		/* highest seq + len sent */
	__u32 acked[2];		/* highest acknowledgment sent */
	__u32 maxwin[2];	/* largest scaled window advertised */
	__u32 reopen_isn;	/* with XG_FLOW_REOPEN: the SYN's sequence number */
	__u64 packets;		/* both directions */
	__u64 bytes;
};

enum {
	/* Slots of a flow-table bucket: a key lives in one bucket. */
	XG_FLOW_WAYS = 8,
};

/*
 * One bucket of the flow table: the value of the xg_flows array map
 * (BPF_F_MMAPABLE), which the XDP programs reach through the map and the
 * loop through the same memory mmap()ed. The lock word is taken by the
 * loop (spinning, briefly) and by XDP (spinning a bounded while: if it is
 * still held, the frame takes the AF_XDP path). slot[] has XG_FLOW_WAYS
 * entries.
 */
struct xg_flow_bucket {
	__u32 lock;
	__u32 pad;
	struct xg_flow slot[8];
};

/*
 * What XDP needs to find a flow: xg_flowinfo[0], written once when the
 * table is made and kept with it (a pinned table keeps its key).
 */
struct xg_flow_table {
	__u8 key[16];		/* SipHash key of the buckets */
	__u32 nbuckets;		/* a power of two */
	__u32 magic;		/* XG_FLOW_TABLE_MAGIC once written */
};

enum {
	XG_FLOW_TABLE_MAGIC = 0x78676674, /* "xgft" */
};

/* xg_fastcfg[0] of a program instance: what it may forward itself. */
enum xg_fast_flags {
	XG_FAST_ON = 1,		/* a peer sits in xg_peer[0] and takes redirected frames */
	XG_FAST_TCP = 2,	/* TCP of verified flows too (not in monitor mode or learning) */
};

struct xg_fast_cfg {
	__u32 flags;		/* enum xg_fast_flags */
	__u32 pad;
};

enum xg_tcp_mode {
	XG_MODE_OFF = 0,	/* no check */
	XG_MODE_MONITOR = 1,	/* count what would be dropped or challenged, pass it */
	XG_MODE_ON = 2,		/* always */
	XG_MODE_AUTO = 3,	/* only for a destination above its rate threshold */
};

/*
 * The TCP policy: the loop's (xg_tcp_configure(), read field by field once
 * per burst) and the outer program's (xg_tcpcfg[0], rewritten whole). Rates
 * are per second; each per-CPU token bucket of XDP gets rate / ncpus.
 */
struct xg_tcp_cfg {
	__u32 syn_mode;		/* enum xg_tcp_mode: SYN challenges */
	__u32 state_mode;	/* enum xg_tcp_mode: out-of-state drops */
	__u32 syn_rate;		/* auto: SYNs/s to one destination before challenges */
	__u32 syn_burst;	/* auto: SYNs above the rate tolerated at once */
	__u32 state_rate;	/* auto: frames/s to one destination judged by state */
	__u32 state_burst;
	__u32 verify_ttl;	/* seconds a verified source skips challenges */
	__u32 learn_until;	/* xg_tcp_now() up to which mid-stream flows are adopted */
	__u32 challenge_rate;	/* challenges/s sent at most, to all sources together */
	__u32 challenge_prefix_rate; /* ... to one source /24 (IPv4) or /48 (IPv6) */
	__u32 verified_syn_rate; /* SYNs/s a verified source may send while challenged */
	__u32 ncpus;		/* CPUs sharing each per-CPU rate */
	/*
	 * SYNs/s that skip the challenge because their source is verified:
	 * to one destination, and to all together. Beyond, they are
	 * challenged like any other: a spoofer can get a real host's address
	 * verified (any live host answers a stray SYN-ACK with a RST), and
	 * these bound what it can then send in that name.
	 */
	__u32 verified_dest_syn_rate;
	__u32 verified_total_syn_rate;
	/*
	 * Live flows one source, and one source /24 (IPv4) or /48 (IPv6), may
	 * hold; 0: an eighth, and a quarter, of the table. Beyond, its new
	 * flows are refused (flow_quota), and a full bucket gives up its
	 * flows first. Allowlisted sources are exempt.
	 */
	__u32 source_flow_quota;
	__u32 prefix_flow_quota;
};

/*
 * The cookie secret of the challenges (xg_secret[0]): key[gen] makes new
 * cookies, and the other, the previous key, still checks answers. Python
 * writes the next key into key[!gen], then flips gen.
 */
struct xg_cookie_secret {
	__u32 gen;
	__u32 pad;
	__u8 key[2][16];
	/*
	 * Odd, random, made with the first key and never rotated: which
	 * xg_chal_prefix slot a source prefix's challenges count in.
	 */
	__u64 prefix_salt;
};

/* An address as the TCP tables key it: IPv4 as ::ffff:a.b.c.d. */
struct xg_addr {
	__u8 addr[16];
};

/*
 * A source that answered a SYN challenge (xg_verified, an LRU hash keyed by
 * its struct xg_addr): until when that counts, and
 * its SYN rate's token bucket.
 */
struct xg_verified_src {
	__u32 expires;		/* coarse monotonic seconds */
	__u32 pad;
	__u64 last_ns;		/* the bucket's last refill (coarse ktime) */
	__s64 tokens;		/* billionths of a SYN; below zero for a moment in a race */
};

/* Keys of the LPM tries: prefix length in bits, then the address. */
struct xg_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct xg_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/*
 * Bits of xg_policy.stages: which of the rule stages hold anything, per
 * family; an empty stage costs nothing. Set after the first entry goes in,
 * cleared before the last goes out, as for the lists.
 */
enum xg_stage_bits {
	XG_STAGES_RULES_V4 = 1,
	XG_STAGES_RULES_V6 = 2,
	XG_STAGES_RATELIMITS_V4 = 4,
	XG_STAGES_RATELIMITS_V6 = 8,
};

/* Runtime switches of the outer program: xg_policy[0], rewritten whole. */
struct xg_policy {
	__u32 frag_policy; /* enum xg_frag_policy */
	__u32 lists;	   /* enum xg_list_bits */
	__u32 stages;	   /* enum xg_stage_bits */
	__u32 pad;
};

/*
 * N-tuple rules (bpf/xg_rules.h, xdpguard/rules.py): FlowSpec's match
 * components (RFC 8955, RFC 8956) and a few actions, in RFC 8955 order.
 *
 * xg_rule_index, an LPM trie keyed by destination prefix, holds for each
 * destination prefix of a rule the rules of exactly that prefix in their
 * order. More specific prefixes come first in that order, so a frame walks
 * its destination's chain of prefixes from the longest to the family's
 * root (the rules without a destination) and the first rule that matches
 * decides: at most XG_RULE_DEPTH lookups of at most XG_RULE_LIST_MAX rules
 * of at most XG_RULE_TERMS terms each. Rules live in slots of xg_rules; a
 * list entry names slot and tag, so a slot reused for another rule never
 * matches an entry meant for the one before.
 */
enum {
	XG_RULES_MAX = 16384,
	XG_RULE_TERMS = 24,
	XG_RULE_LIST_MAX = 64,
	XG_RULE_DEPTH = 8,
	XG_RATELIMITS_MAX = 4096,
	XG_RATELIMIT_SOURCES = 65536, /* per-source buckets (an LRU) */
	/*
	 * Rates are kept as the interval between two units (byte or packet)
	 * in ns << XG_RATE_SHIFT, per CPU (each CPU's bucket gets rate /
	 * ncpus, so the sum never exceeds the rate), and a frame conforms
	 * while its CPU's bucket is at most XG_RATE_TAU_NS ahead of now: the
	 * burst is 100 ms at the rate.
	 */
	XG_RATE_SHIFT = 16,
	XG_RATE_TAU_NS = 100000000,
	/*
	 * The rules' filter (struct xg_rule_filter): a frame whose destination
	 * is in no rule's prefix skips the walk at the cost of a few hashes.
	 */
	XG_RULE_LENS = 8,		/* prefix lengths checked per family; more: always walk */
	XG_RULE_BLOOM_WORDS = 4096,	/* 262,144 bits, two per prefix */
};

/* The components the rules match, numbered as FlowSpec types. */
enum xg_rule_comp {
	XG_RC_PROTO = 3,	/* IP protocol, or IPv6's upper-layer protocol */
	XG_RC_PORT = 4,		/* TCP or UDP, source or destination port */
	XG_RC_DPORT = 5,
	XG_RC_SPORT = 6,
	XG_RC_ICMP_TYPE = 7,	/* ICMP for IPv4, ICMPv6 for IPv6 */
	XG_RC_ICMP_CODE = 8,
	XG_RC_TCP_FLAGS = 9,	/* byte 13 of the TCP header */
	XG_RC_LENGTH = 10,	/* the IP packet's length, its header included */
	XG_RC_DSCP = 11,
	XG_RC_FRAGMENT = 12,	/* enum xg_rule_frag bits */
};

/*
 * An operator term's op, as FlowSpec encodes it minus the end and length
 * bits: numeric (lt, gt, eq: any of them true) or bitmask (match: all of
 * value's bits set, else any; not: the negation), and AND with the term
 * before (AND binds tighter than OR).
 */
enum xg_rule_op {
	XG_OP_EQ = 1,
	XG_OP_GT = 2,
	XG_OP_LT = 4,
	XG_OP_MATCH = 1,
	XG_OP_NOT = 2,
	XG_OP_AND = 0x40,
};

/* FlowSpec's fragment bits (RFC 8955 4.2.2.12; no DF in IPv6). */
enum xg_rule_frag {
	XG_RF_DF = 1,	/* don't fragment */
	XG_RF_ISF = 2,	/* a fragment other than the first */
	XG_RF_FF = 4,	/* the first fragment */
	XG_RF_LF = 8,	/* the last fragment */
};

enum xg_rule_action {
	XG_RULE_DROP = 1,
	XG_RULE_ACCEPT = 2,	/* no further rule; the rest of xdpguard still applies */
	XG_RULE_RATE_BYTES = 3,	/* conforming frames as accept, the rest dropped */
	XG_RULE_RATE_PACKETS = 4,
};

struct xg_rule_term {
	__u8 comp;	/* enum xg_rule_comp; terms are in component order */
	__u8 op;	/* enum xg_rule_op */
	__u16 value;
};

/* Keys of xg_rule_index and xg_rl_index: the family, then the address. */
struct xg_rule_key {
	__u32 prefixlen;	/* 8 (the family) + the prefix's length */
	__u8 family;		/* 4 or 6 */
	__u8 addr[16];		/* IPv4 in the first 4 bytes */
	__u8 pad[3];
};

struct xg_rule_list {
	__u32 prefixlen;	/* of this entry's key: the walk goes on below it */
	__u32 n;
	__u32 entry[64];	/* XG_RULE_LIST_MAX of slot | tag << 16, first first */
};

struct xg_rule {
	__u16 tag;
	__u8 action;		/* enum xg_rule_action */
	__u8 nterms;
	__u8 src_len;		/* the source prefix's length (src_mask says the same) */
	__u8 proto;		/* a frame of another protocol cannot match; 0: any */
	__u16 need;		/* bit c: component c is matched, so the frame needs its field */
	/*
	 * A component that is one range of values (dport 53, sport 1024-2048),
	 * checked here instead of by terms; 0: none. The common rule (a
	 * destination, a protocol, a port) then needs no terms at all.
	 */
	__u8 q_comp;
	__u8 pad;
	__u16 q_lo;
	__u16 q_hi;
	__u16 pad2;
	__u8 src[16];		/* a source matches if (its address ^ src) & src_mask is 0 */
	__u8 src_mask[16];	/* all zero: any source */
	__u64 interval;		/* rate actions: see XG_RATE_SHIFT */
	struct xg_rule_term terms[24]; /* XG_RULE_TERMS */
};

/*
 * Which destinations may have rules (xg_rule_filters[0], swapped whole):
 * for each family the prefix lengths of the rules' destinations, and a
 * Bloom filter of the prefixes (two bits each, xg_rule_hash()). A frame
 * walks the rules only if a length's prefix of its destination is in the
 * filter, or the family has rules without a destination (root), or more
 * lengths than XG_RULE_LENS (then lens[] holds nothing and root is set).
 * A false positive costs a walk, never a verdict.
 */
struct xg_rule_filter {
	__u8 lens[2][8];	/* XG_RULE_LENS per family (0: IPv4), longest first */
	__u8 nlens[2];
	__u8 root[2];
	__u8 pad[4];
	__u64 salt;
	__u64 bits[4096];	/* XG_RULE_BLOOM_WORDS */
};

/* Per rule slot and per CPU (xg_rule_stats), and per rate limit (xg_rl_stats). */
struct xg_rule_stats {
	__u64 packets;		/* frames that matched */
	__u64 bytes;
	__u64 dropped_packets;	/* ... and were dropped by its action */
	__u64 dropped_bytes;
};

/*
 * Per-source rate limits: xg_rl_index (LPM, by source) gives the longest
 * prefix's limit; its buckets are one per CPU for the whole prefix
 * (xg_rl_state[id]) or, XG_RL_PER_SOURCE, one per CPU per source address
 * (xg_rl_src, an LRU keyed by struct xg_rl_src_key).
 */
enum xg_ratelimit_flags {
	XG_RL_PER_SOURCE = 1,
};

struct xg_ratelimit {
	__u16 id;
	__u16 tag;
	__u32 flags;		/* enum xg_ratelimit_flags */
	__u64 pps_interval;	/* 0: no packet rate */
	__u64 bps_interval;	/* 0: no byte rate */
};

struct xg_rl_src_key {
	__u16 id;
	__u16 tag;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

/* A rate's bucket: when the next unit is due (ktime ns); per CPU. */
struct xg_rate_state {
	__u64 tat;
	__u64 tat_bytes;	/* the byte rate's, for a limit with both */
};

/*
 * A set of 16-bit numbers: number p is bit (p % 64) of bits[p / 64]. The
 * UDP source ports to drop (xg_udp_ports) and the ethertypes allowed
 * beside IP and ARP (xg_l2_allow).
 */
struct xg_port_set {
	__u64 bits[1024];
};

enum xg_load_flags {
	/*
	 * Put struct xg_summary in front of every frame, dropped ones
	 * included (for tests and the parser's parity check; the verifier
	 * removes the code when the flag is clear).
	 */
	XG_CFG_SUMMARY = 1,
	/* The kernel has no bpf_ktime_get_coarse_ns (before 5.11): the precise clock. */
	XG_CFG_NO_COARSE = 2,
	/*
	 * No samples and no counting per destination: the code is removed
	 * (for the bench's "off" of the same program).
	 */
	XG_CFG_NO_SAMPLES = 4,
};

/* Load-time settings of one program instance (a const volatile global). */
struct xg_load_cfg {
	__u32 role;  /* enum xg_role */
	__u32 flags; /* enum xg_load_flags */
};

/* What xdpguard trace reports: one kernel XDP error (bpf/xg_trace.bpf.c). */
enum xg_trace_kind {
	XG_TRACE_EXCEPTION = 1,	   /* xdp_exception: an XDP action failed (act) */
	XG_TRACE_REDIRECT_ERR = 2, /* xdp_redirect_err: a redirect failed (err, map) */
	XG_TRACE_DEVMAP_XMIT = 3,  /* xdp_devmap_xmit with drops or an error */
};

struct xg_trace_event {
	__u64 ts_ns;		/* ktime */
	__u64 netns_cookie;	/* of the device (the sending one for devmap_xmit) */
	__u64 to_netns_cookie;	/* devmap_xmit: the target device's */
	__u32 kind;		/* enum xg_trace_kind */
	__u32 ifindex;
	__u32 to_ifindex;
	__s32 err;		/* -errno, or 0 */
	__u32 act;		/* exception: the XDP action */
	__u32 prog_id;		/* the XDP program, where known */
	__u32 map_id;		/* redirect: the map, where there is one */
	__u32 map_type;
	__u32 index;		/* redirect: the map key */
	__s32 sent;		/* devmap_xmit: frames sent, and dropped */
	__s32 drops;
	__u32 pad;
};

/*
 * Packet samples (xdpguard capture, top): 1 in N frames of each verdict
 * reason, each a struct xg_sample on one ring buffer (xg_samples) that
 * both program instances share, under one cap in samples per second.
 */
enum {
	XG_SAMPLE_BYTES = 128,		/* of each frame, from its first byte */
	XG_SAMPLE_RING = 4194304,	/* bytes of xg_samples: 26,000 samples */
	/* Protected prefixes (xdpguard protect), and their addresses counted. */
	XG_PROTECT_MAX = 4096,
	XG_DEST_MAX = 65536,
};

/*
 * A frame's direction: the device it arrived on. The loop's counters and
 * the samples are by it.
 */
enum xg_dir {
	XG_DIR_IN = 0,	/* arrived on outer: client to origin (outer RX -> inner TX) */
	XG_DIR_OUT = 1,	/* arrived on inner: origin to client (inner RX -> outer TX) */
	XG_NR_DIRS = 2,
};

/* One record of the xg_samples ring buffer. */
struct xg_sample {
	__u64 ts_ns;	/* bpf_ktime_get_ns() when judged */
	__u32 len;	/* of the frame as it arrived */
	/*
	 * rule_drop, rule_rate_limited: 1 + the rule's slot;
	 * source_rate_limited: 1 + the rate limit's id; else 0.
	 */
	__u32 rule;
	__u32 every;	/* the frame's reason was sampled 1 in @every */
	__u8 reason;	/* enum xg_reason */
	__u8 dir;	/* enum xg_dir */
	__u8 caplen;	/* bytes of @data that are the frame's */
	__u8 pad;
	__u8 data[XG_SAMPLE_BYTES];
};

/* xg_sample_cfg[0], written whole by xdpguard. */
struct xg_sample_cfg {
	__u32 every[XG_REASON_CAP];	/* 1 in every[reason]; 0: never */
	__u64 interval_ns;		/* the cap: one sample per interval ... */
	__u64 burst_ns;			/* ... with bursts of burst_ns / interval_ns */
	/*
	 * Changed with every write, then copied to the program's global
	 * xg_sample_gen (bpf/xg_samples.h): every count starts over.
	 */
	__u32 gen;
	__u32 pad;
};

/* xg_sample_state[0]: the cap's bucket and what it cost, XDP's only. */
struct xg_sample_state {
	__u64 tat;		/* the cap's theoretical arrival time (GCRA) */
	__u64 taken;		/* samples put on the ring */
	__u64 capped;		/* samples the cap refused */
	__u64 ring_full;	/* samples the ring had no room for */
};

/* The protocol classes counted per protected destination. */
enum xg_dest_class {
	XG_CLASS_SYN = 0,	/* TCP with SYN and without ACK */
	XG_CLASS_TCP = 1,	/* every other TCP segment */
	XG_CLASS_UDP = 2,
	XG_CLASS_ICMP = 3,	/* ICMP and ICMPv6 */
	XG_CLASS_FRAGMENT = 4,	/* an IP fragment (its L4 may be unknown) */
	XG_CLASS_OTHER = 5,
	XG_NR_CLASSES = 6,
};

/*
 * Per protected prefix (xg_protect_stats, by the prefix's index) and per
 * destination address (xg_dests, an LRU by struct xg_addr): frames from
 * outside, whatever their verdict, per CPU.
 */
struct xg_dest_counts {
	__u64 packets[XG_NR_CLASSES];
	__u64 bytes[XG_NR_CLASSES];
	__u64 new_dests;	/* prefix only: addresses it put in xg_dests */
	/*
	 * Address only: 1 + the index of its protected prefix, so that a
	 * known address costs no trie lookup (0: not known on this CPU yet).
	 * xdpguard empties xg_dests when a prefix stops being protected.
	 */
	__u64 prefix;
};

/* cffi:end */

#endif /* XDPGUARD_H */
