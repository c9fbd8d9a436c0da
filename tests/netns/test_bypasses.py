"""Every bypass of the hardening issue, crafted and sent at a running appliance.

TCP protection is on, the blocklist and the UDP port and fragment policy
are set; each attack is sent from the client's eth0 with a source MAC of
its own, and the origin counts what arrives with that MAC at its eth0
ingress (nftables, before its IP stack): zero, every time. A control
frame that should pass proves the count works.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from framegen import ah, dstopts
from lab import ORIGIN_V4, ORIGIN_V6, Appliance, Ledger, lab
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

SPOOF_V6 = "2001:db8:f00d::7"  # not blocked: the TCP stage must stop these
SPOOF_V4 = "198.18.7.7"
BLOCKED_V6_NET = "2001:db8:bad::/48"
BLOCKED_V6 = "2001:db8:bad::1"
BLOCKED_V4 = "198.19.0.9"  # in the blocked 198.19.0.0/16
PER_ATTACK = 100


def v6(src: str = SPOOF_V6) -> Packet:
    return IPv6(src=src, dst=ORIGIN_V6)


def v4(src: str = SPOOF_V4) -> Packet:
    return IP(src=src, dst=ORIGIN_V4)


# name -> a frame (without Ethernet) for source port i.
ATTACKS: dict[str, Callable[[int], Packet]] = {
    "syn-behind-5-dstopts": lambda i: v6() / dstopts(5) / TCP(sport=i, dport=5201, flags="S"),
    "syn-behind-atomic-frag-and-dstopts": lambda i: (
        v6()
        / IPv6ExtHdrFragment(m=0, offset=0, id=i)
        / IPv6ExtHdrDestOpt()
        / TCP(sport=i, dport=5201, flags="S")
    ),
    "syn-behind-8-dstopts": lambda i: v6() / dstopts(8) / TCP(sport=i, dport=5201, flags="S"),
    "ack-behind-8-dstopts": lambda i: v6() / dstopts(8) / TCP(sport=i, dport=5201, flags="A"),
    "syn-behind-9-dstopts": lambda i: v6() / dstopts(9) / TCP(sport=i, dport=5201, flags="S"),
    "syn-behind-ah": lambda i: v6() / ah() / TCP(sport=i, dport=5201, flags="S"),
    "ack-behind-ah": lambda i: v6() / ah() / TCP(sport=i, dport=5201, flags="A"),
    "v4-ack-behind-ah": lambda i: v4() / ah() / TCP(sport=i, dport=5201, flags="A"),
    "rst-behind-5-dstopts": lambda i: v6() / dstopts(5) / TCP(sport=i, dport=5201, flags="R"),
    "udp-blocked-port-behind-5-dstopts": lambda i: v6() / dstopts(5) / UDP(sport=53, dport=i),
    "fragment-behind-dstopts": lambda i: (
        v6() / dstopts(2) / IPv6ExtHdrFragment(m=1, id=i, nh=17) / UDP(sport=4000, dport=i)
    ),
    "later-fragment-behind-dstopts": lambda i: (
        v6() / dstopts(2) / IPv6ExtHdrFragment(m=0, offset=100, id=i, nh=17) / (b"f" * 16)
    ),
    "triple-vlan-from-blocked": lambda i: (
        Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / v4(BLOCKED_V4) / UDP(sport=i, dport=9)
    ),
    "blocked-behind-8-dstopts": lambda i: v6(BLOCKED_V6) / dstopts(8) / UDP(sport=4000, dport=i),
}


def nd_from_blocked(origin_mac: str) -> Packet:
    """A neighbour solicitation for the origin from a blocked /48, with its link address."""
    return (
        IPv6(src=BLOCKED_V6, dst="ff02::1:ff00:2", hlim=255)
        / ICMPv6ND_NS(tgt=ORIGIN_V6)
        / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:0b:ad")
    )


def mac(n: int) -> str:
    return f"02:00:00:00:{n >> 8:02x}:{n & 255:02x}"


# What only the fragment policy stops: with "frags pass" these are let through.
UDP_FRAGMENTS = ("fragment-behind-dstopts", "later-fragment-behind-dstopts")


@pytest.mark.parametrize("frags", ["drop", "pass"])
def test_no_bypass_reaches_the_origin(tmp_path: Path, frags: str) -> None:
    with lab(queues=2) as the_lab, the_lab.server(5201), Appliance(the_lab, tmp_path) as app:
        app.cli("tcp", "mode", "on")
        app.cli("tcp", "config", "--learn", "0")
        app.cli("block", "add", "198.19.0.0/16", BLOCKED_V6_NET)
        app.cli("ports", "add", "53")
        app.cli("frags", frags)
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        attacks = {n: b for n, b in ATTACKS.items() if frags == "drop" or n not in UDP_FRAGMENTS}
        names = [*attacks, "nd-from-blocked", "control"]
        macs = {name: mac(0x100 + i) for i, name in enumerate(names)}
        frames: list[bytes] = []
        for name, build in attacks.items():
            for i in range(PER_ATTACK):
                frames.append(bytes(Ether(src=macs[name], dst=origin.mac) / build(1024 + i)))
        nd = Ether(src=macs["nd-from-blocked"], dst="33:33:ff:00:00:02") / nd_from_blocked(
            origin.mac
        )
        frames += [bytes(nd)] * 10
        control = (
            Ether(src=macs["control"], dst=origin.mac)
            / v6()
            / dstopts(5)
            / UDP(sport=4000, dport=9)
        )
        frames += [bytes(control)] * 10

        def inject() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind(("eth0", 0))
                for frame in frames:
                    raw.send(frame)

        matches = {name: f"ether saddr {m}" for name, m in macs.items()}
        with the_lab.origin_counters(**matches) as counts:
            with Ledger(the_lab, app) as ledger:
                Netns(the_lab.client_ns).run(inject)
            acct = ledger.account()
            seen = counts()
        acct.check()
        assert seen.pop("control") > 0, seen  # the count works
        assert seen == dict.fromkeys(seen, 0), seen
        # The origin learnt no neighbour from the blocked /48.
        neigh = the_lab.ns_exec(the_lab.origin_ns, "ip", "-6", "neigh", "show", BLOCKED_V6)
        assert neigh.stdout.strip() == "", neigh.stdout
        # Each attack was stopped where it should be, and counted there.
        xdp = ["ext_header_limit", "blocklist", "udp_src_port", "syn_challenged"]
        xdp.append("challenge_failed")
        loop = ["tcp_no_flow"]
        # The atomic fragment's SYN: the fragment policy, or else the TCP stage.
        (xdp if frags == "drop" else loop).append("fragment" if frags == "drop" else "tcp_fragment")
        for reason in xdp:
            assert acct.xdp.get(reason, 0) > 0, (reason, acct)
        for reason in loop:
            assert acct.loop.get(reason, 0) > 0, (reason, acct)


def test_frames_that_are_not_ip_are_policed(tmp_path: Path) -> None:
    """Issue 23, 1: with every client address blocked and every IP frame
    refused by rules, frames of a local experimental ethertype (unicast and
    broadcast), IPv4 in MPLS and in LLC/SNAP, and an ARP request from a
    blocked address that would poison the origin's entry for the client:
    none reaches the origin (320,002 of 320,002 did). 'l2 allow' lets the
    experimental ethertype through, and only it."""
    from scapy.layers.l2 import ARP

    client_v4 = "169.254.0.1"
    with lab(queues=2) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("block", "add", "169.254.0.0/16", "198.18.0.0/15", "2001:db8::/32")
        app.cli("frags", "drop")
        app.cli("rule", "add", "dst", "0.0.0.0/0", "drop", "--force")
        app.cli("rule", "add", "dst", "::/0", "drop", "--force")
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        before = the_lab.ns_exec(the_lab.origin_ns, "ip", "neigh", "show", client_v4).stdout
        payload = bytes(v4(client_v4) / UDP(sport=4000, dport=9))
        kinds = {
            "experimental": Ether(src=mac(1), dst=origin.mac, type=0x88B5) / (b"x" * 46),
            "experimental-bcast": Ether(src=mac(2), dst="ff:ff:ff:ff:ff:ff", type=0x88B5)
            / (b"x" * 46),
            "mpls": Ether(src=mac(3), dst=origin.mac, type=0x8847)
            / bytes.fromhex("00001140")
            / payload,
            "snap": bytes.fromhex(origin.mac.replace(":", "") + mac(4).replace(":", ""))
            + (8 + len(payload)).to_bytes(2, "big")
            + bytes.fromhex("aaaa030000000800")
            + payload,
            # "who has 169.254.0.2? tell 169.254.0.1 (at the attacker's MAC)"
            "arp-poison": Ether(src=mac(5), dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=mac(5), psrc=client_v4, pdst=ORIGIN_V4),
            "ipv4-control": Ether(src=mac(6), dst=origin.mac) / v4(client_v4) / UDP(dport=9),
        }
        frames = [bytes(f) for f in kinds.values()]

        matches = {name: f"ether saddr {mac(i + 1)}" for i, name in enumerate(kinds)}
        with the_lab.origin_counters(**matches) as counts:
            with Ledger(the_lab, app) as ledger:
                the_lab.inject(frames * 1000)
            acct = ledger.account()
            seen = counts()
            acct.check()
            assert seen == dict.fromkeys(kinds, 0), seen
            assert acct.xdp.get("l2_other", 0) >= 4000, acct
            after = the_lab.ns_exec(the_lab.origin_ns, "ip", "neigh", "show", client_v4).stdout
            assert mac(5) not in after and after == before, (before, after)

            # The operator allows the experimental ethertype: it, and only it, passes.
            assert "0x88b5" in app.cli("l2", "allow", "0x88b5").stdout
            bad = app.cli("l2", "allow", "0x8847", check=False)
            assert bad.returncode == 1 and "MPLS carries IP" in bad.stderr
            with Ledger(the_lab, app) as ledger:
                the_lab.inject(frames * 100)
            ledger.account().check()
            seen = counts()
        assert seen["experimental"] == seen["experimental-bcast"] == 100, seen
        assert {k: v for k, v in seen.items() if not k.startswith("experimental")} == dict.fromkeys(
            [k for k in kinds if not k.startswith("experimental")], 0
        ), seen
