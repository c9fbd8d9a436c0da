"""The XDP program's verdicts and counters, frame by frame (BPF_PROG_TEST_RUN).

Each case is a crafted frame, the role of the program instance, the RX
queue, and the expected action and reason; the test also checks that exactly
that reason's counter moved, by one packet and the frame's length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from framegen import ah, dstopts
from lab import veth_netns
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from xdpguard import _bindings as B
from xdpguard.defs import XDP_REASONS, Reason, Role
from xdpguard.netns import Netns, resolve_device
from xdpguard.policy import FAMILIES, parse_items
from xdpguard.xdp import PolicyMaps, XdpProgram

pytestmark = pytest.mark.bpf

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
V4 = IP(src="169.254.0.1", dst="169.254.0.2")
V6 = IPv6(src="2001:db8::1", dst="2001:db8::2")


def raw(pkt) -> bytes:  # type: ignore[no-untyped-def]
    return bytes(pkt)


def ipv4_header_patch(frame: bytes, **fields: int) -> bytes:
    """Rewrite IPv4 header fields after scapy built the frame (to make it wrong)."""
    b = bytearray(frame)
    if "ihl" in fields:
        b[14] = (b[14] & 0xF0) | fields["ihl"]
    if "tot_len" in fields:
        b[16:18] = struct.pack("!H", fields["tot_len"])
    return bytes(b)


@dataclass(frozen=True)
class Case:
    name: str
    frame: bytes
    action: int
    reason: str
    role: Role = Role.OUTER
    queue: int = 0
    block: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    frags: str = "pass"
    fast: bool = False  # the fast path on (a peer in xg_peer; no flow table here)
    headroom_taken: int = 0  # a driver that leaves less room in front of the frame
    l2: tuple[int, ...] = ()  # ethertypes allowed beside IP and ARP (xdpguard l2)


GOOD_V4 = raw(ETH / V4 / UDP(sport=1234, dport=53) / (b"x" * 18))
NON_IP = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88B5) / (b"\0" * 46))
# IPv4/UDP from a blocked source inside MPLS (one label, bottom of stack) and
# inside 802.3 LLC/SNAP: the policy never sees the IP header, so neither passes.
MPLS_V4 = (
    raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x8847))
    + bytes.fromhex("00001140")
    + raw(V4 / UDP(sport=1234, dport=53))
)
SNAP_V4 = (
    bytes.fromhex("020000000002020000000001")
    + (8 + 28).to_bytes(2, "big")
    + bytes.fromhex("aaaa03000000")
    + b"\x08\x00"
    + raw(V4 / UDP(sport=1234, dport=53))
)

CASES = [
    Case("ipv4-udp", GOOD_V4, B.XDP_REDIRECT, "redirected"),
    # No room for the loop's word: the loop cannot judge it, so not there.
    Case("no-room-for-the-word", GOOD_V4, B.XDP_DROP, "no_headroom", headroom_taken=216),
    Case("room-for-the-word", GOOD_V4, B.XDP_REDIRECT, "redirected", headroom_taken=200),
    Case("ipv4-tcp", raw(ETH / V4 / TCP(flags="S")), B.XDP_REDIRECT, "redirected"),
    Case(
        "ipv4-options",
        raw(ETH / IP(src="169.254.0.1", dst="169.254.0.2", options=b"\x01\x01\x01\x00") / UDP()),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case("ipv6-tcp", raw(ETH / V6 / TCP(flags="S")), B.XDP_REDIRECT, "redirected"),
    Case(
        "arp", raw(ETH / ARP(psrc="169.254.0.1", pdst="169.254.0.2")), B.XDP_REDIRECT, "redirected"
    ),
    Case("vlan-ipv4", raw(ETH / Dot1Q(vlan=5) / V4 / UDP()), B.XDP_REDIRECT, "redirected"),
    Case(
        "qinq-ipv6",
        raw(ETH / Dot1AD(vlan=5) / Dot1Q(vlan=6) / V6 / UDP()),
        B.XDP_REDIRECT,
        "redirected",
    ),
    # Not IP and not ARP: nothing the policy can see (issue 23, 1).
    Case("non-ip", NON_IP, B.XDP_DROP, "l2_other"),
    Case("non-ip-broadcast", b"\xff" * 6 + NON_IP[6:], B.XDP_DROP, "l2_other"),
    Case("non-ip-allowed", NON_IP, B.XDP_REDIRECT, "redirected", l2=(0x88B5,)),
    Case("non-ip-other-allowed", NON_IP, B.XDP_DROP, "l2_other", l2=(0x88CC,)),
    Case("mpls-ipv4", MPLS_V4, B.XDP_DROP, "l2_other"),
    Case("llc-snap-ipv4", SNAP_V4, B.XDP_DROP, "l2_other"),
    Case(
        "vlan-non-ip", raw(ETH / Dot1Q(vlan=5, type=0x88B5) / (b"\0" * 46)), B.XDP_DROP, "l2_other"
    ),
    Case("arp-truncated", raw(ETH / ARP(psrc="169.254.0.1"))[:30], B.XDP_DROP, "malformed"),
    Case(
        "arp-not-ipv4",
        raw(ETH / ARP(ptype=0x86DD, plen=16, psrc="::1", pdst="::2")),
        B.XDP_DROP,
        "malformed",
    ),
    Case("inner-non-ip", NON_IP, B.XDP_REDIRECT, "redirected", role=Role.INNER),
    Case("ipv4-truncated", raw(Ether(type=0x0800))[:14] + b"\x45" * 10, B.XDP_DROP, "malformed"),
    Case("ipv4-ihl-4", ipv4_header_patch(GOOD_V4, ihl=4), B.XDP_DROP, "malformed"),
    Case(
        "ipv4-ihl-beyond-frame", ipv4_header_patch(raw(ETH / V4), ihl=15), B.XDP_DROP, "malformed"
    ),
    Case(
        "ipv4-total-length-beyond-frame",
        ipv4_header_patch(GOOD_V4, tot_len=1400),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "ipv4-total-length-below-header",
        ipv4_header_patch(GOOD_V4, tot_len=12),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "ipv4-version-6-in-v4-ethertype",
        raw(Ether(type=0x0800) / V6 / UDP()),
        B.XDP_DROP,
        "malformed",
    ),
    Case("ipv6-truncated", raw(ETH / V6)[: 14 + 30], B.XDP_DROP, "malformed"),
    Case(
        "ipv6-payload-beyond-frame",
        raw(ETH / IPv6(src="2001:db8::1", dst="2001:db8::2", plen=500) / UDP()),
        B.XDP_DROP,
        "malformed",
    ),
    Case("vlan-truncated", raw(Ether(type=0x8100))[:14] + b"\x00\x05", B.XDP_DROP, "malformed"),
    # The origin's side is never policed: even a broken frame is passed on.
    Case(
        "inner-malformed-passes",
        ipv4_header_patch(GOOD_V4, ihl=4),
        B.XDP_REDIRECT,
        "redirected",
        role=Role.INNER,
    ),
    Case(
        "inner-ipv6", raw(ETH / V6 / TCP(flags="SA")), B.XDP_REDIRECT, "redirected", role=Role.INNER
    ),
    # No socket on the frame's queue: dropped and counted, whatever the frame.
    Case("no-socket-on-queue", GOOD_V4, B.XDP_DROP, "no_socket", queue=1),
    Case("no-socket-inner", GOOD_V4, B.XDP_DROP, "no_socket", role=Role.INNER, queue=1),
]

# The stateless policy, stage by stage (issue: stateless policy in XDP).
V4_SRC = "169.254.0.1"
V6_SRC = "2001:db8::1"
UDP53_V4 = raw(ETH / V4 / UDP(sport=53, dport=33000) / (b"r" * 40))
UDP53_V6 = raw(ETH / V6 / UDP(sport=53, dport=33000) / (b"r" * 40))
FIRST_FRAG_V4 = raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", flags="MF", frag=0) / UDP(sport=4000))
LATER_FRAG_V4 = raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", proto=17, frag=185) / (b"f" * 8))
FIRST_FRAG_V6 = raw(ETH / V6 / IPv6ExtHdrFragment(m=1, offset=0, id=7) / UDP(sport=4000))
LATER_FRAG_V6 = raw(ETH / V6 / IPv6ExtHdrFragment(m=0, offset=100, id=7, nh=17) / (b"f" * 8))
TCP_V4 = raw(ETH / V4 / TCP(flags="S"))
ND_NS = raw(ETH / IPv6(src=V6_SRC, dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt="2001:db8::2"))


CASES += [
    # Blocklist, IPv4 and IPv6, exact and covering prefixes.
    Case("block-v4-host", GOOD_V4, B.XDP_DROP, "blocklist", block=(V4_SRC,)),
    Case("block-v4-covering", GOOD_V4, B.XDP_DROP, "blocklist", block=("169.254.0.0/16",)),
    Case("block-v4-other", GOOD_V4, B.XDP_REDIRECT, "redirected", block=("169.254.1.0/24",)),
    Case(
        "block-v6-host",
        raw(ETH / V6 / TCP(flags="S")),
        B.XDP_DROP,
        "blocklist",
        block=(V6_SRC,),
    ),
    Case(
        "block-v6-covering",
        raw(ETH / V6 / UDP()),
        B.XDP_DROP,
        "blocklist",
        block=("2001:db8::/32",),
    ),
    Case(
        "block-v6-other",
        raw(ETH / V6 / UDP()),
        B.XDP_REDIRECT,
        "redirected",
        block=("2001:db9::/32",),
    ),
    Case(
        "block-v4-vlan",
        raw(ETH / Dot1Q(vlan=5) / V4 / UDP()),
        B.XDP_DROP,
        "blocklist",
        block=(V4_SRC,),
    ),
    Case(
        "block-also-drops-later-fragments", LATER_FRAG_V4, B.XDP_DROP, "blocklist", block=(V4_SRC,)
    ),
    # Allowlist: a match passes and skips every later stage; longest prefix wins.
    Case("allow-v4", GOOD_V4, B.XDP_REDIRECT, "allowlist", allow=(V4_SRC,)),
    Case(
        "allow-32-inside-block-8",
        GOOD_V4,
        B.XDP_REDIRECT,
        "allowlist",
        allow=(f"{V4_SRC}/32",),
        block=("169.0.0.0/8",),
    ),
    Case(
        "allow-v6-128-inside-block-32",
        raw(ETH / V6 / UDP()),
        B.XDP_REDIRECT,
        "allowlist",
        allow=(V6_SRC,),
        block=("2001:db8::/32",),
    ),
    Case(
        "allow-skips-port-check",
        UDP53_V4,
        B.XDP_REDIRECT,
        "allowlist",
        allow=(V4_SRC,),
        ports=(53,),
    ),
    Case(
        "allow-skips-fragment-check",
        LATER_FRAG_V4,
        B.XDP_REDIRECT,
        "allowlist",
        allow=(V4_SRC,),
        frags="drop",
    ),
    Case(
        "allow-skips-malformed-check",
        raw(ETH / V4 / TCP(flags="SF")),
        B.XDP_REDIRECT,
        "allowlist",
        allow=(V4_SRC,),
    ),
    Case(
        "allow-other-source-still-blocked",
        GOOD_V4,
        B.XDP_DROP,
        "blocklist",
        allow=("169.254.9.9",),
        block=(V4_SRC,),
    ),
    # UDP source ports.
    Case("udp-sport-53-v4", UDP53_V4, B.XDP_DROP, "udp_src_port", ports=(53,)),
    Case("udp-sport-53-v6", UDP53_V6, B.XDP_DROP, "udp_src_port", ports=(53,)),
    Case(
        "udp-sport-11211",
        raw(ETH / V4 / UDP(sport=11211)),
        B.XDP_DROP,
        "udp_src_port",
        ports=(11211, 53),
    ),
    Case(
        "udp-sport-65535",
        raw(ETH / V4 / UDP(sport=65535)),
        B.XDP_DROP,
        "udp_src_port",
        ports=(65535,),
    ),
    Case("udp-sport-not-in-set", UDP53_V4, B.XDP_REDIRECT, "redirected", ports=(123,)),
    Case("udp-sport-empty-set", UDP53_V4, B.XDP_REDIRECT, "redirected"),
    Case(
        "tcp-sport-53-is-not-udp",
        raw(ETH / V4 / TCP(sport=53, flags="SA")),
        B.XDP_REDIRECT,
        "redirected",
        ports=(53,),
    ),
    Case(
        "udp-sport-53-first-fragment",
        raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", flags="MF") / UDP(sport=53)),
        B.XDP_DROP,
        "udp_src_port",
        ports=(53,),
        frags="pass",
    ),
    Case(
        "udp-sport-behind-v6-dest-opts",
        raw(ETH / V6 / IPv6ExtHdrDestOpt() / UDP(sport=53)),
        B.XDP_DROP,
        "udp_src_port",
        ports=(53,),
    ),
    # Fragments.
    Case("frag-v4-first-drop", FIRST_FRAG_V4, B.XDP_DROP, "fragment", frags="drop"),
    Case("frag-v4-later-drop", LATER_FRAG_V4, B.XDP_DROP, "fragment", frags="drop"),
    Case("frag-v6-first-drop", FIRST_FRAG_V6, B.XDP_DROP, "fragment", frags="drop"),
    Case("frag-v6-later-drop", LATER_FRAG_V6, B.XDP_DROP, "fragment", frags="drop"),
    Case("frag-v4-later-pass", LATER_FRAG_V4, B.XDP_REDIRECT, "redirected", frags="pass"),
    Case("frag-v6-later-pass", LATER_FRAG_V6, B.XDP_REDIRECT, "redirected", frags="pass"),
    Case("not-a-fragment-with-drop", GOOD_V4, B.XDP_REDIRECT, "redirected", frags="drop"),
    Case(
        "df-is-not-a-fragment",
        raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", flags="DF") / UDP()),
        B.XDP_REDIRECT,
        "redirected",
        frags="drop",
    ),
    # Malformed transport headers and impossible TCP flags.
    Case("tcp-syn-fin", raw(ETH / V4 / TCP(flags="SF")), B.XDP_DROP, "malformed"),
    Case("tcp-syn-rst", raw(ETH / V4 / TCP(flags="SR")), B.XDP_DROP, "malformed"),
    Case("tcp-fin-rst", raw(ETH / V4 / TCP(flags="FRA")), B.XDP_DROP, "malformed"),
    Case("tcp-no-flags", raw(ETH / V4 / TCP(flags="")), B.XDP_DROP, "malformed"),
    Case("tcp-fin-without-ack", raw(ETH / V4 / TCP(flags="F")), B.XDP_DROP, "malformed"),
    Case("tcp-xmas", raw(ETH / V4 / TCP(flags="FPU")), B.XDP_DROP, "malformed"),
    Case("tcp-v6-syn-fin", raw(ETH / V6 / TCP(flags="SF")), B.XDP_DROP, "malformed"),
    Case("tcp-doff-4", raw(ETH / V4 / TCP(flags="S", dataofs=4)), B.XDP_DROP, "malformed"),
    Case(
        "tcp-doff-beyond-frame", raw(ETH / V4 / TCP(flags="S", dataofs=15)), B.XDP_DROP, "malformed"
    ),
    Case("tcp-truncated", raw(ETH / V4 / TCP(flags="S"))[: 14 + 20 + 12], B.XDP_DROP, "malformed"),
    Case("udp-truncated", raw(ETH / V4 / UDP())[: 14 + 20 + 4], B.XDP_DROP, "malformed"),
    Case("udp-length-below-header", raw(ETH / V4 / UDP(len=4)), B.XDP_DROP, "malformed"),
    Case("tcp-ok-flags", raw(ETH / V4 / TCP(flags="PA") / b"data"), B.XDP_REDIRECT, "redirected"),
    Case("tcp-rst-alone-is-legal", raw(ETH / V4 / TCP(flags="R")), B.XDP_REDIRECT, "redirected"),
    Case("icmp-echo", raw(ETH / V4 / ICMP()), B.XDP_REDIRECT, "redirected"),
    Case(
        "icmpv6-echo-blocked",
        raw(ETH / V6 / ICMPv6EchoRequest()),
        B.XDP_DROP,
        "blocklist",
        block=(V6_SRC,),
    ),
    # ARP is judged by its sender's address: a blocked host cannot poison
    # the origin's neighbour entry of a real client (issue 23, 1).
    Case(
        "arp-from-blocked-source",
        raw(ETH / ARP(psrc=V4_SRC, pdst="169.254.0.2")),
        B.XDP_DROP,
        "blocklist",
        block=(f"{V4_SRC}/32",),
    ),
    Case(
        "arp-from-other-source",
        raw(ETH / ARP(psrc="169.254.0.9", pdst="169.254.0.2")),
        B.XDP_REDIRECT,
        "redirected",
        block=(f"{V4_SRC}/32",),
    ),
    Case(
        "arp-from-allowlisted-source",
        raw(ETH / ARP(psrc=V4_SRC, pdst="169.254.0.2")),
        B.XDP_REDIRECT,
        "allowlist",
        block=("0.0.0.0/0",),
        allow=(f"{V4_SRC}/32",),
    ),
    # Neighbour discovery is IP like the rest: a blocked source's is dropped.
    Case("nd-from-blocked-source", ND_NS, B.XDP_DROP, "blocklist", block=("2001:db8::/48",)),
    Case("nd-from-other-source", ND_NS, B.XDP_REDIRECT, "redirected", block=("2001:db9::/48",)),
    # One parser, fail-closed (issue: hardening): chains it walks, and
    # chains it refuses, whatever the source.
    Case(
        "v6-syn-behind-5-dstopts",
        raw(ETH / V6 / dstopts(5) / TCP(flags="S")),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case(
        "v6-syn-behind-8-dstopts",
        raw(ETH / V6 / dstopts(8) / TCP(flags="S")),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case(
        "v6-syn-behind-9-dstopts",
        raw(ETH / V6 / dstopts(9) / TCP(flags="S")),
        B.XDP_DROP,
        "ext_header_limit",
    ),
    Case(
        "v6-limit-beats-the-allowlist",
        raw(ETH / V6 / dstopts(9) / TCP(flags="A")),
        B.XDP_DROP,
        "ext_header_limit",
        allow=(V6_SRC,),
    ),
    Case(
        "v6-ack-behind-ah",
        raw(ETH / V6 / ah() / TCP(flags="A")),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case(
        "v4-ack-behind-ah",
        raw(ETH / V4 / ah() / TCP(flags="A")),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case(
        "v6-hbh-routing-dstopts-tcp",
        raw(
            ETH
            / V6
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting()
            / IPv6ExtHdrDestOpt()
            / TCP(flags="S")
        ),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case(
        "v6-atomic-frag-then-dstopts-syn",
        raw(
            ETH
            / V6
            / IPv6ExtHdrFragment(m=0, offset=0, id=1)
            / IPv6ExtHdrDestOpt()
            / TCP(flags="S")
        ),
        B.XDP_REDIRECT,
        "redirected",
    ),
    Case(
        "v6-frag-behind-dstopts-dropped",
        raw(ETH / V6 / dstopts(3) / IPv6ExtHdrFragment(m=1, id=2) / UDP(sport=4000)),
        B.XDP_DROP,
        "fragment",
        frags="drop",
    ),
    Case(
        "v6-udp-53-behind-5-dstopts",
        raw(ETH / V6 / dstopts(5) / UDP(sport=53)),
        B.XDP_DROP,
        "udp_src_port",
        ports=(53,),
    ),
    Case(
        "v6-blocked-behind-8-dstopts",
        raw(ETH / V6 / dstopts(8) / TCP(flags="S")),
        B.XDP_DROP,
        "blocklist",
        block=(V6_SRC,),
    ),
    Case(
        "v6-hbh-not-first",
        raw(ETH / V6 / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / TCP(flags="S")),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v6-two-fragment-headers",
        raw(ETH / V6 / IPv6ExtHdrFragment(m=1, id=3) / IPv6ExtHdrFragment(m=1, id=3) / UDP()),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v6-ext-header-beyond-payload",
        raw(ETH / V6 / IPv6ExtHdrDestOpt(len=200) / UDP()),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v6-chain-truncated-mid-header",
        raw(ETH / V6 / dstopts(2) / TCP(flags="S"))[: 14 + 40 + 9],
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v6-first-fragment-without-its-tcp-header",
        raw(ETH / V6 / IPv6ExtHdrFragment(m=1, id=4) / TCP(flags="S"))[: 14 + 40 + 8 + 12],
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v6-unassigned-next-header",
        raw(ETH / IPv6(src=V6_SRC, dst="2001:db8::2", nh=200) / (b"x" * 20)),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v4-tiny-first-fragment",
        raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", flags="MF", proto=6) / (b"\0" * 8)),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "v4-tcp-fragment-at-offset-8",
        raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", frag=1, proto=6) / (b"\0" * 16)),
        B.XDP_DROP,
        "malformed",
    ),
    Case(
        "triple-vlan",
        raw(ETH / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / V4 / UDP()),
        B.XDP_DROP,
        "ext_header_limit",
    ),
    Case(
        "triple-vlan-from-blocked-source",
        raw(ETH / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / V4 / UDP()),
        B.XDP_DROP,
        "ext_header_limit",
        block=(V4_SRC,),
    ),
    # The fast path (no flow table in this rig: TCP always goes to the loop).
    Case("fast-udp", GOOD_V4, B.XDP_REDIRECT, "fast_path", fast=True),
    Case(
        "fast-arp",
        raw(ETH / ARP(psrc="169.254.0.1", pdst="169.254.0.2")),
        B.XDP_REDIRECT,
        "fast_path",
        fast=True,
    ),
    Case(
        "fast-blocked-is-still-dropped",
        GOOD_V4,
        B.XDP_DROP,
        "blocklist",
        block=(V4_SRC,),
        fast=True,
    ),
    Case(
        "fast-tcp-of-no-flow-goes-to-the-loop",
        raw(ETH / V4 / TCP(flags="A")),
        B.XDP_REDIRECT,
        "redirected",
        fast=True,
    ),
    Case(
        "fast-tcp-fragment-goes-to-the-loop",
        raw(ETH / IP(src=V4_SRC, dst="169.254.0.2", proto=6, frag=185) / (b"f" * 8)),
        B.XDP_REDIRECT,
        "redirected",
        fast=True,
    ),
    Case("fast-inner-udp", GOOD_V4, B.XDP_REDIRECT, "fast_path", role=Role.INNER, fast=True),
    Case(
        "fast-inner-unparsable-goes-to-the-loop",
        ipv4_header_patch(GOOD_V4, ihl=4),
        B.XDP_REDIRECT,
        "redirected",
        role=Role.INNER,
        fast=True,
    ),
    Case(
        "nd-lookalike-hop-limit-64",
        raw(ETH / IPv6(src=V6_SRC, dst="ff02::1:ff00:2", hlim=64) / ICMPv6ND_NS(tgt="2001:db8::2")),
        B.XDP_DROP,
        "blocklist",
        block=("::/0",),
    ),
]


@dataclass
class Rig:
    ns: Netns
    ifindex: int
    progs: dict[Role, XdpProgram]
    maps: PolicyMaps
    peer_ifindex: int

    def set_policy(self, case: Case) -> None:
        """Exactly the case's policy, nothing left from the one before."""
        for lst, items in (("allow", case.allow), ("block", case.block)):
            prefixes = parse_items(items)
            self.maps.lists_replace(lst, {f: prefixes[f] for f in FAMILIES})
        self.maps.set_ports(case.ports)
        self.maps.set_l2(case.l2)
        self.maps.set_frag_policy(case.frags)
        for prog in self.progs.values():
            flags = B.FAST_ON | B.FAST_TCP if case.fast else 0
            cfg = B.struct_bytes("struct xg_fast_cfg", flags=flags)
            B.map_update(prog.map_fd("xg_fastcfg"), struct.pack("=I", 0), cfg)
            peer = struct.pack("=I", self.peer_ifindex)
            self.ns.run(B.map_update, prog.map_fd("xg_peer"), struct.pack("=I", 0), peer)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """A veth with two queues in a private netns; an AF_XDP socket on queue 0 only."""
    with veth_netns("xgbpf", queues=2) as name:
        umem = sock = None
        progs: dict[Role, XdpProgram] = {}
        try:
            ns = Netns(name)
            umem = B.Umem(4096, 2048)
            sock = ns.run(B.Sock, umem, "xgv0", 0, 2048, 0, int(Role.OUTER))
            ifindex = sock.info()["ifindex"]
            for role in Role:
                progs[role] = XdpProgram(role)
                progs[role].set_socket(0, sock.info()["fd"])
            maps = PolicyMaps(progs[Role.OUTER])
            yield Rig(ns, ifindex, progs, maps, resolve_device(ns, "xgv1").ifindex)
            maps.close()
        finally:
            for p in progs.values():
                p.close()
            if sock is not None:
                sock.close()
            if umem is not None:
                umem.close()


WORD = B.struct_dtype("struct xg_meta")


def expected_l4(frame: bytes) -> tuple[int, int] | None:
    """(protocol, offset) of the L4 header as scapy finds it; None if it finds none."""
    pkt = Ether(frame)
    for layer, proto in ((TCP, 6), (UDP, 17), (ICMP, 1), (ICMPv6EchoRequest, 58)):
        if pkt.haslayer(layer):
            return proto, len(frame) - len(pkt[layer])
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verdict(rig: Rig, case: Case) -> None:
    rig.set_policy(case)
    prog = rig.progs[case.role]
    before = prog.reason_counters()
    action, out = rig.ns.run(
        B.prog_test_run, prog.fd, case.frame, rig.ifindex, case.queue, 1, case.headroom_taken
    )
    after = prog.reason_counters()

    assert action == case.action
    # The program never rewrites a frame; on the outer side it puts its word
    # for the loop (struct xg_meta) in front of each frame that passed the policy.
    if case.role == Role.OUTER and case.reason in ("redirected", "allowlist", "no_socket"):
        word = np.frombuffer(out[: WORD.itemsize], dtype=WORD)[0]
        assert word["magic"] == B.META_MAGIC
        assert word["flags"] == (B.META_ALLOWLISTED if case.reason == "allowlist" else 0)
        out = out[WORD.itemsize :]
        # The parser (one build for XDP and C: test_parser_parity) finds
        # the L4 header where scapy does.
        expect = expected_l4(case.frame)
        if expect is not None:
            found = B.classify(case.frame)
            assert (found["l4_proto"], found["l4_off"]) == expect, case.name
    assert out == case.frame
    delta = after - before
    expected = Reason[case.reason]
    assert delta[expected].tolist() == [1, len(case.frame)]
    others = [Reason(r).name for r in range(len(delta)) if r != expected and delta[r].any()]
    assert others == []


# The reasons of XDP's TCP gate, whose cases are in test_challenge.py.
TCP_GATE_REASONS = {
    "syn_challenged",
    "challenge_passed",
    "challenge_failed",
    "challenge_rate_limited",
    "verified_syn_rate_limited",
}


# The reasons of the rule stages, whose cases are in test_rules.py.
RULE_REASONS = {"rule_drop", "rule_rate_limited", "source_rate_limited"}


def test_every_xdp_reason_has_a_case() -> None:
    # XDP_REASONS comes from the header's stage mask, next to the enum.
    assert {c.reason for c in CASES} | TCP_GATE_REASONS | RULE_REASONS == {
        r.name for r in XDP_REASONS
    }


def test_incremental_add_delete_keep_lists_enforced(rig: Rig) -> None:
    """The 'list not empty' bits follow adds and deletes, not only replaces."""
    rig.set_policy(Case("reset", GOOD_V4, 0, "redirected"))
    prog = rig.progs[Role.OUTER]

    def verdict(frame: bytes) -> int:
        return rig.ns.run(B.prog_test_run, prog.fd, frame, rig.ifindex, 0)[0]

    v4 = parse_items([V4_SRC, "192.0.2.0/24"])
    rig.maps.lists_add("block", "v4", v4.v4)
    assert verdict(GOOD_V4) == B.XDP_DROP
    rig.maps.lists_delete("block", "v4", parse_items(["192.0.2.0/24"]).v4)
    assert verdict(GOOD_V4) == B.XDP_DROP  # one entry left
    rig.maps.lists_delete("block", "v4", parse_items([V4_SRC]).v4)
    assert verdict(GOOD_V4) == B.XDP_REDIRECT
    rig.maps.lists_add("block", "v6", parse_items([V6_SRC]).v6)
    assert verdict(raw(ETH / V6 / UDP())) == B.XDP_DROP
    assert verdict(GOOD_V4) == B.XDP_REDIRECT
    rig.maps.lists_replace("block", {"v6": parse_items([]).v6})
    assert verdict(raw(ETH / V6 / UDP())) == B.XDP_REDIRECT
