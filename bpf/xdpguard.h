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

#include <linux/types.h>

/* cffi:begin */

enum {
	/* Bumped when a struct below changes shape. */
	XG_ABI_VERSION = 1,
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
};

/* Value of the per-CPU per-reason counter array. */
struct xg_counter {
	__u64 packets;
	__u64 bytes;
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

/* Runtime switches of the outer program: xg_policy[0], rewritten whole. */
struct xg_policy {
	__u32 frag_policy; /* enum xg_frag_policy */
	__u32 lists;	   /* enum xg_list_bits */
};

/* UDP source ports to drop: port p is bit (p % 64) of bits[p / 64]. */
struct xg_port_set {
	__u64 bits[1024];
};

/* Load-time settings of one program instance (a const volatile global). */
struct xg_load_cfg {
	__u32 role; /* enum xg_role */
	__u32 pad;
};

/* cffi:end */

#endif /* XDPGUARD_H */
