"""Frames for the parser's parity and fuzz runs: well-formed seeds and mutants.

Seeds cover what the parser walks (VLAN tags, IPv4 options and AH, IPv6
chains of every extension header, fragments, TCP/UDP/ICMP, non-IP) and a
little past its limits. Mutants damage a seed the way an attacker would:
bytes flipped, cut short or grown, length fields and next-header values
rewritten, headers inserted into chains. Everything is drawn from the
``random.Random`` the caller passes, so a seed replays a run.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterator

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
V4 = {"src": "169.254.0.1", "dst": "169.254.0.2"}
V6 = {"src": "2001:db8::1", "dst": "2001:db8::2"}

# Next-header and protocol values worth trying: every one the parser knows,
# terminal ones, and some it must refuse.
NEXT_HEADERS = [0, 1, 4, 6, 17, 41, 43, 44, 47, 50, 51, 58, 59, 60, 132, 135, 139, 140, 143,
                200, 252, 253, 254, 255]  # fmt: skip
TCP_FLAGS = ["S", "SA", "A", "PA", "R", "RA", "F", "FA", "", "SF", "SR", "FPU", "FR"]


def dstopts(n: int) -> Packet:
    """``n`` Destination Options headers, chained."""
    chain = IPv6ExtHdrDestOpt()
    for _ in range(n - 1):
        chain = chain / IPv6ExtHdrDestOpt()
    return chain


def ah(nh: int = 6) -> Packet:
    """An AH header (12 bytes of ICV) with its lengths right (scapy leaves them 0)."""
    return AH(nh=nh, payloadlen=4, spi=7, seq=1, icv=b"\0" * 12)


def _ext(rng: random.Random) -> Packet:
    kind = rng.randrange(5)
    if kind == 0:
        return IPv6ExtHdrDestOpt()
    if kind == 1:
        return IPv6ExtHdrRouting()
    if kind == 2:
        return AH(payloadlen=4, spi=rng.getrandbits(32), seq=1, icv=b"\0" * 12)
    if kind == 3:
        return IPv6ExtHdrFragment(m=rng.randrange(2), offset=rng.choice((0, 0, 1, 100)), id=9)
    return IPv6ExtHdrHopByHop()


def _l4(rng: random.Random, v6: bool) -> Packet:
    kind = rng.randrange(4)
    if kind == 0:
        return TCP(
            sport=rng.randrange(65536),
            dport=rng.choice((80, 443, 5201)),
            flags=rng.choice(TCP_FLAGS),
            seq=rng.getrandbits(32),
            ack=rng.getrandbits(32),
            options=rng.choice(([], [("MSS", 1460)], [("MSS", 1460), ("WScale", 7)])),
        ) / Raw(bytes(rng.randrange(40)))
    if kind == 1:
        return UDP(sport=rng.choice((53, 123, 4000)), dport=rng.randrange(65536)) / Raw(
            bytes(rng.randrange(40))
        )
    if kind == 2:
        return ICMPv6EchoRequest() if v6 else ICMP()
    return Raw(bytes(rng.randrange(1, 40)))


def _set_nh(chain: list[Packet]) -> None:
    """scapy leaves AH's next header at 0: name the header that follows."""
    for hdr, nxt in itertools.pairwise(chain):
        if isinstance(hdr, AH):
            hdr.nh = {TCP: 6, UDP: 17, ICMP: 1, ICMPv6EchoRequest: 58}.get(type(nxt), 59)


def seed(rng: random.Random) -> bytes:
    """One well-formed (or just past a limit) frame."""
    eth: Packet = ETH.copy()
    for _ in range(rng.choice((0, 0, 0, 1, 2, 3))):
        eth = eth / (Dot1Q(vlan=rng.randrange(4096)) if rng.random() < 0.7 else Dot1AD(vlan=7))
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(eth / ARP(psrc=V4["src"], pdst=V4["dst"]))
    if kind == 1:
        return bytes(
            eth / IPv6(src=V6["src"], dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt=V6["dst"])
        )
    if kind < 5:
        ip = IP(**V4, options=[IPOption_NOP()] * rng.choice((0, 0, 4)))
        if rng.random() < 0.2:
            ip.flags, ip.frag = rng.choice((("MF", 0), ("", 185), ("MF", 1), ("DF", 0)))
        chain = [ip]
        if rng.random() < 0.1:
            chain.append(AH(payloadlen=4, spi=5, seq=1, icv=b"\0" * 12))
        chain.append(_l4(rng, False))
    else:
        chain = [IPv6(**V6)]
        chain += [_ext(rng) for _ in range(rng.choice((0, 1, 2, 3, 5, 8, 9, 10)))]
        chain.append(_l4(rng, True))
    _set_nh(chain)
    pkt = eth
    for hdr in chain:
        pkt = pkt / hdr
    return bytes(pkt)


def _put16(b: bytearray, off: int, value: int) -> None:
    if off + 2 <= len(b):
        b[off : off + 2] = struct.pack("!H", value & 0xFFFF)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One to three damages to ``frame``."""
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(max(len(b), 1))
        if op == 0 and b:  # flip a bit
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # a random byte
            b[pos] = rng.randrange(256)
        elif op == 2:  # cut short
            del b[rng.randrange(len(b) + 1) :]
        elif op == 3:  # grow (trailing garbage, as Ethernet padding or worse)
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif op == 4:  # insert bytes mid-frame
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 4, 8))))
        elif op == 5:  # a next-header / protocol value somewhere a header starts
            if b:
                b[pos] = rng.choice(NEXT_HEADERS)
        elif op == 6:  # an IPv4 total length / IPv6 payload length
            _put16(b, 14 + rng.choice((2, 4, 6)), rng.choice((0, 1, 20, 40, len(b), 0xFFFF)))
        elif op == 7:  # a header length byte (ihl, hdrlen, doff)
            if b:
                b[pos] = rng.choice((0, 1, 2, 0x45, 0x4F, 0x50, 0xF0, 255))
        elif op == 8 and len(b) > 14:  # the ethertype
            _put16(b, 12, rng.choice((0x0800, 0x86DD, 0x8100, 0x88A8, 0x9100, 0x0806, 0)))
    return bytes(b)


def corpus(rng: random.Random, n: int, seeds: int = 400) -> Iterator[bytes]:
    """``n`` frames: the seeds, then mutants of them (one in eight left whole)."""
    base = [seed(rng) for _ in range(min(seeds, n))]
    yield from base
    for _ in range(n - len(base)):
        f = rng.choice(base)
        yield f if rng.random() < 0.125 else mutate(rng, f)


def tcp4_with_seq(frame: bytearray, seq: int) -> bytes:
    """An Ethernet/IPv4 (no options)/TCP (no options, no payload) ``frame``
    with another sequence number and its TCP checksum right: scapy is too
    slow for the 65,536 frames of a blind sweep."""
    frame[38:42] = seq.to_bytes(4, "big")
    frame[50:52] = b"\0\0"
    tcp = frame[34:54]
    words = frame[26:34] + b"\0\x06" + len(tcp).to_bytes(2, "big") + tcp
    total = sum(int.from_bytes(words[i : i + 2], "big") for i in range(0, len(words), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    frame[50:52] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(frame)
