"""Loading, attaching and reading the XDP program (bpf/xdpguard.bpf.o)."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from xdpguard import _bindings as B
from xdpguard.defs import (
    COUNTER_DTYPE,
    LPM_DTYPE,
    POLICY_DTYPE,
    RULE_STATS_DTYPE,
    Reason,
    Role,
)
from xdpguard.errors import XdpguardError
from xdpguard.netns import Device, Netns

XDP_MODES = {"native": B.XDP_FLAGS_DRV_MODE, "skb": B.XDP_FLAGS_SKB_MODE}

_PKG_DIR = Path(__file__).resolve().parent
_OBJECT_CANDIDATES = (
    _PKG_DIR / "xdpguard.bpf.o",  # installed with the package
    _PKG_DIR.parent / "bpf" / "xdpguard.bpf.o",  # source checkout
)


def bpf_object_path() -> Path:
    """The compiled XDP object: $XDPGUARD_BPF_OBJECT, else next to the package."""
    env = os.environ.get("XDPGUARD_BPF_OBJECT")
    if env:
        path = Path(env)
        if not path.is_file():
            raise XdpguardError(f"XDPGUARD_BPF_OBJECT={env}: no such file")
        return path
    for path in _OBJECT_CANDIDATES:
        if path.is_file():
            return path
    raise XdpguardError(
        f"XDP object not found (looked for {_OBJECT_CANDIDATES[-1]}); run 'make build'"
    )


def link_holders(link_id: int) -> list[tuple[int, str]]:
    """(pid, command) of every process holding an fd of BPF link ``link_id``."""
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for info in (proc / "fdinfo").iterdir():
                if f"link_id:\t{link_id}\n" in info.read_text():
                    holders.append((int(proc.name), (proc / "comm").read_text().strip()))
                    break
        except OSError:
            continue  # gone, or not ours to read
    return holders


def occupied(ns: Netns, dev: Device, prog_id: int, mode: str) -> str:
    """One line on who holds the XDP hook of ``dev``, and how to free it."""
    head = (
        f"{dev.name} (netns {ns.label}) already has an XDP program attached "
        f"(id {prog_id}, {mode} mode)"
    )
    try:
        link = ns.run(B.xdp_link_id, dev.ifindex, prog_id)
    except OSError:
        link = None
    if link is None:  # attached through netlink: ip can detach it
        return f"{head}; detach it first (ip link set dev {dev.name} xdp off)"
    holders = link_holders(link)
    who = ", ".join(f"pid {pid} ({comm})" for pid, comm in holders) or "no process (pinned?)"
    return (
        f"{head} through BPF link {link}, held by {who}; stop that, or "
        f"'bpftool link detach id {link}'"
    )


def reason_counters(fd: int) -> np.ndarray:
    """A per-CPU array of struct xg_counter indexed by reason (xg_stats,
    xg_monitor) as [reason] -> (packets, bytes), summed over CPUs."""
    out = np.zeros((max(Reason) + 1, 2), dtype=np.uint64)
    size = COUNTER_DTYPE.itemsize * B.num_possible_cpus()
    for reason in Reason:
        raw = B.map_lookup(fd, struct.pack("=I", reason), size)
        if raw is not None:
            per_cpu = np.frombuffer(raw, dtype=COUNTER_DTYPE)
            out[reason] = per_cpu["packets"].sum(), per_cpu["bytes"].sum()
    return out


class XdpProgram:
    """One instance of the program, for one device (and so one direction)."""

    def __init__(
        self,
        role: Role,
        path: Path | None = None,
        flags: int = 0,
        shared: dict[str, int] | None = None,
        max_entries: dict[str, int] | None = None,
    ) -> None:
        """``flags``: enum xg_load_flags (B.CFG_SUMMARY for tests, B.CFG_NO_COARSE
        without the coarse clock); ``shared``:
        maps by name that this instance uses instead of its own (the flow table,
        the challenges' secret and verified sources); ``max_entries``: sizes of
        its own maps other than the object's."""
        self.role = role
        self.path = path or bpf_object_path()
        try:
            cfg = B.struct_bytes("struct xg_load_cfg", role=int(role), flags=flags)
            self._prog = B.Prog(str(self.path), "xdpguard_prog", {"xg_cfg": cfg}, load=False)
        except OSError as exc:
            raise XdpguardError(f"cannot open {self.path} ({exc.strerror})") from exc
        try:
            abi = self._prog.rodata_u32("xg_abi")
        except OSError:
            abi = None
        if abi != B.ABI_VERSION:
            self._prog.close()
            raise XdpguardError(
                f"{self.path} was built for ABI {abi if abi is not None else '(none)'}, "
                f"this xdpguard is ABI {B.ABI_VERSION}; run 'make build'"
            )
        try:
            for name, fd in (shared or {}).items():
                self._prog.reuse_map(name, fd)
            for name, n in (max_entries or {}).items():
                if name not in (shared or {}):
                    self._prog.set_max_entries(name, n)
            B.libbpf_log()  # what libbpf says from here on is this load's
            self._prog.load()
        except OSError as exc:
            detail = B.libbpf_log()
            self._prog.close()
            from xdpguard.features import why_refused_text

            raise XdpguardError(
                f"cannot load {self.path}: {why_refused_text(detail, exc)} "
                "(the verifier's log: run -v, or the JSON log's detail; "
                "what the kernel has: xdpguard features)",
                detail,
            ) from exc
        self._xsks = self._prog.map_fd("xg_xsks")
        self._stats = self._prog.map_fd("xg_stats")
        self.device: Device | None = None
        self.mode: str | None = None

    @property
    def fd(self) -> int:
        return self._prog.fd

    def map_fd(self, name: str) -> int:
        return self._prog.map_fd(name)

    def attach(self, ns: Netns, dev: Device, mode: str) -> None:
        """Attach to ``dev`` (inside ``ns``) with a BPF link."""
        try:
            ns.run(self._prog.attach, dev.ifindex, XDP_MODES[mode])
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                prog_id, cur = ns.run(B.xdp_query, dev.ifindex)
                raise XdpguardError(occupied(ns, dev, prog_id, cur)) from exc
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and mode == "native":
                raise XdpguardError(
                    f"{dev.name} does not support native XDP ({exc.strerror}); use --xdp-mode skb"
                ) from exc
            raise XdpguardError(f"cannot attach XDP to {dev.name}: {exc.strerror}") from exc
        self.device = dev
        self.mode = mode

    def detach(self) -> None:
        self._prog.detach()
        self.device = None

    def still_attached(self) -> bool:
        """False once the kernel let go of the link (device deleted or moved, link detached)."""
        return self._prog.link_ifindex() != 0

    def set_socket(self, queue: int, sock_fd: int) -> None:
        """Point RX queue ``queue`` of the device at an AF_XDP socket."""
        B.map_update(self._xsks, struct.pack("=I", queue), struct.pack("=I", sock_fd))

    def reason_counters(self) -> np.ndarray:
        """Array [reason] -> (packets, bytes), summed over CPUs."""
        return reason_counters(self._stats)

    def close(self) -> None:
        self._prog.close()


class PolicyMaps:
    """The stateless policy's maps of the outer program (see xdpguard.policy.Policy).

    Each list has one LPM trie per family in a map-of-maps slot. Adding and
    deleting write the live trie; replacing builds a new trie off to the
    side and swaps the slot in one update, so a packet sees the old list or
    the new one, never a mix and never an empty list.
    """

    _SLOTS: ClassVar[dict[str, int]] = {"allow": B.LIST_ALLOW, "block": B.LIST_BLOCK}
    _BITS: ClassVar[dict[tuple[str, str], int]] = {
        ("allow", "v4"): B.LISTS_ALLOW_V4,
        ("allow", "v6"): B.LISTS_ALLOW_V6,
        ("block", "v4"): B.LISTS_BLOCK_V4,
        ("block", "v6"): B.LISTS_BLOCK_V6,
    }

    def __init__(self, prog: XdpProgram) -> None:
        # xg_policy is written whole from two owners (the lists here, the rule
        # stages' bits from xdpguard.rules): one at a time.
        self._policy_lock = threading.Lock()
        self._stages = 0
        self._protect = 0  # enum xg_list_bits of the protected prefixes (xdpguard.protect)
        self._outer = {"v4": prog.map_fd("xg_lists_v4"), "v6": prog.map_fd("xg_lists_v6")}
        self._ports = prog.map_fd("xg_udp_ports")
        self._l2 = prog.map_fd("xg_l2_allow")
        self._policy = prog.map_fd("xg_policy")
        self._tries: dict[tuple[str, str], int] = {}
        # Entries per trie, so that the program's "list is empty" bits stay
        # right: every entry that goes in or out goes through this class.
        self._count = dict.fromkeys(self._BITS, 0)
        self._frag = B.FRAG_PASS
        self._write_policy()
        for lst in self._SLOTS:
            for family in self._outer:
                self._swap_in(lst, family, B.lpm_create(family == "v6"))

    def _write_policy(self) -> None:
        with self._policy_lock:
            value = np.zeros(1, dtype=POLICY_DTYPE)
            value["frag_policy"] = self._frag
            value["lists"] = self._protect | sum(
                bit for key, bit in self._BITS.items() if self._count[key]
            )
            value["stages"] = self._stages
            B.map_update(self._policy, struct.pack("=I", 0), value.tobytes())

    def set_stages(self, bits: int) -> None:
        """enum xg_stage_bits: which rule stages hold anything (xdpguard.rules)."""
        self._stages = bits
        self._write_policy()

    def set_protect_bits(self, bits: int) -> None:
        """XG_LISTS_PROTECT_V4/V6: which families have protected prefixes."""
        self._protect = bits
        self._write_policy()

    def _set_count(self, lst: str, family: str, n: int) -> None:
        was = self._count[(lst, family)]
        self._count[(lst, family)] = n
        if bool(was) != bool(n):
            self._write_policy()

    def _swap_in(self, lst: str, family: str, fd: int) -> None:
        B.map_update(
            self._outer[family], struct.pack("=I", self._SLOTS[lst]), struct.pack("=i", fd)
        )
        old = self._tries.get((lst, family))
        self._tries[(lst, family)] = fd
        if old is not None:
            os.close(old)  # the slot no longer holds it; programs still in it keep it alive

    @staticmethod
    def _keys(family: str, canon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from xdpguard.policy import lpm_keys

        keys = lpm_keys(family, canon, LPM_DTYPE[family])
        return keys, np.ones(len(keys), dtype=np.uint32)

    def lists_add(self, lst: str, family: str, canon: np.ndarray) -> None:
        """Insert ``canon`` (none of them in the trie yet); the list's bit goes on after."""
        if len(canon):
            B.map_update_many(self._tries[(lst, family)], *self._keys(family, canon))
            self._set_count(lst, family, self._count[(lst, family)] + len(canon))

    def lists_delete(self, lst: str, family: str, canon: np.ndarray) -> None:
        """Delete ``canon`` (all in the trie); if that empties it, the bit goes off first."""
        if len(canon):
            left = self._count[(lst, family)] - len(canon)
            if not left:
                self._set_count(lst, family, 0)
            B.map_delete_many(self._tries[(lst, family)], self._keys(family, canon)[0])
            self._set_count(lst, family, left)

    def lists_replace(self, lst: str, canon: dict[str, np.ndarray]) -> None:
        """Replace the list's entries of the families in ``canon``. Every new trie
        is filled before any slot swaps: a trie that cannot be filled (full,
        out of memory) changes nothing."""
        built: dict[str, int] = {}
        try:
            for family, keys in canon.items():
                fd = B.lpm_create(family == "v6")
                built[family] = fd
                if len(keys):
                    B.map_update_many(fd, *self._keys(family, keys))
        except OSError:
            for fd in built.values():
                os.close(fd)
            raise
        for family, fd in built.items():
            if not len(canon[family]):
                self._set_count(lst, family, 0)
            self._swap_in(lst, family, fd)
            self._set_count(lst, family, len(canon[family]))

    @staticmethod
    def _bitset(numbers: Sequence[int]) -> bytes:
        """struct xg_port_set of ``numbers``."""
        bits = np.zeros(B.PORT_WORDS, dtype=np.uint64)
        for p in numbers:
            bits[p >> 6] |= np.uint64(1) << np.uint64(p & 63)
        return bits.tobytes()

    def set_ports(self, ports: Sequence[int]) -> None:
        B.map_update(self._ports, struct.pack("=I", 0), self._bitset(ports))

    def set_l2(self, ethertypes: Sequence[int]) -> None:
        """The ethertypes allowed beside IP and ARP (the rest is l2_other)."""
        B.map_update(self._l2, struct.pack("=I", 0), self._bitset(ethertypes))

    def set_frag_policy(self, policy: str) -> None:
        self._frag = B.FRAG_DROP if policy == "drop" else B.FRAG_PASS
        self._write_policy()

    def close(self) -> None:
        for fd in self._tries.values():
            os.close(fd)
        self._tries.clear()


class RuleMaps:
    """The rule stages' maps of the outer program (see xdpguard.rules.RuleTable)."""

    def __init__(self, prog: XdpProgram, policy: PolicyMaps) -> None:
        self._policy = policy
        self._index = prog.map_fd("xg_rule_index")
        self._rules = prog.map_fd("xg_rules")
        self._stats = prog.map_fd("xg_rule_stats")
        self._rate = prog.map_fd("xg_rule_rate")
        self._rl_index = prog.map_fd("xg_rl_index")
        self._rl_state = prog.map_fd("xg_rl_state")
        self._rl_stats = prog.map_fd("xg_rl_stats")
        self._filters = prog.map_fd("xg_rule_filters")
        self._filter_fd: int | None = None
        ncpus = B.num_possible_cpus()
        self._stats_size = RULE_STATS_DTYPE.itemsize * ncpus
        self._rate_zero = bytes(B.struct_layout("struct xg_rate_state")[0] * ncpus)

    def write_rule(self, slot: int, rule: bytes) -> None:
        B.map_update(self._rules, struct.pack("=I", slot), rule)

    def reset_rule(self, slot: int) -> None:
        key = struct.pack("=I", slot)
        B.map_update(self._stats, key, bytes(self._stats_size))
        B.map_update(self._rate, key, self._rate_zero)

    def set_list(self, key: bytes, value: bytes) -> None:
        B.map_update(self._index, key, value)

    def delete_list(self, key: bytes) -> None:
        B.map_delete(self._index, key)

    def _counts(self, fd: int, idx: int) -> np.ndarray:
        raw = B.map_lookup(fd, struct.pack("=I", idx), self._stats_size)
        if raw is None:
            return np.zeros(4, dtype=np.uint64)
        per_cpu = np.frombuffer(raw, dtype=RULE_STATS_DTYPE)
        return np.array([per_cpu[f].sum() for f in RULE_STATS_DTYPE.names], dtype=np.uint64)

    def rule_counts(self, slot: int) -> np.ndarray:
        """(packets, bytes, dropped packets, dropped bytes) of a slot, all CPUs."""
        return self._counts(self._stats, slot)

    def set_limit(self, key: bytes, value: bytes) -> None:
        B.map_update(self._rl_index, key, value)

    def delete_limit(self, key: bytes) -> None:
        B.map_delete(self._rl_index, key)

    def reset_limit(self, lid: int) -> None:
        key = struct.pack("=I", lid)
        B.map_update(self._rl_stats, key, bytes(self._stats_size))
        B.map_update(self._rl_state, key, self._rate_zero)

    def limit_counts(self, lid: int) -> np.ndarray:
        return self._counts(self._rl_stats, lid)

    def set_stages(self, bits: int) -> None:
        self._policy.set_stages(bits)

    def set_filter(self, value: bytes) -> None:
        """Swap in a new struct xg_rule_filter: built off to the side, then one
        update of the slot, so a frame sees the old filter or the new."""
        fd = B.rule_filter_create(value)
        try:
            B.map_update(self._filters, struct.pack("=I", 0), struct.pack("=i", fd))
        except OSError:
            os.close(fd)
            raise
        old, self._filter_fd = self._filter_fd, fd
        if old is not None:
            os.close(old)  # the slot no longer holds it; frames still in it keep it alive

    def close(self) -> None:
        if self._filter_fd is not None:
            os.close(self._filter_fd)
            self._filter_fd = None
