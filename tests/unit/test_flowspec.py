"""The FlowSpec model (xdpguard.flowspec) and the feed's reading of UPDATEs
(xdpguard.flowspec_feed): text, encoding and order, against RFC 8955/8956
and against what a real GoBGP sent."""

from __future__ import annotations

import random
import struct

import pytest

from xdpguard import flowspec as F
from xdpguard.flowspec_feed import action_of, parse_update

pytestmark = pytest.mark.unit

# UPDATE bodies GoBGP 3.10 sent ExaBGP 4.2 (captured from a lab session),
# with what each means. The commands were:
#   gobgp global rib -a ipv4-flowspec add match destination 192.0.2.0/24
#     protocol udp source-port '==123' then discard   (and its del, last)
#   ... destination 192.0.2.1/32 source 198.18.0.0/15 protocol tcp
#     destination-port '>=1024&<=2048' tcp-flags '=S' then rate-limit 1000
#   ... destination 192.0.2.2/32 protocol icmp icmp-type '==8' icmp-code '==0'
#     packet-length '>=1000' dscp '==46' fragment 'is-fragment' then accept
#   ... destination 192.0.2.3/32 port '==53' '==123' source-port '!=0'
#     tcp-flags '!=SA' fragment '=dont-fragment' then redirect 65000:100
#   gobgp global rib -a ipv6-flowspec add match destination 2001:db8::/64
#     protocol udp source-port '==53' then discard
GOBGP = [
    ("0000002C4001010240020602010000FDE9800E1100018500000B0118C0000203811106817BC01008800600"
     "0000000000",
     [("dst 192.0.2.0/24 proto udp sport 123", "drop")], []),
    ("000000384001010240020602010000FDE9800E1D0001850000170120C0000201020FC61203810605130400"
     "D50800098102C0100880060000447A0000",
     [("dst 192.0.2.1/32 src 198.18.0.0/15 proto tcp dport 1024-2048 tcp-flags =syn",
       "rate-limit 1000")], []),
    ("0000002F4001010240020602010000FDE9800E1F0001850000190120C00002020381010781080881000A93"
     "03E80B812E0C8002",
     [("dst 192.0.2.2/32 proto icmp icmp-type 8 icmp-code 0 length >=1000 dscp 46 "
       "fragment is-fragment", "accept")], []),
    ("000000354001010240020602010000FDE9800E1A0001850000140120C0000203040135817B068600098312"
     "0C8101C010088008FDE800000064",
     [("dst 192.0.2.3/32 port 53,123 sport !=0 tcp-flags !=syn+ack fragment =dont-fragment",
       None)], []),
    ("000000324001010240020602010000FDE9800E1700028500001101400020010DB800000000038111068135"
     "C010088006000000000000",
     [("dst 2001:db8::/64 proto udp sport 53", "drop")], []),
    ("00000012800F0F0001850B0118C0000203811106817B",
     [], ["dst 192.0.2.0/24 proto udp sport 123"]),
]  # fmt: skip


@pytest.mark.parametrize("body,announce,withdraw", GOBGP)
def test_gobgp_updates_read_exactly(body: str, announce: list, withdraw: list) -> None:
    u = parse_update(bytes.fromhex(body))
    got = [(m.text(), a.text() if a else None) for m, a, _ in u.announce]
    assert got == announce
    assert [m.text() for m in u.withdraw] == withdraw
    assert not u.rejected


def test_end_of_rib_is_recognised() -> None:
    # MP_UNREACH_NLRI for IPv4 FlowSpec with no NLRI, and nothing else.
    body = b"\0\0" + struct.pack("!H", 6) + bytes([0x80, 15, 3, 0, 1, 133])
    assert parse_update(body).eor


TEXTS = [
    "dst 192.0.2.0/24 proto udp sport 53,123,1900 drop",
    "dst 2001:db8::/32 proto tcp dport 80,443 tcp-flags =syn rate-limit-pps 10000",
    "ipv4 proto icmp icmp-type 8 length >1000 drop",
    "ipv6 proto icmpv6 icmp-type 128 accept",
    "src 198.18.0.0/15 dport 1024-2048&!=1500 rate-limit 1000000",
    "dst 192.0.2.1/32 port <1024 tcp-flags !=syn+ack,=rst&!fin fragment is-fragment drop",
    "dst 192.0.2.1/32 dscp 46 fragment =dont-fragment,last-fragment drop",
    "dst 0.0.0.0/0 drop",
    "ipv4 sport 123,1&2 drop",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_and_encoding_round_trip(text: str) -> None:
    rule = F.parse(text)
    assert rule.text() == text
    assert F.parse(rule.text()) == rule
    match, n = F.decode_nlri(F.encode_nlri(rule.match), rule.match.family)
    assert match == rule.match and n == len(F.encode_nlri(rule.match))


def test_random_rules_round_trip() -> None:
    rng = random.Random(20261202)
    comps = [F.Comp.PROTO, F.Comp.PORT, F.Comp.DPORT, F.Comp.SPORT, F.Comp.LENGTH,
             F.Comp.DSCP, F.Comp.TCP_FLAGS, F.Comp.FRAGMENT]  # fmt: skip
    for _ in range(500):
        family = rng.choice((4, 6))
        chosen = {}
        for c in rng.sample(comps, rng.randint(1, 4)):
            terms = []
            for i in range(rng.randint(1, 4)):
                join = F.OP_AND if i and rng.random() < 0.5 else 0
                if c in F.BITMASK:
                    top = 14 if (c == F.Comp.FRAGMENT and family == 6) else F.FIELD_MAX[c]
                    op = join | rng.choice((0, 1, 2, 3))
                    terms.append(F.Term(op, rng.randint(1, top) & ~(c == F.Comp.FRAGMENT and
                                                                    family == 6)))  # fmt: skip
                else:
                    op = join | rng.choice((1, 2, 3, 4, 5, 6))
                    terms.append(F.Term(op, rng.randint(0, F.FIELD_MAX[c])))
            chosen[c] = tuple(terms)
        rule = F.make_rule(family, None, None, chosen, F.Action("drop"))
        try:
            text = rule.text()
        except F.RuleError:
            continue
        assert F.parse(text) == rule, text
        assert F.decode_nlri(F.encode_nlri(rule.match), family)[0] == rule.match


@pytest.mark.parametrize(
    "text,why",
    [
        ("dst 192.0.2.0/24 flow-label 5 drop", "flow labels"),
        ("dst 192.0.2.0/24 sport 70000 drop", "more than the field holds"),
        ("dst 192.0.2.0/24 dscp 64 drop", "more than the field holds"),
        ("dst 2001:db8::/32 fragment dont-fragment drop", "no dont-fragment"),
        ("dst 192.0.2.0/24 tcp-flags =bogus drop", "unknown flag"),
        ("proto udp drop", "needs its family"),
        ("dst 192.0.2.0/24 src 2001:db8::/32 drop", "IPv6 in an IPv4 rule"),
        ("dst 192.0.2.0/24 proto udp", "no action"),
        ("dst 192.0.2.0/24 drop accept", "after the action"),
        ("dst 192.0.2.0/24 sport 9-1 drop", "backwards"),
        ("dst 192.0.2.0/24 sport " + ",".join(map(str, range(25))) + " drop", "at most 24"),
    ],
)
def test_what_cannot_be_expressed_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(F.RuleError, match=why):
        F.parse(text)


def test_an_ipv6_prefix_offset_is_refused() -> None:
    # type 1, length 64, offset 8, pattern
    nlri = bytes([10, 1, 64, 8]) + bytes(7)
    with pytest.raises(F.RuleError, match="offset"):
        F.decode_nlri(nlri, 6)


def test_rfc8955_order() -> None:
    """Section 5.1, case by case: lower component types first, more specific
    prefixes first, else lower addresses; other components by their
    encoding, a longer one first when one begins the other; more
    components first when all shared ones are equal."""
    order = [
        "dst 192.0.2.1/32 proto udp drop",
        "dst 192.0.2.1/32 sport 123 drop",  # type 3 before type 6
        "dst 192.0.2.0/24 drop",  # a more specific destination first
        "dst 192.0.3.0/24 drop",  # disjoint: the lower address first
        "src 198.18.0.0/15 drop",  # a destination before none
        "ipv4 proto tcp drop",  # =6 encodes lower than =17
        "ipv4 proto udp sport 53 drop",  # more components first ...
        "ipv4 proto udp drop",  # ... when the shared ones are equal
        "ipv4 sport 53,123 drop",  # by the encoding: its first op lacks the end bit
        "ipv4 sport 53 drop",
    ]
    matches = [F.parse(t).match for t in order]
    for _ in range(20):
        shuffled = matches[:]
        random.shuffle(shuffled)
        assert [m.text() for m in F.ordered(shuffled)] == [m.text() for m in matches]


@pytest.mark.parametrize(
    "communities,action,rejected",
    [
        ([], "accept", False),
        ([0x8006 << 48], "drop", False),  # traffic-rate 0: discard
        ([0x8006 << 48 | 0x447A0000], "rate-limit 1000", False),
        ([0x800C << 48 | struct.unpack("!I", struct.pack("!f", 50.0))[0]], "rate-limit-pps 50",
         False),
        ([0x8008 << 48 | 0xFDE800000064], None, True),  # redirect
        ([0x8009 << 48 | 46], None, True),  # traffic marking
        ([0x8007 << 48 | 2], None, True),  # sample
        ([0x8007 << 48 | 1], None, True),  # not terminal
        ([0x8006 << 48 | 0x447A0000, 0x800C << 48 | 0x447A0000], None, True),
        ([0x0002FDE900000064], "accept", False),  # a route target: not an action
    ],
)  # fmt: skip
def test_actions_from_extended_communities(
    communities: list[int], action: str | None, rejected: bool
) -> None:
    a, why = action_of(communities)
    assert (a.text() if a else None) == action
    assert (why is not None) == rejected


def test_single_range_agrees_with_brute_force() -> None:
    """The rule header's range (interval arithmetic) against every value."""
    rng = random.Random(7)
    for n in range(1000):
        comp = F.Comp.DPORT if n % 100 == 0 else rng.choice([F.Comp.PROTO, F.Comp.DSCP])
        top = F.FIELD_MAX[comp]
        terms = []
        for i in range(rng.randint(1, 4)):
            join = F.OP_AND if i and rng.random() < 0.5 else 0
            terms.append(F.Term(join | rng.randint(0, 7), rng.randint(0, top)))
        held = []
        for v in range(top + 1):
            any_, group = False, True
            for i, t in enumerate(terms):
                if i and not t.op & F.OP_AND:
                    any_, group = any_ or group, True
                ok = (
                    (t.op & 4 and v < t.value)
                    or (t.op & 2 and v > t.value)
                    or (t.op & 1 and v == t.value)
                )
                group = group and bool(ok)
            if any_ or group:
                held.append(v)
        one = held and held[-1] - held[0] + 1 == len(held)
        assert F.single_range(comp, terms) == ((held[0], held[-1]) if one else None), terms
