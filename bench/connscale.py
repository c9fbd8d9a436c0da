#!/usr/bin/env python3
"""Many long-lived TCP connections through the lab, held open and checked.

    ip netns exec client-ns bench/connscale.py run --conns 100000 --hold 60
    (the lab of netns-setup.sh with ANYPORT=1, scripts/anyport-origin.py at the origin)

Opens --conns connections from the client's addresses (--sources) to every
(address, port) of the service prefix (--addrs addresses of 169.254.100.0/24
or 2001:db8:100::/64, --ports ports from --port-base), more than the
ephemeral ports of one source address would allow: each socket is bound to
its source address with IP_BIND_ADDRESS_NO_PORT before it connects, so the
kernel picks the source port for the whole 4-tuple, and connections to
distinct destinations share source ports (the "connectx" technique). A
process may hold at most 20,000 files here, so the connections are spread
over worker processes of at most --per-proc each.

While held, every connection sends a small numbered line every --interval
seconds and checks that the origin echoes it. It reports connections
established, failed, reset and stalled (no echo in time), the time to
establish them, and its own memory; it stops by itself after --hold
seconds (and never opens more than --conns).

The same machinery (ConnScale) serves the tests: open, hold, check on
demand, close.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import math
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h
IN_FLIGHT = 2000  # connects waiting for their handshake, per worker
PER_PROC = 16_000
HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Plan:
    sources: tuple[str, ...]
    prefix: str
    addrs: int
    port_base: int
    ports: int

    def dest(self, i: int) -> tuple[str, str, int]:
        """Connection ``i``'s (source, destination address, destination port)."""
        net = ipaddress.ip_network(self.prefix)
        port = self.port_base + i % self.ports
        addr = str(net[1 + (i // self.ports) % self.addrs])
        src = self.sources[i % len(self.sources)]
        return src, addr, port


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Worker:
    """Connections [lo, hi) of a plan, in this process."""

    def __init__(self, plan: Plan, lo: int, hi: int, in_flight: int = IN_FLIGHT) -> None:
        self.plan, self.lo, self.hi, self.in_flight = plan, lo, hi, in_flight
        self.conns: list[socket.socket] = []
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.seq = 0

    def open(self, timeout: float) -> dict[str, Any]:
        start = time.monotonic()
        sel = selectors.DefaultSelector()
        pending = 0
        i = self.lo
        deadline = start + timeout
        while (i < self.hi or pending) and time.monotonic() < deadline:
            while i < self.hi and pending < self.in_flight:
                src, dst, port = self.plan.dest(i)
                i += 1
                fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setblocking(False)
                try:
                    s.bind((src, 0))
                    s.connect_ex((dst, port))
                except OSError:
                    s.close()
                    self.failed += 1
                    continue
                sel.register(s, selectors.EVENT_WRITE)
                pending += 1
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                pending -= 1
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    s.close()
                    self.failed += 1
                    name = errno.errorcode.get(err, str(err))
                    self.errors[name] = self.errors.get(name, 0) + 1
                else:
                    self.conns.append(s)
        for key in list(sel.get_map().values()):  # still connecting at the deadline
            key.fileobj.close()  # type: ignore[union-attr]
            self.failed += 1
        self.failed += self.hi - i
        return {
            "event": "open",
            "established": len(self.conns),
            "failed": self.failed,
            "seconds": time.monotonic() - start,
            "rss_kb": rss_kb(),
            "errors": self.errors,
        }

    def check(self, timeout: float) -> dict[str, Any]:
        """One numbered line each way on every connection: ok, reset or stalled."""
        self.seq += 1
        want = f"{self.seq}\n".encode()
        sel = selectors.DefaultSelector()
        ok = reset = 0
        got: dict[int, bytes] = {}
        for s in self.conns:
            try:
                s.send(want)
            except OSError:
                reset += 1
                continue
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(64)
                except OSError:
                    data = b""
                if not data:
                    reset += 1
                    sel.unregister(s)
                    continue
                got[s.fileno()] = got.get(s.fileno(), b"") + data
                if got[s.fileno()] == want:
                    ok += 1
                    sel.unregister(s)
        stalled = len(sel.get_map())
        return {"event": "check", "ok": ok, "reset": reset, "stalled": stalled,
                "rss_kb": rss_kb()}  # fmt: skip

    def close(self) -> None:
        for s in self.conns:
            s.close()
        self.conns = []


def worker_main(args: argparse.Namespace) -> int:
    """One worker process, driven over stdin: check | quit."""
    plan = Plan(tuple(args.sources.split(",")), args.prefix, args.addrs, args.port_base, args.ports)
    w = Worker(plan, args.lo, args.hi, args.in_flight)
    print(json.dumps(w.open(args.timeout)), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "check":
            print(json.dumps(w.check(args.timeout)), flush=True)
        elif cmd == "quit":
            break
    w.close()
    print(json.dumps({"event": "closed"}), flush=True)
    return 0


class ConnScale:
    """``conns`` connections from ``netns`` over worker processes (for tests and benches)."""

    def __init__(
        self,
        netns: str | None,
        conns: int,
        sources: tuple[str, ...],
        prefix: str = "169.254.100.0/24",
        addrs: int = 1,
        ports: int = 100,
        port_base: int = 10000,
        per_proc: int = PER_PROC,
        timeout: float = 120.0,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        nprocs = max(1, math.ceil(conns / per_proc))
        step = math.ceil(conns / nprocs)
        prefix_cmd = ["ip", "netns", "exec", netns] if netns else []
        for lo in range(0, conns, step):
            self.procs.append(
                subprocess.Popen(
                    [
                        *prefix_cmd,
                        sys.executable,
                        str(HERE),
                        "worker",
                        "--sources",
                        ",".join(sources),
                        "--prefix",
                        prefix,
                        "--addrs",
                        str(addrs),
                        "--ports",
                        str(ports),
                        "--port-base",
                        str(port_base),
                        "--lo",
                        str(lo),
                        "--hi",
                        str(min(lo + step, conns)),
                        "--timeout",
                        str(timeout),
                        "--in-flight",
                        str(in_flight),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )

    def _gather(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a connscale worker died (exit {p.wait()})")
            for k, v in json.loads(line).items():
                if isinstance(v, dict):
                    merged = out.setdefault(k, {})
                    for name, n in v.items():
                        merged[name] = merged.get(name, 0) + n
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v if k != "seconds" else max(out.get(k, 0), v)
        return out

    def opened(self) -> dict[str, Any]:
        """Wait for every worker to have opened its connections; the totals."""
        return self._gather()

    def check(self) -> dict[str, Any]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("check\n")
            p.stdin.flush()
        return self._gather()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> ConnScale:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_main(args: argparse.Namespace) -> int:
    """Open, hold with periodic checks, report, stop: the standalone tool."""
    sources = tuple(args.sources.split(","))
    report: dict[str, Any] = {"conns": args.conns}
    with ConnScale(None, args.conns, sources, args.prefix, args.addrs, args.ports,
                   args.port_base, args.per_proc, args.timeout, args.in_flight) as cs:  # fmt: skip
        report["open"] = cs.opened()
        print(json.dumps(report["open"]), flush=True)
        end = time.monotonic() + args.hold
        report["checks"] = []
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            c = cs.check()
            report["checks"].append(c)
            print(json.dumps(c), flush=True)
    print(json.dumps(report), flush=True)
    last = report["checks"][-1] if report["checks"] else {"ok": report["open"]["established"]}
    return 0 if last["ok"] == args.conns else 1


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "worker"):
        p = sub.add_parser(name)
        p.add_argument("--sources", default="169.254.0.11,169.254.0.12,169.254.0.13,169.254.0.14")
        p.add_argument("--prefix", default="169.254.100.0/24")
        p.add_argument("--addrs", type=int, default=200)
        p.add_argument("--ports", type=int, default=500)
        p.add_argument("--port-base", type=int, default=10000)
        p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="connects at once, each")
        if name == "run":
            p.add_argument("--conns", type=int, default=10000)
            p.add_argument("--per-proc", type=int, default=PER_PROC)
            p.add_argument("--hold", type=float, default=30.0)
            p.add_argument("--interval", type=float, default=10.0)
        else:
            p.add_argument("--lo", type=int, required=True)
            p.add_argument("--hi", type=int, required=True)
    args = ap.parse_args()
    if args.cmd == "worker":
        return worker_main(args)
    if args.conns > 1_000_000 or args.hold > 3600:
        ap.error("bounded: at most 1,000,000 connections for at most an hour")
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
