"""Attacks found and stopped by the appliance itself: detection, a
fingerprint, an automatic rule that expires.

Detection works per protected destination address and per protected
prefix (carpet bombing spreads an attack thin over many addresses), for
each protocol class, from XDP's own counts (xdpguard.protect), once a
second. A destination is under attack in a class when its rate there
passes the threshold: the greater of the prefix's static floor (``protect
add --pps --bps``) and k times its learned baseline. The baseline is an
exponentially weighted mean of the rate and of its variance, with the
window's time constant; the baseline is the mean plus two deviations (the
95th percentile, were the rate normal). It learns only while there is no
attack, is bounded (one row per address XDP counts, --max-dests), and is
saved in the state directory.

An attack in UDP, ICMP, fragments or other traffic gets a fingerprint:
the most specific rule that matches at least 95 % of the samples of the
attack (the sampling rates are raised for it a moment) and at most 1 % of
the samples to that destination from before it (the sampler's recent
ones). Its terms: protocol, source and destination ports, packet length,
fragment bits, TCP flags, and a source prefix where the sources
concentrate (FlowSpec's components: what the rule engine enforces). A
rule that would be the destination's whole protocol (nothing more
specific holds 95 %) is never a drop: the fallback limits the
destination's class to its threshold. TCP SYN and other TCP attacks are
recorded, not ruled: the TCP protection (challenges, out-of-state drops)
is what stops them, and a flash crowd of real connections looks the same.
An attack whose frames XDP already drops is recorded too.

In ``mitigate`` mode (a prefix's, the default) the rule goes into the rule
engine under the source ``auto``, after every operator's rule, and never
where an operator's rule covers the destination. It is withdrawn once the
traffic it matches stays under the threshold for the hold-down time; a
new attack starts over. ``monitor`` mode logs and lists the rule, and
installs nothing.

Each attack's life is logged (attack_start, attack_update, attack_end,
with JSON fields), kept in ``attacks`` (the last MAX_HISTORY, saved), and
its samples are written to a bounded pcapng in the state directory.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xdpguard import _bindings as B
from xdpguard import pcapng, statefile
from xdpguard.defs import Reason
from xdpguard.protect import CLASSES, addr_text

log = logging.getLogger("xdpguard")

MODES = ("mitigate", "monitor")
DEFAULTS: dict[str, Any] = {
    "k": 4.0,  # times the baseline
    "window": 3600.0,  # seconds: the baseline's time constant
    "hold": 60.0,  # seconds under the threshold before a rule goes
    "floor_pps": 10_000,  # per class, where a prefix sets none
}
LIMITS: dict[str, tuple[float, float]] = {
    "k": (1.5, 1000.0),
    "window": (60.0, 30 * 86400.0),
    "hold": (1.0, 86400.0),
    "floor_pps": (1, 1 << 40),
}
RULED = ("udp", "icmp", "fragment", "other")  # classes that get a rule
FP_SAMPLES = 300  # samples of an attack enough for its fingerprint
FP_SECONDS = 2.0  # or this long after the start, with at least FP_MIN
FP_MIN = 20
MATCH_ATTACK = 0.95
MATCH_BEFORE = 0.01
MAX_TERMS_VALUES = 8  # values of a port term
KEEP_SAMPLES = 2000  # of each attack, for its pcap
MAX_HISTORY = 1000
MAX_ACTIVE = 256  # attacks at once (a carpet of /32s is one prefix attack)
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 47: "gre", 50: "esp", 51: "ah"}
_FORWARDED = {int(Reason.redirected), int(Reason.allowlist), int(Reason.fast_path)}
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def check_settings(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    for k, v in values.items():
        if k not in LIMITS:
            raise ValueError(f"detection setting {k!r}: unknown")
        lo, hi = LIMITS[k]
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ValueError(f"{k} {v!r}: must be {lo:g} to {hi:g}")
        out[k] = v
    return out


@dataclass
class Attack:
    id: int
    destination: str  # an address, or a protected prefix (carpet bombing)
    level: str  # address | prefix
    cls: str
    prefix: str  # the protected prefix it is in
    name: str | None
    mode: str
    start: float  # wall clock
    threshold_pps: float
    threshold_bps: float
    peak_pps: float = 0.0
    peak_bps: float = 0.0
    end: float | None = None
    state: str = "fingerprinting"  # fingerprinting | mitigating | monitoring | recorded | ended
    fingerprint: str | None = None
    why: str = ""  # why no rule, or what the rule is
    rule: str | None = None
    rule_installed: bool = False
    coverage: float | None = None  # of the attack's samples
    before_match: float | None = None  # of the samples from before
    samples: int = 0
    dropped_packets: int = 0
    dropped_bytes: int = 0
    pcap: str | None = None
    # Not saved:
    _since: float = 0.0  # monotonic start
    _under_since: float | None = None
    _taken: list[np.void] = field(default_factory=list)
    _before: list[np.void] = field(default_factory=list)
    _last_counts: np.ndarray | None = None

    def public(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["class"] = d.pop("cls")
        return d


def _proto(n: int) -> str:
    return _PROTO_NAMES.get(n, str(n))


def _addr_int(raw: bytes) -> tuple[int, int]:
    """(value, width) of a 16-byte address (IPv4 mapped: 32 bits)."""
    if raw[:12] == _V4_MAPPED:
        return int.from_bytes(raw[12:], "big"), 32
    return int.from_bytes(raw, "big"), 128


def _prefix_text(value: int, width: int, plen: int) -> str:
    value &= ((1 << plen) - 1) << (width - plen) if plen else 0
    if width == 32:
        return f"{socket.inet_ntop(socket.AF_INET, value.to_bytes(4, 'big'))}/{plen}"
    return f"{socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, 'big'))}/{plen}"


def _flag_names(byte: int) -> str:
    names = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")
    return "=" + "+".join(n for i, n in enumerate(names) if byte >> i & 1)


def fingerprint(attack: np.ndarray, before: np.ndarray, dst: str) -> dict[str, Any]:
    """The most specific rule (text, without its action) that matches at
    least 95 % of ``attack`` and at most 1 % of ``before`` (struct
    xg_sample_keys arrays, plus a "len" field: no, B.sample_keys rows),
    and how well: {match, specific, coverage, before_match}; match None if
    the samples share no protocol."""
    n = len(attack)
    need = math.ceil(MATCH_ATTACK * n)
    sel = (attack["flags"] & B.KEYS_IP) != 0
    terms = [f"dst {dst}"]
    preds: list[Callable[[np.ndarray], np.ndarray]] = []
    if sel.sum() < need:
        return {"match": None, "specific": False, "coverage": float(sel.sum()) / max(n, 1),
                "before_match": None}  # fmt: skip
    protos, counts = np.unique(attack["proto"][sel], return_counts=True)
    p = int(protos[counts.argmax()])
    if counts.max() < need:
        return {"match": None, "specific": False, "coverage": float(counts.max()) / n,
                "before_match": None}  # fmt: skip
    terms.append(f"proto {_proto(p)}")

    def is_proto(a: np.ndarray, p: int = p) -> np.ndarray:
        return ((a["flags"] & B.KEYS_IP) != 0) & (a["proto"] == p)

    preds.append(is_proto)
    sel &= is_proto(attack)
    specific = 0

    def narrow(term: str, pred: Callable[[np.ndarray], np.ndarray]) -> bool:
        nonlocal sel, specific
        new = sel & pred(attack)
        if new.sum() < need:
            return False
        sel = new
        terms.append(term)
        preds.append(pred)
        specific += 1
        return True

    if p in (6, 17):
        for comp in ("sport", "dport"):
            has = sel & ((attack["flags"] & B.KEYS_PORTS) != 0)
            vals, cnt = np.unique(attack[comp][has], return_counts=True)
            order = np.argsort(-cnt, kind="stable")
            chosen: list[int] = []
            total = 0
            for i in order[:MAX_TERMS_VALUES]:
                chosen.append(int(vals[i]))
                total += int(cnt[i])
                if total >= need:
                    break
            if total >= need:
                values = sorted(chosen)

                def has_port(a: np.ndarray, comp: str = comp, v: list[int] = values) -> np.ndarray:
                    return ((a["flags"] & B.KEYS_PORTS) != 0) & np.isin(a[comp], v)

                narrow(f"{comp} {','.join(map(str, values))}", has_port)
    frag = (attack["frag"][sel] & B.FRAG_ANY) != 0
    if frag.mean() >= MATCH_ATTACK:
        narrow("fragment is-fragment", lambda a: (a["frag"] & B.FRAG_ANY) != 0)
    if p == 6:
        fl, cnt = np.unique(attack["tcp_flags"][sel], return_counts=True)
        f = int(fl[cnt.argmax()])
        if f:
            narrow(f"tcp-flags {_flag_names(f)}", lambda a, f=f: a["tcp_flags"] == f)
    # The packet length: what the samples span but their outer 0.5 % each
    # side (strays), and a tenth more each side: the frames not sampled
    # spread a little wider than the samples.
    lens = np.sort(attack["ip_len"][sel].astype(np.int64))
    if len(lens):
        cut = int(len(lens) * 0.005)
        lo_v, hi_v = int(lens[cut]), int(lens[len(lens) - 1 - cut])
        margin = (hi_v - lo_v) // 10
        lo_v, hi_v = max(0, lo_v - margin), min(65535, hi_v + margin)
        if hi_v - lo_v < 1400:  # narrower than what Ethernet carries
            text = f"length {lo_v}" if lo_v == hi_v else f"length {lo_v}-{hi_v}"
            narrow(text, lambda a, lo=lo_v, hi=hi_v: (a["ip_len"] >= lo) & (a["ip_len"] <= hi))
    # Where the sources concentrate: the longest prefix that holds 95 %.
    srcs = [_addr_int(bytes(s)) for s in attack["src"][sel]]
    if srcs and len({w for _, w in srcs}) == 1:
        width = srcs[0][1]
        values = np.array([v for v, _ in srcs], dtype=object)
        for plen in range(width, 7, -1):
            nets = collections.Counter(int(v) >> (width - plen) for v in values)
            net, cnt = nets.most_common(1)[0]
            if cnt + (n - int(sel.sum())) >= need and cnt >= need:
                text = _prefix_text(net << (width - plen), width, plen)

                def in_net(a: np.ndarray, net: int = net, plen: int = plen, w: int = width):
                    out = np.zeros(len(a), dtype=bool)
                    for i, s in enumerate(a["src"]):
                        v, ww = _addr_int(bytes(s))
                        out[i] = ww == w and v >> (w - plen) == net
                    return out

                narrow(f"src {text}", in_net)
                break
    match = " ".join(terms)
    before_match = None
    if len(before):
        hit = np.ones(len(before), dtype=bool)
        for pred in preds:
            hit &= pred(before)
        before_match = float(hit.mean())
    return {
        "match": match,
        "specific": specific > 0,
        "coverage": float(sel.sum()) / n,
        "before_match": before_match,
    }


class Baselines:
    """EWMA of the rate and of its variance, per (destination, class): rows of
    numpy arrays, at most ``capacity`` of them (the quietest go first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: dict[str, int] = {}
        self.mean = np.zeros((capacity, len(CLASSES), 2))
        self.var = np.zeros((capacity, len(CLASSES), 2))
        self.seen = np.zeros(capacity)  # wall clock of the last update

    def row(self, key: str, now: float) -> int:
        i = self.rows.get(key)
        if i is None:
            if len(self.rows) >= self.capacity:
                # The least recently seen destination gives its row up.
                used = np.fromiter(self.rows.values(), dtype=np.int64)
                i = int(used[self.seen[used].argmin()])
                gone = next(k for k, v in self.rows.items() if v == i)
                del self.rows[gone]
            else:
                i = len(self.rows)
            self.rows[key] = i
            self.mean[i] = self.var[i] = 0.0
            self.seen[i] = now
        return i

    def level(self, i: int) -> np.ndarray:
        """[class] x (pps, bps): mean plus two deviations."""
        return self.mean[i] + 2.0 * np.sqrt(self.var[i])

    def learn(self, i: int, rate: np.ndarray, dt: float, window: float, quiet: np.ndarray) -> None:
        """One interval's ``rate`` ([class] x (pps, bps)), for the classes ``quiet``."""
        a = min(1.0, dt / window)
        d = rate - self.mean[i]
        m = np.where(quiet[:, None], self.mean[i] + a * d, self.mean[i])
        v = np.where(quiet[:, None], (1 - a) * (self.var[i] + a * d * d), self.var[i])
        self.mean[i], self.var[i] = m, v

    def save(self, path: Path) -> str | None:
        keys = list(self.rows)
        idx = np.array([self.rows[k] for k in keys], dtype=np.int64)
        meta = json.dumps({"format": "xdpguard-baselines", "version": 1, "keys": keys})

        def write(f: Any) -> None:
            np.savez(f, meta=np.frombuffer(meta.encode(), dtype=np.uint8),
                     mean=self.mean[idx], var=self.var[idx], seen=self.seen[idx])  # fmt: skip

        return statefile.save(path, write, "baselines", None)

    def load(self, path: Path) -> int:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]))
            if meta.get("format") != "xdpguard-baselines" or meta.get("version") != 1:
                raise ValueError("not a version 1 baselines file")
            keys = meta["keys"]
            mean, var, seen = z["mean"], z["var"], z["seen"]
            shape = (len(keys), len(CLASSES), 2)
            if mean.shape != shape or var.shape != shape or seen.shape != (len(keys),):
                raise ValueError("arrays of another shape")
            if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()):
                raise ValueError("a baseline is not a number")
        for j, k in enumerate(keys[: self.capacity]):
            if not isinstance(k, str):
                raise ValueError("a key is not text")
            i = self.row(k, float(seen[j]))
            self.mean[i], self.var[i], self.seen[i] = mean[j], var[j], seen[j]
        return min(len(keys), self.capacity)


class Detector:
    """Called once a second by the sampler's thread (tick()), after the counters were read."""

    def __init__(
        self,
        protect: Any,
        sampler: Any,
        rules: Any,
        state_dir: Path | None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.protect = protect
        self.sampler = sampler
        self.rules = rules
        self.state_dir = state_dir
        self.clock = clock
        self.wall = wall
        self.settings = dict(DEFAULTS)
        self.baselines = Baselines(protect.max_dests + 4096)
        self.active: dict[tuple[str, str], Attack] = {}
        self.history: collections.deque[Attack] = collections.deque(maxlen=MAX_HISTORY)
        self.total: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._last_save = clock()
        self.unsaved: str | None = None
        if state_dir is not None:
            self._restore()

    # ---- state ----

    @property
    def _baseline_path(self) -> Path | None:
        return self.state_dir / "baselines.npz" if self.state_dir else None

    @property
    def _history_path(self) -> Path | None:
        return self.state_dir / "attacks.json" if self.state_dir else None

    def _restore(self) -> None:
        bp, hp = self._baseline_path, self._history_path
        if bp is not None and bp.exists():
            try:
                n = self.baselines.load(bp)
                log.info("detection: %d baseline(s) restored from %s", n, bp)
            except Exception as exc:  # input: a corrupt file costs the baselines, not the start
                log.warning("detection: %s is unreadable (%s); learning again", bp, exc)
        if hp is not None and hp.exists():
            try:
                doc = json.loads(hp.read_text())
                for d in doc.get("attacks", [])[-MAX_HISTORY:]:
                    d["cls"] = d.pop("class")
                    a = Attack(**d)
                    if a.end is None:  # it was running when xdpguard stopped
                        a.end, a.state = a.start, "ended"
                        a.why = (a.why + "; " if a.why else "") + "xdpguard stopped meanwhile"
                    self.history.append(a)
                self._ids = itertools.count(max((a.id for a in self.history), default=0) + 1)
            except Exception as exc:
                log.warning("detection: %s is unreadable (%s); no past attacks", hp, exc)

    def save(self) -> None:
        if self._baseline_path is not None:
            self.unsaved = self.baselines.save(self._baseline_path)
        hp = self._history_path
        if hp is not None:
            with self._lock:
                doc = {
                    "format": "xdpguard-attacks",
                    "version": 1,
                    "attacks": [a.public() for a in [*self.history, *self.active.values()]],
                }
            statefile.save(hp, lambda f: f.write(json.dumps(doc).encode()), "attacks", None)

    def configure(self, values: dict[str, Any]) -> dict[str, Any]:
        self.settings = check_settings({**{k: v for k, v in self.settings.items()}, **values})
        return dict(self.settings)

    # ---- the loop ----

    def _threshold(self, entry: Any, base: np.ndarray) -> np.ndarray:
        """[class] x (pps, bps)."""
        floor = np.zeros((len(CLASSES), 2))
        opts = entry.opts if entry is not None else {}
        for i, c in enumerate(CLASSES):
            floor[i, 0] = opts.get("pps", {}).get(c, self.settings["floor_pps"])
            floor[i, 1] = opts.get("bps", {}).get(c, math.inf)
        return np.maximum(floor, self.settings["k"] * base)

    def tick(self) -> None:
        now, wall = self.clock(), self.wall()
        got = self.protect.last_second()
        if got is None:
            return
        dt, addrs, prefixes = got
        by_index = {e.index: e for e in self.protect.entries.values()}
        seen_now: set[tuple[str, str]] = set()
        for raw, rate in addrs.items():
            entry = self.protect.entry_of(raw)
            key = addr_text(raw)
            self._judge(key, "address", entry, rate, dt, now, wall, seen_now)
        for index, rate in prefixes.items():
            entry = by_index.get(index)
            if entry is not None:
                self._judge(entry.prefix, "prefix", entry, rate, dt, now, wall, seen_now)
        for k, a in list(self.active.items()):
            if k not in seen_now:
                self._quiet(a, now, wall)  # no traffic at all this second
            self._advance(a, now, wall)
        if now - self._last_save > 60:
            self._last_save = now
            self.save()

    def _judge(self, key: str, level: str, entry: Any, rate: np.ndarray, dt: float, now: float,
               wall: float, seen_now: set[tuple[str, str]]) -> None:  # fmt: skip
        i = self.baselines.row(key, wall)
        self.baselines.seen[i] = wall
        thr = self._threshold(entry, self.baselines.level(i))
        over = (rate > thr).any(axis=1)
        under_attack = np.array([(key, c) in self.active for c in CLASSES])
        self.baselines.learn(i, rate, dt, self.settings["window"], ~over & ~under_attack)
        for ci, c in enumerate(CLASSES):
            a = self.active.get((key, c))
            if a is not None:
                seen_now.add((key, c))
                a.peak_pps = max(a.peak_pps, float(rate[ci, 0]))
                a.peak_bps = max(a.peak_bps, float(rate[ci, 1]))
                if a.rule_installed:
                    continue  # the rule's own counters say when it ends (_advance)
                if over[ci]:
                    a._under_since = None
                else:
                    self._quiet(a, now, wall)
            elif over[ci] and entry is not None:
                if level == "address" and (entry.prefix, c) in self.active:
                    continue  # the prefix's attack holds it
                if level == "prefix" and any(
                    k[1] == c and x.level == "address" and x.prefix == key
                    for k, x in self.active.items()
                ):
                    continue  # an attack on one of its addresses: that one's
                if len(self.active) >= MAX_ACTIVE:
                    continue
                self._start(key, level, c, entry, rate[ci], thr[ci], dt, now, wall)
                seen_now.add((key, c))

    def _start(self, key: str, level: str, cls: str, entry: Any, rate: np.ndarray,
               thr: np.ndarray, dt: float, now: float, wall: float) -> None:  # fmt: skip
        a = Attack(
            id=next(self._ids), destination=key, level=level, cls=cls, prefix=entry.prefix,
            name=entry.name, mode=entry.opts.get("mode", "mitigate"), start=wall,
            threshold_pps=float(thr[0]), threshold_bps=float(thr[1]),
            peak_pps=float(rate[0]), peak_bps=float(rate[1]), _since=now,
        )  # fmt: skip
        with self._lock:
            self.active[(key, cls)] = a
        self.total[cls] += 1
        if cls in RULED:
            # What came before: samples older than the last two reads (the
            # attack began within them).
            before_ns = time.monotonic_ns() - int(2.5e9)
            a._before = self.sampler.samples_to(self._matcher(a), before_ns)
            self.sampler.watch(a.id, self._matcher(a), a._taken, KEEP_SAMPLES)
        else:
            a.state = "recorded"
            a.why = "TCP: the TCP protection (challenges, out-of-state drops) handles it"
        self._event("attack_start", a, f"attack {a.id} on {key}: {cls} at {a.peak_pps:.0f} pps "
                    f"(threshold {a.threshold_pps:.0f})")  # fmt: skip

    def _matcher(self, a: Attack) -> Callable[[np.ndarray], np.ndarray]:
        """Which of some samples' keys go to the attacked destination."""
        family, dst, plen = self._dst_parts(a.destination)
        width = 32 if family == 4 else 128
        net = int.from_bytes(dst, "big") >> (width - plen) if plen else 0

        def match(keys: np.ndarray) -> np.ndarray:
            out = np.zeros(len(keys), dtype=bool)
            for i, d in enumerate(keys["dst"]):
                v, w = _addr_int(bytes(d))
                out[i] = w == width and (v >> (width - plen) if plen else 0) == net
            return out & ((keys["flags"] & B.KEYS_IP) != 0)

        return match

    def _quiet(self, a: Attack, now: float, wall: float) -> None:
        if a._under_since is None:
            a._under_since = now
        elif now - a._under_since >= self.settings["hold"]:
            self._end(a, wall, "under the threshold for the hold-down time")

    def _advance(self, a: Attack, now: float, wall: float) -> None:
        if a.end is not None:
            return
        if a.state == "fingerprinting":
            n = len(a._taken)
            if n >= FP_SAMPLES or (now - a._since >= FP_SECONDS and n >= FP_MIN):
                self.sampler.unwatch(a.id)
                self._act(a, wall)
            elif now - a._since >= 10 * FP_SECONDS:
                self.sampler.unwatch(a.id)
                a.state, a.why = "recorded", f"too few samples ({n}) for a fingerprint"
                self._event("attack_update", a, f"attack {a.id}: {a.why}")
        if a.rule_installed and a.rule is not None:
            counts = self.rules.auto_counts(a.rule)
            if counts is None:  # cleared by the operator
                a.rule_installed = False
                a.why += "; the rule was deleted by the operator"
                return
            a.dropped_packets, a.dropped_bytes = int(counts[2]), int(counts[3])
            if a._last_counts is not None:
                pps = float(counts[0] - a._last_counts[0])
                if pps > a.threshold_pps:
                    a._under_since = None
                else:
                    self._quiet(a, now, wall)
            a._last_counts = counts.copy()

    def _act(self, a: Attack, wall: float) -> None:
        taken = np.array(a._taken, dtype=a._taken[0].dtype) if a._taken else None
        before = np.array(a._before, dtype=a._before[0].dtype) if a._before else None
        a.samples = len(a._taken)
        keys = B.sample_keys(taken) if taken is not None else np.zeros(0)
        bkeys = B.sample_keys(before) if before is not None else keys[:0]
        self._write_pcap(a)
        if (
            taken is not None
            and (~np.isin(taken["reason"], list(_FORWARDED))).mean() >= MATCH_ATTACK
        ):
            top = collections.Counter(int(r) for r in taken["reason"]).most_common(1)[0][0]
            a.state = "recorded"
            a.why = f"XDP drops it already ({Reason(top).name})"
            self._event("attack_update", a, f"attack {a.id}: {a.why}")
            return
        fp = fingerprint(keys, bkeys, a.destination)
        a.coverage, a.before_match = fp["coverage"], fp["before_match"]
        if fp["match"] and fp["specific"] and (fp["before_match"] or 0.0) <= MATCH_BEFORE:
            a.fingerprint = fp["match"]
            a.rule = f"{fp['match']} drop"
            a.why = (f"matches {fp['coverage']:.1%} of the attack's {a.samples} samples and "
                     f"{fp['before_match'] or 0:.1%} of the {len(bkeys)} from before")  # fmt: skip
        else:
            proto = {"udp": "udp", "icmp": "icmp", "fragment": None, "other": None}[a.cls]
            if a.cls == "icmp" and ":" in a.destination:
                proto = "icmpv6"
            match = f"dst {a.destination}" + (f" proto {proto}" if proto else "")
            if a.cls == "fragment":
                match += " fragment is-fragment"
            a.fingerprint = fp["match"]
            a.rule = f"{match} rate-limit-pps {max(1, int(a.threshold_pps))}"
            a.why = (
                "no rule more specific than its protocol matches 95 % of the attack "
                "and 1 % of what came before: its class is limited to the threshold"
            )
        covering = []
        fam, dst, plen = self._dst_parts(a.destination)
        covering = self.rules.operator_rules_for(fam, dst, plen)
        if a.mode != "mitigate":
            a.state = "monitoring"
        elif covering:
            a.state = "monitoring"
            a.why += f"; not installed: the operator's rule '{covering[0]}' covers the destination"
        else:
            try:
                a.rule = self.rules.auto_add(a.rule)["rule"]  # as the engine writes it
                a.rule_installed = True
                a.state = "mitigating"
                a._under_since = None
            except Exception as exc:  # a rule the engine refuses (no room): said, not fatal
                a.state = "monitoring"
                a.why += f"; not installed: {exc}"
        self._event("attack_update", a, f"attack {a.id} on {a.destination}: rule '{a.rule}' "
                    f"({a.state}); {a.why}")  # fmt: skip

    @staticmethod
    def _dst_parts(dest: str) -> tuple[int, bytes, int]:
        from xdpguard.policy import parse_prefix

        text = dest if "/" in dest else dest + ("/128" if ":" in dest else "/32")
        family, canon = parse_prefix(text)
        n = 4 if family == "v4" else 16
        return (4 if family == "v4" else 6), canon[:n], canon[n]

    def _end(self, a: Attack, wall: float, why: str) -> None:
        self.sampler.unwatch(a.id)
        if a.rule_installed and a.rule is not None:
            counts = self.rules.auto_counts(a.rule)
            if counts is not None:
                a.dropped_packets, a.dropped_bytes = int(counts[2]), int(counts[3])
            try:
                self.rules.auto_delete(a.rule)
            except Exception as exc:
                log.warning("attack %d: its rule could not be withdrawn: %s", a.id, exc)
            a.rule_installed = False
        a.end, a.state = wall, "ended"
        self._write_pcap(a)
        with self._lock:
            self.active.pop((a.destination, a.cls), None)
            self.history.append(a)
        self._event("attack_end", a, f"attack {a.id} on {a.destination} ended: {why}")
        self.save()

    def _write_pcap(self, a: Attack) -> None:
        if self.state_dir is None or not a._taken:
            return
        d = self.state_dir / "attacks"
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            path = d / f"attack-{a.id}.pcapng"
            with open(path, "wb") as f:
                w = pcapng.Writer(f, B.SAMPLE_BYTES, [("outer", "from outside"),
                                                      ("inner", "from the origin")])  # fmt: skip
                off = int((time.time() - time.monotonic()) * 1e9)
                for s in a._taken[:KEEP_SAMPLES]:
                    caplen = int(s["caplen"])
                    w.packet(int(s["dir"]), int(s["ts_ns"]) + off, bytes(s["data"][:caplen]),
                             int(s["len"]), f"reason={Reason(int(s['reason'])).name} "
                             f"attack={a.id}")  # fmt: skip
            a.pcap = str(path)
        except OSError as exc:
            log.warning("attack %d: cannot write its samples: %s", a.id, exc)

    def _event(self, event: str, a: Attack, message: str) -> None:
        log.info(message, extra={"fields": {"event": event, **a.public()}})

    # ---- what the control socket asks ----

    def attacks(self) -> dict[str, Any]:
        with self._lock:
            return {
                "active": [a.public() for a in self.active.values()],
                "past": [a.public() for a in reversed(self.history)],
                "settings": dict(self.settings),
            }

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            active = collections.Counter(a.cls for a in self.active.values())
        return {"active": {c: active.get(c, 0) for c in CLASSES},
                "total": {c: self.total.get(c, 0) for c in CLASSES}}  # fmt: skip

    def stop(self) -> None:
        """Withdraw every automatic rule (they are not saved) and save the rest."""
        wall = self.wall()
        for a in list(self.active.values()):
            if a.rule_installed and a.rule is not None:
                with_counts = self.rules.auto_counts(a.rule)
                if with_counts is not None:
                    a.dropped_packets = int(with_counts[2])
        self.save()
        _ = wall
