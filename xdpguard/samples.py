"""Packet samples: what XDP drops and forwards, seen frame by frame.

The XDP program samples 1 in N frames of each verdict reason (N per reason,
``xdpguard sample``), under one cap in samples per second for both
devices, onto one ring buffer (bpf/xg_samples.h). The sampler's thread
here reads it and keeps:

- the last RECENT samples, so that a capture can begin with what came just
  before it was asked for (``capture --before``);
- the captures in progress, each with the samples it asked for, until its
  client reads them (``xdpguard capture``); a capture raises the rate of
  the reasons it asks for to every frame (within the cap) while it runs;
- heavy hitters of the frames arriving on outer (``xdpguard top``), by
  source, destination, ports, protocol and source /24 (/48 for IPv6), in
  bounded memory (xdpguard.topk), overall and per reason. A sample stands
  for N frames, and for more when the cap refused some: its weight is N
  times the share of samples the cap let through.

It also reads the per-destination counters once a second (xdpguard.protect).
Nothing here changes a verdict.
"""

from __future__ import annotations

import base64
import collections
import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdpguard import _bindings as B
from xdpguard.defs import LOOP_REASONS, XDP_REASONS, Direction, Reason
from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard")

SAMPLE_DTYPE = B.struct_dtype("struct xg_sample")
CFG_DTYPE = B.struct_dtype("struct xg_sample_cfg")
STATE_DTYPE = B.struct_dtype("struct xg_sample_state")

# Reasons whose frames go on (towards the loop, or forwarded by XDP).
FORWARDED = frozenset({Reason.redirected, Reason.allowlist, Reason.fast_path})
DEFAULT_DROPS = 1000  # 1 in N of each dropping (or answering) reason
DEFAULT_FORWARDED = 10000
DEFAULT_CAP = 1000  # samples per second, for everything
MAX_EVERY = 1 << 24
MAX_CAP = 100_000
# Names an operator may know a reason by beside the enum's.
ALIASES = {"drdos_port": Reason.udp_src_port}

RECENT = 4096  # samples kept for capture --before
CAPTURE_QUEUE = 65536  # samples a capture holds for its client
CAPTURE_IDLE = 15.0  # seconds a capture lives unread (its client is gone)
MAX_CAPTURES = 8
TOP_K = 256  # keys per heavy-hitter table
TOP_TAU = 5.0  # seconds: the rate's time constant
TOP_BY = ("src", "dst", "sport", "dport", "proto", "src/24")
# The section of the program's global xg_sample_gen (bpf/xg_samples.h): a map.
GEN_SECTION = ".data.samples"
# The inner program counts no destination: its own tables of them stay small.
INNER_SAMPLE_ENTRIES = {"xg_dests": 64, "xg_protect_stats": 1}
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 47: "gre", 50: "esp", 132: "sctp"}
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def parse_reason(name: str) -> Reason:
    """A reason's name (or a known alias) -> Reason; XdpguardError otherwise."""
    if name in ALIASES:
        return ALIASES[name]
    try:
        return Reason[name]
    except KeyError:
        raise XdpguardError(
            f"unknown reason {name!r} (known: {', '.join(r.name for r in Reason)})"
        ) from None


def sampled_reason(name: str) -> Reason:
    """A reason XDP gives, so that it has samples; XdpguardError otherwise."""
    r = parse_reason(name)
    if r in LOOP_REASONS and r not in XDP_REASONS:
        raise XdpguardError(
            f"{r.name} is the AF_XDP loop's verdict, and only XDP's are sampled: those frames "
            "are among XDP's redirected ones"
        )
    return r


def default_rates() -> dict[str, Any]:
    return {
        "every": {r.name: DEFAULT_FORWARDED if r in FORWARDED else DEFAULT_DROPS for r in Reason},
        "cap": DEFAULT_CAP,
    }


def validate_rates(value: Any) -> dict[str, Any]:
    """A saved or requested sampling configuration, whole and checked."""
    if not isinstance(value, dict) or set(value) - {"every", "cap"}:
        raise ValueError("sampling: must be an object of every and cap")
    out = default_rates()
    every = value.get("every", {})
    if not isinstance(every, dict):
        raise ValueError("sampling.every: must be an object of reason: N")
    for name, n in every.items():
        try:
            r = parse_reason(name)
        except XdpguardError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_EVERY:
            raise ValueError(f"sampling of {name}: {n!r} is not 0 (never) to {MAX_EVERY}")
        out["every"][r.name] = n
    cap = value.get("cap", DEFAULT_CAP)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_CAP:
        raise ValueError(f"sampling cap {cap!r}: must be 1 to {MAX_CAP} samples per second")
    out["cap"] = cap
    return out


class SampleMaps:
    """The sampling maps both program instances share (outer's own)."""

    def __init__(self, prog: Any) -> None:
        self.ring_fd = prog.map_fd("xg_samples")
        self._cfg = prog.map_fd("xg_sample_cfg")
        self._state = prog.map_fd("xg_sample_state")
        self._gen_fd = prog.map_fd(GEN_SECTION)
        self._gen = 0

    def shared(self) -> dict[str, int]:
        """For the inner instance: one ring, one configuration, one cap."""
        return {"xg_samples": self.ring_fd, "xg_sample_cfg": self._cfg,
                "xg_sample_state": self._state, GEN_SECTION: self._gen_fd}  # fmt: skip

    def write(self, every: dict[Reason, int], cap: int) -> None:
        cfg = np.zeros(1, dtype=CFG_DTYPE)
        for r, n in every.items():
            cfg["every"][0][r] = n
        cfg["interval_ns"] = 1_000_000_000 // cap
        cfg["burst_ns"] = 1_000_000_000  # a second's worth at once
        # A new generation: every CPU's count of every reason starts over, so
        # that a higher rate applies from the next frame.
        gen = self._gen % 0xFFFFFFFF + 1
        cfg["gen"] = gen
        B.map_update(self._cfg, struct.pack("=I", 0), cfg.tobytes())
        B.map_update(self._gen_fd, struct.pack("=I", 0), struct.pack("=I", gen))
        self._gen += 1

    def state(self) -> dict[str, int]:
        raw = B.map_lookup(self._state, struct.pack("=I", 0), STATE_DTYPE.itemsize)
        st = np.frombuffer(raw or bytes(STATE_DTYPE.itemsize), dtype=STATE_DTYPE)[0]
        return {k: int(st[k]) for k in ("taken", "capped", "ring_full")}


@dataclass
class Capture:
    id: int
    reasons: frozenset[int] | None  # None: every reason
    direction: int | None
    queue: collections.deque[tuple[int, np.void]] = field(
        default_factory=lambda: collections.deque(maxlen=CAPTURE_QUEUE)
    )
    lost: int = 0  # samples the queue had no room for
    last_read: float = field(default_factory=time.monotonic)

    def wants(self, reason: int, direction: int) -> bool:
        return (self.reasons is None or reason in self.reasons) and (
            self.direction is None or direction == self.direction
        )


def _addr(raw: bytes) -> str:
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _net(raw: bytes) -> str:
    """The /24 of an IPv4 source, the /48 of an IPv6 one."""
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:15] + bytes(1)) + "/24"
    return socket.inet_ntop(socket.AF_INET6, raw[:6] + bytes(10)) + "/48"


def proto_name(n: int) -> str:
    return _PROTO_NAMES.get(n, str(n))


def _keys_of(k: np.void, by: str) -> Any:
    """One sample's key for a heavy-hitter table (None: it has none)."""
    flags = int(k["flags"])
    if by == "proto":
        return proto_name(int(k["proto"])) if flags & B.KEYS_IP else f"l2/{int(k['l3_proto']):#06x}"
    if not flags & B.KEYS_IP:
        return None
    if by == "src":
        return _addr(bytes(k["src"]))
    if by == "dst":
        return _addr(bytes(k["dst"]))
    if by == "src/24":
        return _net(bytes(k["src"]))
    if not flags & B.KEYS_PORTS:
        return None
    port = int(k["sport"] if by == "sport" else k["dport"])
    return f"{proto_name(int(k['proto']))}/{port}"


class Sampler:
    """The samples' reader, captures and heavy hitters (one thread)."""

    def __init__(
        self,
        maps: SampleMaps,
        protect: Any | None = None,
        rule_text: Callable[[int, int], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maps = maps
        self.protect = protect
        self.rule_text = rule_text or (lambda reason, rule: None)
        self.clock = clock
        self.base = default_rates()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ring: B.Ring | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._recent: collections.deque[tuple[int, np.void]] = collections.deque(maxlen=RECENT)
        self._seq = 0
        self._captures: dict[int, Capture] = {}
        # The detector's: samples to an attacked destination, while it
        # fingerprints (every reason raised, within the cap).
        self._watches: dict[int, tuple[Callable[[np.ndarray], np.ndarray], list[np.void], int]] = {}
        self.detector: Any | None = None  # xdpguard.detect.Detector: tick() once a second
        self._ids = itertools.count(1)
        now = clock()
        self._tops: dict[tuple[str, int | None], Any] = {}
        self._top_start = now
        self._last_state = maps.state()
        self.received = 0
        # ktime (CLOCK_MONOTONIC) -> wall clock, for the samples' times.
        self._wall_offset = time.time() - time.monotonic()

    # ---- rates ----

    def effective(self) -> dict[Reason, int]:
        """1 in N per reason: the operator's, or every frame for a capture's reasons."""
        every = {Reason[name]: n for name, n in self.base["every"].items()}
        if self._watches:
            return dict.fromkeys(every, 1)
        for c in self._captures.values():
            for r in c.reasons if c.reasons is not None else Reason:
                every[Reason(r)] = 1
        return every

    def _write(self) -> None:
        self.maps.write(self.effective(), self.base["cap"])

    def set_base(self, rates: dict[str, Any]) -> None:
        """The operator's rates (validate_rates()'s), in force from now."""
        with self._lock:
            old = self.base
            self.base = rates
            try:
                self._write()
            except OSError:
                self.base = old
                raise

    # ---- thread ----

    def start(self) -> None:
        self._ring = B.Ring(self.maps.ring_fd, "struct xg_sample")
        self._write()
        self._thread = threading.Thread(target=self._run, name="xg-samples", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _run(self) -> None:
        assert self._ring is not None
        last_refresh = 0.0
        while not self._stop.is_set():
            try:
                recs = self._ring.poll(200)
                if len(recs):
                    self._take(recs)
                now = self.clock()
                if now - last_refresh >= 1.0:
                    last_refresh = now
                    if self.protect is not None:
                        self.protect.refresh(now)
                    if self.detector is not None:
                        self.detector.tick()
                    self._expire(now)
            except Exception:  # never let the sampler's thread die silently
                log.exception("samples: reading failed; trying again in a second")
                self._stop.wait(1.0)

    def _expire(self, now: float) -> None:
        with self._lock:
            gone = [c.id for c in self._captures.values() if now - c.last_read > CAPTURE_IDLE]
            for cid in gone:
                del self._captures[cid]
                log.info("capture %d: its client stopped reading; rates restored", cid)
            if gone:
                self._write()

    def _take(self, recs: np.ndarray) -> None:
        now = self.clock()
        state = self.maps.state()
        d_taken = state["taken"] - self._last_state["taken"]
        d_lost = (state["capped"] + state["ring_full"]) - (
            self._last_state["capped"] + self._last_state["ring_full"]
        )
        self._last_state = state
        thin = (d_taken + d_lost) / d_taken if d_taken > 0 else 1.0
        keys = B.sample_keys(recs)
        with self._cond:
            self.received += len(recs)
            for rec in recs:
                self._seq += 1
                item = (self._seq, rec)
                self._recent.append(item)
                for c in self._captures.values():
                    if c.wants(int(rec["reason"]), int(rec["dir"])):
                        if len(c.queue) == c.queue.maxlen:
                            c.lost += 1
                        c.queue.append(item)
            self._cond.notify_all()
            for match, into, limit in self._watches.values():
                room = limit - len(into)
                if room > 0:
                    into.extend(recs[match(keys)][:room])
            inbound = recs["dir"] == Direction.IN
            weights = recs["every"].astype(float) * thin
            for by in TOP_BY:
                overall: dict[Any, float] = collections.defaultdict(float)
                per_reason: dict[int, dict[Any, float]] = collections.defaultdict(
                    lambda: collections.defaultdict(float)
                )
                for i in np.flatnonzero(inbound):
                    key = _keys_of(keys[i], by)
                    if key is None:
                        continue
                    overall[key] += weights[i]
                    per_reason[int(recs[i]["reason"])][key] += weights[i]
                self._table(by, None, now).add(overall.items(), now)
                for r, items in per_reason.items():
                    self._table(by, r, now).add(items.items(), now)

    def _table(self, by: str, reason: int | None, now: float) -> Any:
        from xdpguard.topk import TopK

        t = self._tops.get((by, reason))
        if t is None:
            # Started with the sampler, not now: a table for a reason first seen
            # mid-attack must not read its first second as a whole window.
            t = self._tops[(by, reason)] = TopK(TOP_K, TOP_TAU, self._top_start)
        return t

    # ---- what the control socket asks ----

    def status(self) -> dict[str, Any]:
        with self._lock:
            every = self.effective()
            return {
                "every": {r.name: every[r] for r in Reason},
                "configured": dict(self.base["every"]),
                "cap": self.base["cap"],
                "captures": len(self._captures),
                "received": self.received,
                "held": len(self._recent),
                "dropped": self._ring.dropped() if self._ring is not None else 0,
                **self.maps.state(),
            }

    def watch(self, wid: int, match: Callable[[np.ndarray], np.ndarray], into: list[np.void],
              limit: int) -> None:  # fmt: skip
        """Put the samples whose keys ``match`` in ``into`` (at most ``limit``),
        every reason sampled at every frame meanwhile (within the cap)."""
        with self._lock:
            self._watches[wid] = (match, into, limit)
            self._write()

    def unwatch(self, wid: int) -> None:
        with self._lock:
            if self._watches.pop(wid, None) is not None:
                self._write()

    def samples_to(
        self, match: Callable[[np.ndarray], np.ndarray], before_ns: int
    ) -> list[np.void]:
        """The samples held (the last RECENT) whose keys ``match``, taken
        before ``before_ns`` (CLOCK_MONOTONIC, XDP's clock)."""
        with self._lock:
            recs = [rec for _, rec in self._recent if int(rec["ts_ns"]) < before_ns]
        if not recs:
            return []
        arr = np.array(recs, dtype=SAMPLE_DTYPE)
        return list(arr[match(B.sample_keys(arr))])

    def capture_start(
        self, reasons: Iterable[str] | None, direction: str | None, before: bool
    ) -> dict[str, Any]:
        wanted = frozenset(int(sampled_reason(r)) for r in reasons) if reasons else None
        d = None if direction is None else Direction[direction.upper()]
        with self._lock:
            if len(self._captures) >= MAX_CAPTURES:
                raise XdpguardError(f"{MAX_CAPTURES} captures are running already")
            c = Capture(next(self._ids), wanted, None if d is None else int(d))
            if before:
                for seq, rec in self._recent:
                    if c.wants(int(rec["reason"]), int(rec["dir"])):
                        c.queue.append((seq, rec))
            self._captures[c.id] = c
            self._write()
            held = len(c.queue)
        return {"id": c.id, "reasons": sorted(Reason(r).name for r in wanted) if wanted else None,
                "held_before": held, "cap": self.base["cap"]}  # fmt: skip

    def capture_read(self, cid: int, max_samples: int, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        with self._cond:
            c = self._captures.get(cid)
            if c is None:
                raise XdpguardError(f"no capture {cid} (stopped, or its client stopped reading)")
            c.last_read = self.clock()
            while not c.queue and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or cid not in self._captures:
                    break
                self._cond.wait(min(left, 0.5))
                c.last_read = self.clock()
            out = []
            while c.queue and len(out) < max_samples:
                out.append(c.queue.popleft())
            lost, c.lost = c.lost, 0
        return {"samples": [self._describe(seq, rec) for seq, rec in out], "lost": lost}

    def capture_stop(self, cid: int) -> dict[str, Any]:
        with self._lock:
            c = self._captures.pop(cid, None)
            if c is None:
                raise XdpguardError(f"no capture {cid}")
            self._write()
        return {"id": cid, "stopped": True}

    def _describe(self, seq: int, rec: np.void) -> dict[str, Any]:
        reason, rule = int(rec["reason"]), int(rec["rule"])
        caplen = int(rec["caplen"])
        out: dict[str, Any] = {
            "seq": seq,
            "time_ns": int(rec["ts_ns"]) + int(self._wall_offset * 1e9),
            "reason": Reason(reason).name if reason in Reason._value2member_map_ else str(reason),
            "direction": Direction(int(rec["dir"])).label,
            "len": int(rec["len"]),
            "every": int(rec["every"]),
            "data": base64.b64encode(bytes(rec["data"][:caplen])).decode(),
        }
        if rule:
            out["rule"] = self.rule_text(reason, rule) or f"#{rule - 1}"
        return out

    def top(self, by: str, reason: str | None, n: int) -> dict[str, Any]:
        if by not in TOP_BY:
            raise XdpguardError(f"top by {by!r}: must be one of {', '.join(TOP_BY)}")
        r = int(sampled_reason(reason)) if reason else None
        now = self.clock()
        if by == "dst" and r is None and self.protect is not None and self.protect.entries:
            return {"by": by, "source": "counted", "rows": self.protect.top(n)}
        with self._lock:
            t = self._tops.get((by, r))
            rows = t.top(n, now) if t is not None else []
        return {"by": by, "reason": Reason(r).name if r is not None else None,
                "source": "sampled",
                "rows": [{"key": x["key"], "pps": x["rate"], "error": x["error"]}
                         for x in rows]}  # fmt: skip
