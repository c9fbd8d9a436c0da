/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * xg_shim: the C side of xdpguard. Python reaches it through cffi (the text
 * between cffi:begin and cffi:end is fed to ffi.cdef(), so it holds no
 * preprocessor directives); nothing here calls back into Python.
 *
 * Objects and who owns what
 * -------------------------
 *
 *   xg_prog    one loaded instance of bpf/xdpguard.bpf.o (maps included) and,
 *              once attached, the BPF link that ties it to one device. Closing
 *              the link (or the process dying) detaches the program.
 *   xg_umem    one UMEM: a single mmap()ed area of @nframes frames shared by
 *              every socket of the appliance, on every device and namespace.
 *   xg_sock    one AF_XDP socket bound to (device, queue) with its own RX, TX,
 *              fill and completion rings. Registered in its UMEM under
 *              (netns cookie, ifindex, queue): ifindexes repeat across
 *              namespaces, cookies do not.
 *   xg_worker  the hot loop for one queue index: it owns the outer and the
 *              inner socket of that queue, all four of their rings, and a
 *              private slice of the UMEM's frames.
 *   xg_tcp     the TCP stage every worker shares: the flow table (XDP's
 *              too) and the policy of its checks. SYN challenges are XDP's
 *              (bpf/xg_challenge.h).
 *
 * Ring ownership, per worker (U = this worker, K = kernel):
 *
 *             fill (U->K)                          fill (U->K)
 *   free  ---------------> outer RX (K->U) --+   <--------------- free
 *    ^                                       |                     ^
 *    |                 same descriptor,      v                     |
 *    |  outer TX (U->K) <---- no copy ---- inner RX (K->U)         |
 *    |       |   ^                             inner TX (U->K) <---+ (from outer RX)
 *    |       v                                           v
 *    +-- outer completion (K->U)      inner completion (K->U) --> free
 *
 * A frame is always in exactly one place: the worker's free stack, a fill,
 * RX, TX or completion ring, or in flight inside the kernel (taken from a
 * ring, not yet put on the next). xg_worker_account() proves it.
 *
 * Errors are negative errno values; 0 (or a count) is success. Functions do
 * not print, except that libbpf's own warnings (verifier log included) go to
 * stderr. Functions marked "netns" act in the network namespace of the
 * calling thread: call them from a thread that entered the device's
 * namespace with xg_netns_enter().
 */
#ifndef XG_SHIM_H
#define XG_SHIM_H

#include <stddef.h>
#include <stdint.h>

#include "xdpguard.h"

/* cffi:begin */

/* ---- network namespaces ---- */

/*
 * Move the calling thread (only it) into the network namespace @nsfd (an
 * open /run/netns/NAME or /proc/PID/ns/net). Needs CAP_SYS_ADMIN. Does not
 * block. Returns 0 or -errno.
 */
int xg_netns_enter(int nsfd);

/*
 * Store the cookie of the calling thread's network namespace (the value of
 * SO_NETNS_COOKIE, unique for the boot, unlike an ifindex or inode) in
 * @cookie. Returns 0 or -errno (-ENOPROTOOPT before Linux 5.14). netns.
 */
int xg_netns_cookie(uint64_t *cookie);

/*
 * Move the calling thread (only it) into a new, empty network namespace of
 * its own, and return an fd of it (O_CLOEXEC, the caller's to close). The
 * namespace and every device in it go away once no thread is in it and the
 * fd and every socket of it are closed: a probe's scratch space that
 * nothing outlives, not even a SIGKILL. Needs CAP_SYS_ADMIN. Returns the
 * fd or -errno.
 */
int xg_netns_new(void);

/*
 * Queues of the device @ifname that an AF_XDP socket can use: the device's
 * real RX and TX queue counts (ETHTOOL_GCHANNELS: dedicated plus combined
 * channels). Returns 0, -EOPNOTSUPP if the driver does not report channels
 * (fall back to the netlink counts), -ENODEV, or -errno. netns.
 */
int xg_dev_queues(const char *ifname, uint32_t *rx, uint32_t *tx);

/*
 * Frames other devices' XDP redirected into @ifname to send, by its driver's
 * counters: *@sent the ones it took, *@errors the ones it refused (a veth's
 * tx_queue_N_xdp_xmit[_errors]: what its peer's NAPI received). Returns
 * 0; -ENOENT if the driver counts no such thing; -ENODEV; -errno. netns.
 */
int xg_dev_xdp_xmit(const char *ifname, uint64_t *sent, uint64_t *errors);

/* ---- XDP program ---- */

struct xg_prog;

/*
 * Open the BPF object at @path and pick its program @prog_name (the only
 * one of the object's programs that will load); nothing is in the kernel
 * yet. Set load-time constants with xg_prog_set_rodata(), then
 * xg_prog_load(). *@out owns the object; free it with xg_prog_close().
 * Returns 0, -ENOENT (no such file or program) or libbpf's -errno.
 */
int xg_prog_open(const char *path, const char *prog_name, struct xg_prog **out);

/*
 * What libbpf said (warnings and the verifier's log) since the last call,
 * up to @size - 1 bytes of its end, NUL-terminated, in @buf; the buffer
 * is emptied. From the first call on, libbpf's messages are kept here and
 * no longer printed to stderr. Returns the length copied. Any thread.
 */
size_t xg_libbpf_log(char *buf, size_t size);

/*
 * Before xg_prog_load(): set the const volatile global @var (in .rodata) to
 * the @size bytes at @value. Returns 0, -ENOENT (no such variable), -EINVAL
 * (@size differs from the variable's: object and header disagree), -EBUSY
 * (already loaded).
 */
int xg_prog_set_rodata(struct xg_prog *prog, const char *var, const void *value,
		       size_t size);

/*
 * Copy the value the object gives the const volatile global @var (its
 * initial value, or what xg_prog_set_rodata() put there) to @value.
 * Returns 0, -ENOENT (no such variable) or -EINVAL (@size differs from the
 * variable's). Does not block.
 */
int xg_prog_get_rodata(struct xg_prog *prog, const char *var, void *value, size_t size);

/*
 * Before xg_prog_load(): make the object's map @name the existing map @fd
 * (shared by several program instances, or pinned), which must have its
 * shape. Returns 0, -ENOENT, -EBUSY (already loaded) or libbpf's -errno.
 */
int xg_prog_reuse_map(struct xg_prog *prog, const char *name, int fd);

/*
 * Before xg_prog_load(): give the object's map @name @max_entries instead
 * of what the object says. Returns 0, -ENOENT, -EBUSY or libbpf's -errno.
 */
int xg_prog_set_max_entries(struct xg_prog *prog, const char *name, uint32_t max_entries);

/*
 * Load every program and map of the object into the kernel. Needs CAP_BPF.
 * Returns 0 or libbpf's -errno (the verifier log goes to stderr).
 */
int xg_prog_load(struct xg_prog *prog);

/* Program fd, owned by @prog (do not close). */
int xg_prog_fd(const struct xg_prog *prog);

/*
 * Fd of the map called @name, owned by @prog (do not close). Returns the fd
 * or -ENOENT.
 */
int xg_prog_map_fd(const struct xg_prog *prog, const char *name);

/*
 * Attach @prog to @ifindex with a BPF link; @xdp_flags selects the mode
 * (XDP_FLAGS_DRV_MODE = 4 for native, XDP_FLAGS_SKB_MODE = 2 for generic).
 * The link belongs to @prog: it is released by xg_prog_detach(),
 * xg_prog_close() or the process' exit, so a crash never leaves the program
 * behind. Returns 0; -EBUSY if another program is attached to the device;
 * -EEXIST if @prog is already attached; -EOPNOTSUPP if the driver lacks
 * the mode; -ENODEV. Does not block. netns.
 */
int xg_prog_attach(struct xg_prog *prog, int ifindex, uint32_t xdp_flags);

/* Release the link made by xg_prog_attach(). Returns 0 or -ENOENT. */
int xg_prog_detach(struct xg_prog *prog);

/*
 * Where the link made by xg_prog_attach() still holds the program: its
 * ifindex, or 0 once the kernel let go of it (the device was deleted or
 * moved to another namespace, or someone detached the link with bpftool).
 * -ENOENT if not attached. Does not block; any namespace.
 */
int xg_prog_link_ifindex(const struct xg_prog *prog);

/* Detach if attached, unload, free @prog. NULL is a no-op. */
void xg_prog_close(struct xg_prog *prog);

/*
 * The XDP program attached to @ifindex: *@prog_id = 0 if none, else its id,
 * and *@mode = XDP_ATTACHED_* (1 drv, 2 skb, 3 hw, 4 multi). Returns 0 or
 * -errno. netns.
 */
int xg_xdp_query(int ifindex, uint32_t *prog_id, uint32_t *mode);

/*
 * Attach the sk_lookup program @prog_fd to the network namespace open at
 * @netns_fd with a BPF link. Returns the link's fd (the caller owns it:
 * closing it detaches), or -errno. Needs CAP_NET_ADMIN and CAP_BPF.
 */
int xg_netns_link(int prog_fd, int netns_fd);

/*
 * The BPF link that holds program @prog_id on @ifindex (from
 * xg_xdp_query(), so in the caller's namespace): *@link_id. Returns 0, or
 * -ENOENT when no link does (the program was attached through netlink).
 * Needs CAP_SYS_ADMIN. Walks every BPF link of the system; not for hot
 * paths. Does not block.
 */
int xg_xdp_link_id(int ifindex, uint32_t prog_id, uint32_t *link_id);

/*
 * Run @prog_fd @repeat times (at least once) over @data (BPF_PROG_TEST_RUN),
 * on the calling CPU, as if received on @rx_queue of @ingress_ifindex (0 =
 * no device; a non-zero queue needs a device). The first @meta_len bytes
 * of @data are metadata in front of the frame, taken from its headroom (up
 * to 216: what a driver with little headroom leaves is the rest). The
 * frame as the last run left it, metadata included, is copied to
 * @data_out (up to *@size_out bytes; *@size_out is updated). Needs
 * CAP_BPF. Returns 0, the last run's XDP action in *@action and the
 * kernel's mean time of a run in *@duration_ns (if not NULL), or -errno.
 * The runs share one frame: a program that changes it (a challenge, the
 * loop's word) sees its own change on the next run.
 */
int xg_prog_test_run(int prog_fd, const void *data, uint32_t size, uint32_t meta_len,
		     void *data_out, uint32_t *size_out, uint32_t ingress_ifindex,
		     uint32_t rx_queue, uint32_t repeat, uint32_t *action,
		     uint32_t *duration_ns);

/* ---- the tests' and benchmarks' traffic generator ---- */

struct xg_gen;

/* What a generator sends: one template frame, varied per frame. */
struct xg_gen_cfg {
	uint8_t frame[2048];	/* the template, @len bytes of it */
	uint32_t len;		/* at least 14, at most 2048 */
	uint32_t random_saddr;	/* IPv4: a random host of 198.18.0.0/15 per frame */
	uint32_t random_sport;	/* TCP/UDP: a random source port (1024-61023) per frame */
	uint32_t mix_fragments;	/* IPv4: every other frame the smallest later fragment */
	uint32_t random_host_bits; /* IPv4: the source's low bits (1-24) random per frame */
	/*
	 * IPv4 UDP: each frame cut to a random length from this many bytes to
	 * @len (the IP and UDP lengths follow; the UDP checksum becomes 0,
	 * "none"); 0: every frame @len long.
	 */
	uint32_t random_len_min;
	uint32_t random_dst_bits; /* IPv4: the destination's low bits (1-24) random per frame */
	uint32_t pad;
	uint64_t seed;		/* of the variations; 0: a fixed one */
};

/*
 * A TX-only AF_XDP socket in copy mode on queue @queue of @ifname, with a
 * UMEM of its own (8 MiB), sending @cfg's frame. Copy mode works on every
 * device; nothing is attached to the device. Checksums (IPv4 header, and
 * the TCP or UDP one) stay right through every variation. *@out is the
 * caller's: free with xg_gen_close(). Needs CAP_NET_RAW. Returns 0,
 * -EINVAL (a variation the template cannot take: not IPv4), or libxdp's
 * -errno. netns.
 */
int xg_gen_create(const char *ifname, uint32_t queue, const struct xg_gen_cfg *cfg,
		  struct xg_gen **out);

/*
 * Send @count frames, at @pps frames per second (0: as fast as the kernel
 * takes them), for at most @max_ms milliseconds (0: no bound), then wait
 * until the kernel sent what was queued. Blocks until then, or until
 * xg_gen_stop(). Only one thread may send on a generator. Returns 0,
 * -ETIMEDOUT (the kernel stopped taking frames for a second), or the
 * -errno of sendto() (-ENETDOWN, -ENXIO).
 */
int xg_gen_send(struct xg_gen *g, uint64_t count, uint64_t pps, uint32_t max_ms);

/* Frames the kernel has sent so far (completed). Any thread, lock-free. */
uint64_t xg_gen_sent(const struct xg_gen *g);

/* Make xg_gen_send() return soon, now and for good. Any thread. */
void xg_gen_stop(struct xg_gen *g);

/* Close the socket and free everything. NULL is a no-op. */
void xg_gen_close(struct xg_gen *g);

/* ---- the parser ---- */

/*
 * Classify @frame as the outer XDP program does with an empty policy, with
 * the same parser (bpf/xg_parse.h): *@out gets what the program loaded
 * with XG_CFG_SUMMARY writes in front of a frame (out->meta zero),
 * out->reason its verdict (XG_REASON_REDIRECTED, MALFORMED,
 * EXT_HEADER_LIMIT, an L4 verdict, or L2_OTHER for a frame neither IP nor
 * ARP). Reads @len bytes and no more. Never fails, does not
 * block.
 */
void xg_classify(const uint8_t *frame, uint32_t len, struct xg_summary *out);

/* What xg_sample_keys() found in a sample. */
enum {
	XG_KEYS_IP = 1,		/* src, dst and proto are set */
	XG_KEYS_V6 = 2,
	XG_KEYS_PORTS = 4,	/* TCP or UDP: sport and dport are set */
};

struct xg_sample_keys {
	uint8_t src[16];	/* IPv4 as ::ffff:a.b.c.d */
	uint8_t dst[16];
	uint16_t sport;		/* host order */
	uint16_t dport;
	uint16_t l3_proto;	/* the ethertype after VLAN tags, host order */
	uint16_t ip_len;	/* the IP packet's length, as FlowSpec's packet length */
	uint8_t proto;		/* IPPROTO_* after the header chain */
	uint8_t tcp_flags;
	uint8_t flags;		/* XG_KEYS_* */
	uint8_t ttl;		/* IPv4 TTL, IPv6 hop limit */
	uint8_t frag;		/* enum xg_frag_bits */
	uint8_t pad[3];
};

/*
 * The addresses and ports of @n samples, by the parser of bpf/xg_parse.h
 * (what a sample lacks of its frame reads as zeros): @out[i] for @s[i].
 * Never fails, does not block; thread-safe.
 */
void xg_sample_keys(const struct xg_sample *s, uint32_t n, struct xg_sample_keys *out);

/*
 * SipHash-@c-@d of the @n 64-bit words at @words (little-endian) under the
 * 16-byte @key: xg_flow.h's xg_siphash(), which the flow table (1-3) and
 * the challenges' cookies (2-4) use in XDP and in the loop, for its
 * known-answer tests. Never fails, does not block.
 */
uint64_t xg_siphash_words(const uint64_t *words, uint32_t n, const uint8_t *key, uint32_t c,
			  uint32_t d);

/*
 * bpf/xg_rule_hash.h's xg_rule_hash(), the rules' Bloom filter hash, as
 * XDP computes it: Python builds the filter with this. Never fails.
 */
uint64_t xg_rule_hash_of(uint64_t hi, uint64_t lo, uint32_t plen, uint32_t v6, uint64_t salt);

/* ---- policy maps ---- */

/*
 * Create an empty LPM trie shaped like the inner maps of xg_lists_v4 (@v6 =
 * 0) or xg_lists_v6 (@v6 = 1), ready to be filled and put into a slot. The
 * caller owns the returned fd (close() it; a slot holding the map keeps it
 * alive). Needs CAP_BPF. Returns the fd or -errno.
 */
int xg_lpm_create(int v6);

/*
 * Whether the kernel makes a map of this shape (enum bpf_map_type @type,
 * BPF_F_* @flags, @map_extra, @inner_fd for a map of maps or -1): it is
 * made and closed at once. Needs CAP_BPF. Returns 0 or -errno.
 */
int xg_map_probe(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries,
		 uint32_t flags, uint64_t map_extra, int inner_fd);

/*
 * Create the rules' filter map shaped like the inner map of xg_rule_filters
 * (one struct xg_rule_filter), holding @filter, ready to be put into the
 * slot. The caller owns the returned fd. Needs CAP_BPF. Returns the fd or
 * -errno (nothing to close then).
 */
int xg_rule_filter_create(const struct xg_rule_filter *filter);

/*
 * Every entry of @fd, the XDP program's xg_dests (per-CPU struct
 * xg_dest_counts by struct xg_addr), up to @max: the addresses in @keys,
 * their counts summed over the CPUs in @sums, how many in *@n. The map
 * changes while it is read: an entry may be missed or read twice, none is
 * torn. Returns 0 or -errno (then *@n says how many were read). Blocks
 * for a syscall per 1024 entries.
 */
int xg_dests_read(int fd, struct xg_addr *keys, struct xg_dest_counts *sums, uint32_t max,
		  uint32_t *n);

/*
 * Write @count entries (@keys and @values: arrays of the map's key and
 * value size) into the map @fd: with BPF_MAP_UPDATE_BATCH, or one by one
 * where the kernel refuses batches for this map type. *@done is the number
 * written, also on failure (entries before it are in the map). Blocks for
 * the duration of the syscalls. Returns 0 or -errno.
 */
int xg_map_update_many(int fd, const void *keys, const void *values,
		       uint32_t count, uint32_t *done);

/*
 * Delete @count keys from the map @fd, batched where the kernel can. A key
 * that is not there stops the batch, so pass only keys that are. *@done as
 * above. Returns 0 or -errno.
 */
int xg_map_delete_many(int fd, const void *keys, uint32_t count,
		       uint32_t *done);

/* What a map is, as the kernel has it (enum bpf_map_type, sizes, flags). */
struct xg_map_shape {
	uint32_t type;
	uint32_t key_size;
	uint32_t value_size;
	uint32_t max_entries;
	uint32_t flags;
	/* Bytes of one entry's value as lookups copy it: every CPU's, per CPU. */
	uint32_t value_stride;
};

/* Fill *@out for the map @fd. Returns 0 or -errno. Does not block. */
int xg_map_shape(int fd, struct xg_map_shape *out);

/*
 * Copy up to @max entries of the map @fd to @keys and @values (arrays of
 * its key size and value_stride), in batches where the kernel has them for the
 * map type, else key by key; *@count is how many. Entries added or
 * deleted meanwhile may be missed (never copied twice). Returns 0 or
 * -errno. Blocks for the duration of the syscalls.
 */
int xg_map_dump(int fd, void *keys, void *values, uint32_t max, uint32_t *count);

/* ---- the flow table's maps ---- */

struct xg_flowtab;

/*
 * Make the flow table: the map xg_flows (an mmapable array of @nbuckets
 * struct xg_flow_bucket, @nbuckets a power of two) and xg_flowinfo (its
 * struct xg_flow_table: a fresh random SipHash key, @nbuckets), both
 * empty, xg_flows mapped into this process. Put the fds into the XDP
 * programs with xg_prog_reuse_map() before they load. *@out owns maps and
 * mapping; free with xg_flowtab_close() after everything using them.
 * Needs CAP_BPF. Returns 0, -EINVAL, or -errno.
 */
int xg_flowtab_create(uint32_t nbuckets, struct xg_flowtab **out);

/*
 * Open a table pinned in @dir by xg_flowtab_pin(), with its flows, if it
 * has the shape this build expects for @nbuckets buckets. Returns 0;
 * -ENOENT (nothing pinned); -ESTALE (pinned with another size or layout:
 * unusable); -errno.
 */
int xg_flowtab_open(const char *dir, uint32_t nbuckets, struct xg_flowtab **out);

/*
 * Copy into @to the live flows of the table pinned in @dir, which has this
 * build's layout but another size (xg_flowtab_open() said -ESTALE): a
 * resized table (--max-flows) keeps its flows. Established flows first;
 * a flow whose new bucket is full is left behind. *@moved and *@left get
 * the counts. Call it before any program or loop uses @to: it takes no
 * bucket lock (a killed process may have died holding one of the old
 * table's). The pinned table is only read. Returns 0; -ENOENT (nothing
 * pinned); -ESTALE (another layout: nothing to copy); -errno. Allocates
 * nothing but the mapping; never blocks on the data path.
 */
int xg_flowtab_migrate(const char *dir, struct xg_flowtab *to, uint64_t *moved,
		       uint64_t *left);

/*
 * Pin both maps in @dir (an existing directory of a bpffs), replacing what
 * was pinned there. The pins outlive the process. Returns 0 or -errno.
 */
int xg_flowtab_pin(struct xg_flowtab *t, const char *dir);

/* Fd of xg_flows (@which 0) or xg_flowinfo (1), owned by @t; -EINVAL. */
int xg_flowtab_fd(const struct xg_flowtab *t, int which);

/* The buckets, mapped; owned by @t. */
struct xg_flow_bucket *xg_flowtab_buckets(const struct xg_flowtab *t);

/* The table's key and size; owned by @t. */
const struct xg_flow_table *xg_flowtab_info(const struct xg_flowtab *t);

/* Unmap and close (pins stay). NULL is a no-op. */
void xg_flowtab_close(struct xg_flowtab *t);

/* ---- UMEM and AF_XDP sockets ---- */

struct xg_umem;
struct xg_sock;

/*
 * Allocate a UMEM of @nframes frames of @frame_size bytes (2048 or 4096),
 * with fill and completion rings of @ring_size entries (a power of two)
 * for every socket. The kernel registration happens in the first
 * xg_sock_create(), in that caller's namespace (see there). *@out owns the
 * memory; free with xg_umem_destroy() after every socket on it is
 * destroyed. Does not block. Returns 0, -EINVAL or -ENOMEM.
 */
int xg_umem_create(uint32_t nframes, uint32_t frame_size, uint32_t ring_size,
		   struct xg_umem **out);

/*
 * Free @umem. Returns 0, or -EBUSY (and frees nothing) while sockets remain.
 * NULL is a no-op.
 */
int xg_umem_destroy(struct xg_umem *umem);

/* Number of frames and frame size of @umem. */
uint32_t xg_umem_nframes(const struct xg_umem *umem);
uint32_t xg_umem_frame_size(const struct xg_umem *umem);

/* What a socket is bound to (see xg_sock_info()). */
struct xg_sock_info {
	uint64_t netns_cookie;
	int32_t ifindex;
	uint32_t queue;
	uint32_t role;		/* enum xg_role */
	uint32_t zerocopy;	/* 1 if bound in zero-copy mode */
	uint32_t need_wakeup;	/* 1 if the rings use need_wakeup */
	int32_t fd;
	char ifname[16];
};

/* The kernel's XDP_STATISTICS for one socket, field for field. */
struct xg_xsk_stats {
	uint64_t rx_dropped;
	uint64_t rx_invalid_descs;
	uint64_t tx_invalid_descs;
	uint64_t rx_ring_full;
	uint64_t rx_fill_ring_empty_descs;
	uint64_t tx_ring_empty_descs;
};

/*
 * Create an AF_XDP socket on @umem bound to queue @queue of the device
 * @ifname as seen from the calling thread's namespace, with RX and TX rings
 * of @ring_size entries (a power of two) and its own fill and completion
 * rings of the UMEM's ring size (xg_umem_create()).
 * The first socket of a UMEM also registers the UMEM (CAP_NET_RAW, and
 * RLIMIT_MEMLOCK or CAP_IPC_LOCK for the pinned pages); its @bind_flags
 * decide need_wakeup and copy/zero-copy for every later socket, whose own
 * @bind_flags must be 0.
 * No XDP program is loaded: put xg_sock_fd() into the program's xg_xsks
 * map. @bind_flags are XDP_COPY (2), XDP_ZEROCOPY (4) and/or
 * XDP_USE_NEED_WAKEUP (8); @role is recorded for the workers. *@out is owned
 * by @umem's registry until xg_sock_destroy(). Returns 0; -ENODEV (no such
 * device here); -EEXIST (this (netns, ifindex, queue) already has a socket
 * on @umem); -EINVAL (queue beyond the device's queues); -EXDEV (the
 * socket did not end up in the caller's namespace); -errno from
 * socket()/bind(). netns.
 */
int xg_sock_create(struct xg_umem *umem, const char *ifname, uint32_t queue,
		   uint32_t ring_size, uint32_t bind_flags, uint32_t role,
		   struct xg_sock **out);

/*
 * The socket registered on @umem for (@netns_cookie, @ifindex, @queue), or
 * NULL. The pointer stays owned by @umem.
 */
struct xg_sock *xg_sock_find(const struct xg_umem *umem, uint64_t netns_cookie,
			     int ifindex, uint32_t queue);

/* Fill *@info. Never fails. */
void xg_sock_info(const struct xg_sock *sock, struct xg_sock_info *info);

/* Read the kernel's XDP_STATISTICS for @sock. Returns 0 or -errno. */
int xg_sock_stats(const struct xg_sock *sock, struct xg_xsk_stats *stats);

/*
 * Unbind, unmap and close @sock and remove it from its UMEM's registry. Its
 * worker must be destroyed first. NULL is a no-op.
 */
void xg_sock_destroy(struct xg_sock *sock);

/* ---- TCP flow protection (shared by every worker) ---- */

struct xg_tcp;
struct xg_worker_stats;

/*
 * enum xg_tcp_mode and struct xg_tcp_cfg, the TCP policy, are in
 * bpf/xdpguard.h: XDP reads them too.
 */

/* Occupancy of the flow table (see xg_tcp_scan()). */
struct xg_tcp_counts {
	uint64_t capacity;
	uint64_t states[8];	/* live flows by enum xg_tcp_state; [0] = free slots */
	uint64_t evictions;	/* flows given up for a new one in a full bucket */
	uint64_t fast;		/* live flows XDP forwards (XG_FLOW_FAST) */
};

/*
 * Allocate the flow table (@max_flows, rounded up to whole buckets of 8)
 * with @cfg. The table is keyed with SipHash under a random key, so no one
 * can aim floods at one bucket. *@out belongs to the caller; free it with
 * xg_tcp_destroy() after every worker using it. Returns 0, -EINVAL or
 * -ENOMEM. Does not block.
 */
int xg_tcp_create(uint32_t max_flows, const struct xg_tcp_cfg *cfg, struct xg_tcp **out);

/*
 * The same, with the flow table of @ft, which XDP shares (XG_FLOW_FAST
 * flows are forwarded there). @ft must outlive the stage; its flows,
 * restored from a pin or not, are the stage's from the start. Call it
 * before any XDP program using @ft is attached: it frees every bucket
 * lock (a killed process may have died holding one). Returns 0, -EINVAL
 * or -ENOMEM.
 */
int xg_tcp_create_shared(struct xg_flowtab *ft, const struct xg_tcp_cfg *cfg,
			 struct xg_tcp **out);

/* Free @tcp. NULL is a no-op. */
void xg_tcp_destroy(struct xg_tcp *tcp);

/* Replace the policy (takes effect within one burst). Never fails. */
void xg_tcp_configure(struct xg_tcp *tcp, const struct xg_tcp_cfg *cfg);

/* Copy the policy out. */
void xg_tcp_config(const struct xg_tcp *tcp, struct xg_tcp_cfg *cfg);

/* The loop's clock: coarse monotonic seconds (for learn_until, expiries). */
uint32_t xg_tcp_now(void);

/*
 * Walk the flow table (taking each bucket's lock briefly; workers keep
 * running): fill *@counts and copy up to @ntop of the busiest live flows,
 * most packets first, to @top. Returns how many were copied. O(capacity).
 */
uint32_t xg_tcp_scan(struct xg_tcp *tcp, struct xg_tcp_counts *counts,
		     struct xg_flow *top, uint32_t ntop);

/* What xg_tcp_quota() found. */
struct xg_tcp_quota_report {
	uint32_t source_quota;	/* in force (0 in the settings: an eighth of the table) */
	uint32_t prefix_quota;	/* ... a quarter */
	uint32_t sources_over;	/* sources at or over their quota now */
	uint32_t prefixes_over;
	uint64_t top_source;	/* the most flows one source holds (among those counted) */
	uint64_t top_prefix;
};

/*
 * Find the sources and source prefixes (/24, /48) at or over their quota
 * of live flows (struct xg_tcp_cfg), and publish them to the workers: their
 * new flows are refused from now on (flow_quota), and a full bucket gives
 * up their flows first. Walks the table twice without its locks (counts
 * may be a flow off); allocates about 1 MiB, freed before it returns. For
 * the housekeeping, every second or so. Returns 0 or -ENOMEM.
 */
int xg_tcp_quota(struct xg_tcp *tcp, struct xg_tcp_quota_report *report);

enum xg_tcp_verdict {
	XG_V_FORWARD = 0,	/* pass the frame on, unchanged */
	XG_V_DROP = 1,		/* free the frame (its reason is counted) */
};

/*
 * Judge one frame exactly as the hot loop does, with the clock given
 * (@now_s as xg_tcp_now()): for tests and tools.
 * @from_outside picks the direction (frames from inside always pass);
 * @meta is what XDP said of a frame from outside (XG_META_* flags). The
 * frame is not changed (*@len neither). Verdict counters go to @stats.
 * Returns an enum xg_tcp_verdict.
 */
int xg_tcp_judge(struct xg_tcp *tcp, uint8_t *frame, uint32_t *len, int from_outside,
		 uint32_t meta, uint32_t now_s,
		 struct xg_worker_stats *stats);

/* ---- workers ---- */

struct xg_worker;

/* Directions (enum xg_dir) are bpf/xdpguard.h's. */
enum {
	/* Descriptors moved per ring per step of the loop. */
	XG_BATCH = 64,
	/* Longest sleep in poll() when idle; bounds the reaction to stop. */
	XG_IDLE_POLL_MS = 50,
};

enum {
	/* Forward without any per-frame logic: the benchmarks' baseline. */
	XG_WORKER_NO_POLICY = 1,
};

/*
 * Counters of one direction. Written only by the worker thread; any thread
 * may read them at any time without a lock (each is a naturally aligned
 * 64-bit integer, so a read never tears).
 */
struct xg_dir_stats {
	uint64_t rx_packets;	/* descriptors taken from the RX ring */
	uint64_t rx_bytes;
	uint64_t tx_packets;	/* descriptors put on the other side's TX ring */
	uint64_t tx_bytes;
	uint64_t tx_ring_full;	/* frames freed because that TX ring was full */
	uint64_t dropped;	/* frames freed by a verdict of the loop */
	uint64_t tx_wakeups;	/* sendto() kicks (only when the ring asked) */
	uint64_t fill_wakeups;	/* kicks because the fill ring asked */
	uint64_t fill_short;	/* fill ring not topped up: no free frames */
	uint64_t completions;	/* frames reaped from the completion ring */
};

struct xg_worker_stats {
	struct xg_dir_stats dir[2]; /* indexed by XG_DIR_* */
	uint64_t loops;		/* iterations of the loop */
	uint64_t polls;		/* idle poll() calls */
	/* The loop's own verdicts (drops), by enum xg_reason. */
	struct xg_counter reasons[64];
	/* What monitor (or auto below its threshold) let pass but would drop. */
	struct xg_counter monitor[64];
	uint64_t tx_down;	/* kicks refused because the device was down */
	/* Why the loop stopped by itself: 0, or -errno and the XG_ROLE_* of
	 * the socket concerned. Written once, before xg_worker_run() returns. */
	int32_t error;
	uint32_t error_role;
};

/*
 * Where every frame of a worker's slice is. When @consistent is 1 the
 * numbers satisfy
 *     free + fill + rx + tx + completion + in_flight == total,
 * with in_flight derived from the worker's own counters (descriptors given
 * to and taken back from the kernel), so a frame the loop lost or gave out
 * twice breaks the sum. in_flight is what the kernel holds between rings:
 *   in_flight_tx  taken from a TX ring, not yet completed (skbs on their
 *                 way); drains to 0 once traffic stops;
 *   in_flight_rx  taken from a fill ring, not on an RX ring. Besides frames
 *                 being received, in copy mode this includes buffers the
 *                 kernel keeps in its pool after dropping a frame for a full
 *                 RX ring: they serve the next frame on that queue, so they
 *                 drain when traffic arrives, not when it stops.
 */
struct xg_frame_account {
	uint64_t total;
	uint64_t free;
	uint64_t fill;
	uint64_t rx;
	uint64_t tx;
	uint64_t completion;
	int64_t in_flight;
	int64_t in_flight_rx;
	int64_t in_flight_tx;
	uint32_t consistent;
	uint32_t pad;
};

/*
 * Make the worker for one queue index: it moves frames between @outer and
 * @inner (two sockets on @umem with the same queue id, possibly in different
 * namespaces) using frames [@first_frame, @first_frame + @nframes) of
 * @umem, none of which another worker may use. @flags: XG_WORKER_*. Fills
 * both fill rings before returning. The worker does not own the sockets.
 * Returns 0, -EINVAL (bad slice, or sockets from another UMEM), -ENOMEM.
 */
int xg_worker_create(struct xg_umem *umem, struct xg_sock *outer,
		     struct xg_sock *inner, uint32_t first_frame,
		     uint32_t nframes, uint32_t flags, struct xg_worker **out);

/*
 * Run the hot loop in the calling thread until xg_worker_stop(). Blocks
 * (call it with the GIL released: cffi does). Never allocates, logs or calls
 * back. Sleeps in poll() for at most XG_IDLE_POLL_MS when there is nothing
 * to do, also while a device is down (frames then wait on its TX ring).
 * Returns 0 when stopped, -EALREADY if already running, or -ENODEV when a
 * socket lost its device (deleted, or moved to another namespace): the loop
 * then stops by itself and says which socket in stats->error_role. That is
 * noticed within a second.
 */
int xg_worker_run(struct xg_worker *w);

/*
 * Ask the loop to return; it does within XG_IDLE_POLL_MS plus one batch.
 * Does not block; safe from any thread and from a signal handler.
 */
void xg_worker_stop(struct xg_worker *w);

/* Live counters of @w, owned by @w; valid until xg_worker_destroy(). */
const struct xg_worker_stats *xg_worker_stats(const struct xg_worker *w);

/*
 * Take the frame account of @w. While the loop runs, it is taken by the
 * loop itself between two steps (so nothing is in the loop's hands); this
 * call waits up to @timeout_ms for that and returns -ETIMEDOUT otherwise.
 * When the loop is not running it is taken at once. Returns 0 or -errno.
 */
int xg_worker_account(struct xg_worker *w, struct xg_frame_account *out,
		      int timeout_ms);

/*
 * Give @w the TCP stage @tcp (NULL: none), before xg_worker_run(). A worker
 * created with XG_WORKER_NO_POLICY ignores it. Returns 0 or -EBUSY while
 * running.
 */
int xg_worker_set_tcp(struct xg_worker *w, struct xg_tcp *tcp);

/* Free @w (stop and join its thread first). NULL is a no-op. */
void xg_worker_destroy(struct xg_worker *w);

/* ---- BPF ring buffers of fixed-size records ---- */

struct xg_ring;

/*
 * Read the ring buffer map @map_fd (the caller keeps it open), whose
 * records are @rec_size bytes, through a backlog of @backlog records.
 * *@out is the caller's: free with xg_ring_close(). Returns 0, -EINVAL or
 * -ENOMEM, or libbpf's -errno.
 */
int xg_ring_open(int map_fd, uint32_t rec_size, uint32_t backlog, struct xg_ring **out);

/*
 * Copy up to @max records to @out (@max * rec_size bytes); if none is
 * waiting, wait for one at most @timeout_ms (-1: for ever, 0: not at all).
 * Returns how many, or -errno. Blocks. One thread at a time.
 */
int xg_ring_poll(struct xg_ring *r, void *out, uint32_t max, int timeout_ms);

/* Records lost here: the backlog had no room, or one was too short. */
uint64_t xg_ring_dropped(const struct xg_ring *r);

/* Free @r. NULL is a no-op. */
void xg_ring_close(struct xg_ring *r);

/* ---- xdpguard trace ---- */

struct xg_trace;

/*
 * Load the trace object at @path (bpf/xg_trace.bpf.o) and attach each of
 * its tp_btf programs to the kernel's XDP tracepoints. *@out belongs to the
 * caller (xg_trace_close()). Needs CAP_BPF and CAP_PERFMON. Returns 0 or
 * -errno (the verifier's log, if any, on stderr).
 */
int xg_trace_open(const char *path, struct xg_trace **out);

/*
 * Copy up to @max events to @out; if none is waiting, wait for one at most
 * @timeout_ms (-1: for ever). Returns how many, or -errno. Blocks.
 */
int xg_trace_poll(struct xg_trace *t, struct xg_trace_event *out, uint32_t max, int timeout_ms);

/* Events lost for lack of room, in the kernel's ring buffer or ours. */
uint64_t xg_trace_lost(struct xg_trace *t);

/* Detach and free @t. NULL is a no-op. */
void xg_trace_close(struct xg_trace *t);

/* cffi:end */

#endif /* XG_SHIM_H */
