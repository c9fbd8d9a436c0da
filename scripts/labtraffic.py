#!/usr/bin/env python3
"""Real TCP and UDP endpoints for the lab; standard library only.

Run each side inside its namespace, e.g.

    ip netns exec origin-ns scripts/labtraffic.py serve --port 5201
    ip netns exec client-ns scripts/labtraffic.py send --to 169.254.0.2 --port 5201 --bytes 64M

serve   one dual-stack server for everything below (TCP on --port, UDP echo on
        the same port), until killed. A TCP connection names what it wants in
        its first line: "SINK" (read to EOF, answer the SHA-256), "SOURCE N
        SEED" (send N deterministic bytes), "ECHO" (echo to EOF).
send    client -> server bulk transfer; checks the server's SHA-256.
recv    server -> client bulk transfer; checks the SHA-256 against the seed.
many    N concurrent short TCP exchanges (connect, echo a line, close).
udp     N UDP datagrams echoed back; reports how many returned.
probe   for --seconds (or --count attempts, or --until-ok, or until SIGTERM),
        every --interval: one echo exchange from --from over UDP or TCP (a
        fresh connection each time); reports each attempt's wall-clock start
        and end and whether it succeeded within --timeout.

Client commands print one JSON object (one line of text with --text) and
exit 0 only if everything checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import socket
import socketserver
import sys
import threading
import time

CHUNK = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def stream(nbytes: int, seed: int):
    """The deterministic byte stream both ends can regenerate."""
    rng = random.Random(seed)
    left = nbytes
    while left:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def expected_digest(nbytes: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in stream(nbytes, seed):
        h.update(chunk)
    return h.hexdigest()


class TcpHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(256).decode().split()
        if not line:
            return
        if line[0] == "SINK":
            h = hashlib.sha256()
            total = 0
            while chunk := self.rfile.read1(CHUNK):
                h.update(chunk)
                total += len(chunk)
            self.wfile.write(f"{total} {h.hexdigest()}\n".encode())
        elif line[0] == "SOURCE":
            for chunk in stream(int(line[1]), int(line[2])):
                self.wfile.write(chunk)
        elif line[0] == "ECHO":
            while chunk := self.rfile.read1(CHUNK):
                self.wfile.write(chunk)


class TcpServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(args: argparse.Namespace) -> int:
    tcp = TcpServer(("::", args.port), TcpHandler)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", args.port))

    def udp_echo() -> None:
        while True:
            data, peer = udp.recvfrom(65535)
            udp.sendto(data, peer)

    threading.Thread(target=udp_echo, daemon=True).start()
    print(f"serving on port {args.port}", flush=True)
    tcp.serve_forever()
    return 0


def connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def send(args: argparse.Namespace) -> dict:
    nbytes = parse_size(args.bytes)
    h = hashlib.sha256()
    start = time.monotonic()
    with connect(args.to, args.port, args.timeout) as s:
        s.sendall(b"SINK\n")
        for chunk in stream(nbytes, args.seed):
            h.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = s.makefile().readline().split()
    secs = time.monotonic() - start
    return {
        "bytes": nbytes,
        "sha256": h.hexdigest(),
        "server": reply,
        "seconds": secs,
        "mbit_s": 8 * nbytes / secs / 1e6,
        "ok": reply == [str(nbytes), h.hexdigest()],
    }


def recv(args: argparse.Namespace) -> dict:
    nbytes = parse_size(args.bytes)
    h = hashlib.sha256()
    total = 0
    start = time.monotonic()
    with connect(args.to, args.port, args.timeout) as s:
        s.sendall(f"SOURCE {nbytes} {args.seed}\n".encode())
        while chunk := s.recv(CHUNK):
            h.update(chunk)
            total += len(chunk)
    secs = time.monotonic() - start
    want = expected_digest(nbytes, args.seed)
    return {
        "bytes": total,
        "sha256": h.hexdigest(),
        "expected": want,
        "seconds": secs,
        "mbit_s": 8 * total / secs / 1e6,
        "ok": total == nbytes and h.hexdigest() == want,
    }


def many(args: argparse.Namespace) -> dict:
    results: list[str | None] = [None] * args.conns
    barrier = threading.Barrier(args.conns, timeout=args.timeout)

    def one(i: int) -> None:
        msg = f"hello {i}\n".encode()
        try:
            with connect(args.to, args.port, args.timeout) as s:
                barrier.wait()  # all connections open at the same time
                s.sendall(b"ECHO\n" + msg)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
            results[i] = None if got == msg else f"echo mismatch: {got!r}"
        except (OSError, threading.BrokenBarrierError) as exc:
            results[i] = repr(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.conns)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if r is not None]
    return {
        "connections": args.conns,
        "failed": len(errors),
        "errors": errors[:5],
        "seconds": time.monotonic() - start,
        "ok": not errors,
    }


def udp(args: argparse.Namespace) -> dict:
    family = socket.AF_INET6 if ":" in args.to else socket.AF_INET
    got = 0
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(args.timeout)
        s.connect((args.to, args.port))
        for i in range(args.count):
            payload = f"udp {i} ".encode().ljust(args.size, b".")
            s.send(payload)
            try:
                if s.recv(65535) == payload:
                    got += 1
            except TimeoutError:
                pass
    return {"sent": args.count, "echoed": got, "ok": got >= args.count * args.min_ratio}


def probe(args: argparse.Namespace) -> dict:
    family = socket.AF_INET6 if ":" in args.to else socket.AF_INET
    events: list[tuple[float, float, bool]] = []
    end = time.monotonic() + args.seconds
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    udp_sock = None
    if args.proto == "udp":
        udp_sock = socket.socket(family, socket.SOCK_DGRAM)
        udp_sock.bind((args.src, 0))
        udp_sock.connect((args.to, args.port))
        udp_sock.settimeout(args.timeout)
    seq = 0
    while time.monotonic() < end and not stop.is_set() and len(events) < args.count:
        started, wall = time.monotonic(), time.time()
        ok = False
        seq += 1
        try:
            if udp_sock is not None:
                payload = f"probe {seq}".encode()
                udp_sock.send(payload)
                deadline = started + args.timeout
                while not ok and time.monotonic() < deadline:
                    udp_sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    ok = udp_sock.recv(2048) == payload  # late echoes of earlier probes: skip
            else:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(args.timeout)
                    s.bind((args.src, 0))
                    s.connect((args.to, args.port))
                    s.sendall(b"ECHO\nprobe\n")
                    s.shutdown(socket.SHUT_WR)
                    ok = s.recv(64) == b"probe\n"
        except OSError:
            ok = False
        events.append((wall, time.time(), ok))
        if ok and args.until_ok:
            break
        stop.wait(max(0.0, args.interval - (time.monotonic() - started)))
    return {"events": events, "ok": any(ok for _, _, ok in events)}


TEXT = {
    "send": "sent {bytes} bytes in {seconds:.2f}s ({mbit_s:.0f} Mbit/s), SHA-256 match: {ok}",
    "recv": "received {bytes} bytes in {seconds:.2f}s ({mbit_s:.0f} Mbit/s), SHA-256 match: {ok}",
    "many": "{connections} concurrent connections, {failed} failed, in {seconds:.2f}s",
    "udp": "{echoed}/{sent} UDP datagrams echoed",
    "probe": "{events}",
}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("--port", type=int, default=5201)
    for name in ("send", "recv", "many", "udp", "probe"):
        c = sub.add_parser(name)
        c.add_argument("--text", action="store_true", help="one line for people, not JSON")
        c.add_argument("--to", required=True)
        c.add_argument("--port", type=int, default=5201)
        c.add_argument("--timeout", type=float, default=20.0)
        if name in ("send", "recv"):
            c.add_argument("--bytes", default="64M")
            c.add_argument("--seed", type=int, default=1)
        if name == "many":
            c.add_argument("--conns", type=int, default=200)
        if name == "probe":
            c.add_argument("--from", dest="src", required=True)
            c.add_argument("--proto", choices=("udp", "tcp"), default="udp")
            c.add_argument("--interval", type=float, default=0.05)
            c.add_argument("--seconds", type=float, default=5.0)
            c.add_argument("--count", type=int, default=1 << 30, help="at most this many")
            c.add_argument("--until-ok", action="store_true", help="stop at the first success")
        if name == "udp":
            c.add_argument("--count", type=int, default=100)
            c.add_argument("--size", type=int, default=64)
            c.add_argument("--min-ratio", type=float, default=1.0)
    args = p.parse_args()
    if args.cmd == "serve":
        return serve(args)
    result = {"send": send, "recv": recv, "many": many, "udp": udp, "probe": probe}[args.cmd](args)
    print(TEXT[args.cmd].format(**result) if args.text else json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
