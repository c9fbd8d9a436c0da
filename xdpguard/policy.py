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
import math
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xdpguard import tcp as tcpmod
from xdpguard.errors import XdpguardError

FAMILIES = ("v4", "v6")
LISTS = ("allow", "block")
_AF = {"v4": socket.AF_INET, "v6": socket.AF_INET6}
_ADDR_LEN = {"v4": 4, "v6": 16}
_BITS = {"v4": 32, "v6": 128}
CANON = {"v4": np.dtype("V5"), "v6": np.dtype("V17")}

# The classic reflection/amplification sources (chargen, DNS, NTP, SNMP,
# CLDAP, SSDP, WS-Discovery, memcached): `ports add --preset drdos`.
PORT_PRESETS = {"drdos": (19, 53, 123, 161, 389, 1900, 3702, 11211)}
FRAG_POLICIES = ("pass", "drop")
MAX_TTL = 10 * 365 * 86400
MAX_COMMENT = 256
STATE_FILE = "policy.npz"
STATE_FORMAT = "xdpguard-policy"
STATE_VERSION = 1


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


def parse_text(text: str) -> Prefixes:
    """A list file: one prefix per line, '#' comments and blank lines allowed."""
    out = {f: bytearray() for f in FAMILIES}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            family, canon = parse_prefix(line)
        except ValueError as exc:
            raise PolicyInputError(f"line {n}: {raw.strip()!r}: {exc}") from None
        out[family] += canon
    return _collect(out)


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


def parse_ports(ports: Sequence[Any]) -> list[int]:
    out = []
    for p in ports:
        text = str(p)
        if not text.isdigit() or int(text) > 65535:
            raise PolicyInputError(f"port {p!r}: must be a number from 0 to 65535")
        out.append(int(text))
    return sorted(set(out))


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
    def lists_replace(self, lst: str, family: str, canon: np.ndarray) -> None: ...
    def set_ports(self, ports: Sequence[int]) -> None: ...
    def set_frag_policy(self, policy: str) -> None: ...


class Policy:
    """The policy of a running appliance; every public method is one atomic change."""

    def __init__(
        self,
        maps: PolicyMaps,
        state_dir: Path | None,
        clock: Any = time.time,
        tcp: tcpmod.TcpStage | None = None,
    ) -> None:
        self.maps = maps
        self.tcp = tcp
        self.tcp_settings: dict[str, Any] = dict(tcpmod.DEFAULTS)
        self.state_path = state_dir / STATE_FILE if state_dir else None
        self.clock = clock
        self.lists = {lst: {f: PrefixSet(f) for f in FAMILIES} for lst in LISTS}
        self.ports: list[int] = []
        self.frags = "pass"
        self.comments: list[str] = []
        self._comment_ids: dict[str, int] = {}
        self._lock = threading.RLock()
        # The earliest TTL deadline of any entry: expire() scans nothing before it.
        self._due = math.inf

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

    def _restore_maps(self, lst: str) -> None:
        """After a failed map update: put the kernel back to the authoritative copy."""
        for f in FAMILIES:
            self.maps.lists_replace(lst, f, self.lists[lst][f].keys)

    def _apply(self, lst: str, fn: Any) -> Any:
        try:
            return fn()
        except OSError as exc:
            self._restore_maps(lst)
            raise XdpguardError(f"{lst}list not changed: the kernel refused ({exc})") from exc

    # -- lists --

    def list_add(
        self, lst: str, items: Sequence[str], ttl: Any = None, comment: Any = None
    ) -> dict[str, Any]:
        prefixes = parse_items(items)
        ttl_s, text = parse_ttl(ttl), parse_comment(comment)
        if not len(prefixes):
            raise PolicyInputError("no prefixes given")
        with self._lock:
            sets = self._list(lst)
            deadline = self.clock() + ttl_s if ttl_s else math.inf
            cid = self._comment_id(text)
            added = updated = 0
            for f in FAMILIES:
                new, _ = sets[f].split(prefixes[f])
                self._apply(lst, lambda f=f, new=new: self.maps.lists_add(lst, f, new))
                _, upd = sets[f].merge(prefixes[f], deadline, cid)
                added, updated = added + len(new), updated + upd
            # An update may also lift a TTL: recompute rather than min().
            self._due = self._next_deadline() if updated else min(self._due, deadline)
            self._save()
        return {"added": added, "updated": updated}

    def list_del(self, lst: str, items: Sequence[str]) -> dict[str, Any]:
        prefixes = parse_items(items)
        with self._lock:
            sets = self._list(lst)
            deleted, missing = 0, []
            for f in FAMILIES:
                absent, present = sets[f].split(prefixes[f])
                self._apply(lst, lambda f=f, p=present: self.maps.lists_delete(lst, f, p))
                sets[f].remove(present)
                deleted += len(present)
                missing += [format_prefix(f, bytes(k)) for k in absent]
            self._save()
        return {"deleted": deleted, "missing": missing}

    def list_load(self, lst: str, text: str, replace: bool = False) -> dict[str, Any]:
        prefixes = parse_text(text)
        with self._lock:
            sets = self._list(lst)
            if replace:
                for f in FAMILIES:
                    self._apply(lst, lambda f=f: self.maps.lists_replace(lst, f, prefixes[f]))
                for f in FAMILIES:
                    n = len(prefixes[f])
                    sets[f].assign(
                        prefixes[f], np.full(n, math.inf), np.full(n, -1, dtype=np.int32)
                    )
                self._save()
                return {"loaded": len(prefixes), "added": len(prefixes), "replaced": True}
            added = 0
            for f in FAMILIES:
                new, _ = sets[f].split(prefixes[f])
                self._apply(lst, lambda f=f, new=new: self.maps.lists_add(lst, f, new))
                sets[f].merge(prefixes[f], math.inf, -1)
                added += len(new)
            self._save()
        return {"loaded": len(prefixes), "added": added, "replaced": False}

    def list_clear(self, lst: str) -> dict[str, Any]:
        with self._lock:
            sets = self._list(lst)
            n = sum(len(s) for s in sets.values())
            empty = {f: np.empty(0, dtype=CANON[f]) for f in FAMILIES}
            for f in FAMILIES:
                self._apply(lst, lambda f=f: self.maps.lists_replace(lst, f, empty[f]))
                sets[f] = PrefixSet(f)
            self._save()
        return {"deleted": n}

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
        """Remove entries whose TTL ran out; how many. Free while nothing is due."""
        now = self.clock()
        if now < self._due:
            return 0
        removed = 0
        with self._lock:
            for lst in LISTS:
                for f in FAMILIES:
                    s = self.lists[lst][f]
                    due = s.keys[s.deadline <= now]
                    if len(due):
                        self._apply(
                            lst, lambda lst=lst, f=f, due=due: self.maps.lists_delete(lst, f, due)
                        )
                        s.remove(due)
                        removed += len(due)
            self._due = self._next_deadline()
            if removed:
                self._save()
        return removed

    # -- ports and fragments --

    def ports_add(self, ports: Sequence[Any] = (), preset: str | None = None) -> dict[str, Any]:
        wanted = parse_ports(ports)
        if preset is not None:
            if preset not in PORT_PRESETS:
                raise PolicyInputError(
                    f"unknown preset {preset!r} (known: {', '.join(PORT_PRESETS)})"
                )
            wanted = sorted(set(wanted) | set(PORT_PRESETS[preset]))
        if not wanted:
            raise PolicyInputError("no ports given")
        with self._lock:
            new = sorted(set(self.ports) | set(wanted))
            self.maps.set_ports(new)
            added = len(new) - len(self.ports)
            self.ports = new
            self._save()
        return {"added": added, "ports": self.ports}

    def ports_del(self, ports: Sequence[Any]) -> dict[str, Any]:
        gone = parse_ports(ports)
        if not gone:
            raise PolicyInputError("no ports given")
        with self._lock:
            missing = sorted(set(gone) - set(self.ports))
            new = sorted(set(self.ports) - set(gone))
            self.maps.set_ports(new)
            deleted = len(self.ports) - len(new)
            self.ports = new
            self._save()
        return {"deleted": deleted, "missing": missing, "ports": self.ports}

    def ports_list(self) -> dict[str, Any]:
        return {"ports": list(self.ports)}

    def frags_set(self, policy: Any) -> dict[str, Any]:
        if policy not in FRAG_POLICIES:
            raise PolicyInputError(f"fragment policy {policy!r}: must be one of {FRAG_POLICIES}")
        with self._lock:
            self.maps.set_frag_policy(policy)
            self.frags = policy
            self._save()
        return {"frags": self.frags}

    def frags_get(self) -> dict[str, Any]:
        return {"frags": self.frags}

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
            if valid:
                self._save()
        return self.tcp_get()

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
                "frags": self.frags,
                "tcp": dict(self.tcp_settings),
                "state_file": str(self.state_path) if self.state_path else None,
            }

    # -- persistence --

    def _save(self) -> None:
        if self.state_path is None:
            return
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "saved_at": time.time(),
            "ports": self.ports,
            "frags": self.frags,
            "tcp": self.tcp_settings,
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
        self.state_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            dfd = os.open(self.state_path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise XdpguardError(
                f"applied, but the state could not be saved to {self.state_path}: {exc.strerror}"
            ) from exc

    def _push_all(self) -> None:
        """Put the whole authoritative copy into the kernel and the TCP stage."""
        for lst in LISTS:
            for f in FAMILIES:
                self.maps.lists_replace(lst, f, self.lists[lst][f].keys)
        self.maps.set_ports(self.ports)
        self.maps.set_frag_policy(self.frags)
        if self.tcp is not None:
            self.tcp.apply(self.tcp_settings)

    def restore(self) -> dict[str, Any]:
        """Load the state file (if any) and push it all into the maps; what was restored."""
        if self.state_path is None or not self.state_path.exists():
            self._push_all()
            return self.summary()
        try:
            self._read_state(self.state_path)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise XdpguardError(
                f"state file {self.state_path} is corrupt ({exc}); fix or move it away "
                "(xdpguard refuses to start with an empty policy instead)"
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
            meta = json.loads(bytes(z["meta"]))
            if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} {STATE_FORMAT} file")
            ports = parse_ports(meta["ports"])
            if meta["frags"] not in FRAG_POLICIES:
                raise ValueError(f"bad fragment policy {meta['frags']!r}")
            comments = [str(c) for c in meta["comments"]]
            try:
                tcp_settings = {**tcpmod.DEFAULTS, **tcpmod.validate(meta.get("tcp", {}))}
            except XdpguardError as exc:
                raise ValueError(str(exc)) from None
            lists: dict[str, dict[str, PrefixSet]] = {}
            for lst in LISTS:
                lists[lst] = {}
                for f in FAMILIES:
                    raw = z[f"{lst}_{f}_keys"]
                    if raw.dtype != np.uint8 or raw.size % CANON[f].itemsize:
                        raise ValueError(f"bad {lst} {f} keys")
                    keys = raw.view(CANON[f])
                    deadline = z[f"{lst}_{f}_deadline"].astype(np.float64)
                    comment = z[f"{lst}_{f}_comment"].astype(np.int32)
                    if not len(keys) == len(deadline) == len(comment):
                        raise ValueError(f"{lst} {f}: arrays of different lengths")
                    if len(comment) and (comment.max() >= len(comments) or comment.min() < -1):
                        raise ValueError(f"{lst} {f}: bad comment reference")
                    # The file is input like any other: every prefix is checked.
                    bad = ~canon_valid(f, keys)
                    if bad.any():
                        raise ValueError(f"{lst} {f}: invalid prefix {bytes(keys[bad][0]).hex()}")
                    if len(np.unique(keys)) != len(keys):
                        raise ValueError(f"{lst} {f}: duplicate prefixes")
                    s = PrefixSet(f)
                    s.assign(keys.copy(), deadline, comment)
                    lists[lst][f] = s
        self.lists, self.ports, self.frags = lists, ports, meta["frags"]
        self.tcp_settings = tcp_settings
        self.comments = comments
        self._comment_ids = {c: i for i, c in enumerate(comments)}
