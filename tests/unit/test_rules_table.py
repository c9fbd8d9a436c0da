"""The rule table (xdpguard.rules) and the FlowSpec feed (xdpguard.flowspec_feed)
against maps kept in memory: batches all or nothing, the kernel refusing
halfway, leases and stale routes, the feed's replay and refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xdpguard import _bindings as B
from xdpguard import flowspec as F
from xdpguard.control import COMMANDS, MAX_LINE, ControlError
from xdpguard.errors import XdpguardError
from xdpguard.flowspec_feed import Feed
from xdpguard.rules import RuleTable

pytestmark = pytest.mark.unit


class FakeMaps:
    """The maps as dicts; after ``fail_after`` list writes, one fails (ENOMEM)."""

    def __init__(self) -> None:
        self.rules: dict[int, bytes] = {}
        self.lists: dict[bytes, bytes] = {}
        self.limits: dict[bytes, bytes] = {}
        self.stages = 0
        self.filter: bytes | None = None
        self.fail_after: int | None = None

    def _maybe_fail(self) -> None:
        if self.fail_after is not None:
            if self.fail_after == 0:
                self.fail_after = None
                raise OSError(12, "Cannot allocate memory")
            self.fail_after -= 1

    def write_rule(self, slot: int, rule: bytes) -> None:
        self.rules[slot] = rule

    def reset_rule(self, slot: int) -> None:
        pass

    def set_list(self, key: bytes, value: bytes) -> None:
        self._maybe_fail()
        self.lists[key] = value

    def delete_list(self, key: bytes) -> None:
        self._maybe_fail()
        self.lists.pop(key, None)  # as B.map_delete: absent is no error

    def rule_counts(self, slot: int) -> np.ndarray:
        return np.zeros(4, dtype=np.uint64)

    def set_limit(self, key: bytes, value: bytes) -> None:
        self.limits[key] = value

    def delete_limit(self, key: bytes) -> None:
        del self.limits[key]

    def reset_limit(self, lid: int) -> None:
        pass

    def limit_counts(self, lid: int) -> np.ndarray:
        return np.zeros(4, dtype=np.uint64)

    def set_stages(self, bits: int) -> None:
        self.stages = bits

    def set_filter(self, value: bytes) -> None:
        self.filter = value

    def listed(self) -> set[tuple[int, int]]:
        """(slot, tag) of every list entry in the 'kernel'."""
        out = set()
        for value in self.lists.values():
            n = struct.unpack_from("=I", value, 4)[0]
            for i in range(n):
                e = struct.unpack_from("=I", value, 8 + 4 * i)[0]
                out.add((e & 0xFFFF, e >> 16))
        return out


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def table(tmp_path: Path) -> RuleTable:
    return RuleTable(FakeMaps(), tmp_path, clock=Clock(), ncpus=2)


def texts(t: RuleTable, source: str | None = None) -> list[str]:
    return [r["rule"] for r in t.entries_of(source)["rules"]]


def test_a_batch_is_all_or_nothing(table: RuleTable) -> None:
    table.add(["dst 192.0.2.0/24 drop"])
    bad = ["dst 192.0.2.1/32 proto udp drop", "dst 192.0.2.2/32 sport 70000 drop"]
    with pytest.raises(F.RuleError, match="more than the field holds"):
        table.add(bad)
    assert texts(table) == ["dst 192.0.2.0/24 drop"]


def test_the_kernel_refusing_halfway_puts_the_lists_back(table: RuleTable) -> None:
    maps: FakeMaps = table.maps  # type: ignore[assignment]
    table.add(["dst 192.0.2.0/24 drop"])
    lists, listed = dict(maps.lists), maps.listed()
    maps.fail_after = 1  # the second list write fails
    with pytest.raises(XdpguardError, match="not changed: the kernel refused"):
        table.add(["dst 198.51.100.0/24 drop", "dst 203.0.113.0/24 drop"])
    maps.fail_after = None
    assert maps.lists == lists and maps.listed() == listed
    assert texts(table) == ["dst 192.0.2.0/24 drop"]
    table.add(["dst 203.0.113.0/24 drop"])  # and the slots taken were given back
    assert len(texts(table)) == 2


def test_a_slot_used_again_gets_another_tag(table: RuleTable) -> None:
    maps: FakeMaps = table.maps  # type: ignore[assignment]
    table.add(["dst 192.0.2.0/24 drop"])
    (first,) = maps.listed()
    table.delete(["dst 192.0.2.0/24"])
    # Every slot is used once before one comes back; then its tag differs.
    seen = {first}
    for i in range(0, B.RULES_MAX, 1000):
        batch = [f"dst 10.{(j >> 8) & 255}.{j & 255}.0/24 drop" for j in range(i, i + 1000)]
        table.add(batch[: B.RULES_MAX - i])
        seen |= maps.listed()
        table.clear()
    slots = {}
    for slot, tag in seen:
        slots.setdefault(slot, set()).add(tag)
    assert len(slots[first[0]]) >= 2


def test_local_rules_are_saved_and_bgp_ones_are_not(table: RuleTable, tmp_path: Path) -> None:
    table.add(["dst 192.0.2.0/24 proto udp drop"], comment="why")
    table.session("bgp:192.0.2.1", "up", 30)
    table.update("bgp:192.0.2.1", ["dst 198.51.100.0/24 drop"], [], 30)
    table.limit_add(["198.18.0.0/15"], 1000, None, True)
    doc = json.loads((tmp_path / "rules.json").read_text())
    assert [r["rule"] for r in doc["rules"]] == ["dst 192.0.2.0/24 proto udp drop"]
    again = RuleTable(FakeMaps(), tmp_path, clock=Clock(), ncpus=2)
    assert again.restore() == {"rules": 1, "ratelimits": 1}
    assert texts(again) == ["dst 192.0.2.0/24 proto udp drop"]
    assert again.entries_of()["rules"][0]["comment"] == "why"


def test_a_corrupt_state_file_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "rules.json").write_text('{"format": "xdpguard-rules", "version": 1, "rules": [')
    with pytest.raises(XdpguardError, match="corrupt"):
        RuleTable(FakeMaps(), tmp_path).restore()


def test_leases_and_stale_routes(table: RuleTable) -> None:
    clock: Clock = table.clock  # type: ignore[assignment]
    src = "bgp:192.0.2.1"
    table.session(src, "up", 10)
    table.update(src, ["dst 192.0.2.0/24 drop", "dst 192.0.2.1/32 drop"], [], 10)
    table.add(["dst 203.0.113.0/24 drop"])  # local: never touched by any of it
    table.session(src, "down", 10)
    clock.t += 9
    assert table.expire() == 0 and len(texts(table, src)) == 2
    table.session(src, "up", 10)  # back in time: both stale now
    assert all(r["stale"] for r in table.entries_of(src)["rules"])
    table.update(src, ["dst 192.0.2.0/24 drop"], [], 10)  # announced again
    table.session(src, "eor", 10)
    assert texts(table, src) == ["dst 192.0.2.0/24 drop"]
    # The feed goes silent: the lease runs out a hold time after the last renewal.
    clock.t += 9
    table.session(src, "up", 10)
    clock.t += 9.9
    assert table.expire() == 0
    clock.t += 0.2
    assert table.expire() == 1 and texts(table, src) == []
    assert texts(table, "local") == ["dst 203.0.113.0/24 drop"]


def test_an_update_without_a_session_is_leased_all_the_same(table: RuleTable) -> None:
    """xdpguard restarted (its sessions gone) and the feed's next UPDATE came
    before its keepalive: the rules must still go if the feed never speaks
    again, not stay forever."""
    clock: Clock = table.clock  # type: ignore[assignment]
    src = "bgp:192.0.2.1"
    table.update(src, ["dst 192.0.2.0/24 drop"], [], 10)
    assert table.entries_of(src)["sessions"][src]["up"]
    clock.t += 9.9
    assert table.expire() == 0
    clock.t += 0.2
    assert table.expire() == 1 and texts(table, src) == []


def test_rules_of_a_bgp_source_come_only_by_its_updates(table: RuleTable) -> None:
    """'rule.add' is for local rules: a BGP-sourced rule added there would
    have no lease, and nothing would ever expire it."""
    with pytest.raises(TypeError):
        table.add(["dst 192.0.2.0/24 drop"], source="bgp:192.0.2.1")  # type: ignore[call-arg]
    table.add(["dst 192.0.2.0/24 drop"], "a note")
    assert texts(table, "local") == ["dst 192.0.2.0/24 drop"]


class TableClient:
    """The control socket, short-circuited to a RuleTable; can refuse or break."""

    def __init__(self, table: RuleTable) -> None:
        self.table = table
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.broken = False

    def __call__(self, control: str) -> TableClient:
        return self

    def call(self, cmd: str, **a: Any) -> Any:
        if self.broken:
            raise XdpguardError("xdpguard is not running")
        self.calls.append((cmd, a))
        # What the server refuses before any handler: a line over its limit,
        # an argument outside the command's schema.
        line = json.dumps({"id": 1, "cmd": cmd, "args": a})
        if len(line) > MAX_LINE:
            raise ControlError(f"request line longer than {MAX_LINE} bytes")
        try:
            args = COMMANDS[cmd].validate(a)
        except XdpguardError as exc:
            raise ControlError(str(exc)) from None
        try:
            if cmd == "rule.update":
                return self.table.update(
                    args["source"],
                    args["announce"] or [],
                    args["withdraw"] or [],
                    args["hold"],
                    bool(args["partial"]),
                )
            if cmd == "rule.session":
                return self.table.session(args["source"], args["state"], args["hold"])
        except F.RuleError as exc:
            raise ControlError(str(exc)) from None
        raise AssertionError(cmd)

    def close(self) -> None:
        pass


def state(peer: str, what: str) -> dict[str, Any]:
    return {"type": "state", "neighbor": {"address": {"peer": peer}, "state": what}}


# GoBGP's UPDATE: dst 192.0.2.0/24 proto udp sport 123, then discard.
NTP_DISCARD = (
    "0000002C4001010240020602010000FDE9800E1100018500000B0118C0000203811106817BC01008800600"
    "0000000000"
)


def update(peer: str, body: str) -> dict[str, Any]:
    return {"type": "update", "neighbor": {"address": {"peer": peer}, "message": {"body": body}}}


def test_the_feed_leaves_out_only_what_xdpguard_refuses(table: RuleTable) -> None:
    client = TableClient(table)
    feed = Feed("ctl", 30, client=client)
    feed.handle(state("192.0.2.9", "up"))
    # 65 rules on one destination: one more than a list holds.
    rules = [f"dst 192.0.2.0/24 proto udp sport {p} drop" for p in range(65)]
    table.update("bgp:192.0.2.9", rules[:64], [], 30)
    feed.ribs["bgp:192.0.2.9"] = {F.parse(r).match.key(): r for r in rules[:64]}
    feed._apply("bgp:192.0.2.9", [rules[64], "dst 198.51.100.0/24 drop"], [])
    got = texts(table, "bgp:192.0.2.9")
    assert "dst 198.51.100.0/24 drop" in got and rules[64] not in got
    assert not feed.resync


def test_the_feed_replays_after_xdpguard_restarted(table: RuleTable, tmp_path: Path) -> None:
    client = TableClient(table)
    feed = Feed("ctl", 30, client=client)
    peer = "192.0.2.9"
    feed.handle(state(peer, "up"))
    feed.handle(update(peer, NTP_DISCARD))
    assert texts(table) == ["dst 192.0.2.0/24 proto udp sport 123 drop"]
    # xdpguard restarts: a new table, a new instance; the keepalive notices.
    fresh = RuleTable(FakeMaps(), tmp_path, clock=Clock())
    client.table = fresh
    feed.keepalive()  # sees the new instance
    feed.keepalive()  # replays
    assert texts(fresh) == ["dst 192.0.2.0/24 proto udp sport 123 drop"]
    # xdpguard unreachable: the feed says so and replays when it is back.
    client.broken = True
    feed.handle(update(peer, "00000012800F0F0001850B0118C0000203811106817B"))  # the withdrawal
    assert feed.resync
    client.broken = False
    feed.keepalive()
    assert texts(fresh) == []


@pytest.mark.parametrize("ncpus", [1, 2, 64])
def test_the_lowest_rate_said_is_the_lowest_taken(ncpus: int) -> None:
    """A rate too low for the buckets names the lowest that fits, and that one fits."""
    import re

    from xdpguard.rules import interval

    with pytest.raises(F.RuleError, match="too low") as refused:
        interval(0.001, ncpus)
    lowest = float(re.search(r"at least ([0-9.e+]+)$", str(refused.value)).group(1))  # type: ignore[union-attr]
    assert interval(lowest, ncpus) >= 1
    with pytest.raises(F.RuleError):
        interval(lowest * 0.99, ncpus)


def test_an_update_before_the_session_is_said_up_opens_it(table: RuleTable) -> None:
    """ExaBGP without 'neighbor-changes' sends UPDATEs and no 'state up':
    the peer's first UPDATE opens its session, and the keepalives renew it."""
    client = TableClient(table)
    feed = Feed("ctl", 30, client=client)
    feed.handle(update("192.0.2.9", NTP_DISCARD))
    assert texts(table, "bgp:192.0.2.9")
    assert "bgp:192.0.2.9" in feed.up
    assert client.calls[0] == (
        "rule.session",
        {"source": "bgp:192.0.2.9", "state": "up", "hold": 30},
    )


@pytest.mark.parametrize(
    "text", ["dst ::/0 drop", "ipv4 accept", "dst 0.0.0.0/0 src 0.0.0.0/0 rate-limit-pps 10"]
)
def test_a_local_rule_that_matches_everything_needs_force(table: RuleTable, text: str) -> None:
    """As a /0 in the blocklist: a typo away from dropping a whole family."""
    with pytest.raises(F.RuleError, match=r"matches every IPv[46] frame; add --force"):
        table.add([text])
    with pytest.raises(F.RuleError, match=r"line 2: .*add --force"):
        table.load(f"dst 192.0.2.0/24 drop\n{text}\n", replace=False)
    assert texts(table) == [] and table.maps.lists == {}  # type: ignore[attr-defined]
    table.add([text], force=True)
    assert len(texts(table)) == 1


def test_narrower_rules_and_bgp_sources_need_no_force(table: RuleTable) -> None:
    table.add(["dst 0.0.0.0/0 proto udp sport 53 drop", "ipv6 proto tcp drop"])
    table.update("bgp:192.0.2.9", ["dst ::/0 drop"], [], hold=30)  # the session is the authority
    assert len(texts(table)) == 3


def test_a_load_that_would_empty_the_local_rules_needs_force(table: RuleTable) -> None:
    table.add(["dst 192.0.2.0/24 drop"])
    with pytest.raises(F.RuleError, match="--replace would delete every local rule"):
        table.load("# nothing left\n", replace=True)
    assert texts(table) == ["dst 192.0.2.0/24 drop"]
    assert table.load("", replace=True, force=True)["deleted"] == 1


def test_a_shared_limit_on_a_whole_family_needs_force(table: RuleTable, tmp_path: Path) -> None:
    with pytest.raises(F.RuleError, match="without --per-source limits every IPv4 source"):
        table.limit_add(["0.0.0.0/0"], 100, None, False)
    assert table.limit_entries()["limits"] == []
    table.limit_add(["0.0.0.0/0"], 100, None, True)  # each source its own limit
    table.limit_add(["::/0"], 100, None, False, force=True)
    assert table.limit_entries()["count"] == 2
    table.add(["ipv6 drop"], force=True)
    # What was insisted on once comes back without asking again.
    again = RuleTable(FakeMaps(), tmp_path, clock=Clock(), ncpus=2)
    assert again.restore() == {"rules": 1, "ratelimits": 2}


def test_an_odd_message_from_exabgp_does_not_end_the_feed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each line is its own: one the feed cannot read is logged and skipped,
    and the next is handled (here the last says a session is up)."""
    import io
    import logging

    from xdpguard.flowspec_feed import run

    peer = {"address": {"peer": "192.0.2.9"}}
    odd = [
        json.dumps({"type": "update", "neighbor": peer | {"message": [1]}}),
        json.dumps({"type": "update", "neighbor": peer | {"message": {"body": 5}}}),
        json.dumps({"type": "update", "neighbor": peer | {"message": {"body": "zz"}}}),
        json.dumps({"type": "state", "neighbor": peer | {"state": ["up"]}}),
        json.dumps({"type": "update", "neighbor": [peer]}),
        "[" * 100_000 + "]" * 100_000,
        "[1, 2]",
        "not json",
    ]
    lines = [*odd, json.dumps(state("192.0.2.7", "up"))]
    with caplog.at_level(logging.INFO, logger="xdpguard"):
        assert run("/nonexistent/control.sock", 30, io.StringIO("\n".join(lines) + "\n")) == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("bgp:192.0.2.7: session up" in m for m in said), said
    assert not any("Traceback" in m for m in said)


def flowspec_update(matches: list[F.Match], discard: bool = True) -> str:
    """The hex body of a BGP UPDATE announcing ``matches`` (FlowSpec of one
    family), with the traffic-rate 0 (discard) community."""
    return flowspec_update_raw([F.encode_nlri(m) for m in matches], matches[0].family, discard)


def flowspec_update_raw(nlris: list[bytes], family: int, discard: bool = True) -> str:
    nlri = b"".join(nlris)
    afi = 2 if family == 6 else 1
    reach = struct.pack("!HBB", afi, 133, 0) + b"\x00" + nlri
    comm = struct.pack("!HHf", 0x8006, 0, 0.0) if discard else b""
    attrs = b"\x40\x01\x01\x00" + b"\x40\x02\x00"
    attrs += b"\x90\x0e" + struct.pack("!H", len(reach)) + reach
    attrs += b"\xc0\x10" + bytes([len(comm)]) + comm
    return (struct.pack("!HH", 0, len(attrs)) + attrs).hex()


def test_a_rib_of_100000_routes_never_wedges_the_feed(
    table: RuleTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23, 7: a peer's RIB of 100,000 routes, far over 4 MiB of rule
    text and over what the table holds. After xdpguard restarts, the replay
    goes in chunks: the table holds what fits, the rest is refused in one
    log line, and a later UPDATE (a new drop rule) is applied at once. It
    used to be one request the control socket refused, retried before every
    later message, for ever: every BGP rule lost, no UPDATE applied."""
    import logging

    client = TableClient(table)
    feed = Feed("ctl", 30, client=client)
    peer = "192.0.2.9"
    feed.handle(state(peer, "up"))
    # 100,000 routes as long as a rule gets (24 terms, IPv6 addresses): what
    # the table holds of them is over 4 MiB of rule text. 200 per UPDATE.
    ranges = ",".join(f"{p}-{p + 999}" for p in range(10000, 21000, 1000))

    def route(i: int) -> F.Match:
        g = f"{(i >> 12) | 0x1000:x}:{(i & 0xFFF) | 0x1000:x}"
        return F.parse(
            f"dst 2001:db8:ffff:{g}:bbbb:cccc:dddd/128 src 2001:db8:ffff:eeee:dddd:cccc:{g}/128 "
            f"proto udp sport 65535 dport {ranges} drop"
        ).match

    # One route encoded, the others by its bytes (parsing 100,000 would be
    # most of the test's time): the two 16-bit groups sit at fixed offsets.
    first = F.encode_nlri(route(0))
    marks = [first.index(bytes.fromhex("10001000"), k) for k in (0, 30)]

    def nlri(i: int) -> bytes:
        b = bytearray(first)
        g = ((i >> 12) | 0x1000).to_bytes(2, "big") + ((i & 0xFFF) | 0x1000).to_bytes(2, "big")
        for m in marks:
            b[m : m + 4] = g
        return bytes(b)

    assert F.decode_nlri(nlri(77777), 6)[0] == route(77777)
    for i in range(0, 100_000, 200):
        feed.handle(update(peer, flowspec_update_raw([nlri(j) for j in range(i, i + 200)], 6)))
    matches = [route(0)]
    held = len(texts(table, f"bgp:{peer}"))
    assert held == B.RULES_MAX  # what fits
    assert sum(len(t) for t in feed.ribs[f"bgp:{peer}"].values()) > MAX_LINE
    # xdpguard restarts: the replay must bring back what fits, in chunks.
    fresh = RuleTable(FakeMaps(), tmp_path / "fresh", clock=Clock())
    client.table = fresh
    with caplog.at_level(logging.ERROR, logger="xdpguard"):
        feed.keepalive()  # sees the new instance
        feed.keepalive()  # replays
    assert len(texts(fresh, f"bgp:{peer}")) == held
    assert not feed.resync
    assert max(len(json.dumps(a)) for _, a in client.calls) < MAX_LINE
    # A later UPDATE is applied at once (the table is full: a withdrawal
    # makes room first, as an operator's controller would).
    gone = matches[0]
    body = F.encode_nlri(gone)
    unreach = struct.pack("!HB", 2, 133) + body
    attrs = b"\x90\x0f" + struct.pack("!H", len(unreach)) + unreach
    feed.handle(update(peer, (struct.pack("!HH", 0, len(attrs)) + attrs).hex()))
    new = F.parse("dst 203.0.113.7/32 proto tcp dport 80 drop").match
    feed.handle(update(peer, flowspec_update([new])))
    got = texts(fresh, f"bgp:{peer}")
    assert "dst 203.0.113.7/32 proto tcp dport 80 drop" in got
    assert gone.text() + " drop" not in got


def test_a_message_with_a_bad_peer_name_is_skipped_and_others_go_on(table: RuleTable) -> None:
    """Issue 23, 7: a peer name xdpguard refuses (over 64 characters) once
    wedged the feed and lost every peer sorting after it."""
    client = TableClient(table)
    feed = Feed("ctl", 30, client=client)
    feed.handle(state("x" * 80, "up"))
    feed.handle(update("x" * 80, NTP_DISCARD))
    feed.handle(state("192.0.2.9", "up"))
    feed.handle(update("192.0.2.9", NTP_DISCARD))
    assert texts(table) == ["dst 192.0.2.0/24 proto udp sport 123 drop"]
    assert not feed.resync
