"""A small pcapng reader for the tests: blocks, interfaces, packets and their comments.

Written from the format's specification (draft-ietf-opsawg-pcapng), apart
from xdpguard.pcapng, so that a writer's mistake is not read back as right.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass
class Packet:
    interface: int
    ts: int  # in the interface's units (xdpguard: ns)
    data: bytes
    orig_len: int
    comment: str | None
    flags: int | None


def _options(raw: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    i = 0
    while i + 4 <= len(raw):
        code, n = struct.unpack_from("<HH", raw, i)
        if code == 0:
            break
        out.setdefault(code, []).append(raw[i + 4 : i + 4 + n])
        i += 4 + n + (-n % 4)
    return out


def read_pcapng(buf: bytes) -> list[Packet]:
    """The Enhanced Packet Blocks of a little-endian pcapng file; AssertionError
    for anything malformed."""
    packets: list[Packet] = []
    i = 0
    interfaces = 0
    while i < len(buf):
        kind, total = struct.unpack_from("<II", buf, i)
        assert total % 4 == 0 and total >= 12 and i + total <= len(buf), (i, kind, total)
        assert struct.unpack_from("<I", buf, i + total - 4)[0] == total, "trailing length"
        body = buf[i + 8 : i + total - 4]
        if kind == 0x0A0D0D0A:
            assert struct.unpack_from("<I", body, 0)[0] == 0x1A2B3C4D
        elif kind == 1:
            interfaces += 1
        elif kind == 6:
            iface, hi, lo, cap, orig = struct.unpack_from("<IIIII", body, 0)
            assert iface < interfaces, "a packet of an interface not described"
            data = body[20 : 20 + cap]
            opts = _options(body[20 + cap + (-cap % 4) :])
            comment = opts.get(1, [None])[0]
            flags = opts.get(2, [None])[0]
            packets.append(Packet(iface, hi << 32 | lo, data, orig,
                                  comment.decode() if comment is not None else None,
                                  struct.unpack("<I", flags)[0] if flags else None))  # fmt: skip
        i += total
    return packets
