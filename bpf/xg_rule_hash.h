/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The hash of a destination prefix in the rules' Bloom filter: XDP asks
 * the filter with it (bpf/xg_rules.h), and xdpguard/rules.py builds the
 * filter with it, through the shim's C build of this very file
 * (xg_rule_hash_of()): one function, so the filter cannot answer "no" for
 * a prefix that has rules, which would skip them.
 */
#ifndef XG_RULE_HASH_H
#define XG_RULE_HASH_H

#ifdef __bpf__
#define XG_RULE_HASH_INLINE static __always_inline
#else
#define XG_RULE_HASH_INLINE static inline
#endif

/*
 * The address's first @plen bits as two big-endian words @hi, @lo (IPv4
 * in the top of @hi), the length, the family (@v6), under @salt.
 */
XG_RULE_HASH_INLINE __u64 xg_rule_hash(__u64 hi, __u64 lo, __u32 plen, __u32 v6, __u64 salt)
{
	__u64 x;

	if (plen < 64) {
		hi &= plen ? ~0ULL << (64 - plen) : 0;
		lo = 0;
	} else if (plen < 128) {
		lo &= plen > 64 ? ~0ULL << (128 - plen) : 0;
	}
	x = hi * 0x9e3779b97f4a7c15ULL ^ lo * 0xc2b2ae3d27d4eb4fULL ^
	    ((__u64)(plen << 1 | v6) + salt) * 0x165667b19e3779f9ULL;
	x ^= x >> 29;
	x *= 0xbf58476d1ce4e5b9ULL;
	return x ^ (x >> 32);
}

#endif /* XG_RULE_HASH_H */
