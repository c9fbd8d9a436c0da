"""The stateless policy: allow/block lists, UDP source ports, fragment policy.

Every change goes the same way: validate all of it first (one bad item
changes nothing and is named, with its line for a file), apply it to the
XDP program's maps, update the authoritative copy here, then persist that
copy atomically in the state directory, from where ``xdpguard run``
restores it.

Prefixes are kept as sorted numpy arrays of fixed-width byte strings: the
address in network order followed by the prefix length (5 bytes for IPv4,
17 for IPv6). Sorting them compares bytes, searching is vectorised, and a
million prefixes cost a few megabytes rather than a million Python objects.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from xdpguard import _bindings as B
from xdpguard import detect as detectmod
from xdpguard import samples as samplesmod
from xdpguard import statefile
from xdpguard import tcp as tcpmod
from xdpguard.errors import XdpguardError

FAMILIES = ("v4", "v6")
LISTS = ("allow", "block")
_AF = {"v4": socket.AF_INET, "v6": socket.AF_INET6}
_ADDR_LEN = {"v4": 4, "v6": 16}
_BITS = {"v4": 32, "v6": 128}
CANON = {"v4": np.dtype("V5"), "v6": np.dtype("V17")}
_V4_MAPPED = bytes(10) + b"\xff\xff"
# A list file's limits: a line (one prefix and its comment), and the whole
# file (about the lists' capacity, XG_LPM_V4_MAX + XG_LPM_V6_MAX, at 40 bytes).
MAX_LIST_LINE = 4096
MAX_LIST_BYTES = 256 << 20

# The classic reflection/amplification sources (chargen, DNS, NTP, SNMP,
# CLDAP, SSDP, WS-Discovery, memcached): `ports add --preset drdos`.
PORT_PRESETS = {"drdos": (19, 53, 123, 161, 389, 1900, 3702, 11211)}
FRAG_POLICIES = ("pass", "drop")
MAX_TTL = 10 * 365 * 86400
MAX_COMMENT = 256
STATE_FILE = "policy.npz"
STATE_FORMAT = "xdpguard-policy"
STATE_VERSION = 1

log = logging.getLogger("xdpguard")


class PolicyInputError(XdpguardError):
    """An item of a request is invalid; nothing was changed."""


# ---- parsing ----


def parse_prefix(text: str) -> tuple[str, bytes]:
    """One address or CIDR -> (family, canonical bytes); ValueError says what is wrong."""
    addr, slash, plen_text = text.partition("/")
    family = "v6" if ":" in addr else "v4"
    try:
        packed = socket.inet_pton(_AF[family], addr)
    except OSError:
        raise ValueError(f"not an IP{family} address") from None
    bits = _BITS[family]
    if slash:
        if not plen_text.isdigit() or len(plen_text) > 3:
            raise ValueError("prefix length must be a number")
        plen = int(plen_text)
        if plen > bits:
            raise ValueError(f"prefix length {plen} is more than {bits}")
    else:
        plen = bits
    host = int.from_bytes(packed, "big") & ((1 << (bits - plen)) - 1)
    if host:
        net = (int.from_bytes(packed, "big") - host).to_bytes(len(packed), "big")
        raise ValueError(
            f"host bits set (the network is {socket.inet_ntop(_AF[family], net)}/{plen})"
        )
    if family == "v6" and plen >= 96 and packed[:12] == _V4_MAPPED:
        # IPv4 traffic never carries these: the entry would never match.
        v4 = socket.inet_ntop(socket.AF_INET, packed[12:])
        raise ValueError(f"an IPv4-mapped address: write it as IPv4 ({v4}/{plen - 96})")
    return family, packed + bytes((plen,))


@dataclass
class Prefixes:
    """Parsed, canonical, de-duplicated prefixes of both families."""

    v4: np.ndarray
    v6: np.ndarray

    def __getitem__(self, family: str) -> np.ndarray:
        return self.v4 if family == "v4" else self.v6

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter((("v4", self.v4), ("v6", self.v6)))


def _collect(out: dict[str, bytearray]) -> Prefixes:
    return Prefixes(
        **{f: np.unique(np.frombuffer(bytes(out[f]), dtype=CANON[f])) for f in FAMILIES}
    )


def parse_items(items: Iterable[str]) -> Prefixes:
    """Prefixes given one by one (command-line arguments)."""
    out = {f: bytearray() for f in FAMILIES}
    for item in items:
        try:
            family, canon = parse_prefix(item.strip())
        except ValueError as exc:
            raise PolicyInputError(f"{item!r}: {exc}") from None
        out[family] += canon
    return _collect(out)


def parse_lines(lines: Iterable[bytes]) -> Prefixes:
    """A list file, line by line (split on newlines only, so the numbers are
    those of ``grep -n``): one prefix per line, '#' comments, blank lines.
    Every error names its line; nothing is returned unless all is good."""
    out = {f: bytearray() for f in FAMILIES}
    total = 0
    for n, raw in enumerate(lines, 1):
        total += len(raw)
        if total > MAX_LIST_BYTES:
            raise PolicyInputError(f"more than {MAX_LIST_BYTES >> 20} MiB: not a list file")
        if len(raw) > MAX_LIST_LINE:
            raise PolicyInputError(f"line {n}: longer than {MAX_LIST_LINE} bytes")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise PolicyInputError(f"line {n}: not UTF-8 text") from None
        line = text.split("#", 1)[0].strip()
        if not line:
            continue
        if "\0" in line:
            raise PolicyInputError(f"line {n}: a NUL byte: not a list file")
        try:
            family, canon = parse_prefix(line)
        except ValueError as exc:
            raise PolicyInputError(f"line {n}: {text.strip()!r}: {exc}") from None
        out[family] += canon
    return _collect(out)


def split_lines(data: bytes) -> Iterator[bytes]:
    """``data`` cut at each newline, and nowhere else (not at form feeds or CRs)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        yield data[start:end].removesuffix(b"\r")
        start = end + 1


def read_lines(f: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a file (or pipe) read in chunks; a line never grows past
    MAX_LIST_LINE + 1 bytes in memory, so /dev/zero is refused, not swallowed."""
    pending = b""
    while True:
        data = f.read(chunk)
        if not data:
            break
        pending += data
        *whole, pending = pending.split(b"\n")
        for line in whole:
            yield line.removesuffix(b"\r")
        if len(pending) > MAX_LIST_LINE:
            yield pending  # too long: parse_lines says so, with its number
            return
    if pending:
        yield pending.removesuffix(b"\r")


def parse_text(text: str) -> Prefixes:
    """A list file given as text (see parse_lines)."""
    return parse_lines(split_lines(text.encode("utf-8", "surrogateescape")))


def format_prefix(family: str, canon: bytes) -> str:
    n = _ADDR_LEN[family]
    return f"{socket.inet_ntop(_AF[family], canon[:n])}/{canon[n]}"


def canon_valid(family: str, canon: np.ndarray) -> np.ndarray:
    """Per prefix: a possible length and no host bits (vectorised parse_prefix)."""
    n = _ADDR_LEN[family]
    raw = canon.view(np.uint8).reshape(-1, n + 1)
    plen = raw[:, n].astype(np.int64)
    ok = plen <= _BITS[family]
    # The address as big-endian 64-bit words; host bits per word.
    words = raw[:, :n].copy().view(">u8" if n == 16 else ">u4").astype(np.uint64)
    width = 64 if n == 16 else 32
    for i in range(words.shape[1]):
        keep = np.clip(plen - i * width, 0, width).astype(np.uint64)  # network bits in word i
        host_bits = np.uint64(width) - keep
        full = host_bits >= 64
        mask = np.where(
            full, np.uint64(0xFFFFFFFFFFFFFFFF), (np.uint64(1) << np.minimum(host_bits, 63)) - 1
        )
        ok &= (words[:, i] & mask) == 0
    return ok


def lpm_keys(family: str, canon: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Canonical prefixes -> the LPM trie's key structs (``dtype``)."""
    n = _ADDR_LEN[family]
    raw = canon.view(np.uint8).reshape(-1, n + 1)
    keys = np.zeros(len(canon), dtype=dtype)
    keys["prefixlen"] = raw[:, n]
    keys["addr"] = raw[:, :n]
    return keys


def parse_ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise PolicyInputError(f"ttl {ttl!r}: must be a number of seconds")
    if not 0 < ttl <= MAX_TTL:
        raise PolicyInputError(f"ttl {ttl!r}: must be more than 0 and at most {MAX_TTL}")
    return float(ttl)


def parse_comment(comment: Any) -> str | None:
    if comment is None:
        return None
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT or not comment.isprintable():
        raise PolicyInputError(f"comment: must be printable text of at most {MAX_COMMENT} chars")
    return comment


def parse_ports(ports: Any) -> list[int]:
    """A list of port numbers (ints: "53" is a string, not a port)."""
    if not isinstance(ports, list | tuple):
        raise PolicyInputError(f"ports {ports!r}: must be a list of port numbers")
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 65535:
            raise PolicyInputError(f"port {p!r}: must be a number from 0 to 65535")
    return sorted(set(ports))


# Ethertypes xdpguard judges itself, or that carry IP it cannot judge: never
# allowed by 'l2 allow' (the first pass by policy, the rest are dropped).
L2_NOT_ALLOWABLE = {
    0x0800: "IPv4 is judged by the policy",
    0x86DD: "IPv6 is judged by the policy",
    0x0806: "ARP is judged by its sender's address",
    0x8100: "VLAN tags are walked to what they carry",
    0x88A8: "VLAN tags are walked to what they carry",
    0x9100: "VLAN tags are walked to what they carry",
    0x8847: "MPLS carries IP the policy cannot see",
    0x8848: "MPLS carries IP the policy cannot see",
    0x8864: "PPPoE sessions carry IP the policy cannot see",
}
# Names an operator may type for ethertypes.
L2_NAMES = {"lldp": 0x88CC, "lacp": 0x8809, "eapol": 0x888E, "ptp": 0x88F7}


def parse_ethertypes(values: Any) -> list[int]:
    """Ethertypes (numbers from 0x0600) that 'l2 allow' may let through."""
    if not isinstance(values, list | tuple):
        raise PolicyInputError(f"ethertypes {values!r}: must be a list of numbers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0x0600 <= v <= 0xFFFF:
            raise PolicyInputError(
                f"ethertype {v!r}: must be a number from 0x0600 to 0xffff (below 0x0600 "
                "is an 802.3 length: LLC and SNAP frames are never allowed)"
            )
        if v in L2_NOT_ALLOWABLE:
            raise PolicyInputError(f"ethertype {v:#06x}: {L2_NOT_ALLOWABLE[v]}; not allowable")
    return sorted(set(values))


# ---- the authoritative copy ----


class PrefixSet:
    """Sorted unique prefixes of one family, each with a deadline and a comment id."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.keys = np.empty(0, dtype=CANON[family])
        self.deadline = np.empty(0, dtype=np.float64)  # inf: no TTL
        self.comment = np.empty(0, dtype=np.int32)  # -1: none

    def __len__(self) -> int:
        return len(self.keys)

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Insertion points of ``keys`` (sorted, unique) and which are present."""
        idx = np.searchsorted(self.keys, keys)
        present = idx < len(self.keys)
        present[present] = self.keys[idx[present]] == keys[present]
        return idx, present

    def split(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys not in the set, keys in it)."""
        _, present = self.locate(keys)
        return keys[~present], keys[present]

    def merge(self, keys: np.ndarray, deadline: float, comment: int) -> tuple[np.ndarray, int]:
        """Add or update; returns (keys that are new, number updated)."""
        idx, present = self.locate(keys)
        self.deadline[idx[present]] = deadline
        self.comment[idx[present]] = comment
        new = keys[~present]
        at = idx[~present]
        self.keys = np.insert(self.keys, at, new)
        self.deadline = np.insert(self.deadline, at, deadline)
        self.comment = np.insert(self.comment, at, comment)
        return new, int(present.sum())

    def remove(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Delete; returns (keys removed, keys that were not there)."""
        idx, present = self.locate(keys)
        gone = idx[present]
        self.keys = np.delete(self.keys, gone)
        self.deadline = np.delete(self.deadline, gone)
        self.comment = np.delete(self.comment, gone)
        return keys[present], keys[~present]

    def assign(self, keys: np.ndarray, deadline: np.ndarray, comment: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys, self.deadline, self.comment = keys[order], deadline[order], comment[order]


class PolicyMaps(Protocol):
    """Where the policy lives in the kernel (xdpguard.xdp.PolicyMaps)."""

    def lists_add(self, lst: str, family: str, canon: np.ndarray) -> None: ...
    def lists_delete(self, lst: str, family: str, canon: np.ndarray) -> None: ...
    def lists_replace(self, lst: str, canon: dict[str, np.ndarray]) -> None: ...
    def set_ports(self, ports: Sequence[int]) -> None: ...
    def set_l2(self, ethertypes: Sequence[int]) -> None: ...
    def set_frag_policy(self, policy: str) -> None: ...


def _check_force(prefixes: Prefixes, force: bool) -> None:
    """A /0 covers a whole family: say so, unless the operator insists."""
    if force:
        return
    for f in FAMILIES:
        for key in prefixes[f]:
            if bytes(key)[-1] == 0:
                raise PolicyInputError(
                    f"{format_prefix(f, bytes(key))} covers every IP{f} source; "
                    "add --force if you mean it"
                )


class Policy:
    """The policy of a running appliance; every public method is one atomic change.

    A change is validated whole, then written to the kernel for both
    families, and only then taken into the authoritative copy here: when
    the kernel refuses any part, the maps are put back to that copy (which
    never saw the change) and the error says nothing changed. A change the
    kernel took but the state directory did not is kept, reported as not
    saved ("saved": false and a warning), and saved again later.
    """

    def __init__(
        self,
        maps: PolicyMaps,
        state_dir: Path | None,
        clock: Any = time.time,
        tcp: tcpmod.TcpStage | None = None,
        tcp_initial: dict[str, Any] | None = None,
        protect: Any | None = None,
        sampler: Any | None = None,
    ) -> None:
        """``tcp_initial``: the TCP settings of a first start (the settings
        file's [tcp]); a state file's saved ones win over them. ``protect``
        (xdpguard.protect.ProtectMaps) and ``sampler`` (xdpguard.samples.
        Sampler) take the protected prefixes and the sampling rates."""
        self.maps = maps
        self.tcp = tcp
        self.tcp_initial = dict(tcp_initial or {})
        self.tcp_settings: dict[str, Any] = {**tcpmod.DEFAULTS, **self.tcp_initial}
        self.state_path = state_dir / STATE_FILE if state_dir else None
        self.clock = clock
        self.lists = {lst: {f: PrefixSet(f) for f in FAMILIES} for lst in LISTS}
        self.ports: list[int] = []
        self.l2: list[int] = []  # ethertypes allowed beside IP and ARP
        self.frags = "pass"
        self.protect_maps = protect
        self.sampler = sampler
        # Protected prefixes as (family, canonical bytes, name, options), in the
        # order added; the options are the detector's (mode, pps, bps).
        self.protected: list[Protected] = []
        self.detector: Any | None = None  # xdpguard.detect.Detector, once there is one
        self.detect_settings: dict[str, Any] = dict(detectmod.DEFAULTS)
        self.sampling: dict[str, Any] = samplesmod.default_rates()
        self.comments: list[str] = []
        self._comment_ids: dict[str, int] = {}
        self._lock = threading.RLock()
        # The earliest TTL deadline of any entry: expire() scans nothing before it.
        self._due = math.inf
        # Why the last save failed, while the state file is behind the policy.
        self.unsaved: str | None = None

    # -- helpers --

    def _comment_id(self, comment: str | None) -> int:
        if comment is None:
            return -1
        if comment not in self._comment_ids:
            self._comment_ids[comment] = len(self.comments)
            self.comments.append(comment)
        return self._comment_ids[comment]

    def _list(self, lst: str) -> dict[str, PrefixSet]:
        if lst not in LISTS:
            raise PolicyInputError(f"unknown list {lst!r}")
        return self.lists[lst]

    def _kernel(self, lst: str, *steps: Any) -> None:
        """Run the map updates ``steps`` of one change to ``lst``: all of them, or,
        if the kernel refuses one, none (the maps go back to the authoritative copy)."""
        try:
            for step in steps:
                step()
        except OSError as exc:
            try:
                self.maps.lists_replace(lst, {f: self.lists[lst][f].keys for f in FAMILIES})
            except OSError as again:
                raise XdpguardError(
                    f"{lst}list: the kernel refused a change ({exc}) and then its undo "
                    f"({again}); the kernel's list may differ until the next change"
                ) from exc
            raise XdpguardError(f"{lst}list not changed: the kernel refused ({exc})") from exc

    def _done(self, result: dict[str, Any]) -> dict[str, Any]:
        """Save the state and say whether that worked, in ``result``."""
        self._save()
        result["saved"] = self.unsaved is None
        if self.unsaved is not None:
            result["warning"] = (
                f"applied, but not saved ({self.unsaved}): it will not survive a restart "
                "until a later save works"
            )
        return result

    # -- lists --

    def list_add(
        self,
        lst: str,
        items: Sequence[str],
        ttl: Any = None,
        comment: Any = None,
        force: bool = False,
    ) -> dict[str, Any]:
        prefixes = parse_items(items)
        ttl_s, text = parse_ttl(ttl), parse_comment(comment)
        if not len(prefixes):
            raise PolicyInputError("no prefixes given")
        _check_force(prefixes, force)
        with self._lock:
            sets = self._list(lst)
            new = {f: sets[f].split(prefixes[f])[0] for f in FAMILIES}
            self._kernel(lst, *(lambda f=f: self.maps.lists_add(lst, f, new[f]) for f in FAMILIES))
            deadline = self.clock() + ttl_s if ttl_s else math.inf
            cid = self._comment_id(text)
            updated = sum(sets[f].merge(prefixes[f], deadline, cid)[1] for f in FAMILIES)
            # An update may also lift a TTL: recompute rather than min().
            self._due = self._next_deadline() if updated else min(self._due, deadline)
            return self._done({"added": sum(len(n) for n in new.values()), "updated": updated})

    def list_del(self, lst: str, items: Sequence[str]) -> dict[str, Any]:
        prefixes = parse_items(items)
        with self._lock:
            sets = self._list(lst)
            split = {f: sets[f].split(prefixes[f]) for f in FAMILIES}
            self._kernel(
                lst, *(lambda f=f: self.maps.lists_delete(lst, f, split[f][1]) for f in FAMILIES)
            )
            for f in FAMILIES:
                sets[f].remove(split[f][1])
            missing = [format_prefix(f, bytes(k)) for f in FAMILIES for k in split[f][0]]
            deleted = sum(len(split[f][1]) for f in FAMILIES)
            return self._done({"deleted": deleted, "missing": missing})

    def list_load(
        self, lst: str, prefixes: Prefixes, replace: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Load parsed prefixes (parse_text() or parse_lines() of a file)."""
        _check_force(prefixes, force)
        if replace and not len(prefixes) and not force:
            raise PolicyInputError(
                "no prefixes: --replace would empty the list; add --force, or use clear"
            )
        with self._lock:
            sets = self._list(lst)
            if replace:
                self._kernel(lst, lambda: self.maps.lists_replace(lst, dict(prefixes.items())))
                for f in FAMILIES:
                    n = len(prefixes[f])
                    sets[f].assign(
                        prefixes[f], np.full(n, math.inf), np.full(n, -1, dtype=np.int32)
                    )
                self._due = self._next_deadline()
                return self._done(
                    {"loaded": len(prefixes), "added": len(prefixes), "replaced": True}
                )
            new = {f: sets[f].split(prefixes[f])[0] for f in FAMILIES}
            self._kernel(lst, *(lambda f=f: self.maps.lists_add(lst, f, new[f]) for f in FAMILIES))
            for f in FAMILIES:
                sets[f].merge(prefixes[f], math.inf, -1)
            self._due = self._next_deadline()
            added = sum(len(n) for n in new.values())
            return self._done({"loaded": len(prefixes), "added": added, "replaced": False})

    def list_clear(self, lst: str) -> dict[str, Any]:
        with self._lock:
            sets = self._list(lst)
            n = sum(len(s) for s in sets.values())
            empty = {f: np.empty(0, dtype=CANON[f]) for f in FAMILIES}
            self._kernel(lst, lambda: self.maps.lists_replace(lst, empty))
            for f in FAMILIES:
                sets[f] = PrefixSet(f)
            self._due = self._next_deadline()
            return self._done({"deleted": n})

    def list_entries(self, lst: str) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            entries = []
            for f in FAMILIES:
                s = self._list(lst)[f]
                for key, dl, cid in zip(s.keys, s.deadline, s.comment, strict=True):
                    entries.append(
                        {
                            "prefix": format_prefix(f, bytes(key)),
                            "expires": None if math.isinf(dl) else float(dl),
                            "ttl": None if math.isinf(dl) else max(0.0, round(float(dl) - now, 1)),
                            "comment": self.comments[cid] if cid >= 0 else None,
                        }
                    )
        return {"count": len(entries), "entries": entries}

    def _next_deadline(self) -> float:
        return min(
            (
                float(s.deadline.min())
                for sets in self.lists.values()
                for s in sets.values()
                if len(s)
            ),
            default=math.inf,
        )

    def expire(self) -> int:
        """Remove entries whose TTL ran out; how many. Free while nothing is due.

        Raises XdpguardError if the kernel refused (the entries stay, and
        the next call tries again)."""
        now = self.clock()
        if now < self._due:
            return 0
        removed = 0
        with self._lock:
            for lst in LISTS:
                due = {f: self.lists[lst][f].keys[self.lists[lst][f].deadline <= now]
                       for f in FAMILIES}  # fmt: skip
                if not any(len(d) for d in due.values()):
                    continue
                self._kernel(
                    lst,
                    *(
                        lambda f=f, lst=lst, due=due: self.maps.lists_delete(lst, f, due[f])
                        for f in FAMILIES
                    ),
                )
                for f in FAMILIES:
                    self.lists[lst][f].remove(due[f])
                    removed += len(due[f])
            self._due = self._next_deadline()
            if removed:
                self._save()
        return removed

    def save_if_behind(self) -> bool:
        """Try again to save a state that could not be saved; True once it is."""
        with self._lock:
            if self.unsaved is not None:
                self._save()
            return self.unsaved is None

    # -- ports and fragments --

    def _change_numbers(
        self, attr: str, key: str, add: list[int], remove: list[int]
    ) -> dict[str, Any]:
        """Add ``add`` to, or take ``remove`` from, the number set ``attr``
        (the UDP source ports, the ethertypes allowed): the kernel first,
        then the copy here; refused by the kernel, nothing changes."""
        push = {"ports": self.maps.set_ports, "l2": self.maps.set_l2}[attr]
        if not add and not remove:
            raise PolicyInputError(f"no {key} given")
        with self._lock:
            old: list[int] = getattr(self, attr)
            new = sorted((set(old) | set(add)) - set(remove))
            try:
                push(new)
            except OSError as exc:
                raise XdpguardError(f"{key} not changed: the kernel refused ({exc})") from exc
            setattr(self, attr, new)
            out: dict[str, Any] = {key: list(new)}
            if add:
                out["added"] = len(new) - len(old)
            if remove:
                out["deleted"] = len(old) - len(new)
                out["missing"] = sorted(set(remove) - set(old))
            return self._done(out)

    def ports_add(self, ports: Sequence[Any] = (), preset: str | None = None) -> dict[str, Any]:
        wanted = parse_ports(ports)
        if preset is not None:
            if preset not in PORT_PRESETS:
                raise PolicyInputError(
                    f"unknown preset {preset!r} (known: {', '.join(PORT_PRESETS)})"
                )
            wanted = sorted(set(wanted) | set(PORT_PRESETS[preset]))
        return self._change_numbers("ports", "ports", wanted, [])

    def ports_del(self, ports: Sequence[Any]) -> dict[str, Any]:
        return self._change_numbers("ports", "ports", [], parse_ports(ports))

    def ports_list(self) -> dict[str, Any]:
        return {"ports": list(self.ports)}

    def frags_set(self, policy: Any) -> dict[str, Any]:
        if policy not in FRAG_POLICIES:
            raise PolicyInputError(f"fragment policy {policy!r}: must be one of {FRAG_POLICIES}")
        with self._lock:
            try:
                self.maps.set_frag_policy(policy)
            except OSError as exc:
                raise XdpguardError(f"fragments not changed: the kernel refused ({exc})") from exc
            self.frags = policy
            return self._done({"frags": self.frags})

    def frags_get(self) -> dict[str, Any]:
        return {"frags": self.frags}

    # -- L2: frames that are neither IP nor ARP --

    def l2_allow(self, ethertypes: Sequence[Any]) -> dict[str, Any]:
        return self._change_numbers("l2", "ethertypes", parse_ethertypes(ethertypes), [])

    def l2_del(self, ethertypes: Sequence[Any]) -> dict[str, Any]:
        return self._change_numbers("l2", "ethertypes", [], parse_ethertypes(ethertypes))

    def l2_list(self) -> dict[str, Any]:
        return {"ethertypes": list(self.l2)}

    # -- protected networks and samples --

    def _set_protected(self, new: list[Protected]) -> None:
        if self.protect_maps is not None:
            try:
                self.protect_maps.replace(new)
            except OSError as exc:
                raise XdpguardError(f"protect not changed: the kernel refused ({exc})") from exc
        self.protected = new

    def protect_add(
        self,
        items: Sequence[Any],
        name: Any = None,
        mode: Any = None,
        pps: Any = None,
        bps: Any = None,
    ) -> dict[str, Any]:
        """Protect prefixes; given again, a prefix takes the name, mode and
        thresholds given (the others it keeps)."""
        if name is not None and (
            not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable()
        ):
            raise PolicyInputError("name: must be 1 to 64 printable characters")
        change = parse_protect_opts({"mode": mode, "pps": pps, "bps": bps})
        parsed = parse_protected(items)
        with self._lock:
            new = list(self.protected)
            where = {(f, c): i for i, (f, c, _, _) in enumerate(new)}
            added = 0
            for f, c in parsed:
                i = where.get((f, c))
                if i is None:
                    new.append((f, c, name, change))
                    added += 1
                else:
                    _, _, old_name, old_opts = new[i]
                    new[i] = (f, c, name if name is not None else old_name, {**old_opts, **change})
            if len(new) > PROTECT_MAX:
                raise PolicyInputError(f"at most {PROTECT_MAX} protected prefixes")
            self._set_protected(new)
            return self._done({"added": added, **self.protect_list()})

    def protect_del(self, items: Sequence[Any]) -> dict[str, Any]:
        parsed = parse_protected(items)
        with self._lock:
            gone = set(parsed)
            have = {(f, c) for f, c, _, _ in self.protected}
            missing = [format_prefix(f, c) for f, c in parsed if (f, c) not in have]
            self._set_protected([e for e in self.protected if (e[0], e[1]) not in gone])
            return self._done({"deleted": len(gone & have), "missing": missing,
                               **self.protect_list()})  # fmt: skip

    def protect_list(self) -> dict[str, Any]:
        rows = {r["prefix"]: r for r in self.protect_maps.prefixes()} if self.protect_maps else {}
        out = []
        for f, c, name, opts in self.protected:
            text = format_prefix(f, c)
            out.append(
                {
                    **rows.get(text, {}),
                    "prefix": text,
                    "name": name,
                    "mode": opts.get("mode", "mitigate"),
                    "floor_pps": opts.get("pps", {}),
                    "floor_bps": opts.get("bps", {}),
                }
            )
        return {"protected": out, "detection": dict(self.detect_settings)}

    def detect_config(self, values: dict[str, Any]) -> dict[str, Any]:
        given = {k: v for k, v in values.items() if v is not None}
        try:
            settings = detectmod.check_settings({**self.detect_settings, **given})
        except ValueError as exc:
            raise PolicyInputError(str(exc)) from None
        with self._lock:
            if self.detector is not None:
                self.detector.configure(settings)
            self.detect_settings = settings
            return self._done(dict(settings)) if given else dict(settings)

    def sample_set(self, every: Any = None, cap: Any = None, drops: Any = None,
                   forwarded: Any = None) -> dict[str, Any]:  # fmt: skip
        """Change the sampling rates: per reason (``every``), for every dropping
        or every forwarding reason at once, and the cap; persisted."""
        with self._lock:
            want = {"every": dict(self.sampling["every"]), "cap": self.sampling["cap"]}
            for group, n in (("drops", drops), ("forwarded", forwarded)):
                if n is not None:
                    for r in samplesmod.Reason:
                        if (r in samplesmod.FORWARDED) == (group == "forwarded"):
                            want["every"][r.name] = n
            for name, n in (every or {}).items():
                want["every"][samplesmod.parse_reason(name).name] = n
            if cap is not None:
                want["cap"] = cap
            try:
                rates = samplesmod.validate_rates(want)
            except ValueError as exc:
                raise PolicyInputError(str(exc)) from None
            if self.sampler is not None:
                try:
                    self.sampler.set_base(rates)
                except OSError as exc:
                    raise XdpguardError(
                        f"sampling not changed: the kernel refused ({exc})"
                    ) from exc
            self.sampling = rates
            return self._done(self.sample_get())

    def sample_get(self) -> dict[str, Any]:
        if self.sampler is not None:
            return self.sampler.status()
        return {"every": dict(self.sampling["every"]), "cap": self.sampling["cap"]}

    # -- TCP stage settings --

    def tcp_set(self, changes: dict[str, Any], learn: Any = None) -> dict[str, Any]:
        """Change TCP settings (persisted) and/or reopen the learning window (not)."""
        valid = tcpmod.validate(changes)
        if learn is not None and (
            isinstance(learn, bool) or not isinstance(learn, int | float) or not 0 <= learn <= 86400
        ):
            raise PolicyInputError(f"learn {learn!r}: must be 0 to 86400 seconds")
        with self._lock:
            settings = {**self.tcp_settings, **valid}
            if self.tcp is not None:
                self.tcp.apply(settings)
                if learn is not None:
                    self.tcp.learn(learn)
            self.tcp_settings = settings
            result = self.tcp_get()
            return self._done(result) if valid else result

    def tcp_get(self) -> dict[str, Any]:
        return {
            **self.tcp_settings,
            "learning_left": self.tcp.learning_left() if self.tcp else 0,
        }

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "allow": {f: len(self.lists["allow"][f]) for f in FAMILIES},
                "block": {f: len(self.lists["block"][f]) for f in FAMILIES},
                "ports": list(self.ports),
                "l2": list(self.l2),
                "protect": len(self.protected),
                "frags": self.frags,
                "tcp": dict(self.tcp_settings),
                "state_file": str(self.state_path) if self.state_path else None,
            }

    # -- persistence --

    def _save(self) -> None:
        """Write the authoritative copy (write, fsync, rename). Never raises: a
        failure is kept in self.unsaved, for the reply and for a later retry."""
        if self.state_path is None:
            return
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "saved_at": time.time(),
            "ports": self.ports,
            "l2": self.l2,
            "frags": self.frags,
            "tcp": self.tcp_settings,
            "protect": [[format_prefix(f, c), n, o] for f, c, n, o in self.protected],
            "detect": self.detect_settings,
            "sampling": self.sampling,
            "comments": self.comments,
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        }
        for lst in LISTS:
            for f in FAMILIES:
                s = self.lists[lst][f]
                arrays[f"{lst}_{f}_keys"] = s.keys.view(np.uint8)
                arrays[f"{lst}_{f}_deadline"] = s.deadline
                arrays[f"{lst}_{f}_comment"] = s.comment
        self.unsaved = statefile.save(
            self.state_path, lambda f: np.savez(f, **arrays), "policy", self.unsaved
        )

    def _push_all(self) -> None:
        """Put the whole authoritative copy into the kernel and the TCP stage."""
        for lst in LISTS:
            self.maps.lists_replace(lst, {f: self.lists[lst][f].keys for f in FAMILIES})
        self.maps.set_ports(self.ports)
        self.maps.set_l2(self.l2)
        self.maps.set_frag_policy(self.frags)
        if self.tcp is not None:
            self.tcp.apply(self.tcp_settings)
        self._set_protected(self.protected)
        if self.sampler is not None:
            self.sampler.set_base(self.sampling)
        if self.detector is not None:
            self.detector.configure(self.detect_settings)

    def restore(self) -> dict[str, Any]:
        """Load the state file (if any) and push it all into the maps; what was restored."""
        if self.state_path is not None:
            for path in statefile.remove_stale_temp_files(self.state_path.parent):
                log.info("removed %s, left by an interrupted save", path)
        if self.state_path is None or not self.state_path.exists():
            self._push_all()
            return self.summary()
        try:
            self._read_state(self.state_path)
        except Exception as exc:  # the file is input: anything wrong with it is "corrupt"
            raise XdpguardError(
                f"state file {self.state_path} is corrupt ({_one_line(exc)}); fix or move it "
                "away (xdpguard refuses to start with an empty policy instead)"
            ) from None
        self.expire_silently()
        self._due = self._next_deadline()
        self._push_all()
        return self.summary()

    def expire_silently(self) -> None:
        now = self.clock()
        for lst in LISTS:
            for f in FAMILIES:
                s = self.lists[lst][f]
                keep = s.deadline > now
                s.keys, s.deadline, s.comment = s.keys[keep], s.deadline[keep], s.comment[keep]

    def _read_state(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(_array(z, "meta", np.uint8)))
            if not isinstance(meta, dict):
                raise ValueError("meta is not an object")
            if (
                meta.get("format") != STATE_FORMAT
                or not _is_int(meta.get("version"))
                or (meta["version"] != STATE_VERSION)
            ):
                raise ValueError(f"not a version {STATE_VERSION} {STATE_FORMAT} file")
            ports = meta.get("ports")
            if not isinstance(ports, list) or not all(
                _is_int(p) and 0 <= p <= 65535 for p in ports
            ):
                raise ValueError(f"ports: {ports!r} is not a list of port numbers")
            l2 = meta.get("l2", [])  # files of before issue 23 have none
            try:
                l2 = parse_ethertypes(l2)
            except PolicyInputError as exc:
                raise ValueError(f"l2: {exc}") from None
            # Files of before issue 19 have neither.
            protected = _read_protected(meta.get("protect", []))
            detect_settings = detectmod.check_settings(meta.get("detect", {}))
            sampling = samplesmod.validate_rates(meta.get("sampling", samplesmod.default_rates()))
            if meta.get("frags") not in FRAG_POLICIES:
                raise ValueError(f"bad fragment policy {meta.get('frags')!r}")
            comments = meta.get("comments")
            if not isinstance(comments, list):
                raise ValueError("comments: not a list")
            for c in comments:
                parse_comment(c)
            tcp = meta.get("tcp", {})
            if not isinstance(tcp, dict):
                raise ValueError("tcp: not an object")
            try:
                saved_tcp = tcpmod.validate(tcp)
            except XdpguardError as exc:
                raise ValueError(str(exc)) from None
            tcp_settings = {**tcpmod.DEFAULTS, **self.tcp_initial, **saved_tcp}
            lists: dict[str, dict[str, PrefixSet]] = {}
            for lst in LISTS:
                lists[lst] = {}
                for f in FAMILIES:
                    raw = _array(z, f"{lst}_{f}_keys", np.uint8)
                    if raw.ndim != 1 or raw.size % CANON[f].itemsize:
                        raise ValueError(f"bad {lst} {f} keys")
                    keys = raw.view(CANON[f])
                    deadline = _array(z, f"{lst}_{f}_deadline", np.float64)
                    comment = _array(z, f"{lst}_{f}_comment", np.int32)
                    if not len(keys) == len(deadline) == len(comment):
                        raise ValueError(f"{lst} {f}: arrays of different lengths")
                    # A deadline is a time, or +inf for "no TTL"; NaN is neither.
                    if len(deadline) and not (
                        (np.isfinite(deadline) | (deadline == np.inf)).all()
                        and (deadline > 0).all()
                    ):
                        raise ValueError(f"{lst} {f}: a deadline is not a time")
                    if len(comment) and (comment.max() >= len(comments) or comment.min() < -1):
                        raise ValueError(f"{lst} {f}: bad comment reference")
                    # The file is input like any other: every prefix is checked.
                    bad = ~canon_valid(f, keys)
                    if bad.any():
                        raise ValueError(f"{lst} {f}: invalid prefix {bytes(keys[bad][0]).hex()}")
                    if len(np.unique(keys)) != len(keys):
                        raise ValueError(f"{lst} {f}: duplicate prefixes")
                    s = PrefixSet(f)
                    s.assign(keys.copy(), deadline.copy(), comment.copy())
                    lists[lst][f] = s
        self.lists, self.ports, self.frags = lists, sorted(set(ports)), meta["frags"]
        self.l2 = l2
        self.protected, self.sampling = protected, sampling
        self.detect_settings = detect_settings
        self.tcp_settings = tcp_settings
        overridden = sorted(k for k, v in self.tcp_initial.items() if saved_tcp.get(k, v) != v)
        if overridden:
            log.info(
                "tcp: the saved %s of %s win over the settings file's [tcp] "
                "('xdpguard tcp config' changes them)",
                ", ".join(f"{k}={saved_tcp[k]}" for k in overridden),
                path,
            )
        self.comments = list(comments)
        self._comment_ids = {c: i for i, c in enumerate(comments)}


PROTECT_MAX = B.PROTECT_MAX


def parse_protected(items: Any) -> list[tuple[str, bytes]]:
    """Prefixes to protect, each once, in order; PolicyInputError names the first bad one."""
    if not isinstance(items, list | tuple) or not items:
        raise PolicyInputError("no prefixes given")
    out: list[tuple[str, bytes]] = []
    for item in items:
        if not isinstance(item, str):
            raise PolicyInputError(f"{item!r}: not a prefix")
        try:
            fc = parse_prefix(item.strip())
        except ValueError as exc:
            raise PolicyInputError(f"{item}: {exc}") from None
        if fc[1][-1] == 0:
            raise PolicyInputError(f"{item}: a /0 is not a network to protect")
        if fc not in out:
            out.append(fc)
    return out


Protected = tuple[str, bytes, "str | None", dict[str, Any]]
PROTECT_MODES = ("mitigate", "monitor")
_CLASSES = ("syn", "tcp", "udp", "icmp", "fragment", "other")  # enum xg_dest_class's (checked)


def parse_protect_opts(value: Any) -> dict[str, Any]:
    """A prefix's detection options, those given: {mode?, pps?, bps?}, each
    threshold {class: number} ('*': every class)."""
    if not isinstance(value, dict):
        raise PolicyInputError("options: must be an object")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if v is None:
            continue
        if k == "mode":
            if v not in PROTECT_MODES:
                raise PolicyInputError(f"mode {v!r}: must be one of {', '.join(PROTECT_MODES)}")
            out[k] = v
        elif k in ("pps", "bps"):
            if not isinstance(v, dict):
                raise PolicyInputError(f"{k}: must be an object of class: number")
            per: dict[str, float] = {}
            for c, n in v.items():
                if c != "*" and c not in _CLASSES:
                    raise PolicyInputError(
                        f"{k}: unknown class {c!r} (known: {', '.join(_CLASSES)})"
                    )
                if isinstance(n, bool) or not isinstance(n, int | float) or not 0 < n < 1e13:
                    raise PolicyInputError(f"{k} of {c}: {n!r} is not a rate")
                for cc in _CLASSES if c == "*" else (c,):
                    per[cc] = float(n)
            out[k] = per
        else:
            raise PolicyInputError(f"unknown option {k!r}")
    return out


def _read_protected(value: Any) -> list[Protected]:
    if not isinstance(value, list) or len(value) > PROTECT_MAX:
        raise ValueError(f"protect: not a list of at most {PROTECT_MAX} [prefix, name, options]")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) in (2, 3) and isinstance(item[0], str)
                and (item[1] is None or isinstance(item[1], str))):  # fmt: skip
            raise ValueError(f"protect: {item!r} is not [prefix, name, options]")
        family, canon = parse_prefix(item[0])
        try:
            opts = parse_protect_opts(item[2] if len(item) == 3 else {})
        except PolicyInputError as exc:
            raise ValueError(f"protect {item[0]}: {exc}") from None
        out.append((family, canon, item[1], opts))
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _array(z: Any, name: str, dtype: Any) -> np.ndarray:
    """Member ``name`` of a loaded npz, which must hold ``dtype`` values."""
    if name not in z.files:
        raise ValueError(f"no {name}")
    arr = z[name]
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise ValueError(f"{name}: {arr.dtype}[{arr.ndim}d], not a {np.dtype(dtype)} vector")
    return arr


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
