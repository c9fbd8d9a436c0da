"""SYN challenges as the outer XDP program answers them (bpf/xg_challenge.h),
and what Python keeps of them: their policy (xg_tcpcfg), the cookie secret
(xg_secret) and the sources that answered (xg_verified).

The secret and the verified sources are pinned beside the flow table
(flowtable.pin_dir_for()), mode 0600: a restart, even after SIGKILL, finds
the secret a challenge in flight was made with, and every source verified
before it. A pinned map of another shape (another ABI, --max-flows
changed) is replaced by an empty one, said once. verified.json in the
state directory (written on a clean stop) brings the verified sources
back when nothing is pinned (after a reboot).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError
from xdpguard.statefile import write_atomically
from xdpguard.xdp import reason_counters

log = logging.getLogger("xdpguard")

PINNED = ("xg_secret", "xg_verified", "xg_verified_bloom")
# The inner program answers no challenge: its own tables of them stay small.
INNER_MAX_ENTRIES = {"xg_chal_prefix": 1, "xg_dest_rates": 1}
_MAP_ARRAY, _MAP_LRU_HASH, _MAP_BLOOM_FILTER = 2, 9, 30  # enum bpf_map_type
_ZERO = struct.pack("=I", 0)
# Longest TTL a verified source may have (seconds); also bounds a restored one.
MAX_VERIFY_TTL = 30 * 86400
_V4_MAPPED = bytes(10) + b"\xff\xff"


def verified_capacity(max_flows: int) -> int:
    """Sources xg_verified holds: a quarter of the flows, at least 65,536."""
    return max(65536, max_flows // 4)


def _shapes(max_verified: int) -> dict[str, dict[str, int]]:
    return {
        "xg_secret": {
            "type": _MAP_ARRAY,
            "key_size": 4,
            "value_size": B.struct_layout("struct xg_cookie_secret")[0],
            "max_entries": 1,
        },
        "xg_verified": {
            "type": _MAP_LRU_HASH,
            "key_size": 16,
            "value_size": B.struct_layout("struct xg_verified_src")[0],
            "max_entries": max_verified,
        },
        "xg_verified_bloom": {
            "type": _MAP_BLOOM_FILTER,
            "key_size": 0,
            "value_size": 16,
            "max_entries": max_verified,
        },
    }


def max_entries(max_verified: int) -> dict[str, int]:
    """The sizes the loader gives the verified sources' maps."""
    return {"xg_verified": max_verified, "xg_verified_bloom": max_verified}


@dataclass
class Pinned:
    """What a start takes from the challenge maps pinned by the last one."""

    fds: dict[str, int] = field(default_factory=dict)  # maps reused as they are (caller closes)
    # Verified sources (key, value) of an xg_verified of another size
    # (--max-flows changed), to be put into the new one.
    carried: list[tuple[bytes, bytes]] = field(default_factory=list)

    def whole(self) -> bool:
        return set(self.fds) == set(PINNED)


def open_pinned(pin: Path | None, max_verified: int) -> Pinned:
    """The challenge maps pinned in ``pin``: all of them, if they have this
    build's shape; the secret and the verified sources' contents, if only
    the capacity of the verified sources changed; else nothing (and
    nothing pinned there is used)."""
    if pin is None:
        return Pinned()
    fds: dict[str, int] = {}
    try:
        for name in PINNED:
            try:
                fds[name] = B.obj_get(str(pin / name))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise XdpguardError(f"cannot open {pin / name}: {exc.strerror}") from None
                return Pinned()
        shapes = {name: B.map_shape(fd) for name, fd in fds.items()}
        wants = _shapes(max_verified)
        differ = [n for n in PINNED if {k: shapes[n][k] for k in wants[n]} != wants[n]]
        if not differ:
            out, fds = Pinned(fds), {}
            return out
        sized = ("xg_verified", "xg_verified_bloom")  # both sized with --max-flows

        def resized(n: str) -> bool:
            return all(shapes[n][k] == v for k, v in wants[n].items() if k != "max_entries")

        if set(differ) <= set(sized) and all(resized(n) for n in sized):
            old = shapes["xg_verified"]["max_entries"]
            carried = B.map_dump(fds["xg_verified"], old)
            log.info(
                "verified sources: %d carried from a table of %d into one of %d",
                len(carried),
                old,
                max_verified,
            )
            return Pinned({"xg_secret": fds.pop("xg_secret")}, carried)
        log.warning(
            "the pinned %s in %s has another shape; starting with an empty one "
            "(its contents are not restored)",
            differ[0],
            pin,
        )
        for p in PINNED:
            (pin / p).unlink(missing_ok=True)
        return Pinned()
    finally:
        for fd in fds.values():
            os.close(fd)


def pin_maps(pin: Path, fds: dict[str, int]) -> None:
    """Pin ``fds`` (the challenge maps a program made) in ``pin``, mode 0600."""
    for name in PINNED:
        path = pin / name
        path.unlink(missing_ok=True)
        try:
            B.obj_pin(fds[name], str(path))
        except OSError as exc:
            raise XdpguardError(f"cannot pin {path}: {exc.strerror}") from None
        os.chmod(path, 0o600)


def addr_text(raw: bytes) -> str:
    if raw[:12] == _V4_MAPPED:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


def _addr16(text: str) -> bytes:
    packed = ipaddress.ip_address(text).packed
    return packed if len(packed) == 16 else _V4_MAPPED + packed


class Challenges:
    """The challenge state of one appliance, in the outer program's maps."""

    def __init__(self, prog: Any, restored: bool) -> None:
        """``prog``: the outer XdpProgram; ``restored``: its secret and verified
        sources came back from their pins (else the secret is made here)."""
        self._cfg = prog.map_fd("xg_tcpcfg")
        self._secret = prog.map_fd("xg_secret")
        self._verified = prog.map_fd("xg_verified")
        self._bloom = prog.map_fd("xg_verified_bloom")
        self._monitor = prog.map_fd("xg_monitor")
        self.capacity = B.map_shape(self._verified)["max_entries"]
        self._value = B.struct_dtype("struct xg_verified_src")
        self._secret_dtype = B.struct_dtype("struct xg_cookie_secret")
        if not restored or not self._read_secret()["prefix_salt"]:
            secret = np.zeros(1, dtype=self._secret_dtype)
            key = np.frombuffer(os.urandom(16), dtype=np.uint8)
            secret["key"][0] = [key, key]
            secret["prefix_salt"] = int.from_bytes(os.urandom(8), "little") | 1
            self._write_secret(secret)

    # ---- policy and secret ----

    def configure(self, cfg: dict[str, int]) -> None:
        """Write the whole TCP policy (struct xg_tcp_cfg) for XDP."""
        B.map_update(self._cfg, _ZERO, B.struct_bytes("struct xg_tcp_cfg", **cfg))

    def _read_secret(self) -> np.ndarray:
        raw = B.map_lookup(self._secret, _ZERO, self._secret_dtype.itemsize)
        assert raw is not None  # an array slot
        return np.frombuffer(raw, dtype=self._secret_dtype).copy()[0]

    def _write_secret(self, secret: np.ndarray) -> None:
        B.map_update(self._secret, _ZERO, secret.tobytes())

    def rotate_secret(self, key: bytes) -> None:
        """Make ``key`` the secret of new cookies; the current one still checks
        answers. The key goes in first, the generation flips after: a cookie
        never names a key that is not there yet."""
        assert len(key) == 16
        secret = np.array(self._read_secret())
        gen = int(secret["gen"]) & 1
        secret["key"][1 - gen] = np.frombuffer(key, dtype=np.uint8)
        self._write_secret(secret)
        secret["gen"] = 1 - gen
        self._write_secret(secret)

    # ---- verified sources ----

    def verified(self, now: int) -> list[tuple[bytes, int]]:
        """(16-byte address, expires) of every live verified source."""
        out = []
        for key, raw in B.map_dump(self._verified, self.capacity):
            expires = struct.unpack_from("=I", raw)[0]
            if (expires - now) & 0xFFFFFFFF < 0x80000000:  # not before now
                out.append((key, expires))
        return out

    def verified_add(self, addr16: bytes, expires: int) -> None:
        """Mark a source verified until ``expires`` (xg_tcp_now() seconds), with
        a full SYN bucket (its rate is XDP's to keep)."""
        value = np.zeros(1, dtype=self._value)
        value["expires"] = expires
        value["tokens"] = 1 << 62  # clamped to the rate at the first SYN
        B.map_update(self._verified, addr16, value.tobytes())
        B.map_push(self._bloom, addr16)

    def verified_carry(self, entries: list[tuple[bytes, bytes]]) -> int:
        """Put back verified sources read from a table of another size (key,
        value), as they were: expiry and SYN bucket; how many were live."""
        now = B.tcp_now()
        n = 0
        for key, raw in entries[: self.capacity]:
            expires = struct.unpack_from("=I", raw)[0]
            if (expires - now) & 0xFFFFFFFF >= 0x80000000:
                continue  # expired meanwhile
            B.map_update(self._verified, key, raw)
            B.map_push(self._bloom, key)
            n += 1
        return n

    def verified_clear(self) -> int:
        """Forget every verified source; how many there were. (Their bits stay
        in xg_verified_bloom, which only ever grows: a lookup each, no more.)"""
        keys = [k for k, _ in B.map_dump(self._verified, self.capacity)]
        return sum(B.map_delete(self._verified, k) for k in keys)

    def monitor_counters(self) -> np.ndarray:
        """What monitor mode let through, per reason: [reason] -> (packets, bytes)."""
        return reason_counters(self._monitor)


# ---- verified.json: the verified sources across a reboot ----


def save_verified(challenges: Challenges, path: Path) -> int:
    """Write the verified sources and their remaining TTLs (on a clean stop)."""
    now = B.tcp_now()
    entries = [
        {"source": addr_text(addr), "ttl": (expires - now) & 0xFFFFFFFF}
        for addr, expires in challenges.verified(now)
    ]
    entries.sort(key=lambda e: e["source"])
    doc = {"saved_at": time.time(), "entries": entries}
    write_atomically(path, lambda f: f.write(json.dumps(doc).encode()))
    return len(entries)


def load_verified(challenges: Challenges, path: Path) -> int:
    """Bring back what save_verified() wrote, minus the time xdpguard was down.

    The file only saves clients a challenge: a missing one restores nothing,
    and a damaged one is refused whole, said in one line, and left for the
    operator to look at."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("state file %s unreadable (%s): no verified source restored", path, exc)
        return 0
    try:
        entries = _parse_verified(raw)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        log.warning("state file %s is corrupt (%s): no verified source restored", path, exc)
        return 0
    now = B.tcp_now()
    for addr, left in entries[: challenges.capacity]:
        challenges.verified_add(addr, now + min(left, MAX_VERIFY_TTL))
    return min(len(entries), challenges.capacity)


def _parse_verified(raw: bytes) -> list[tuple[bytes, int]]:
    """verified.json, checked whole: (16-byte address, seconds left) of the live entries."""
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError("not an object with a list of entries")
    saved_at = data.get("saved_at")
    if isinstance(saved_at, bool) or not isinstance(saved_at, int | float):
        raise ValueError("saved_at is not a time")
    if not math.isfinite(saved_at):
        raise ValueError("saved_at is not a time")
    down = max(0.0, time.time() - float(saved_at))
    out = []
    for i, e in enumerate(data["entries"]):
        if not isinstance(e, dict) or not isinstance(e.get("source"), str):
            raise ValueError(f"entry {i}: no source address")
        ttl = e.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
            raise ValueError(f"entry {i}: ttl is not a number")
        if not 0 <= ttl <= MAX_VERIFY_TTL:
            raise ValueError(f"entry {i}: ttl {ttl} out of range")
        addr = _addr16(e["source"])
        left = int(ttl - down)
        if left > 0:
            out.append((addr, left))
    return out
