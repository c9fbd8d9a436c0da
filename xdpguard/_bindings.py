"""The only importer of the compiled shim (xdpguard._shim).

Turns the C API of libxdp_shim/xg_shim.h into small Python objects: negative
errno returns become OSError, handles become objects with explicit close(),
and C structs come back as plain dicts. No other module touches ``ffi``.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import numpy as np

from xdpguard._shim import ffi, lib

# XDP attach flags and AF_XDP bind flags (linux/if_link.h, linux/if_xdp.h).
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_COPY = 1 << 1
XDP_ZEROCOPY = 1 << 2
XDP_USE_NEED_WAKEUP = 1 << 3
XDP_ATTACHED_MODES = {0: "none", 1: "native", 2: "skb", 3: "hw", 4: "multi"}

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

MAX_QUEUES: int = lib.XG_MAX_QUEUES
LIST_ALLOW: int = lib.XG_LIST_ALLOW
LIST_BLOCK: int = lib.XG_LIST_BLOCK
FRAG_PASS: int = lib.XG_FRAG_PASS
FRAG_DROP: int = lib.XG_FRAG_DROP
PORT_WORDS: int = lib.XG_PORT_WORDS
LISTS_ALLOW_V4: int = lib.XG_LISTS_ALLOW_V4
LISTS_PROTECT_V4: int = lib.XG_LISTS_PROTECT_V4
LISTS_PROTECT_V6: int = lib.XG_LISTS_PROTECT_V6
LISTS_ALLOW_V6: int = lib.XG_LISTS_ALLOW_V6
LISTS_BLOCK_V4: int = lib.XG_LISTS_BLOCK_V4
LISTS_BLOCK_V6: int = lib.XG_LISTS_BLOCK_V6
META_MAGIC: int = lib.XG_META_MAGIC
META_ALLOWLISTED: int = lib.XG_META_ALLOWLISTED
META_STATE_OVER: int = lib.XG_META_STATE_OVER
META_FORWARD: int = lib.XG_META_FORWARD
CFG_SUMMARY: int = lib.XG_CFG_SUMMARY
CFG_NO_COARSE: int = lib.XG_CFG_NO_COARSE
CFG_NO_SAMPLES: int = lib.XG_CFG_NO_SAMPLES
SAMPLE_BYTES: int = lib.XG_SAMPLE_BYTES
PROTECT_MAX: int = lib.XG_PROTECT_MAX
DEST_MAX: int = lib.XG_DEST_MAX
NR_CLASSES: int = lib.XG_NR_CLASSES
KEYS_IP, KEYS_V6, KEYS_PORTS = lib.XG_KEYS_IP, lib.XG_KEYS_V6, lib.XG_KEYS_PORTS
FAST_ON: int = lib.XG_FAST_ON
FAST_TCP: int = lib.XG_FAST_TCP
FLOW_WAYS: int = lib.XG_FLOW_WAYS
FRAG_ANY: int = lib.XG_FRAG_ANY
FRAG_LATER: int = lib.XG_FRAG_LATER
VERDICT_FORWARD, VERDICT_DROP = lib.XG_V_FORWARD, lib.XG_V_DROP
TCP_MODES = {
    "off": lib.XG_MODE_OFF,
    "monitor": lib.XG_MODE_MONITOR,
    "on": lib.XG_MODE_ON,
    "auto": lib.XG_MODE_AUTO,
}
REASON_CAP: int = lib.XG_REASON_CAP
STAGE_XDP: int = lib.XG_STAGE_XDP
STAGE_LOOP: int = lib.XG_STAGE_LOOP
IDLE_POLL_MS: int = lib.XG_IDLE_POLL_MS
WORKER_NO_POLICY: int = lib.XG_WORKER_NO_POLICY
ROLE_OUTER: int = lib.XG_ROLE_OUTER
ROLE_INNER: int = lib.XG_ROLE_INNER
DIR_IN: int = lib.XG_DIR_IN
DIR_OUT: int = lib.XG_DIR_OUT
FRAG_MORE: int = lib.XG_FRAG_MORE
RULES_MAX: int = lib.XG_RULES_MAX
RULE_TERMS: int = lib.XG_RULE_TERMS
RULE_LIST_MAX: int = lib.XG_RULE_LIST_MAX
RULE_DEPTH: int = lib.XG_RULE_DEPTH
RATELIMITS_MAX: int = lib.XG_RATELIMITS_MAX
RATELIMIT_SOURCES: int = lib.XG_RATELIMIT_SOURCES
RATE_SHIFT: int = lib.XG_RATE_SHIFT
RATE_TAU_NS: int = lib.XG_RATE_TAU_NS
RULE_LENS: int = lib.XG_RULE_LENS
RULE_BLOOM_WORDS: int = lib.XG_RULE_BLOOM_WORDS
RL_PER_SOURCE: int = lib.XG_RL_PER_SOURCE
STAGES = {
    ("rules", 4): lib.XG_STAGES_RULES_V4,
    ("rules", 6): lib.XG_STAGES_RULES_V6,
    ("ratelimits", 4): lib.XG_STAGES_RATELIMITS_V4,
    ("ratelimits", 6): lib.XG_STAGES_RATELIMITS_V6,
}
RULE_ACTIONS = {
    "drop": lib.XG_RULE_DROP,
    "accept": lib.XG_RULE_ACCEPT,
    "rate-limit": lib.XG_RULE_RATE_BYTES,
    "rate-limit-pps": lib.XG_RULE_RATE_PACKETS,
}


# What this Python code was written against (bpf/xdpguard.h XG_ABI_VERSION).
ABI_VERSION = 8


def abi_problem() -> str | None:
    """Why the compiled shim cannot be used with this Python code, or None."""
    built = int(lib.XG_ABI_VERSION)
    if built != ABI_VERSION:
        return (
            f"the compiled shim (xdpguard/_shim) was built for ABI {built}, this xdpguard "
            f"is ABI {ABI_VERSION}; run 'make build'"
        )
    return None


class _Handle:
    """A C object owned through a pointer. After close() every call raises
    OSError(EBADF) instead of touching freed memory; close() and the quick
    calls hold a lock, so a reader never races the free."""

    _what = "object"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ptr: Any = None

    def _get(self) -> Any:
        p = self._ptr
        if p is None:
            raise OSError(errno.EBADF, f"{self._what} is closed")
        return p

    @property
    def closed(self) -> bool:
        return self._ptr is None


def check(ret: int, what: str) -> int:
    """Return ``ret`` or raise OSError(errno, strerror, what) for a negative errno."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret), what)
    return ret


def enum_members(c_enum: str) -> dict[str, int]:
    """Names and values of a C enum of the shared header, in value order."""
    elements: dict[int, str] = ffi.typeof(c_enum).elements
    return {name: value for value, name in sorted(elements.items())}


def struct_bytes(c_struct: str, **fields: Any) -> bytes:
    """The bytes of a shared-header struct with ``fields`` set (the rest zero)."""
    return bytes(ffi.buffer(ffi.new(f"{c_struct} *", fields)))


def struct_layout(c_struct: str) -> tuple[int, dict[str, int]]:
    """Size of a struct and offset of each field, as the C compiler laid it out."""
    ctype = ffi.typeof(c_struct)
    return ffi.sizeof(ctype), {name: ffi.offsetof(ctype, name) for name, _ in ctype.fields}


_NUMPY_PRIMITIVES = {
    "uint8_t": "u1",
    "uint16_t": "<u2",
    "uint32_t": "<u4",
    "uint64_t": "<u8",
    "int32_t": "<i4",
    "int64_t": "<i8",
    "unsigned char": "u1",
    "unsigned short": "<u2",
    "unsigned int": "<u4",
    "unsigned long long": "<u8",
    "long long": "<i8",
    "int": "<i4",
}


def struct_dtype(c_struct: str) -> np.dtype:
    """A numpy dtype with the C compiler's layout of ``c_struct`` (scalars and
    arrays, nested ones too)."""
    ctype = ffi.typeof(c_struct)
    names, formats, offsets = [], [], []
    for name, field in ctype.fields:
        t, dims = field.type, []
        while t.kind == "array":  # key[2][16]: shape (2, 16)
            dims.append(t.length)
            t = t.item
        fmt: Any = (_NUMPY_PRIMITIVES[t.cname], tuple(dims)) if dims else _NUMPY_PRIMITIVES[t.cname]
        names.append(name)
        formats.append(fmt)
        offsets.append(field.offset)
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": ffi.sizeof(ctype)}
    )


def _to_dict(cdata: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in ffi.typeof(cdata).fields:
        value = getattr(cdata, name)
        if field.type.kind == "array":
            if field.type.item.kind == "primitive" and field.type.item.cname == "char":
                out[name] = ffi.string(value).decode()
            elif field.type.item.kind == "struct":
                out[name] = [_to_dict(v) for v in value]
            else:
                out[name] = list(value)
        elif field.type.kind == "struct":
            out[name] = _to_dict(value)
        else:
            out[name] = value
    return out


# ---- network namespaces ----


def netns_enter(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    check(lib.xg_netns_enter(fd), "setns")


def netns_new() -> int:
    """Move this thread into a new network namespace of its own; an fd of it
    (the caller's to close)."""
    return check(lib.xg_netns_new(), "unshare(CLONE_NEWNET)")


def libbpf_log() -> str:
    """What libbpf said since the last call (the verifier's log of a failed
    load among it); from the first call on, libbpf no longer prints."""
    buf = ffi.new("char[]", 65536)
    n = lib.xg_libbpf_log(buf, len(buf))
    return ffi.string(buf, n).decode(errors="replace")


def map_probe(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    map_extra: int = 0,
    inner_fd: int = -1,
) -> None:
    """Make a map of this shape and close it; OSError if the kernel refuses."""
    check(
        lib.xg_map_probe(map_type, key_size, value_size, max_entries, flags, map_extra, inner_fd),
        "BPF_MAP_CREATE",
    )


def netns_cookie() -> int:
    """Cookie of the calling thread's network namespace."""
    out = ffi.new("uint64_t *")
    check(lib.xg_netns_cookie(out), "SO_NETNS_COOKIE")
    return int(out[0])


def dev_queues(ifname: str) -> tuple[int, int] | None:
    """Real (rx, tx) queue counts of a device in this thread's netns, None if unreported."""
    rx = ffi.new("uint32_t *")
    tx = ffi.new("uint32_t *")
    ret = lib.xg_dev_queues(ifname.encode(), rx, tx)
    if ret == -errno.EOPNOTSUPP:
        return None
    check(ret, f"channels of {ifname}")
    return int(rx[0]), int(tx[0])


def dev_xdp_xmit(ifname: str) -> tuple[int, int] | None:
    """(taken, refused) redirected frames ``ifname`` sent (veth counters); None if
    the driver does not count them. This thread's netns."""
    sent = ffi.new("uint64_t *")
    errors = ffi.new("uint64_t *")
    ret = lib.xg_dev_xdp_xmit(ifname.encode(), sent, errors)
    if ret in (-errno.ENOENT, -errno.EOPNOTSUPP):
        return None
    check(ret, f"XDP transmit counters of {ifname}")
    return int(sent[0]), int(errors[0])


# ---- XDP program ----


class Prog(_Handle):
    """One loaded instance of a program of a BPF object (and, once attached, its link).

    With ``load=False`` the object is only opened: read its settings with
    rodata_u32(), then load().
    """

    _what = "BPF program"

    def __init__(
        self, path: str, name: str, rodata: dict[str, bytes] | None = None, load: bool = True
    ) -> None:
        super().__init__()
        self.path = path
        out = ffi.new("struct xg_prog **")
        check(lib.xg_prog_open(path.encode(), name.encode(), out), f"opening {path}:{name}")
        self._ptr = out[0]
        try:
            for var, value in (rodata or {}).items():
                check(
                    lib.xg_prog_set_rodata(self._ptr, var.encode(), value, len(value)),
                    f"setting {var}",
                )
            if load:
                self.load()
        except OSError:
            self.close()
            raise

    def reuse_map(self, name: str, fd: int) -> None:
        """Before load(): the object's map ``name`` is the existing map ``fd``."""
        check(lib.xg_prog_reuse_map(self._get(), name.encode(), fd), f"reusing map {name}")

    def set_max_entries(self, name: str, n: int) -> None:
        """Before load(): the object's map ``name`` holds ``n`` entries."""
        check(lib.xg_prog_set_max_entries(self._get(), name.encode(), n), f"sizing map {name}")

    def rodata_u32(self, var: str) -> int:
        """The value of the object's ``const volatile __u32 var``."""
        out = ffi.new("uint32_t *")
        check(lib.xg_prog_get_rodata(self._get(), var.encode(), out, 4), f"reading {var}")
        return int(out[0])

    def load(self) -> None:
        check(lib.xg_prog_load(self._get()), f"loading {self.path}")

    @property
    def fd(self) -> int:
        return lib.xg_prog_fd(self._get())

    def map_fd(self, name: str) -> int:
        return check(lib.xg_prog_map_fd(self._get(), name.encode()), f"map {name}")

    def attach(self, ifindex: int, xdp_flags: int) -> None:
        """Attach in the calling thread's namespace; raises OSError (EBUSY: taken)."""
        with self._lock:
            check(lib.xg_prog_attach(self._get(), ifindex, xdp_flags), "attaching XDP program")

    def detach(self) -> None:
        with self._lock:
            lib.xg_prog_detach(self._get())

    def link_ifindex(self) -> int:
        """The ifindex the program's link holds, 0 once the kernel let go of it."""
        with self._lock:
            return check(lib.xg_prog_link_ifindex(self._get()), "reading XDP link")

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_prog_close(self._ptr)
                self._ptr = None


def xdp_query(ifindex: int) -> tuple[int, str]:
    """(program id, mode name) of the XDP program on ``ifindex`` in this thread's netns."""
    prog_id = ffi.new("uint32_t *")
    mode = ffi.new("uint32_t *")
    check(lib.xg_xdp_query(ifindex, prog_id, mode), "querying XDP state")
    return int(prog_id[0]), XDP_ATTACHED_MODES.get(int(mode[0]), str(mode[0]))


def netns_link(prog_fd: int, netns_fd: int) -> int:
    """An sk_lookup program attached to a netns; the link's fd (close it to detach)."""
    return check(lib.xg_netns_link(prog_fd, netns_fd), "attaching sk_lookup")


def xdp_link_id(ifindex: int, prog_id: int) -> int | None:
    """Id of the BPF link holding ``prog_id`` on ``ifindex`` (this netns), None if none."""
    out = ffi.new("uint32_t *")
    ret = lib.xg_xdp_link_id(ifindex, prog_id, out)
    if ret == -errno.ENOENT:
        return None
    check(ret, "looking for the XDP link")
    return int(out[0])


def prog_test_run(
    prog_fd: int,
    data: bytes,
    ingress_ifindex: int = 0,
    rx_queue: int = 0,
    repeat: int = 1,
    headroom_taken: int = 0,
) -> tuple[int, bytes]:
    """Run a program ``repeat`` times over ``data`` on this CPU; returns (the
    last XDP action, the frame as it left it). ``headroom_taken`` bytes of
    the frame's headroom are taken by metadata (a driver that leaves less
    room), and are not in what comes back."""
    out = ffi.new("char[]", max(len(data) + 512, 4096))
    size = ffi.new("uint32_t *", len(out))
    action = ffi.new("uint32_t *")
    meta = bytes(headroom_taken)
    check(
        lib.xg_prog_test_run(
            prog_fd,
            meta + data,
            len(meta) + len(data),
            len(meta),
            out,
            size,
            ingress_ifindex,
            rx_queue,
            repeat,
            action,
            ffi.NULL,
        ),
        "BPF_PROG_TEST_RUN",
    )
    if headroom_taken:
        return int(action[0]), bytes(ffi.buffer(out, size[0]))[headroom_taken:]
    return int(action[0]), bytes(ffi.buffer(out, size[0]))


def prog_run_time(
    prog_fd: int, data: bytes, repeat: int, ingress_ifindex: int = 0
) -> tuple[int, int]:
    """(XDP action, the kernel's mean ns per run) of ``repeat`` runs over ``data``
    on this CPU; the runs share one frame (see xg_prog_test_run())."""
    out = ffi.new("char[]", max(len(data) + 512, 4096))
    size = ffi.new("uint32_t *", len(out))
    action = ffi.new("uint32_t *")
    duration = ffi.new("uint32_t *")
    check(
        lib.xg_prog_test_run(
            prog_fd, data, len(data), 0, out, size, ingress_ifindex, 0, repeat, action, duration
        ),
        "BPF_PROG_TEST_RUN",
    )
    return int(action[0]), int(duration[0])


def prog_fd_by_id(prog_id: int) -> int:
    """An fd of the loaded program ``prog_id`` (the caller closes it)."""
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err), f"program id {prog_id}")
    return fd


class TestRunner:
    """BPF_PROG_TEST_RUN over many frames with buffers made once (fuzzing, parity)."""

    def __init__(self, prog_fd: int, max_out: int = 8192) -> None:
        self.fd = prog_fd
        self._out = ffi.new("char[]", max_out)
        self._size = ffi.new("uint32_t *")
        self._action = ffi.new("uint32_t *")

    def run(self, data: bytes, ingress_ifindex: int = 0, rx_queue: int = 0) -> tuple[int, bytes]:
        self._size[0] = len(self._out)
        check(
            lib.xg_prog_test_run(
                self.fd,
                data,
                len(data),
                0,
                self._out,
                self._size,
                ingress_ifindex,
                rx_queue,
                1,
                self._action,
                ffi.NULL,
            ),
            "BPF_PROG_TEST_RUN",
        )
        return int(self._action[0]), bytes(ffi.buffer(self._out, self._size[0]))


class Generator(_Handle):
    """The tests' and benchmarks' traffic generator (xg_gen_*): a TX-only
    AF_XDP socket in copy mode on (``ifname``, ``queue``) of the calling
    thread's namespace, sending ``frame`` varied per frame."""

    _what = "generator"

    def __init__(
        self,
        ifname: str,
        frame: bytes,
        queue: int = 0,
        random_saddr: bool = False,
        random_sport: bool = False,
        mix_fragments: bool = False,
        seed: int = 0,
        random_host_bits: int = 0,
        random_len_min: int = 0,
        random_dst_bits: int = 0,
    ) -> None:
        super().__init__()
        cfg = ffi.new("struct xg_gen_cfg *")
        if not 14 <= len(frame) <= len(cfg.frame):
            raise OSError(errno.EINVAL, f"a frame of {len(frame)} bytes", "generator")
        ffi.memmove(cfg.frame, frame, len(frame))
        cfg.len = len(frame)
        cfg.random_saddr = int(random_saddr)
        cfg.random_sport = int(random_sport)
        cfg.mix_fragments = int(mix_fragments)
        cfg.random_host_bits = random_host_bits
        cfg.random_len_min = random_len_min
        cfg.random_dst_bits = random_dst_bits
        cfg.seed = seed
        out = ffi.new("struct xg_gen **")
        check(lib.xg_gen_create(ifname.encode(), queue, cfg, out), f"AF_XDP generator on {ifname}")
        self._ptr = out[0]

    def send(self, count: int, pps: int = 0, max_ms: int = 0) -> None:
        """Send ``count`` frames at ``pps`` (0: as fast as it can) for at most
        ``max_ms``; blocks (without the GIL) until the kernel sent them."""
        check(lib.xg_gen_send(self._get(), count, pps, max_ms), "generator send")

    def sent(self) -> int:
        with self._lock:
            return int(lib.xg_gen_sent(self._get())) if self._ptr is not None else 0

    def stop(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_gen_stop(self._ptr)

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_gen_close(self._ptr)
                self._ptr = None


def rule_hash(hi: int, lo: int, plen: int, v6: int, salt: int) -> int:
    """bpf/xg_rule_hash.h's xg_rule_hash(), as XDP computes it."""
    return int(lib.xg_rule_hash_of(hi, lo, plen, v6, salt))


def classify(frame: bytes) -> dict[str, int]:
    """The parser's findings and verdict for ``frame`` (struct xg_summary), as XDP has them."""
    out = ffi.new("struct xg_summary *")
    lib.xg_classify(frame, len(frame), out)
    return _to_dict(out[0])


# ---- BPF maps ----


def num_possible_cpus() -> int:
    return check(lib.libbpf_num_possible_cpus(), "possible CPUs")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Value stored under ``key``, or None if absent."""
    value = ffi.new("char[]", value_size)
    ret = lib.bpf_map_lookup_elem(fd, key, value)
    if ret == -errno.ENOENT:
        return None
    check(ret, "map lookup")
    return bytes(ffi.buffer(value, value_size))


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    check(lib.bpf_map_update_elem(fd, key, value, flags), "map update")


def map_push(fd: int, value: bytes) -> None:
    """Add ``value`` to a keyless map (a Bloom filter, a queue)."""
    check(lib.bpf_map_update_elem(fd, ffi.NULL, value, 0), "map push")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; whether it was there."""
    ret = lib.bpf_map_delete_elem(fd, key)
    if ret == -errno.ENOENT:
        return False
    check(ret, "map delete")
    return True


def map_shape(fd: int) -> dict[str, int]:
    """type (enum bpf_map_type), key_size, value_size, max_entries, flags, and
    value_stride (a value as lookups copy it: every CPU's for a per-CPU map)."""
    out = ffi.new("struct xg_map_shape *")
    check(lib.xg_map_shape(fd, out), "reading a map's shape")
    return _to_dict(out[0])


def map_dump(fd: int, max_entries: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the map ``fd``, up to ``max_entries`` (a per-CPU
    map's values hold every CPU's)."""
    shape = map_shape(fd)
    n = max(max_entries, 1)
    keys = ffi.new("char[]", n * shape["key_size"])
    values = ffi.new("char[]", n * shape["value_stride"])
    count = ffi.new("uint32_t *")
    check(lib.xg_map_dump(fd, keys, values, max_entries, count), "reading a map")
    k, v = bytes(ffi.buffer(keys)), bytes(ffi.buffer(values))
    ks, vs = shape["key_size"], shape["value_stride"]
    return [(k[i * ks : (i + 1) * ks], v[i * vs : (i + 1) * vs]) for i in range(count[0])]


def obj_pin(fd: int, path: str) -> None:
    """Pin the BPF object ``fd`` at ``path`` (in a BPF filesystem)."""
    check(lib.bpf_obj_pin(fd, path.encode()), f"pinning {path}")


def obj_get(path: str) -> int:
    """An fd of the BPF object pinned at ``path``; the caller closes it."""
    return check(lib.bpf_obj_get(path.encode()), f"opening {path}")


def lpm_create(v6: bool) -> int:
    """An empty LPM trie shaped like the list slots' inner maps; caller closes the fd."""
    return check(lib.xg_lpm_create(int(v6)), "creating LPM trie")


def rule_filter_create(filter_bytes: bytes) -> int:
    """A rules' filter map holding ``filter_bytes`` (struct xg_rule_filter); caller closes."""
    buf = ffi.new("struct xg_rule_filter *")
    ffi.memmove(buf, filter_bytes, ffi.sizeof("struct xg_rule_filter"))
    return check(lib.xg_rule_filter_create(buf), "creating the rules' filter")


def map_update_many(fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """Write all ``keys``/``values`` (contiguous arrays of the map's types); batched."""
    assert len(keys) == len(values)
    done = ffi.new("uint32_t *")
    ret = lib.xg_map_update_many(
        fd, ffi.from_buffer(keys), ffi.from_buffer(values), len(keys), done
    )
    check(ret, f"map update ({done[0]} of {len(keys)} written)")


def map_delete_many(fd: int, keys: np.ndarray) -> None:
    """Delete all ``keys`` (each must be present); batched."""
    done = ffi.new("uint32_t *")
    ret = lib.xg_map_delete_many(fd, ffi.from_buffer(keys), len(keys), done)
    check(ret, f"map delete ({done[0]} of {len(keys)} deleted)")


# ---- UMEM, sockets, workers ----


class Umem(_Handle):
    _what = "UMEM"

    def __init__(self, nframes: int, frame_size: int, ring_size: int = 2048) -> None:
        """``ring_size``: entries of the fill and completion ring of every socket."""
        super().__init__()
        out = ffi.new("struct xg_umem **")
        check(lib.xg_umem_create(nframes, frame_size, ring_size, out), "creating UMEM")
        self._ptr = out[0]
        self.nframes = nframes
        self.frame_size = frame_size

    @property
    def _u(self) -> Any:
        return self._get()

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                check(lib.xg_umem_destroy(self._ptr), "destroying UMEM")
                self._ptr = None


class Sock(_Handle):
    """An AF_XDP socket on a shared UMEM; create it in the device's netns thread."""

    _what = "AF_XDP socket"

    def __init__(
        self, umem: Umem, ifname: str, queue: int, ring_size: int, bind_flags: int, role: int
    ) -> None:
        super().__init__()
        out = ffi.new("struct xg_sock **")
        check(
            lib.xg_sock_create(umem._u, ifname.encode(), queue, ring_size, bind_flags, role, out),
            f"AF_XDP socket on {ifname} queue {queue}",
        )
        self._ptr = out[0]
        self.umem = umem

    @property
    def _s(self) -> Any:
        return self._get()

    def info(self) -> dict[str, Any]:
        info = ffi.new("struct xg_sock_info *")
        with self._lock:
            lib.xg_sock_info(self._get(), info)
        return _to_dict(info[0])

    def kernel_stats(self) -> dict[str, int]:
        stats = ffi.new("struct xg_xsk_stats *")
        with self._lock:
            check(lib.xg_sock_stats(self._get(), stats), "XDP_STATISTICS")
        return _to_dict(stats[0])

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_sock_destroy(self._ptr)
                self._ptr = None


class FlowTab(_Handle):
    """The flow table's maps (xg_flows, xg_flowinfo), mapped into this process."""

    _what = "flow table"

    def __init__(self, nbuckets: int, pinned: str | None = None) -> None:
        """A new, empty table; or with ``pinned``, the one pinned in that directory
        (OSError ENOENT: none; ESTALE: one of another size or layout)."""
        super().__init__()
        out = ffi.new("struct xg_flowtab **")
        if pinned is None:
            check(lib.xg_flowtab_create(nbuckets, out), "creating the flow table")
        else:
            check(lib.xg_flowtab_open(pinned.encode(), nbuckets, out), f"opening {pinned}")
        self._ptr = out[0]
        self.nbuckets = nbuckets

    @property
    def _ft(self) -> Any:
        return self._get()

    def fds(self) -> dict[str, int]:
        """The maps' fds by their names in the BPF object, owned by the table."""
        return {
            "xg_flows": lib.xg_flowtab_fd(self._get(), 0),
            "xg_flowinfo": lib.xg_flowtab_fd(self._get(), 1),
        }

    def pin(self, directory: str) -> None:
        check(lib.xg_flowtab_pin(self._get(), directory.encode()), f"pinning in {directory}")

    def migrate_from(self, pinned: str) -> tuple[int, int]:
        """Copy in the live flows of the table of another size pinned in
        ``pinned``: (moved, left behind for want of room). OSError ESTALE:
        it has another layout."""
        moved, left = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(
            lib.xg_flowtab_migrate(pinned.encode(), self._get(), moved, left),
            f"reading the flows pinned in {pinned}",
        )
        return int(moved[0]), int(left[0])

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_flowtab_close(self._ptr)
                self._ptr = None


def sock_registered(umem: Umem, netns_cookie: int, ifindex: int, queue: int) -> bool:
    """Whether the UMEM's registry holds a socket for this (netns, ifindex, queue)."""
    return lib.xg_sock_find(umem._u, netns_cookie, ifindex, queue) != ffi.NULL


class Ring(_Handle):
    """A BPF ring buffer of fixed-size records ``c_struct``, read into numpy."""

    _what = "ring buffer"

    def __init__(self, map_fd: int, c_struct: str, backlog: int = 8192, batch: int = 1024) -> None:
        """``map_fd`` stays the caller's, open as long as this reads it."""
        super().__init__()
        self.dtype = struct_dtype(c_struct)
        out = ffi.new("struct xg_ring **")
        check(lib.xg_ring_open(map_fd, self.dtype.itemsize, backlog, out), "reading a ring buffer")
        self._ptr = out[0]
        self._batch = batch
        self._buf = ffi.new("char[]", batch * self.dtype.itemsize)

    def poll(self, timeout_ms: int) -> np.ndarray:
        """The records that came (a copy), waiting at most ``timeout_ms`` for the first."""
        with self._lock:
            n = check(lib.xg_ring_poll(self._get(), self._buf, self._batch, timeout_ms),
                      "reading a ring buffer")  # fmt: skip
            raw = bytes(ffi.buffer(self._buf, n * self.dtype.itemsize))
        return np.frombuffer(raw, dtype=self.dtype)

    def dropped(self) -> int:
        return int(lib.xg_ring_dropped(self._get()))

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_ring_close(self._ptr)
                self._ptr = None


def sample_keys(samples: np.ndarray) -> np.ndarray:
    """struct xg_sample_keys of each struct xg_sample in ``samples``, by the one parser."""
    dtype = struct_dtype("struct xg_sample_keys")
    out = np.zeros(len(samples), dtype=dtype)
    if len(samples):
        src = np.ascontiguousarray(samples)
        lib.xg_sample_keys(ffi.from_buffer("struct xg_sample[]", src), len(samples),
                           ffi.from_buffer("struct xg_sample_keys[]", out))  # fmt: skip
    return out


def dests_read(fd: int, max_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """xg_dests whole: (addresses as 16-byte rows, struct xg_dest_counts summed over CPUs)."""
    keys = np.zeros((max_entries, 16), dtype=np.uint8)
    sums = np.zeros(max_entries, dtype=struct_dtype("struct xg_dest_counts"))
    n = ffi.new("uint32_t *")
    check(lib.xg_dests_read(fd, ffi.from_buffer("struct xg_addr[]", keys),
                            ffi.from_buffer("struct xg_dest_counts[]", sums), max_entries, n),
          "reading the destinations' counters")  # fmt: skip
    return keys[: n[0]].copy(), sums[: n[0]].copy()


class Trace(_Handle):
    """The kernel's XDP error tracepoints, attached (bpf/xg_trace.bpf.o)."""

    _what = "trace"

    def __init__(self, path: str) -> None:
        super().__init__()
        out = ffi.new("struct xg_trace **")
        check(lib.xg_trace_open(path.encode(), out), f"loading {path}")
        self._ptr = out[0]
        self._buf = ffi.new("struct xg_trace_event[]", 256)

    def poll(self, timeout_ms: int) -> list[dict[str, Any]]:
        """The events that came, waiting at most ``timeout_ms`` for the first."""
        n = check(lib.xg_trace_poll(self._get(), self._buf, 256, timeout_ms), "reading events")
        return [_to_dict(self._buf[i]) for i in range(n)]

    def lost(self) -> int:
        return int(lib.xg_trace_lost(self._get()))

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_trace_close(self._ptr)
                self._ptr = None


class Tcp(_Handle):
    """The loop's TCP stage, shared by every worker: the flow table and its policy."""

    _what = "TCP stage"

    def __init__(
        self,
        max_flows: int,
        cfg: dict[str, int],
        table: FlowTab | None = None,
    ) -> None:
        """A flow table of its own for ``max_flows``, or ``table``'s (shared with XDP)."""
        super().__init__()
        out = ffi.new("struct xg_tcp **")
        c = ffi.new("struct xg_tcp_cfg *", cfg)
        if table is None:
            ret = lib.xg_tcp_create(max_flows, c, out)
        else:
            ret = lib.xg_tcp_create_shared(table._ft, c, out)
        check(ret, "creating the TCP stage")
        self._ptr = out[0]
        self.table = table  # the memory of its flows: kept alive as long as it

    @property
    def _t(self) -> Any:
        return self._get()

    @staticmethod
    def cfg_fields() -> list[str]:
        """The fields of struct xg_tcp_cfg."""
        return [name for name, _ in ffi.typeof("struct xg_tcp_cfg").fields]

    def configure(self, cfg: dict[str, int]) -> None:
        with self._lock:
            lib.xg_tcp_configure(self._t, ffi.new("struct xg_tcp_cfg *", cfg))

    def config(self) -> dict[str, int]:
        out = ffi.new("struct xg_tcp_cfg *")
        with self._lock:
            lib.xg_tcp_config(self._t, out)
        return _to_dict(out[0])

    def scan(self, top: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Occupancy counts and the ``top`` busiest flows (O(capacity))."""
        counts = ffi.new("struct xg_tcp_counts *")
        flows = ffi.new("struct xg_flow[]", max(top, 1))
        with self._lock:
            n = lib.xg_tcp_scan(self._t, counts, flows, top)
        return _to_dict(counts[0]), [_to_dict(flows[i]) for i in range(n)]

    def quota(self) -> dict[str, int]:
        """Find who holds its quota of flows and refuse its new ones (xg_tcp_quota)."""
        rep = ffi.new("struct xg_tcp_quota_report *")
        with self._lock:
            check(lib.xg_tcp_quota(self._t, rep), "flow quotas")
        return _to_dict(rep[0])

    def judge(
        self,
        frame: bytes,
        from_outside: bool,
        now_s: int,
        meta: int = 0,
        stats: Any = None,
    ) -> tuple[int, bytes]:
        """One frame through the TCP stage as the loop would, with what XDP said
        of it (``meta``: META_* flags): (verdict, frame after)."""
        buf = ffi.new("uint8_t[]", frame)
        length = ffi.new("uint32_t *", len(frame))
        st = stats if stats is not None else ffi.new("struct xg_worker_stats *")
        with self._lock:
            v = lib.xg_tcp_judge(
                self._t,
                buf,
                length,
                int(from_outside),
                meta,
                now_s,
                st,
            )
        return int(v), bytes(ffi.buffer(buf, length[0]))

    @staticmethod
    def new_stats() -> Any:
        return ffi.new("struct xg_worker_stats *")

    @staticmethod
    def stats_dict(stats: Any) -> dict[str, Any]:
        return _to_dict(stats[0])

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_tcp_destroy(self._ptr)
                self._ptr = None


def tcp_now() -> int:
    """The TCP stage's clock: coarse monotonic seconds."""
    return int(lib.xg_tcp_now())


class Worker(_Handle):
    """The hot loop of one queue index."""

    _what = "worker"

    def __init__(
        self, umem: Umem, outer: Sock, inner: Sock, first_frame: int, nframes: int, flags: int
    ) -> None:
        super().__init__()
        out = ffi.new("struct xg_worker **")
        check(
            lib.xg_worker_create(umem._u, outer._s, inner._s, first_frame, nframes, flags, out),
            "creating worker",
        )
        self._ptr = out[0]
        # The worker uses but does not own these: keep them alive as long as it.
        self.umem, self.socks = umem, (outer, inner)

    def set_tcp(self, tcp: Tcp | None) -> None:
        with self._lock:
            check(lib.xg_worker_set_tcp(self._get(), tcp._t if tcp else ffi.NULL), "TCP stage")
        self.tcp = tcp

    def run(self) -> int:
        """Block in the loop (GIL released) until stop(); returns 0 or -errno.
        Call close() only after it returned."""
        return int(lib.xg_worker_run(self._get()))

    def stop(self) -> None:
        with self._lock:
            lib.xg_worker_stop(self._get())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return _to_dict(lib.xg_worker_stats(self._get())[0])

    def account(self, timeout_ms: int = 500) -> dict[str, int]:
        out = ffi.new("struct xg_frame_account *")
        with self._lock:
            check(lib.xg_worker_account(self._get(), out, timeout_ms), "frame account")
        return _to_dict(out[0])

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.xg_worker_destroy(self._ptr)
                self._ptr = None


# libbpf's messages are kept for whoever asks (a failed load's one-line
# reason, -v), never printed over the log.
libbpf_log()
