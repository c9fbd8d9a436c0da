"""The networks the appliance protects (``xdpguard protect``), and what XDP
counts per protected destination address.

XDP looks the destination of each IP frame from outside up in the
protected prefixes (an LPM trie per family, xg_protect_v4/v6, to the
prefix's index) and, for one it finds, counts the frame per protocol class
(enum xg_dest_class) twice: per prefix (xg_protect_stats, an array) and per
address (xg_dests, an LRU of a stated size: an attack on more addresses
than it holds evicts the quietest). Counting is by frames arriving,
whatever their verdict: it is what an attack sends, not what gets through.

Rates are differences between reads a second apart, over the last two
seconds, made by the sampler's thread (xdpguard.samples).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdpguard import _bindings as B
from xdpguard.defs import LPM_DTYPE
from xdpguard.errors import XdpguardError

CLASSES = tuple(
    name.removeprefix("XG_CLASS_").lower()
    for name in B.enum_members("enum xg_dest_class")
    if name != "XG_NR_CLASSES"
)
COUNTS_DTYPE = B.struct_dtype("struct xg_dest_counts")
MAX_NAME = 64
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


@dataclass
class Entry:
    prefix: str  # canonical text
    family: str  # v4 | v6
    canon: bytes  # address + length, as xdpguard.policy.parse_prefix gives it
    name: str | None
    index: int  # its slot of xg_protect_stats
    opts: dict[str, Any] = field(default_factory=dict)  # mode, pps, bps (xdpguard.detect)


def addr_text(raw: bytes) -> str:
    """A 16-byte struct xg_addr (IPv4 mapped) as text."""
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _lpm_key(e: Entry) -> bytes:
    n = 4 if e.family == "v4" else 16
    key = np.zeros(1, dtype=LPM_DTYPE[e.family])
    key["prefixlen"] = e.canon[n]
    key["addr"] = np.frombuffer(e.canon[:n], dtype=np.uint8)
    return key.tobytes()


class ProtectMaps:
    """The outer program's protect maps; ``set_bits`` turns counting on per family."""

    def __init__(self, prog: Any, set_bits: Callable[[int], None], max_dests: int) -> None:
        self._tries = {"v4": prog.map_fd("xg_protect_v4"), "v6": prog.map_fd("xg_protect_v6")}
        self._stats = prog.map_fd("xg_protect_stats")
        self._dests = prog.map_fd("xg_dests")
        self._set_bits = set_bits
        self.max_dests = max_dests
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._ncpus = B.num_possible_cpus()
        # For the evictions: addresses taken out of xg_dests here, and the new
        # addresses counted by prefixes no longer protected.
        self._deleted = 0
        self._gone_new = 0
        # Rates: the last two reads, (time, per prefix index totals, dest keys, dest totals).
        self._reads: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []

    def _zero_stats(self, index: int) -> None:
        zero = bytes(COUNTS_DTYPE.itemsize * self._ncpus)
        B.map_update(self._stats, struct.pack("=I", index), zero)

    def replace(self, wanted: Sequence[tuple[Any, ...]]) -> None:
        """Make the protected set ``wanted`` (family, canon, name[, opts]): the
        kernel's tries first; if it refuses a step, what was done is undone
        and nothing changes (OSError)."""
        from xdpguard.policy import format_prefix

        with self._lock:
            new: dict[str, Entry] = {}
            used = {e.index for e in self.entries.values()}
            free = (i for i in range(B.PROTECT_MAX) if i not in used)
            for family, canon, name, *rest in wanted:
                opts = dict(rest[0]) if rest else {}
                text = format_prefix(family, canon)
                old = self.entries.get(text)
                if old is not None:
                    new[text] = Entry(text, family, canon, name, old.index, opts)
                    continue
                index = next(free, None)
                if index is None:
                    raise XdpguardError(f"at most {B.PROTECT_MAX} protected prefixes")
                new[text] = Entry(text, family, canon, name, index, opts)
            added = [e for k, e in new.items() if k not in self.entries]
            gone = [e for k, e in self.entries.items() if k not in new]
            done: list[Entry] = []
            try:
                for e in added:
                    self._zero_stats(e.index)
                    B.map_update(self._tries[e.family], _lpm_key(e), struct.pack("=I", e.index))
                    done.append(e)
            except OSError:
                for e in done:
                    B.map_delete(self._tries[e.family], _lpm_key(e))
                raise
            self._set_bits(self._bits(new))
            for e in gone:
                B.map_delete(self._tries[e.family], _lpm_key(e))
                self._gone_new += int(self._totals(e.index)["new_dests"])
            self.entries = new
            if gone:
                self._forget_addresses()

    def _forget_addresses(self) -> None:
        """Empty xg_dests: its entries name their prefix by index (XDP asks the
        trie only for an address it does not hold), and an index let go of
        may be given to another prefix."""
        keys, _ = B.dests_read(self._dests, self.max_dests)
        for k in keys:
            if B.map_delete(self._dests, k.tobytes()):
                self._deleted += 1

    def entry_of(self, raw: bytes) -> Entry | None:
        """The most specific protected prefix holding a 16-byte address."""
        if raw[:12] == _V4_MAPPED:
            family, value, width = "v4", int.from_bytes(raw[12:], "big"), 32
        else:
            family, value, width = "v6", int.from_bytes(raw, "big"), 128
        best: Entry | None = None
        for e in list(self.entries.values()):
            if e.family != family:
                continue
            n = width // 8
            plen = e.canon[n]
            net = int.from_bytes(e.canon[:n], "big")
            if (plen == 0 or value >> (width - plen) == net >> (width - plen)) and (
                best is None or plen > best.canon[n]
            ):
                best = e
        return best

    @staticmethod
    def _bits(entries: dict[str, Entry]) -> int:
        fams = {e.family for e in entries.values()}
        return (B.LISTS_PROTECT_V4 if "v4" in fams else 0) | (
            B.LISTS_PROTECT_V6 if "v6" in fams else 0
        )

    # ---- counters ----

    def _totals(self, index: int) -> np.void:
        """xg_protect_stats[index] summed over CPUs."""
        out = np.zeros(1, dtype=COUNTS_DTYPE)[0]
        raw = B.map_lookup(
            self._stats, struct.pack("=I", index), COUNTS_DTYPE.itemsize * self._ncpus
        )
        if raw is not None:
            per_cpu = np.frombuffer(raw, dtype=COUNTS_DTYPE)
            for f in ("packets", "bytes"):
                out[f] = per_cpu[f].sum(axis=0)
            out["new_dests"] = per_cpu["new_dests"].sum()
        return out

    def _prefix_totals(self) -> np.ndarray:
        """[index] -> struct xg_dest_counts summed over CPUs, for every slot in use."""
        out = np.zeros(B.PROTECT_MAX, dtype=COUNTS_DTYPE)
        for e in list(self.entries.values()):
            out[e.index] = self._totals(e.index)
        return out

    def refresh(self, now: float | None = None) -> None:
        """Read the counters (the sampler's thread, once a second)."""
        now = time.monotonic() if now is None else now
        if not self.entries:
            self._reads.clear()
            return
        prefixes = self._prefix_totals()
        keys, sums = B.dests_read(self._dests, self.max_dests)
        self._reads = [*self._reads[-2:], (now, prefixes, keys, sums)]

    def _window(self) -> tuple[float, Any, Any] | None:
        if len(self._reads) < 2:
            return None
        (t0, *a), (t1, *b) = self._reads[0], self._reads[-1]
        return t1 - t0, a, b

    def last_second(self) -> tuple[float, dict[bytes, np.ndarray], dict[int, np.ndarray]] | None:
        """The rates between the last two reads, for the detector: (seconds,
        per address [class] x (pps, bps), per prefix index the same)."""
        if len(self._reads) < 2:
            return None
        (t0, p0, k0, s0), (t1, p1, k1, s1) = self._reads[-2], self._reads[-1]
        dt = t1 - t0
        if dt <= 0:
            return None
        before = {bytes(k): i for i, k in enumerate(k0)}
        addrs: dict[bytes, np.ndarray] = {}
        for i, k in enumerate(k1):
            key = bytes(k)
            now = np.stack([s1[i]["packets"], s1[i]["bytes"]]).astype(np.int64)
            j = before.get(key)
            if j is not None:
                now = now - np.stack([s0[j]["packets"], s0[j]["bytes"]]).astype(np.int64)
            rate = np.maximum(now, 0) / dt
            if rate.any():
                rate[1] *= 8  # bytes to bits
                addrs[key] = rate.T
        prefixes: dict[int, np.ndarray] = {}
        for e in self.entries.values():
            d = np.stack([p1[e.index]["packets"], p1[e.index]["bytes"]]).astype(np.int64) - (
                np.stack([p0[e.index]["packets"], p0[e.index]["bytes"]]).astype(np.int64)
            )
            rate = np.maximum(d, 0) / dt
            rate[1] *= 8
            prefixes[e.index] = rate.T
        return dt, addrs, prefixes

    def prefixes(self) -> list[dict[str, Any]]:
        """Each protected prefix: its name, totals, and rates per class over the
        last two seconds."""
        w = self._window()
        last = self._reads[-1][1] if self._reads else None
        out = []
        for e in sorted(self.entries.values(), key=lambda x: x.index):
            row: dict[str, Any] = {"prefix": e.prefix, "name": e.name}
            if last is not None:
                tot = last[e.index]
                row["packets"] = dict(zip(CLASSES, map(int, tot["packets"]), strict=True))
                row["bytes"] = dict(zip(CLASSES, map(int, tot["bytes"]), strict=True))
                row["addresses_seen"] = int(tot["new_dests"])
            if w is not None:
                dt, (p0, *_), (p1, *_) = w
                d = p1[e.index]["packets"].astype(np.int64) - p0[e.index]["packets"]
                db = p1[e.index]["bytes"].astype(np.int64) - p0[e.index]["bytes"]
                row["pps"] = {c: max(0.0, float(v) / dt) for c, v in zip(CLASSES, d, strict=True)}
                row["bps"] = {
                    c: max(0.0, float(v) * 8 / dt) for c, v in zip(CLASSES, db, strict=True)
                }
            out.append(row)
        return out

    def occupancy(self) -> dict[str, int]:
        """Addresses held in xg_dests, and those evicted to make room."""
        if not self._reads:
            return {"tracked": 0, "evicted": 0, "capacity": self.max_dests}
        _, prefixes, keys, _ = self._reads[-1]
        # Every address XDP put in, less those still there and those taken
        # out here: the LRU's evictions.
        seen = int(prefixes["new_dests"].sum()) + self._gone_new
        return {"tracked": len(keys), "evicted": max(0, seen - len(keys) - self._deleted),
                "capacity": self.max_dests}  # fmt: skip

    def top(self, n: int) -> list[dict[str, Any]]:
        """The busiest protected addresses over the last two seconds, per class."""
        w = self._window()
        if w is None:
            return []
        dt, (_, k0, s0), (_, k1, s1) = w
        before = {bytes(k): i for i, k in enumerate(k0)}
        pk = s1["packets"].astype(np.int64)
        by = s1["bytes"].astype(np.int64)
        for i, k in enumerate(k1):
            j = before.get(bytes(k))
            if j is not None:
                pk[i] -= s0[j]["packets"].astype(np.int64)
                by[i] -= s0[j]["bytes"].astype(np.int64)
        pk, by = np.maximum(pk, 0), np.maximum(by, 0)
        total = pk.sum(axis=1) if len(pk) else np.zeros(0)
        order = np.argsort(-total, kind="stable")[:n]
        rows = []
        for i in order:
            if total[i] == 0:
                break
            rows.append({
                "key": addr_text(bytes(k1[i])),
                "pps": float(total[i]) / dt,
                "bps": float(by[i].sum()) * 8 / dt,
                "pps_by_class": {c: float(v) / dt for c, v in zip(CLASSES, pk[i], strict=True)},
            })  # fmt: skip
        return rows
