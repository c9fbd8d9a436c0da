"""The XDP program's verdicts and counters, frame by frame (BPF_PROG_TEST_RUN).

Each case is a crafted frame, the role of the program instance, the RX
queue, and the expected action and reason; the test also checks that exactly
that reason's counter moved, by one packet and the frame's length.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from xdpguard import _bindings as B
from xdpguard.defs import Reason, Role
from xdpguard.netns import Netns
from xdpguard.xdp import XdpProgram

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


GOOD_V4 = raw(ETH / V4 / UDP(sport=1234, dport=53) / (b"x" * 18))

CASES = [
    Case("ipv4-udp", GOOD_V4, B.XDP_REDIRECT, "redirected"),
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
    Case(
        "non-ip",
        raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88B5) / (b"\0" * 46)),
        B.XDP_REDIRECT,
        "redirected",
    ),
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


@dataclass
class Rig:
    ns: Netns
    ifindex: int
    progs: dict[Role, XdpProgram]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """A veth with two queues in a private netns; an AF_XDP socket on queue 0 only."""
    name = f"xgbpf{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    umem = sock = None
    progs: dict[Role, XdpProgram] = {}
    try:
        subprocess.run(
            [
                "ip",
                "-n",
                name,
                "link",
                "add",
                "name",
                "xgt0",
                "numrxqueues",
                "2",
                "numtxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                "xgt1",
                "numrxqueues",
                "2",
                "numtxqueues",
                "2",
            ],
            check=True,
        )
        for dev in ("xgt0", "xgt1"):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        ns = Netns(name)
        umem = B.Umem(4096, 2048)
        sock = ns.run(B.Sock, umem, "xgt0", 0, 2048, 0, int(Role.OUTER))
        ifindex = sock.info()["ifindex"]
        for role in Role:
            progs[role] = XdpProgram(role)
            progs[role].set_socket(0, sock.info()["fd"])
        yield Rig(ns, ifindex, progs)
    finally:
        for p in progs.values():
            p.close()
        if sock is not None:
            sock.close()
        if umem is not None:
            umem.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verdict(rig: Rig, case: Case) -> None:
    prog = rig.progs[case.role]
    before = prog.reason_counters()
    action, out = rig.ns.run(B.prog_test_run, prog.fd, case.frame, rig.ifindex, case.queue)
    after = prog.reason_counters()

    assert action == case.action
    assert out == case.frame  # the program never rewrites a frame
    delta = after - before
    expected = Reason[case.reason]
    assert delta[expected].tolist() == [1, len(case.frame)]
    others = [Reason(r).name for r in range(len(delta)) if r != expected and delta[r].any()]
    assert others == []


def test_every_reason_has_a_case() -> None:
    assert {c.reason for c in CASES} == {r.name for r in Reason}
