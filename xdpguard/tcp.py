"""The TCP stage of the hot loop as Python drives it.

The loop (libxdp_shim/xg_tcp.c) tracks flows, challenges SYNs and drops
what is out of state; Python sets its policy (modes and thresholds, which
are part of the persisted policy), opens the learning window at start,
rotates the cookie secret, and reads the tables for `xdpguard tcp ...`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard")

MODES = tuple(B.TCP_MODES)
# What an appliance does out of the box: nothing until a destination's rate
# says it is under attack (docs/ARCHITECTURE.md, the TCP stage).
DEFAULTS: dict[str, Any] = {
    "syn_mode": "auto",
    "state_mode": "auto",
    "syn_rate": 1000,
    "syn_burst": 2000,
    "state_rate": 1000,
    "state_burst": 2000,
    "verify_ttl": 600,
}
LIMITS = {
    "syn_rate": (1, 100_000_000),
    "syn_burst": (1, 100_000_000),
    "state_rate": (1, 100_000_000),
    "state_burst": (1, 100_000_000),
    "verify_ttl": (1, 30 * 86400),
}
STATES = {
    value: name.removeprefix("XG_TCP_").lower()
    for name, value in B.enum_members("enum xg_tcp_state").items()
    if name != "XG_TCP_NR_STATES"
}
# The cookie secret is replaced this often; the previous one stays valid.
SECRET_ROTATE_SECONDS = 240.0


class TcpInputError(XdpguardError):
    """A TCP setting is invalid; nothing was changed."""


def validate(changes: dict[str, Any]) -> dict[str, Any]:
    """Checked copy of ``changes`` (a subset of DEFAULTS' keys)."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in DEFAULTS:
            raise TcpInputError(f"unknown TCP setting {key!r}")
        if key.endswith("_mode"):
            if value not in MODES:
                raise TcpInputError(f"{key} {value!r}: must be one of {', '.join(MODES)}")
        else:
            lo, hi = LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise TcpInputError(f"{key} {value!r}: must be a whole number from {lo} to {hi}")
        out[key] = value
    return out


def _addr(raw: list[int], v6: bool) -> str:
    packed = bytes(raw)
    return str(ipaddress.IPv6Address(packed)) if v6 else str(ipaddress.IPv4Address(packed[12:]))


def _endpoint(addr: str, port_be: int) -> str:
    port = int.from_bytes(port_be.to_bytes(2, "little"), "big")
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class TcpStage:
    """Owns the loop's shared TCP state (xg_tcp) for one appliance."""

    def __init__(
        self, max_flows: int, learn_seconds: float, table: B.FlowTab | None = None
    ) -> None:
        """``table``: the flow table XDP shares (else one of the stage's own)."""
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.learn_until = B.tcp_now() + int(learn_seconds)
        self.tcp = B.Tcp(max_flows, max(65536, max_flows // 4), self._c_cfg(), table)
        self._rotated = time.monotonic()
        self.tcp.rotate_secret(os.urandom(16))

    def _c_cfg(self) -> dict[str, int]:
        cfg = {k: v for k, v in self.settings.items() if not k.endswith("_mode")}
        cfg["syn_mode"] = B.TCP_MODES[self.settings["syn_mode"]]
        cfg["state_mode"] = B.TCP_MODES[self.settings["state_mode"]]
        cfg["learn_until"] = self.learn_until
        return cfg

    def apply(self, settings: dict[str, Any]) -> None:
        self.settings = {**DEFAULTS, **settings}
        self.tcp.configure(self._c_cfg())

    def learn(self, seconds: float) -> None:
        """(Re)open the learning window for ``seconds`` from now."""
        self.learn_until = B.tcp_now() + int(seconds)
        self.tcp.configure(self._c_cfg())

    def fast_tcp_allowed(self) -> bool:
        """May XDP forward verified flows itself? Not while anything is only
        watched (monitor) or flows are being adopted (learning)."""
        return (
            "monitor" not in (self.settings["syn_mode"], self.settings["state_mode"])
            and not self.learning_left()
        )

    def learning_left(self) -> int:
        return max(0, self.learn_until - B.tcp_now())

    def tick(self) -> None:
        """Called periodically: rotate the cookie secret when it is due."""
        if time.monotonic() - self._rotated >= SECRET_ROTATE_SECONDS:
            self.tcp.rotate_secret(os.urandom(16))
            self._rotated = time.monotonic()

    def flows(self, top: int = 10) -> dict[str, Any]:
        counts, flows = self.tcp.scan(top)
        now = B.tcp_now()
        by_state = {STATES[i]: n for i, n in enumerate(counts["states"]) if i in STATES}
        return {
            "capacity": counts["capacity"],
            "free": by_state.pop("free"),
            "states": by_state,
            "tracked": sum(by_state.values()),
            "evictions": counts["evictions"],
            "fast_path": counts["fast"],
            "verified": counts["verified"],
            "verified_capacity": counts["verified_capacity"],
            "learning_left": self.learning_left(),
            "busiest": [
                {
                    "outside": _endpoint(_addr(f["key"]["out_addr"], f["key"]["v6"]),
                                         f["key"]["out_port"]),
                    "inside": _endpoint(_addr(f["key"]["in_addr"], f["key"]["v6"]),
                                        f["key"]["in_port"]),
                    "state": STATES.get(f["state"], str(f["state"])),
                    "packets": f["packets"],
                    "bytes": f["bytes"],
                    "idle": max(0, now - f["last_seen"]),
                    "adopted": bool(f["flags"] & 2),
                    # Where each side stands, for out-of-window questions.
                    "sides": {
                        side: {"next_seq": f["end"][i], "acked": f["acked"][i],
                               "window": f["maxwin"][i]}
                        for i, side in enumerate(("outside", "inside"))
                    },
                }
                for f in flows
            ],
        }  # fmt: skip

    def verified(self, limit: int = 1_000_000) -> dict[str, Any]:
        now = B.tcp_now()
        entries = [
            {"source": _addr(v["addr"], _is_v6(v["addr"])), "ttl": max(0, v["expires"] - now)}
            for v in self.tcp.verified(limit)
        ]
        entries.sort(key=lambda e: e["source"])
        return {"count": len(entries), "entries": entries}

    def save_verified(self, path: Path) -> int:
        """Write the verified sources and their remaining TTLs (on a clean stop)."""
        entries = self.verified()["entries"]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"saved_at": time.time(), "entries": entries}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return len(entries)

    def load_verified(self, path: Path) -> int:
        """Bring back what save_verified() wrote, minus the time xdpguard was down.

        The file only saves clients a challenge: a missing one restores
        nothing, and a damaged one is refused whole, said in one line, and
        left for the operator to look at."""
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
        now, n = B.tcp_now(), 0
        for packed, left in entries:
            addr = packed if len(packed) == 16 else bytes(10) + b"\xff\xff" + packed
            self.tcp.verified_add(addr, now + min(left, LIMITS["verify_ttl"][1]))
            n += 1
        return n

    def verified_clear(self) -> dict[str, Any]:
        n = self.verified()["count"]
        self.tcp.verified_clear()
        return {"cleared": n}

    def close(self) -> None:
        self.tcp.close()


def _is_v6(raw: list[int]) -> bool:
    return bytes(raw[:12]) != bytes(10) + b"\xff\xff"


def _parse_verified(raw: bytes) -> list[tuple[bytes, int]]:
    """verified.json, checked whole: (address, seconds left) of the live entries."""
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
        if not 0 <= ttl <= LIMITS["verify_ttl"][1]:
            raise ValueError(f"entry {i}: ttl {ttl} out of range")
        packed = ipaddress.ip_address(e["source"]).packed
        left = int(ttl - down)
        if left > 0:
            out.append((packed, left))
    return out
