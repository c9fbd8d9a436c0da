"""Writing pcapng (draft-ietf-opsawg-pcapng) for ``xdpguard capture``.

One section; one interface per direction (0: outer, frames towards the
origin; 1: inner, frames from it), Ethernet, nanosecond timestamps; one
Enhanced Packet Block per sample, its verdict in the packet's comment and
its direction in epb_flags. tcpdump, tshark and Wireshark read it.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from xdpguard import __version__

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_LINKTYPE_ETHERNET = 1
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9
_EPB_FLAGS = 2
_EPB_INBOUND = 1  # both devices' frames arrived on them


def _option(code: int, value: bytes) -> bytes:
    pad = -len(value) % 4
    return struct.pack("=HH", code, len(value)) + value + b"\0" * pad


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("=II", kind, total) + body + struct.pack("=I", total)


def _options(*opts: bytes) -> bytes:
    return b"".join(opts) + struct.pack("=HH", _OPT_END, 0)


class Writer:
    def __init__(self, out: BinaryIO, snaplen: int, interfaces: list[tuple[str, str]]) -> None:
        """``interfaces``: (name, description) per interface id."""
        self.out = out
        self.count = 0
        shb = struct.pack("=IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + _options(
            _option(_SHB_USERAPPL, f"xdpguard {__version__}".encode())
        )
        head = _block(_SHB, shb)
        for name, desc in interfaces:
            idb = struct.pack("=HHI", _LINKTYPE_ETHERNET, 0, snaplen) + _options(
                _option(_IF_NAME, name.encode()),
                _option(_IF_DESCRIPTION, desc.encode()),
                _option(_IF_TSRESOL, bytes((9,))),
            )
            head += _block(_IDB, idb)
        out.write(head)

    def packet(self, interface: int, ts_ns: int, data: bytes, orig_len: int, comment: str) -> None:
        body = struct.pack("=IIIII", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data),
                           orig_len)  # fmt: skip
        body += data + b"\0" * (-len(data) % 4)
        body += _options(
            _option(_OPT_COMMENT, comment.encode()),
            _option(_EPB_FLAGS, struct.pack("=I", _EPB_INBOUND)),
        )
        self.out.write(_block(_EPB, body))
        self.count += 1
