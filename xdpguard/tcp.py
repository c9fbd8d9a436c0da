"""The TCP stage as Python drives it.

The loop (libxdp_shim/xg_tcp.c) tracks flows and drops what is out of
state; the outer XDP program answers SYN challenges and keeps the verified
sources and the rates of auto mode (bpf/xg_challenge.h, through
xdpguard.challenges). Python sets the policy of both (modes and
thresholds, which are part of the persisted policy), opens the learning
window at start, rotates the cookie secret, and reads the tables for
`xdpguard tcp ...`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any

from xdpguard import _bindings as B
from xdpguard import challenges as ch
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
    # The reflection caps: challenges per second to everyone, and to one
    # source /24 (IPv4) or /48 (IPv6). A challenge is 54 to 74 bytes.
    "challenge_rate": 1_000_000,
    "challenge_prefix_rate": 1000,
    # SYNs per second one verified source may send while it would be
    # challenged (a real host's address can be verified by a spoofer): a
    # browser opens tens of connections at once, a NAT's users more.
    "verified_syn_rate": 1000,
    # SYNs per second that skip the challenge because their source is
    # verified: to one destination, and to all together. Beyond, they are
    # challenged like any other (a spoofer can have many real hosts verified).
    "verified_dest_syn_rate": 10_000,
    "verified_total_syn_rate": 100_000,
    # Live flows one source, and one source /24 or /48, may hold: 0 is an
    # eighth, and a quarter, of the table (a proxy may hold tens of
    # thousands of connections to one origin: raise it for one).
    "source_flow_quota": 0,
    "prefix_flow_quota": 0,
}
LIMITS = {
    "syn_rate": (1, 100_000_000),
    "syn_burst": (1, 100_000_000),
    "state_rate": (1, 100_000_000),
    "state_burst": (1, 100_000_000),
    "verify_ttl": (1, ch.MAX_VERIFY_TTL),
    "challenge_rate": (1, 100_000_000),
    "challenge_prefix_rate": (1, 100_000_000),
    "verified_syn_rate": (1, 100_000_000),
    "verified_dest_syn_rate": (1, 100_000_000),
    "verified_total_syn_rate": (1, 100_000_000),
    "source_flow_quota": (0, 1 << 30),
    "prefix_flow_quota": (0, 1 << 30),
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
    """Owns the loop's TCP state (xg_tcp) and the outer program's challenges."""

    def __init__(
        self,
        max_flows: int,
        learn_seconds: float,
        challenges: ch.Challenges,
        table: B.FlowTab | None = None,
    ) -> None:
        """``table``: the flow table XDP shares (else one of the stage's own)."""
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.learn_until = B.tcp_now() + int(learn_seconds)
        self.challenges = challenges
        self.tcp = B.Tcp(max_flows, self._c_cfg(), table)
        self.quota_over = (0, 0)
        self.quota_report: dict[str, int] = {}
        self.challenges.configure(self._c_cfg())
        self._rotated = time.monotonic()

    def _c_cfg(self) -> dict[str, int]:
        cfg = {k: v for k, v in self.settings.items() if not k.endswith("_mode")}
        cfg["syn_mode"] = B.TCP_MODES[self.settings["syn_mode"]]
        cfg["state_mode"] = B.TCP_MODES[self.settings["state_mode"]]
        cfg["learn_until"] = self.learn_until
        # XDP's per-CPU token buckets share each rate among the CPUs.
        cfg["ncpus"] = os.cpu_count() or 1
        return cfg

    def _push(self) -> None:
        cfg = self._c_cfg()
        self.tcp.configure(cfg)
        self.challenges.configure(cfg)

    def apply(self, settings: dict[str, Any]) -> None:
        self.settings = {**DEFAULTS, **settings}
        self._push()

    def learn(self, seconds: float) -> None:
        """(Re)open the learning window for ``seconds`` from now."""
        self.learn_until = B.tcp_now() + int(seconds)
        self._push()

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
            self.challenges.rotate_secret(os.urandom(16))
            self._rotated = time.monotonic()

    def enforce_quotas(self) -> None:
        """Find who holds its quota of the flow table (the workers refuse
        their new flows until the next call); said when that changes."""
        rep = self.tcp.quota()
        over = (rep["sources_over"], rep["prefixes_over"])
        if over != self.quota_over:
            log.warning(
                "flow quotas: %d source(s) and %d prefix(es) at their quota (%d and %d "
                "flows); their new flows are refused (flow_quota)",
                *over,
                rep["source_quota"],
                rep["prefix_quota"],
            )
        self.quota_over = over
        self.quota_report = rep

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
            "verified": len(self.challenges.verified(now)),
            "verified_capacity": self.challenges.capacity,
            "learning_left": self.learning_left(),
            "quota": dict(self.quota_report),
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

    def verified(self) -> dict[str, Any]:
        now = B.tcp_now()
        entries = [
            {"source": ch.addr_text(addr), "ttl": (expires - now) & 0xFFFFFFFF}
            for addr, expires in self.challenges.verified(now)
        ]
        entries.sort(key=lambda e: e["source"])
        return {"count": len(entries), "entries": entries}

    def save_verified(self, path: Path) -> int:
        return ch.save_verified(self.challenges, path)

    def load_verified(self, path: Path) -> int:
        return ch.load_verified(self.challenges, path)

    def verified_clear(self) -> dict[str, Any]:
        return {"cleared": self.challenges.verified_clear()}

    def close(self) -> None:
        self.tcp.close()
