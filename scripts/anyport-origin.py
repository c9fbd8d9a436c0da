#!/usr/bin/env python3
"""An origin that accepts TCP on every port of a service prefix: the lab's
stand-in for an anycast service (Spectrum's any-port setup).

    ip netns exec origin-ns .venv/bin/python scripts/anyport-origin.py [--workers N]

The prefix (169.254.100.0/24 and 2001:db8:100::/64) is routed as local in
the origin's namespace (netns-setup.sh with ANYPORT=1), so the kernel takes
SYNs to any address of it. One listening socket per family gets every
connection to any port: an sk_lookup program (scripts/xg_anyport.bpf.c)
assigns it. sk_lookup rather than TPROXY: it needs no iptables rules, no
policy routing and no IP_TRANSPARENT, and it is one small program the lab
attaches to one namespace and detaches by closing a file.

Everything received is echoed back. A process here may hold at most 20,000
files, so --workers processes accept from the same two listeners and each
serves its own connections (ceil(expected / 16,000) of them). Prints
"serving ..." once it accepts; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OBJ = HERE / "xg_anyport.bpf.o"


def listeners() -> list[socket.socket]:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    out = []
    for s, addr in ((v4, ("127.0.0.1", 0)), (v6, ("::1", 0))):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(4096)
        s.setblocking(False)
        out.append(s)
    return out


def steer(socks: list[socket.socket]) -> tuple[object, int]:
    """Load the sk_lookup program, give it the listeners, attach it here."""
    from xdpguard import _bindings as B

    prog = B.Prog(str(OBJ), "anyport")
    fd = prog.map_fd("anyport_socks")
    for key, s in enumerate(socks):
        B.map_update(fd, struct.pack("=I", key), struct.pack("=Q", s.fileno()))
    netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        link = B.netns_link(prog.fd, netns)
    finally:
        os.close(netns)
    return prog, link


def serve(socks: list[socket.socket], stop: list[bool]) -> None:
    """Accept from the shared listeners and echo, until stopped."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ, None)
    while not stop[0]:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            if key.data is None:  # a listener
                try:
                    conn, _ = s.accept()  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue  # another worker took it
                except OSError:  # out of files: the others take the rest
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, b"")
                continue
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                try:
                    s.sendall(data)  # type: ignore[union-attr]
                except OSError:
                    data = b""
            if not data:
                sel.unregister(s)
                s.close()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    socks = listeners()
    _prog, link = steer(socks)
    stop = [False]

    def on_signal(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children = []
    for _ in range(max(args.workers, 1) - 1):
        pid = os.fork()
        if pid == 0:
            os.close(link)
            serve(socks, stop)
            os._exit(0)
        children.append(pid)
    print(f"serving any port of 169.254.100.0/24 and 2001:db8:100::/64, {args.workers} worker(s)",
          flush=True)  # fmt: skip
    try:
        serve(socks, stop)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
