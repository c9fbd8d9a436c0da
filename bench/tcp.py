#!/usr/bin/env python3
"""TCP protection under load: the flow table's cost to an established flow.

xdpguard runs with one queue pinned to CPU 1; the generator is pinned to
CPU 0.

  flows       forwarding rate of an established flow (a real connection
              whose in-window segment the generator replays into an XDP
              sink at the origin) with 10 flows in the table and with the
              table filled to about 1,000,000 flows by a spoofed SYN flood.

The challenges (rate, connection setup under floods) are bench/challenge.py's;
this module also holds the real clients both use.

Usage: bench/tcp.py [--json PATH] (as root).
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from xgbench import GEN_CPU, NAMES, lab, sh  # noqa: E402

from xdpguard.netns import Netns, resolve_device  # noqa: E402

ORIGIN, PORT = "169.254.0.2", 5201
SOURCES = [f"169.254.0.{i}" for i in range(100, 124)]


def server(stop: threading.Event) -> threading.Thread:
    """A listener in the origin's namespace that accepts and holds connections."""
    ready = threading.Event()
    held: list[socket.socket] = []

    def body() -> None:
        def listen() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", PORT))
            s.listen(4096)
            return s

        lsock = Netns(NAMES["ORIGIN_NS"]).run(listen)
        lsock.settimeout(0.2)
        ready.set()
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(lsock.accept()[0])
        lsock.close()
        for s in held:
            s.close()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    ready.wait(5)
    return t


def connect_times(sources: list[str]) -> list[float]:
    def dial() -> list[float]:
        out = []
        for src in sources:
            t = time.perf_counter()
            with socket.create_connection((ORIGIN, PORT), timeout=5, source_address=(src, 0)):
                out.append(time.perf_counter() - t)
        return out

    return Netns(NAMES["CLIENT_NS"]).run(dial)


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    return {
        "median_ms": statistics.median(ms),
        "p95_ms": ms[int(0.95 * (len(ms) - 1))],
        "max_ms": ms[-1],
    }


def syn_frame(client_mac: str, origin_mac: str) -> bytes:
    return xgbench.tcp4_frame(client_mac, origin_mac, "198.18.0.1", ORIGIN, 40000, PORT, "S")


def forward_rate(frame: bytes, sink: xgbench.Sink, seconds: float) -> float:
    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame)
    try:
        gen.run(50_000, cpu=GEN_CPU)
        before = sink.count()
        elapsed = gen.run(int(1_000_000 * seconds), cpu=GEN_CPU)
        time.sleep(0.1)
        return (sink.count() - before) / elapsed
    finally:
        gen.close()


def main() -> int:
    ap = xgbench.arguments(__doc__, "tcp")
    args = xgbench.parse_as_root(ap)
    report: dict = xgbench.report("TCP protection")
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp, lab(edge=False):
        for src in SOURCES:
            sh("ip", "-n", NAMES["CLIENT_NS"], "addr", "add", f"{src}/24", "dev", "eth0")
        client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
        origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
        frame = syn_frame(client.mac, origin.mac)
        srv = server(stop)
        # Answers to spoofed sources must not flood the client host's stack.
        shield = xgbench.attach(NAMES["CLIENT_NS"], "eth0", "xg_drop_spoofed")
        try:
            with xgbench.xdpguard("--max-flows", "1000000", state_dir=Path(tmp) / "b") as proc:
                xgbench.control(proc, "tcp.config", syn_mode="off", state_mode="on", learn=0)
                s = Netns(NAMES["CLIENT_NS"]).run(
                    lambda: socket.create_connection((ORIGIN, PORT), timeout=5)
                )
                cport = s.getsockname()[1]
                s.send(b"x")
                time.sleep(0.2)
                segment = xgbench.flow_segment(proc, client.mac, origin.mac, cport, ORIGIN, PORT)
                sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
                try:
                    few = forward_rate(segment, sink, 2.0)
                    flooder = xgbench.Generator(
                        NAMES["CLIENT_NS"], "eth0", frame, random_saddr=True, random_sport=True
                    )
                    t = time.perf_counter()
                    while time.perf_counter() - t < 20:
                        flooder.run(300_000, cpu=GEN_CPU)
                        tracked = xgbench.control(proc, "tcp.flows", top=0)["tracked"]  # type: ignore[index]
                        if tracked >= 950_000:
                            break
                    flooder.close()
                    many = forward_rate(segment, sink, 2.0)
                    tracked_after = xgbench.control(proc, "tcp.flows", top=0)  # type: ignore[index]
                finally:
                    sink.close()
                    s.close()
                report["flows"] = {
                    "few_flows_pps": few,
                    "tracked": tracked_after["tracked"],
                    "many_flows_pps": many,
                    "ratio": many / few,
                    "evictions": tracked_after["evictions"],
                }
                print(
                    f"established flow forwarded: {few / 1e6:.3f} Mpps with 10 flows, "
                    f"{many / 1e6:.3f} Mpps with {tracked_after['tracked']} tracked",
                    flush=True,
                )
        finally:
            shield.close()
            stop.set()
            srv.join(3)

    xgbench.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
