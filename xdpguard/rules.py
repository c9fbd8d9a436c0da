"""The n-tuple rules and per-source rate limits of a running appliance.

Rules come from sources: ``local`` (``xdpguard rule``, saved in the state
directory, restored at start) and BGP peers (``bgp:ADDRESS``, from
``xdpguard flowspec-feed``; never saved: the session is the authority). A
rule is named by its source and its match (the FlowSpec encoding): the same
match from the same source again replaces the action.

Every change is one batch, checked whole before anything is written (the
capacity of the rule slots, at most XG_RULE_LIST_MAX rules per destination
prefix, at most XG_RULE_DEPTH nested destination prefixes): a batch that
does not fit changes nothing. Then each rule new or changed goes into a
slot no list names yet, and each destination prefix's list is rewritten
whole (an LPM entry replaced in one update); if the kernel refuses one,
the lists already written are put back. A slot freed is used again only
with a new tag, so a packet still walking an old list never matches the
rule that took the slot over.

A BGP source lives on a lease (``session()``): while its session is up the
feed renews it; when the session goes down, or the feed stops renewing,
its rules go when the hold time runs out. A session that comes back in
time marks its rules stale; the routes it announces again are kept, and the
rest go at its End-of-RIB, or a hold time after it came back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xdpguard import _bindings as B
from xdpguard import flowspec as F
from xdpguard import statefile
from xdpguard.errors import XdpguardError
from xdpguard.policy import parse_comment

log = logging.getLogger("xdpguard")

LOCAL = "local"
# The detector's rules (xdpguard.detect): never saved (an attack is found
# again), and after every operator's rule of the same destination prefix.
AUTO = "auto"
STATE_FILE = "rules.json"
STATE_FORMAT = "xdpguard-rules"
STATE_VERSION = 1
MAX_HOLD = 3600.0
# The slowest rate the per-CPU buckets can hold (their interval times the
# largest frame must fit 64 bits), per CPU.
_MAX_INTERVAL = (1 << 64) // 65536 - 1


class RuleMaps(Protocol):
    """What the rule table writes (xdpguard.xdp.RuleMaps; a fake in unit tests)."""

    def write_rule(self, slot: int, rule: bytes) -> None: ...
    def reset_rule(self, slot: int) -> None: ...
    def set_list(self, key: bytes, value: bytes) -> None: ...
    def delete_list(self, key: bytes) -> None: ...
    def rule_counts(self, slot: int) -> np.ndarray: ...
    def set_limit(self, key: bytes, value: bytes) -> None: ...
    def delete_limit(self, key: bytes) -> None: ...
    def reset_limit(self, lid: int) -> None: ...
    def limit_counts(self, lid: int) -> np.ndarray: ...
    def set_stages(self, bits: int) -> None: ...
    def set_filter(self, value: bytes) -> None: ...


def interval(rate: float, ncpus: int) -> int:
    """A rate per second as the buckets keep it (bpf/xdpguard.h, XG_RATE_SHIFT)."""
    iv = round(1e9 * (1 << B.RATE_SHIFT) * ncpus / rate)
    if iv > _MAX_INTERVAL:
        exact = 1e9 * (1 << B.RATE_SHIFT) * ncpus / _MAX_INTERVAL
        scale = 10.0 ** (2 - math.floor(math.log10(exact)))  # three digits, rounded up
        lowest = math.ceil(exact * scale) / scale
        raise F.RuleError(f"rate {rate:g}/s is too low for {ncpus} CPU(s): at least {lowest:g}")
    return max(iv, 1)


def filter_hash(hi: int, lo: int, plen: int, v6: int, salt: int) -> int:
    """A destination prefix's hash in the rules' filter: bpf/xg_rule_hash.h's,
    compiled into the shim (one function for XDP and for the filter)."""
    return B.rule_hash(hi, lo, plen, v6, salt)


@functools.lru_cache(maxsize=1 << 17)
def _prefix_hash(family: int, addr: bytes, plen: int, salt: int) -> int:
    """filter_hash() of one destination prefix; kept, as the filter is made
    again, whole, after every change of the rules (a RIB of 16,384 routes)."""
    addr = addr.ljust(16, b"\0")
    return filter_hash(
        int.from_bytes(addr[:8], "big"),
        int.from_bytes(addr[8:], "big"),
        plen,
        int(family == 6),
        salt,
    )


def filter_value(keys: Iterable[tuple[int, F.Prefix | None]], salt: int) -> bytes:
    """struct xg_rule_filter for the destination prefixes that have rules."""
    nbits = B.RULE_BLOOM_WORDS * 64
    bits = np.zeros(B.RULE_BLOOM_WORDS, dtype=np.uint64)
    lens: dict[int, set[int]] = {4: set(), 6: set()}
    root = {4: 0, 6: 0}
    where: list[int] = []
    for family, pfx in keys:
        if pfx is None:
            root[family] = 1
            continue
        lens[family].add(pfx.plen)
        h = _prefix_hash(family, pfx.addr, pfx.plen, salt)
        where += (h & (nbits - 1), (h >> 24) & (nbits - 1))
    if where:
        idx = np.array(where, dtype=np.uint64)
        np.bitwise_or.at(
            bits, (idx >> np.uint64(6)).astype(np.intp), np.uint64(1) << (idx & np.uint64(63))
        )
    out_lens, nlens = [[0] * B.RULE_LENS, [0] * B.RULE_LENS], [0, 0]
    for i, family in enumerate((4, 6)):
        if len(lens[family]) > B.RULE_LENS:
            root[family] = 1  # too many lengths to check: every frame walks
            continue
        ordered = sorted(lens[family], reverse=True)
        out_lens[i][: len(ordered)] = ordered
        nlens[i] = len(ordered)
    return B.struct_bytes(
        "struct xg_rule_filter",
        lens=out_lens,
        nlens=nlens,
        root=[root[4], root[6]],
        salt=salt,
        bits=bits.tolist(),
    )


def lpm_key(family: int, pfx: F.Prefix | None) -> bytes:
    """struct xg_rule_key of a prefix; None: the family's root."""
    plen = pfx.plen if pfx else 0
    addr = pfx.addr.ljust(16, b"\0") if pfx else bytes(16)
    return (8 + plen).to_bytes(4, "little") + bytes((family,)) + addr + bytes(3)


@dataclass
class _Entry:
    rule: F.Rule
    source: str
    slot: int
    tag: int
    base: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.uint64))
    stale: bool = False

    @property
    def list_key(self) -> tuple[int, F.Prefix | None]:
        return (self.rule.match.family, self.rule.match.dst)


@dataclass
class _Session:
    hold: float
    up: bool
    expires: float  # the lease: the source's rules go at this time
    stale_until: float = math.inf  # stale rules go at this time


class _Slots:
    """Slot numbers, used again oldest first, each with a tag that changes."""

    def __init__(self, n: int) -> None:
        self.free: deque[int] = deque(range(n))
        self.tags = [1] * n

    def take(self, n: int) -> list[tuple[int, int]]:
        return [(s, self.tags[s]) for s in (self.free.popleft() for _ in range(n))]

    def give_back(self, slots: Iterable[int], used: bool) -> None:
        for s in slots:
            if used:
                self.tags[s] = self.tags[s] % 0xFFFF + 1
            self.free.append(s)


def _entry_order(e: _Entry) -> tuple[Any, ...]:
    return (e.source == AUTO, F.precedence(e.rule.match), e.source != LOCAL, e.source)


def _depth_ok(prefixes: Iterable[F.Prefix | None], family: int) -> int:
    """The longest chain of nested destination prefixes (the root counts)."""
    width = 32 if family == 4 else 128
    items = sorted(
        (int.from_bytes(p.addr, "big") if p else 0, p.plen if p else 0) for p in prefixes
    )
    stack: list[tuple[int, int]] = []  # (first, last) addresses of enclosing prefixes
    deepest = 0
    for start, plen in items:
        end = start + (1 << (width - plen)) - 1
        while stack and stack[-1][1] < start:
            stack.pop()
        stack.append((start, end))
        deepest = max(deepest, len(stack))
    return deepest


class RuleTable:
    """Rules and rate limits: their maps, the authoritative copy, the state file."""

    def __init__(
        self,
        maps: RuleMaps,
        state_dir: Path | None,
        clock: Any = time.monotonic,
        ncpus: int | None = None,
    ) -> None:
        self.maps = maps
        self.state_path = state_dir / STATE_FILE if state_dir else None
        self.clock = clock
        self.ncpus = ncpus or os.cpu_count() or 1
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.lists: dict[tuple[int, F.Prefix | None], list[_Entry]] = {}
        self.slots = _Slots(B.RULES_MAX)
        self.sessions: dict[str, _Session] = {}
        self.limits: dict[tuple[int, F.Prefix], dict[str, Any]] = {}
        self.limit_ids = _Slots(B.RATELIMITS_MAX)
        self.stages = 0
        self.unsaved: str | None = None
        # Which run of the daemon this is: a feed that sees it change replays.
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        # The filter's hash salt: nobody outside picks prefixes that collide.
        self.salt = int.from_bytes(os.urandom(8), "little")
        self.filter_keys: set[tuple[int, F.Prefix | None]] = set()
        self._lock = threading.RLock()

    # ---- rules ----

    def _value(self, e: _Entry) -> bytes:
        m, a = e.rule.match, e.rule.action
        src = m.src.addr.ljust(16, b"\0") if m.src else bytes(16)
        plen = m.src.plen if m.src else 0
        mask = (((1 << plen) - 1) << (128 - plen)).to_bytes(16, "big") if plen else bytes(16)
        # A single "= N" protocol term is checked on its own before the terms
        # (frames of another protocol are rejected cheaply), and so is a
        # numeric component that is one range; both are left out of the terms.
        proto = 0
        quick: tuple[int, int, int] = (0, 0, 0)
        terms = m.xdp_terms()
        rest = []
        for comp, ts in m.comps:
            if comp == F.Comp.PROTO and len(ts) == 1 and ts[0].op == F.OP_EQ and ts[0].value:
                proto = ts[0].value
            else:
                rest.append((comp, ts))
        if len(rest) == 1 and rest[0][0] not in F.BITMASK:
            span = F.single_range(*rest[0])
            if span is not None:
                quick = (int(rest[0][0]), *span)
                rest = []
        keep = {int(c) for c, _ in rest}
        terms = [t for t in terms if t["comp"] in keep]
        fields: dict[str, Any] = {
            "tag": e.tag,
            "proto": proto,
            "need": sum(1 << comp for comp, _ in m.comps),
            "q_comp": quick[0],
            "q_lo": quick[1],
            "q_hi": quick[2],
            "action": B.RULE_ACTIONS[a.kind],
            "nterms": len(terms),
            "src_len": plen,
            "src": list(src),
            "src_mask": list(mask),
            "interval": interval(a.rate, self.ncpus) if a.kind.startswith("rate") else 0,
            "terms": terms,
        }
        return B.struct_bytes("struct xg_rule", **fields)

    @staticmethod
    def _list_value(key: tuple[int, F.Prefix | None], entries: Sequence[_Entry]) -> bytes:
        plen = key[1].plen if key[1] else 0
        out = (8 + plen).to_bytes(4, "little") + len(entries).to_bytes(4, "little")
        out += b"".join((e.slot | e.tag << 16).to_bytes(4, "little") for e in entries)
        return out + bytes(4 * (B.RULE_LIST_MAX - len(entries)))

    def _stage_bits(self) -> int:
        bits = 0
        for family, _ in self.lists:
            bits |= B.STAGES[("rules", family)]
        for family, _ in self.limits:
            bits |= B.STAGES[("ratelimits", family)]
        return bits

    def _apply(
        self, source: str, add: Sequence[F.Rule], delete: Sequence[F.Match], unstale: bool = True
    ) -> dict[str, Any]:
        """One batch for ``source``: rules to add (or whose action changes) and
        matches to delete. All of it, or nothing."""
        added = updated = unchanged = 0
        new: dict[tuple[str, str], _Entry | None] = {}
        for rule in add:
            k = (source, rule.match.key())
            old = new.get(k, self.entries.get(k))
            if old is not None and old.rule.action == rule.action:
                if old.stale or old.rule.comment != rule.comment:
                    # A route announced again: no longer stale; same slot.
                    keep = _Entry(rule, source, old.slot, old.tag, old.base, False)
                    new[k] = keep
                unchanged += 1
                continue
            new[k] = _Entry(rule, source, -1, 0)
            if old is None:
                added += 1
            else:
                updated += 1
        missing = []
        for match in delete:
            k = (source, match.key())
            if k in self.entries or new.get(k) is not None:
                new[k] = None
            else:
                missing.append(match.text())
        deleted = sum(1 for k, v in new.items() if v is None and k in self.entries)
        result = {
            "added": added,
            "updated": updated,
            "unchanged": unchanged,
            "deleted": deleted,
            "missing": missing,
        }
        if not new:
            return result  # nothing in the kernel to change: no filter to rebuild
        # What each touched list becomes.
        touched: dict[tuple[int, F.Prefix | None], list[_Entry]] = {}
        for k, e in new.items():
            for entry in (self.entries.get(k), e):
                if entry is not None:
                    touched.setdefault(entry.list_key, list(self.lists.get(entry.list_key, [])))
        for k, e in new.items():
            old = self.entries.get(k)
            if old is not None:
                touched[old.list_key] = [x for x in touched[old.list_key] if x is not old]
            if e is not None:
                touched[e.list_key].append(e)
        fresh = [e for e in new.values() if e is not None and e.slot < 0]
        self._check_fits(touched, len(fresh))
        for e, (slot, tag) in zip(fresh, self.slots.take(len(fresh)), strict=True):
            e.slot, e.tag = slot, tag
        for lst in touched.values():
            lst.sort(key=_entry_order)
        try:
            values = [(e.slot, self._value(e)) for e in fresh]
        except F.RuleError:
            self.slots.give_back((e.slot for e in fresh), used=False)
            raise
        self._write(touched, values, fresh)
        # The kernel has it: the copy here follows.
        freed: list[int] = []
        for k, e in new.items():
            old = self.entries.pop(k, None)
            if old is not None and (e is None or e.slot != old.slot):
                freed.append(old.slot)
                if e is not None:
                    e.base = old.base + self.maps.rule_counts(old.slot)
            if e is not None:
                self.entries[k] = e
        self.slots.give_back(freed, used=True)
        for key, lst in touched.items():
            if lst:
                self.lists[key] = lst
            else:
                self.lists.pop(key, None)
        return result

    def _check_fits(self, touched: dict[tuple[int, F.Prefix | None], list[_Entry]], n: int) -> None:
        if n > len(self.slots.free):
            raise F.RuleError(
                f"no room: {n} rule(s) to place, {len(self.slots.free)} of {B.RULES_MAX} slots free"
            )
        for (family, dst), lst in touched.items():
            if len(lst) > B.RULE_LIST_MAX:
                where = dst.text() if dst else f"IPv{family} without a destination"
                raise F.RuleError(
                    f"{len(lst)} rules for {where}: at most {B.RULE_LIST_MAX} per destination "
                    "prefix"
                )
        for family in {f for f, _ in touched}:
            keys = {d for (f, d) in self.lists if f == family}
            for (f, d), lst in touched.items():
                if f == family:
                    (keys.add if lst else keys.discard)(d)
            depth = _depth_ok(keys, family)
            if depth > B.RULE_DEPTH:
                raise F.RuleError(
                    f"IPv{family} destination prefixes nest {depth} deep: at most "
                    f"{B.RULE_DEPTH}, the rules without a destination counted"
                )

    def _write(
        self,
        touched: dict[tuple[int, F.Prefix | None], list[_Entry]],
        values: Sequence[tuple[int, bytes]],
        fresh: Sequence[_Entry],
    ) -> None:
        """Slots first (no list names them yet), then the lists, then the
        stage bits; undone as far as it went if the kernel refuses."""
        done: list[tuple[int, F.Prefix | None]] = []
        bits = self._stage_bits_after(touched)
        try:
            for slot, value in values:
                self.maps.reset_rule(slot)
                self.maps.write_rule(slot, value)
            if bits & ~self.stages:
                pass  # turned on after the lists are in
            else:
                self._set_stages(bits)  # off before a list goes
            for key, lst in touched.items():
                done.append(key)
                if lst:
                    self.maps.set_list(lpm_key(*key), self._list_value(key, lst))
                elif key in self.lists:
                    self.maps.delete_list(lpm_key(*key))
            keys = set(self.lists) | {k for k, lst in touched.items() if lst}
            keys -= {k for k, lst in touched.items() if not lst}
            if keys != self.filter_keys:
                self.maps.set_filter(filter_value(keys, self.salt))
                self.filter_keys = keys
            self._set_stages(bits)
        except OSError as exc:
            for key in done:
                old = self.lists.get(key)
                with contextlib.suppress(OSError):
                    if old:
                        self.maps.set_list(lpm_key(*key), self._list_value(key, old))
                    else:
                        self.maps.delete_list(lpm_key(*key))
            with contextlib.suppress(OSError):
                self._set_stages(self._stage_bits())
            self.slots.give_back((e.slot for e in fresh), used=True)
            raise XdpguardError(f"rules not changed: the kernel refused ({exc})") from exc

    def _stage_bits_after(self, touched: dict[tuple[int, F.Prefix | None], list[_Entry]]) -> int:
        keys = {k for k in self.lists}
        for k, lst in touched.items():
            (keys.add if lst else keys.discard)(k)
        bits = 0
        for family, _ in keys:
            bits |= B.STAGES[("rules", family)]
        for family, _ in self.limits:
            bits |= B.STAGES[("ratelimits", family)]
        return bits

    def _set_stages(self, bits: int) -> None:
        if bits != self.stages:
            self.maps.set_stages(bits)
            self.stages = bits

    # ---- the commands ----

    @staticmethod
    def _source(source: Any) -> str:
        source = source or LOCAL
        if not isinstance(source, str) or not (
            source in (LOCAL, AUTO) or (source.startswith("bgp:") and 4 < len(source) <= 64)
        ):
            raise F.RuleError(f"source {source!r}: 'local', 'auto' or 'bgp:PEER'")
        return source

    @staticmethod
    def _check_force(rule: F.Rule, force: bool) -> None:
        """A local rule that matches every frame of a family (a typo away from
        'dst ::/0 drop') is taken only if the operator insists, as a /0 in
        the blocklist is. A BGP source's are not held back: its session is
        the authority, as a router's would be."""
        if rule.match.everything() and not force:
            raise F.RuleError(
                f"'{rule.text()}' matches every IPv{rule.match.family} frame; "
                "add --force if you mean it"
            )

    def add(self, texts: Sequence[str], comment: Any = None, force: bool = False) -> dict[str, Any]:
        """Local rules. A BGP source's come by update() only, under its
        session's lease: added here, nothing would ever expire them."""
        text = parse_comment(comment)
        rules = [self._parse(t, text) for t in texts]
        if not rules:
            raise F.RuleError("no rules given")
        for r in rules:
            self._check_force(r, force)
        with self._lock:
            result = self._apply(LOCAL, rules, [])
            return self._done(LOCAL, result)

    def delete(self, texts: Sequence[str], source: Any = None) -> dict[str, Any]:
        source = self._source(source)
        matches = [self._parse_match(t) for t in texts]
        with self._lock:
            return self._done(source, self._apply(source, [], matches))

    def update(
        self,
        source: Any,
        announce: Sequence[str],
        withdraw: Sequence[str],
        hold: float,
        partial: bool = False,
    ) -> dict[str, Any]:
        """A BGP UPDATE's worth of changes (the feed's). A source without a
        session (xdpguard restarted since the feed said 'up') gets one, up
        for ``hold`` seconds: its rules are never without a lease.

        All or nothing, unless ``partial`` (a RIB replayed, or an UPDATE
        refused whole): then each announcement that can be held is, the
        rest are listed in "refused" with why, and nothing else changes
        for them."""
        source = self._source(source)
        if source in (LOCAL, AUTO):
            raise F.RuleError("updates come from a BGP source")
        self._check_hold(hold)
        matches = [self._parse_match(t) for t in withdraw]
        rules: list[F.Rule] = []
        refused: list[list[str]] = []
        for t in announce:
            try:
                rules.append(self._parse(t, None))
            except F.RuleError as exc:
                if not partial:
                    raise
                refused.append([str(t)[:200], str(exc)])
        unreadable = len(refused)
        with self._lock:
            if source not in self.sessions:
                self.sessions[source] = _Session(hold, True, self.clock() + hold)
            self._lease(source)
            try:
                result = self._apply(source, rules, matches)
            except F.RuleError:
                if not partial:
                    raise
                result = self._apply(source, [], matches) if matches else {
                    "added": 0, "updated": 0, "unchanged": 0, "deleted": 0, "missing": []
                }  # fmt: skip
                # What can fit in one go: rules already there (a new action)
                # and new ones up to the free slots; the rest has no room.
                fits: list[F.Rule] = []
                free = len(self.slots.free)
                for rule in rules:
                    if (source, rule.match.key()) in self.entries or free > 0:
                        free -= (source, rule.match.key()) not in self.entries
                        fits.append(rule)
                    else:
                        refused.append([rule.text(), f"no room: 0 of {B.RULES_MAX} slots free"])
                try:
                    self._apply(source, fits, [])
                except F.RuleError:
                    # Another limit (rules per destination, nesting): rule by rule.
                    for rule in fits:
                        try:
                            self._apply(source, [rule], [])
                        except F.RuleError as exc:
                            refused.append([rule.text(), str(exc)])
                result["added"] = len(rules) - (len(refused) - unreadable)
            if partial:
                result["refused"] = refused
            return result

    def load(self, text: str, replace: bool, force: bool = False) -> dict[str, Any]:
        """A rule file: one rule per line, '#' comments; all or nothing."""
        rules = []
        for n, line in enumerate(text.splitlines(), 1):
            body, _, note = line.partition("#")
            if not body.strip():
                continue
            try:
                rules.append(F.parse(body, note.strip() or None))
                self._check_force(rules[-1], force)
            except F.RuleError as exc:
                raise F.RuleError(f"line {n}: {exc}") from None
        if replace and not rules and not force:
            raise F.RuleError(
                "no rules: --replace would delete every local rule; add --force, or use clear"
            )
        with self._lock:
            gone = []
            if replace:
                keep = {r.match.key() for r in rules}
                gone = [
                    e.rule.match
                    for (src, key), e in self.entries.items()
                    if src == LOCAL and key not in keep
                ]
            result = self._apply(LOCAL, rules, gone)
            result["loaded"] = len(rules)
            return self._done(LOCAL, result)

    def clear(self, source: Any = None) -> dict[str, Any]:
        source = self._source(source)
        with self._lock:
            gone = [e.rule.match for (src, _), e in self.entries.items() if src == source]
            return self._done(source, self._apply(source, [], gone))

    def entries_of(self, source: Any = None) -> dict[str, Any]:
        with self._lock:
            out = []
            for key in sorted(self.lists, key=lambda k: (k[0], k[1] is None)):
                for e in self.lists[key]:
                    if source and e.source != source:
                        continue
                    counts = e.base + self.maps.rule_counts(e.slot)
                    out.append(
                        {
                            "rule": e.rule.text(),
                            "source": e.source,
                            "comment": e.rule.comment,
                            "stale": e.stale,
                            "packets": int(counts[0]),
                            "bytes": int(counts[1]),
                            "dropped_packets": int(counts[2]),
                            "dropped_bytes": int(counts[3]),
                        }
                    )
            sessions = {
                s: {
                    "up": v.up,
                    "hold": v.hold,
                    "expires_in": round(max(0.0, v.expires - self.clock()), 1),
                }
                for s, v in self.sessions.items()
            }
            return {"count": len(out), "rules": out, "sessions": sessions}

    @staticmethod
    def _parse(text: str, comment: str | None) -> F.Rule:
        if not isinstance(text, str):
            raise F.RuleError("a rule is text")
        return F.parse(text, comment)

    @staticmethod
    def _parse_match(text: str) -> F.Match:
        """A rule's match, from its text with or without an action."""
        if not isinstance(text, str):
            raise F.RuleError("a rule is text")
        words = text.split()
        if not any(F._ACTION_ALIASES.get(w, w) in F.ACTIONS for w in words):
            words.append("drop")
        return F.parse(words).match

    def _done(self, source: str, result: dict[str, Any]) -> dict[str, Any]:
        if source == LOCAL:
            self._save()
            result["saved"] = self.unsaved is None
            if self.unsaved is not None:
                result["warning"] = f"applied, but not saved ({self.unsaved})"
        return result

    # ---- BGP sessions ----

    def _lease(self, source: str) -> None:
        s = self.sessions.get(source)
        if s is not None and s.up:
            s.expires = max(s.expires, self.clock() + s.hold)

    @staticmethod
    def _check_hold(hold: float) -> None:
        if not 0 < hold <= MAX_HOLD:
            raise F.RuleError(f"hold {hold}: 0 < hold <= {MAX_HOLD:g} seconds")

    def session(self, source: Any, state: str, hold: float) -> dict[str, Any]:
        """A BGP source's session: ``up`` (also the feed's keepalive), ``down``
        or ``eor`` (End-of-RIB: what stayed stale goes now)."""
        source = self._source(source)
        if source in (LOCAL, AUTO):
            raise F.RuleError("sessions are BGP sources'")
        self._check_hold(hold)
        now = self.clock()
        with self._lock:
            s = self.sessions.get(source)
            marked = removed = 0
            if state == "up":
                if s is None or not s.up:
                    # Back, or first seen: what it had is stale until announced again.
                    for (src, _), e in self.entries.items():
                        if src == source:
                            e.stale = True
                            marked += 1
                    s = _Session(hold, True, now + hold, now + hold if marked else math.inf)
                    self.sessions[source] = s
                else:
                    s.hold, s.expires = hold, now + hold
            elif state == "down":
                if s is None:
                    s = self.sessions[source] = _Session(hold, False, now + hold)
                elif s.up:
                    s.up, s.hold, s.expires = False, hold, now + hold
            elif state == "eor":
                removed = self._drop_stale(source)
                if s is not None:
                    s.stale_until = math.inf
            else:
                raise F.RuleError(f"session state {state!r}: up, down or eor")
            return {
                "source": source,
                "state": state,
                "stale": marked,
                "removed": removed,
                "instance": self.instance,
            }

    def _drop_stale(self, source: str) -> int:
        gone = [e.rule.match for (src, _), e in self.entries.items() if src == source and e.stale]
        if gone:
            self._apply(source, [], gone)
        return len(gone)

    def expire(self) -> int:
        """Housekeeping: sources whose lease ran out lose their rules, stale
        rules past their time go. How many rules went."""
        now = self.clock()
        n = 0
        with self._lock:
            for source, s in list(self.sessions.items()):
                if now >= s.expires:
                    gone = [e.rule.match for (src, _), e in self.entries.items() if src == source]
                    if gone:
                        self._apply(source, [], gone)
                        log.info(
                            "rules: %s's hold time ran out (session %s): %d rule(s) removed",
                            source,
                            "up, feed silent" if s.up else "down",
                            len(gone),
                        )
                    n += len(gone)
                    del self.sessions[source]
                elif now >= s.stale_until:
                    k = self._drop_stale(source)
                    if k:
                        log.info("rules: %s: %d stale rule(s) removed", source, k)
                    n += k
                    s.stale_until = math.inf
        return n

    # ---- per-source rate limits ----

    def limit_add(
        self,
        prefixes: Sequence[str],
        pps: Any,
        bps: Any,
        per_source: bool,
        comment: Any = None,
        force: bool = False,
    ) -> dict[str, Any]:
        if not pps and not bps:
            raise F.RuleError("give --pps or --bps (or both)")
        text = parse_comment(comment)
        pfxs = [F.parse_prefix(p) for p in prefixes]
        if not pfxs:
            raise F.RuleError("no prefixes given")
        for p in pfxs:
            if p.plen == 0 and not per_source and not force:
                raise F.RuleError(
                    f"{p.text()} without --per-source limits every IPv{p.family} source "
                    "together; add --force if you mean it"
                )
        ivs = {
            "pps": interval(pps, self.ncpus) if pps else 0,
            "bps": interval(bps, self.ncpus) if bps else 0,
        }
        with self._lock:
            new = [p for p in pfxs if (p.family, p) not in self.limits]
            if len(set(new)) > len(self.limit_ids.free):
                raise F.RuleError(
                    f"no room: {len(set(new))} limit(s), {len(self.limit_ids.free)} free"
                )
            added = updated = 0
            written: list[tuple[tuple[int, F.Prefix], dict[str, Any] | None]] = []
            try:
                for p in dict.fromkeys(pfxs):
                    key = (p.family, p)
                    old = self.limits.get(key)
                    if old is None:
                        ((lid, tag),) = self.limit_ids.take(1)
                        self.maps.reset_limit(lid)
                        base = np.zeros(4, dtype=np.uint64)
                    else:
                        lid, tag, base = old["id"], old["tag"], old["base"]
                        if bool(old["per_source"]) != per_source:
                            tag = tag % 0xFFFF + 1  # the per-source buckets start over
                    lim = {
                        "id": lid, "tag": tag, "pps": pps or 0, "bps": bps or 0,
                        "per_source": per_source, "comment": text, "base": base,
                    }  # fmt: skip
                    value = B.struct_bytes(
                        "struct xg_ratelimit",
                        id=lid,
                        tag=tag,
                        flags=B.RL_PER_SOURCE if per_source else 0,
                        pps_interval=ivs["pps"],
                        bps_interval=ivs["bps"],
                    )
                    written.append((key, old))
                    self.limits[key] = lim
                    self.maps.set_limit(lpm_key(p.family, p), value)
                    if old is None:
                        added += 1
                    else:
                        updated += 1
                self._set_stages(self._stage_bits())
            except OSError as exc:
                for key, old in reversed(written):
                    with contextlib.suppress(OSError):
                        if old is None:
                            self.maps.delete_limit(lpm_key(*key))
                            lim = self.limits.pop(key)
                            self.limit_ids.give_back([lim["id"]], used=True)
                        else:
                            self.limits[key] = old
                with contextlib.suppress(OSError):
                    self._set_stages(self._stage_bits())
                raise XdpguardError(f"rate limits not changed: the kernel refused ({exc})") from exc
            return self._done(LOCAL, {"added": added, "updated": updated})

    def limit_del(self, prefixes: Sequence[str]) -> dict[str, Any]:
        pfxs = [F.parse_prefix(p) for p in prefixes]
        with self._lock:
            keys = [(p.family, p) for p in dict.fromkeys(pfxs)]
            missing = [k[1].text() for k in keys if k not in self.limits]
            keys = [k for k in keys if k in self.limits]
            remaining = {k for k in self.limits if k not in keys}
            bits = self._stage_bits() & ~(B.STAGES[("ratelimits", 4)] | B.STAGES[("ratelimits", 6)])
            for family, _ in remaining:
                bits |= B.STAGES[("ratelimits", family)]
            self._set_stages(bits)  # off first, if this empties a family
            try:
                for k in keys:
                    self.maps.delete_limit(lpm_key(*k))
            except OSError as exc:
                raise XdpguardError(f"rate limits: the kernel refused a delete ({exc})") from exc
            for k in keys:
                lim = self.limits.pop(k)
                self.limit_ids.give_back([lim["id"]], used=True)
            return self._done(LOCAL, {"deleted": len(keys), "missing": missing})

    def limit_entries(self) -> dict[str, Any]:
        with self._lock:
            out = []
            order = sorted(self.limits.items(), key=lambda kv: (kv[0][0], kv[0][1].addr))
            for (_, p), lim in order:
                counts = lim["base"] + self.maps.limit_counts(lim["id"])
                out.append(
                    {
                        "prefix": p.text(),
                        "pps": lim["pps"] or None,
                        "bps": lim["bps"] or None,
                        "per_source": lim["per_source"],
                        "comment": lim["comment"],
                        "packets": int(counts[0]),
                        "bytes": int(counts[1]),
                        "dropped_packets": int(counts[2]),
                        "dropped_bytes": int(counts[3]),
                    }
                )
            return {"count": len(out), "limits": out}

    # ---- state ----

    def summary(self) -> dict[str, Any]:
        with self._lock:
            by_source: dict[str, int] = {}
            for src, _ in self.entries:
                by_source[src] = by_source.get(src, 0) + 1
            return {
                "rules": len(self.entries),
                "by_source": by_source,
                "ratelimits": len(self.limits),
            }

    def _save(self) -> None:
        """The local rules and the rate limits (write, fsync, rename); never
        raises: a failure is kept for the reply and a later retry."""
        if self.state_path is None:
            return
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "rules": [
                {"rule": e.rule.text(), "comment": e.rule.comment}
                for (src, _), e in self.entries.items()
                if src == LOCAL
            ],
            "ratelimits": [
                {
                    "prefix": p.text(),
                    "pps": lim["pps"] or None,
                    "bps": lim["bps"] or None,
                    "per_source": lim["per_source"],
                    "comment": lim["comment"],
                }
                for (_, p), lim in self.limits.items()
            ],
        }
        self.unsaved = statefile.save(
            self.state_path, lambda f: f.write(json.dumps(doc).encode()), "rules", self.unsaved
        )

    # ---- the detector's rules ----

    def auto_add(self, text: str) -> dict[str, Any]:
        """Install the detector's rule ``text`` (source ``auto``); RuleError if
        it cannot be (no room, not valid), changing nothing."""
        rule = self._parse(text, "automatic")
        with self._lock:
            result = self._apply(AUTO, [rule], [])
            e = self.entries[(AUTO, rule.match.key())]
            return {**result, "rule": rule.text(), "slot": e.slot}

    def auto_delete(self, text: str) -> None:
        with self._lock:
            self._apply(AUTO, [], [self._parse_match(text)])

    def auto_counts(self, text: str) -> np.ndarray | None:
        """(packets, bytes, dropped packets, dropped bytes) of a rule of ``auto``."""
        with self._lock:
            e = self.entries.get((AUTO, self._parse_match(text).key()))
            return None if e is None else e.base + self.maps.rule_counts(e.slot)

    def operator_rules_for(self, family: int, dst: bytes, plen: int) -> list[str]:
        """The operator's rules (local and BGP) whose destination holds the
        prefix dst/plen, or that have none: an automatic rule there would
        come before them (XDP walks the longest destination first), and
        the operator's rule must win."""
        want = int.from_bytes(dst, "big")
        width = 32 if family == 4 else 128
        out = []
        with self._lock:
            for (fam, pfx), lst in self.lists.items():
                if fam != family:
                    continue
                if pfx is not None:
                    if pfx.plen > plen:
                        continue  # a part of the prefix only
                    base = int.from_bytes(pfx.addr, "big")
                    if pfx.plen and (want ^ base) >> (width - pfx.plen):
                        continue
                out += [e.rule.text() for e in lst if e.source != AUTO]
        return out

    def hit_text(self, ratelimit: bool, n: int) -> str | None:
        """What a sample's rule field names (struct xg_sample.rule): the rule
        in slot ``n``, or with ``ratelimit`` the rate limit of id ``n``."""
        with self._lock:
            if ratelimit:
                for (_, p), lim in self.limits.items():
                    if lim["id"] == n:
                        return f"ratelimit {p.text()}"
                return None
            for (src, _), e in self.entries.items():
                if e.slot == n:
                    return e.rule.text() + ("" if src == LOCAL else f" (from {src})")
            return None

    def save_if_behind(self) -> bool:
        if self.unsaved is None:
            return False
        with self._lock:
            self._save()
        return self.unsaved is None

    def restore(self) -> dict[str, Any]:
        """Load the state file (if any) into the maps; what it held."""
        if self.state_path is None or not self.state_path.exists():
            return {"rules": 0, "ratelimits": 0}
        try:
            doc = json.loads(self.state_path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                raise ValueError("not an xdpguard rules file")
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {STATE_VERSION}")
            rules = [F.parse(r["rule"], r.get("comment")) for r in doc["rules"]]
            limits = list(doc["ratelimits"])
        except Exception as exc:  # the file is input: anything wrong with it is "corrupt"
            raise XdpguardError(
                f"state file {self.state_path} is corrupt ({exc}); fix or move it away "
                "(xdpguard refuses to start without the rules it had)"
            ) from None
        with self._lock:
            self._apply(LOCAL, rules, [])
            for lim in limits:
                self.limit_add(
                    [lim["prefix"]],
                    lim.get("pps"),
                    lim.get("bps"),
                    bool(lim.get("per_source")),
                    lim.get("comment"),
                    force=True,  # it was insisted on when it was added
                )
        return {"rules": len(rules), "ratelimits": len(limits)}
