"""The n-tuple rules and per-source rate limits in XDP (BPF_PROG_TEST_RUN).

Table-driven: each case loads its rules through the rule table (the code
the daemon runs), runs one crafted frame through the outer program, and
checks the verdict, that exactly its reason counted, and which rule
counted the frame. One case per component and per action, then the
ordering cases of RFC 8955 5.1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from lab import veth_netns
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.defs import Reason, Role
from xdpguard.netns import Netns
from xdpguard.rules import RuleTable
from xdpguard.xdp import PolicyMaps, RuleMaps, XdpProgram

pytestmark = pytest.mark.bpf

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
SRC4, DST4 = "198.18.0.7", "192.0.2.10"
SRC6, DST6 = "2001:db8:ff::7", "2001:db8:1::10"


def v4(*layers, **ip) -> bytes:  # type: ignore[no-untyped-def]
    pkt = ETH / IP(src=SRC4, dst=DST4, **ip)
    for layer in layers:
        pkt = pkt / layer
    return bytes(pkt)


def v6(*layers, **ip) -> bytes:  # type: ignore[no-untyped-def]
    pkt = ETH / IPv6(src=SRC6, dst=DST6, **ip)
    for layer in layers:
        pkt = pkt / layer
    return bytes(pkt)


UDP_NTP = v4(UDP(sport=123, dport=40000) / (b"x" * 40))
UDP_DNS = v4(UDP(sport=40000, dport=53) / (b"x" * 40))
SYN = v4(TCP(sport=40000, dport=80, flags="S"))
SYNACK = v4(TCP(sport=80, dport=40000, flags="SA"))
ACK = v4(TCP(sport=40000, dport=80, flags="A"))
PING = v4(ICMP(type=8, code=0) / (b"x" * 56))
PING6 = v6(ICMPv6EchoRequest() / (b"x" * 56))
UDP6 = v6(UDP(sport=123, dport=40000) / (b"x" * 40))
BIG = v4(UDP(sport=5000, dport=6000) / (b"x" * 1200))
EF = v4(UDP(sport=5000, dport=6000) / b"x", tos=46 << 2)
DF = v4(UDP(sport=5000, dport=6000) / b"x", flags="DF")
FIRST_FRAG = v4(UDP(sport=5000, dport=6000) / (b"x" * 40), flags="MF")
MID_FRAG = v4(b"x" * 40, flags="MF", frag=10, proto=17)
LAST_FRAG = v4(b"x" * 40, frag=20, proto=17)
LAST_FRAG6 = v6(IPv6ExtHdrFragment(offset=20, m=0, nh=17) / (b"x" * 40))


@dataclass(frozen=True)
class Case:
    name: str
    rules: tuple[str, ...]
    frame: bytes
    reason: str  # "redirected": passes
    counted: int | None = None  # the rule (index in rules) that counted the frame


D = f"dst {DST4}/32"
CASES = [
    # No rule matches.
    Case("no-rules-for-family", ("ipv6 proto udp drop",), UDP_NTP, "redirected"),
    Case("other-destination", ("dst 192.0.2.99/32 drop",), UDP_NTP, "redirected"),
    # One case per component.
    Case("dst", (f"{D} drop",), UDP_NTP, "rule_drop", 0),
    Case("dst-covering", ("dst 192.0.2.0/24 drop",), UDP_NTP, "rule_drop", 0),
    Case("src", (f"src {SRC4}/32 drop",), UDP_NTP, "rule_drop", 0),
    Case("src-other", ("src 198.18.1.0/24 drop",), UDP_NTP, "redirected"),
    Case("src-short-prefix", ("src 198.16.0.0/13 drop",), UDP_NTP, "rule_drop", 0),
    Case("proto", (f"{D} proto udp drop",), UDP_NTP, "rule_drop", 0),
    Case("proto-other", (f"{D} proto tcp drop",), UDP_NTP, "redirected"),
    Case("proto-zero-is-not-any", (f"{D} proto 0 drop",), UDP_NTP, "redirected"),
    Case("proto-range", (f"{D} proto 10-20 drop",), UDP_NTP, "rule_drop", 0),
    Case("port-as-source", (f"{D} port 123 drop",), UDP_NTP, "rule_drop", 0),
    Case("port-as-destination", (f"{D} port 53 drop",), UDP_DNS, "rule_drop", 0),
    Case("port-neither", (f"{D} port 80 drop",), UDP_NTP, "redirected"),
    Case("dport-range", (f"{D} dport 50-60 drop",), UDP_DNS, "rule_drop", 0),
    Case("dport-outside", (f"{D} dport 54-60 drop",), UDP_DNS, "redirected"),
    Case("sport-list", (f"{D} sport 19,53,123 drop",), UDP_NTP, "rule_drop", 0),
    Case("sport-not-equal", (f"{D} sport !=123 drop",), UDP_NTP, "redirected"),
    Case("sport-and", (f"{D} sport >100&<200 drop",), UDP_NTP, "rule_drop", 0),
    # AND binds tighter than OR: 123 or (1 and 2), not (123 or 1) and 2.
    Case("and-before-or", (f"{D} sport 123,1&2 drop",), UDP_NTP, "rule_drop", 0),
    Case("icmp-type", (f"{D} icmp-type 8 drop",), PING, "rule_drop", 0),
    Case("icmp-type-other", (f"{D} icmp-type 0 drop",), PING, "redirected"),
    Case("icmp-code", (f"{D} icmp-type 8 icmp-code 0 drop",), PING, "rule_drop", 0),
    Case("icmp-type-of-udp", (f"{D} icmp-type 0-255 drop",), UDP_NTP, "redirected"),
    Case("icmpv6-type", (f"dst {DST6}/128 icmp-type 128 drop",), PING6, "rule_drop", 0),
    Case("tcp-flags-match", (f"{D} tcp-flags =syn drop",), SYN, "rule_drop", 0),
    Case("tcp-flags-match-all", (f"{D} tcp-flags =syn+ack drop",), SYN, "redirected"),
    Case("tcp-flags-match-all-hit", (f"{D} tcp-flags =syn+ack drop",), SYNACK, "rule_drop", 0),
    Case("tcp-flags-any", (f"{D} tcp-flags syn+fin drop",), SYNACK, "rule_drop", 0),
    Case("tcp-flags-not", (f"{D} tcp-flags !ack drop",), SYN, "rule_drop", 0),
    Case("tcp-flags-not-miss", (f"{D} tcp-flags !ack drop",), ACK, "redirected"),
    Case("tcp-flags-of-udp", (f"{D} tcp-flags !ack drop",), UDP_NTP, "redirected"),
    Case("length", (f"{D} length >1000 drop",), BIG, "rule_drop", 0),
    Case("length-short", (f"{D} length >1000 drop",), UDP_NTP, "redirected"),
    Case("dscp", (f"{D} dscp 46 drop",), EF, "rule_drop", 0),
    Case("dscp-other", (f"{D} dscp 46 drop",), UDP_NTP, "redirected"),
    Case("fragment-df", (f"{D} fragment dont-fragment drop",), DF, "rule_drop", 0),
    Case("fragment-first", (f"{D} fragment first-fragment drop",), FIRST_FRAG, "rule_drop", 0),
    Case("fragment-is", (f"{D} fragment is-fragment drop",), MID_FRAG, "rule_drop", 0),
    Case("fragment-is-not-first", (f"{D} fragment is-fragment drop",), FIRST_FRAG, "redirected"),
    Case("fragment-last", (f"{D} fragment last-fragment drop",), LAST_FRAG, "rule_drop", 0),
    Case("fragment-mid-not-last", (f"{D} fragment last-fragment drop",), MID_FRAG, "redirected"),
    Case(
        "fragment-last-v6",
        (f"dst {DST6}/128 fragment =last-fragment drop",),
        LAST_FRAG6,
        "rule_drop",
        0,
    ),
    Case("ports-of-a-later-fragment", (f"{D} sport 0-65535 drop",), MID_FRAG, "redirected"),
    Case("v6-udp", ("ipv6 proto udp sport 123 drop",), UDP6, "rule_drop", 0),
    # Actions.
    Case("accept", (f"{D} accept",), UDP_NTP, "redirected", 0),
    Case("rate-limit-in-rate", (f"{D} rate-limit 1G",), UDP_NTP, "redirected", 0),
    Case("rate-limit-pps-in-rate", (f"{D} rate-limit-pps 1M",), UDP_NTP, "redirected", 0),
    Case("rate-zero-is-drop", (f"{D} rate-limit 0",), UDP_NTP, "rule_drop", 0),
    # RFC 8955 5.1: the first in order decides.
    Case(
        "more-specific-destination-first",
        ("dst 192.0.2.0/24 drop", f"{D} accept"),
        UDP_NTP,
        "redirected",
        1,
    ),
    Case(
        "more-specific-destination-first-2",
        ("dst 192.0.2.0/24 accept", f"{D} drop"),
        UDP_NTP,
        "rule_drop",
        1,
    ),
    Case(
        "a-destination-before-none", ("ipv4 proto udp accept", f"{D} drop"), UDP_NTP, "rule_drop", 1
    ),
    Case(
        "source-before-none",
        ("ipv4 proto udp drop", f"src {SRC4}/32 accept"),
        UDP_NTP,
        "redirected",
        1,
    ),
    Case(
        "lower-type-first",
        (f"{D} sport 123 drop", f"{D} proto udp accept"),
        UDP_NTP,
        "redirected",
        1,
    ),
    Case(
        "more-components-first",
        (f"{D} proto udp drop", f"{D} proto udp sport 123 accept"),
        UDP_NTP,
        "redirected",
        1,
    ),
    Case(
        "lower-value-first",
        (f"{D} sport >100 drop", f"{D} sport 123 accept"),
        UDP_NTP,
        "redirected",
        1,
    ),
    Case(
        "walks-past-non-matching-specific",
        (f"{D} proto tcp accept", "dst 192.0.2.0/24 drop"),
        UDP_NTP,
        "rule_drop",
        1,
    ),
]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    ns: Netns
    ifindex: int
    prog: XdpProgram
    table: RuleTable
    policy: PolicyMaps

    def run(self, frame: bytes, repeat: int = 1) -> int:
        """The last action of ``repeat`` runs, each on a fresh copy of ``frame``
        (one run with repeat would see the frame as the last one left it: a
        frame for the loop has the loop's word in front)."""

        def pinned() -> int:
            os.sched_setaffinity(0, {0})  # one CPU: one bucket
            runner = B.TestRunner(self.prog.fd)
            for _ in range(repeat):
                action = runner.run(frame, self.ifindex, 0)[0]
            return action

        return self.ns.run(pinned)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with veth_netns("xgrule", queues=1) as name:
        ns = Netns(name)
        umem = B.Umem(4096, 2048)
        sock = ns.run(B.Sock, umem, "xgv0", 0, 2048, 0, int(Role.OUTER))
        prog = XdpProgram(Role.OUTER)
        try:
            prog.set_socket(0, sock.info()["fd"])
            policy = PolicyMaps(prog)
            table = RuleTable(RuleMaps(prog, policy), None, clock=FakeClock())
            yield Rig(ns, sock.info()["ifindex"], prog, table, policy)
            policy.close()
        finally:
            prog.close()
            sock.close()
            umem.close()


def counted(rig: Rig) -> dict[str, np.ndarray]:
    return {
        r["rule"]: np.array([r["packets"], r["bytes"]]) for r in rig.table.entries_of()["rules"]
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_verdict(rig: Rig, case: Case) -> None:
    rig.table.clear()
    rig.table.add(list(case.rules))
    texts = [r["rule"] for r in rig.table.entries_of()["rules"]]
    before, counters = counted(rig), rig.prog.reason_counters()
    action = rig.run(case.frame)
    delta = rig.prog.reason_counters() - counters
    want = Reason[case.reason]
    assert action == (B.XDP_REDIRECT if case.reason == "redirected" else B.XDP_DROP)
    assert delta[want].tolist() == [1, len(case.frame)]
    assert [Reason(r).name for r in range(len(delta)) if r != want and delta[r].any()] == []
    grew = {t for t in texts if (counted(rig)[t] - before[t]).any()}
    if case.counted is None:
        assert grew == set()
    else:
        from xdpguard.flowspec import parse

        want_text = parse(case.rules[case.counted]).text()
        assert grew == {want_text}
        assert (counted(rig)[want_text] - before[want_text]).tolist() == [1, len(case.frame)]


def test_a_rate_limit_passes_its_burst_then_drops(rig: Rig) -> None:
    """pps 100 (per CPU: 100 / ncpus): from rest, one frame and the 100 ms
    tolerance pass, then the bucket is ahead and the rest drop. Run on one
    CPU, 1,000 times in a row (in far less than 100 ms)."""
    rig.table.clear()
    ncpus = rig.table.ncpus
    rig.table.add([f"{D} rate-limit-pps 100"])
    counters = rig.prog.reason_counters()
    rig.run(UDP_NTP, repeat=1000)
    delta = rig.prog.reason_counters() - counters
    passed, dropped = delta[Reason.redirected][0], delta[Reason.rule_rate_limited][0]
    assert passed + dropped == 1000
    per_cpu = 100 / ncpus
    assert 1 <= passed <= 1 + per_cpu * B.RATE_TAU_NS / 1e9 + 1
    entry = rig.table.entries_of()["rules"][0]
    assert entry["packets"] == 1000 and entry["dropped_packets"] == dropped


def test_a_byte_rate_counts_bytes(rig: Rig) -> None:
    """rate-limit in bytes/s: with room for about ten big frames in the
    tolerance, about ten pass (and a small frame's cost is its size)."""
    rig.table.clear()
    ncpus = rig.table.ncpus
    rate = int(len(BIG) * 10 / (B.RATE_TAU_NS / 1e9) * ncpus)
    rig.table.add([f"{D} rate-limit {rate}"])
    counters = rig.prog.reason_counters()
    rig.run(BIG, repeat=200)
    passed = (rig.prog.reason_counters() - counters)[Reason.redirected][0]
    assert 9 <= passed <= 12


def test_per_source_rate_limits(rig: Rig) -> None:
    """ratelimit --per-source: each source has its own bucket; without it,
    the prefix shares one. Counted under source_rate_limited."""
    rig.table.clear()
    ncpus = rig.table.ncpus
    rig.table.limit_add(["198.18.0.0/15"], 50 * ncpus, None, per_source=True)
    other = bytes(ETH / IP(src="198.18.0.8", dst=DST4) / UDP(sport=1, dport=2))
    try:
        c0 = rig.prog.reason_counters()
        rig.run(UDP_NTP, repeat=100)
        rig.run(other, repeat=100)
        d = rig.prog.reason_counters() - c0
        passed = d[Reason.redirected][0]
        # each source: 1 + 50 * 0.1 = 6 or so; two sources: twice that
        assert 2 * 5 <= passed <= 2 * 7
        assert d[Reason.source_rate_limited][0] == 200 - passed
        rig.table.limit_add(["198.18.0.0/15"], 50 * ncpus, None, per_source=False)
        c0 = rig.prog.reason_counters()
        rig.run(UDP_NTP, repeat=100)
        rig.run(other, repeat=100)
        passed = (rig.prog.reason_counters() - c0)[Reason.redirected][0]
        assert 5 <= passed <= 7  # one bucket for the /15
        lim = rig.table.limit_entries()["limits"][0]
        assert lim["packets"] == 400 and lim["per_source"] is False
    finally:
        rig.table.limit_del(["198.18.0.0/15"])
    c0 = rig.prog.reason_counters()
    rig.run(UDP_NTP, repeat=10)
    assert (rig.prog.reason_counters() - c0)[Reason.redirected][0] == 10


def test_rules_come_before_rate_limits_and_after_the_blocklist(rig: Rig) -> None:
    from xdpguard.policy import parse_items

    rig.table.clear()
    rig.table.add([f"{D} drop"])
    rig.table.limit_add([f"{SRC4}/32"], 1, None, per_source=False)
    try:
        c0 = rig.prog.reason_counters()
        rig.run(UDP_NTP)
        assert (rig.prog.reason_counters() - c0)[Reason.rule_drop][0] == 1
        rig.policy.lists_add("block", "v4", parse_items([f"{SRC4}/32"]).v4)
        c0 = rig.prog.reason_counters()
        rig.run(UDP_NTP)
        assert (rig.prog.reason_counters() - c0)[Reason.blocklist][0] == 1
    finally:
        rig.policy.lists_replace("block", {"v4": parse_items([]).v4})
        rig.table.limit_del([f"{SRC4}/32"])


def test_a_full_list_and_deep_nesting_are_refused_whole(rig: Rig) -> None:
    from xdpguard.flowspec import RuleError

    rig.table.clear()
    many = [f"{D} sport {p} drop" for p in range(B.RULE_LIST_MAX + 1)]
    with pytest.raises(RuleError, match="at most 64 per destination prefix"):
        rig.table.add(many)
    assert rig.table.entries_of()["count"] == 0
    nested = [f"dst 192.0.2.0/{n} drop" for n in range(24, 24 + B.RULE_DEPTH + 1)]
    with pytest.raises(RuleError, match="nest"):
        rig.table.add(nested)
    assert rig.table.entries_of()["count"] == 0
    assert rig.run(UDP_NTP) == B.XDP_REDIRECT


@pytest.mark.parametrize("plen", [0, 1, 7, 8, 9, 16, 23, 24, 31, 32])
def test_the_destination_filter_finds_every_prefix_length_v4(rig: Rig, plen: int) -> None:
    """The filter in front of the walk (a Bloom filter of the rules'
    destination prefixes, hashed alike in Python and BPF) never hides a
    rule: each length, alone and among nine others (more lengths than it
    checks: every frame walks then)."""
    import ipaddress

    net = ipaddress.ip_network(f"{DST4}/{plen}", strict=False)
    rig.table.clear()
    rig.table.add([f"dst {net} drop"], force=plen == 0)  # a /0 is everything
    assert rig.run(UDP_NTP) == B.XDP_DROP
    others = [f"dst 10.{n}.0.0/{n} drop" for n in range(16, 25)]  # disjoint, 9 lengths
    rig.table.add(others)
    assert rig.run(UDP_NTP) == B.XDP_DROP
    rig.table.delete([f"dst {net} drop"])
    assert rig.run(UDP_NTP) == B.XDP_REDIRECT


@pytest.mark.parametrize("plen", [0, 1, 48, 63, 64, 65, 127, 128])
def test_the_destination_filter_finds_every_prefix_length_v6(rig: Rig, plen: int) -> None:
    import ipaddress

    net = ipaddress.ip_network(f"{DST6}/{plen}", strict=False)
    rig.table.clear()
    rig.table.add([f"dst {net} drop"], force=plen == 0)  # a /0 is everything
    assert rig.run(UDP6) == B.XDP_DROP
    rig.table.add(["dst 2001:db8:ffff::/48 drop"])  # another length in the filter
    assert rig.run(UDP6) == B.XDP_DROP
    rig.table.clear()
    assert rig.run(UDP6) == B.XDP_REDIRECT


def test_the_filter_never_hides_a_prefix_with_rules(rig: Rig) -> None:
    """Issue 21, 5: the filter in front of the walk answers "no rules here"
    for most destinations; one built with another hash than XDP's would
    say so for prefixes that have rules, and their rules would be skipped
    (fail open). Random prefixes of every length, each with a rule, and a
    frame to a random address inside each: every one is dropped by it."""
    import ipaddress
    import random

    rng = random.Random(random.getrandbits(64))  # the test's seed, see conftest
    rig.table.clear()
    nets = set()
    while len(nets) < 48:
        v6 = rng.random() < 0.5
        width = 128 if v6 else 32
        plen = rng.randint(8, width)
        addr = rng.getrandbits(width) & ~((1 << (width - plen)) - 1)
        addr = (0x20010DB8 << 96 | addr & ((1 << 96) - 1)) if v6 else addr
        net = ipaddress.ip_network((addr, plen if not v6 else max(plen, 32)), strict=False)
        if not any(net.overlaps(n) for n in nets):
            nets.add(net)
    rig.table.add([f"dst {n} proto udp dport 9 drop" for n in nets])
    for n in nets:
        host = n.network_address + rng.randrange(n.num_addresses)
        pkt = (
            ETH / IPv6(src=SRC6, dst=str(host))
            if n.version == 6
            else ETH / IP(src=SRC4, dst=str(host))
        ) / UDP(sport=4000, dport=9)
        before = rig.prog.reason_counters()[Reason.rule_drop, 0]
        assert rig.run(bytes(pkt)) == B.XDP_DROP, n
        assert rig.prog.reason_counters()[Reason.rule_drop, 0] == before + 1, n
