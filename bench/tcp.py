#!/usr/bin/env python3
"""TCP protection under load: challenge rate, connection setup, flow-table cost.

xdpguard runs with one queue pinned to CPU 1; the generator is pinned to
CPU 0 and sends spoofed segments from 198.18.0.0/15.

  challenges  SYN challenges sent per second when a spoofed SYN flood is
              offered at increasing rates (`tcp mode on`).
  setup       connect() time of real clients from 24 fresh source addresses
              (so each goes through a challenge) and again once verified,
              with no flood and with a spoofed SYN flood at about half the
              challenge capacity.
  flows       forwarding rate of an established flow (a real connection
              whose in-window segment the generator replays into an XDP
              sink at the origin) with 10 flows in the table and with the
              table filled to about 1,000,000 flows by a spoofed SYN flood.

Usage: bench/tcp.py [--json PATH] (as root).
"""

from __future__ import annotations

import contextlib
import itertools
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


def measure_challenges(proc, frame: bytes, seconds: float = 2.0) -> list[dict]:  # type: ignore[no-untyped-def]
    """Sustained challenges/s at increasing offered rates, each over ``seconds``."""
    probe = xgbench.LiveGenerator(
        NAMES["CLIENT_NS"], "eth0", frame, random_saddr=True, random_sport=True
    )
    runs_per_s = 300_000 / probe.run(300_000, cpu=GEN_CPU)  # program runs/s at full load
    probe.close()
    points = []
    for ratio in (0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0):
        gen = xgbench.LiveGenerator(
            NAMES["CLIENT_NS"], "eth0", frame, random_saddr=True, random_sport=True, ratio=ratio
        )
        try:
            gen.run(20_000, cpu=GEN_CPU)
            time.sleep(0.3)
            before, sent0 = losses(proc), gen.sent()
            c0 = xgbench.control(proc, "stats")["challenges"]  # type: ignore[index]
            elapsed = gen.run(int(runs_per_s * seconds), cpu=GEN_CPU)
            c1 = xgbench.control(proc, "stats")["challenges"]  # type: ignore[index]
            after, sent = losses(proc), gen.sent() - sent0
        finally:
            gen.close()
        points.append(
            {
                "ratio": ratio,
                "offered_pps": sent / elapsed,
                "challenges_per_s": (c1["sent"] - c0["sent"]) / elapsed,
                "kernel_drops_per_s": (after["outer_rx_ring_full"] - before["outer_rx_ring_full"])
                / elapsed,
            }
        )
        p = points[-1]
        print(
            f"  offered {p['offered_pps'] / 1e6:.3f} Mpps -> {p['challenges_per_s'] / 1e6:.3f}"
            f" M challenges/s, {p['kernel_drops_per_s'] / 1e6:.3f} M/s dropped at the "
            "socket's RX ring",
            flush=True,
        )
    return points


def ratio_for(points: list[dict], pps: float) -> float:
    """The generator's ratio that offered ``pps`` in the sweep (interpolated).

    Not pps / full rate: a run that sends nothing is cheaper than one that
    sends, so thinned runs go faster and the offered rate is not linear in
    the ratio.
    """
    pts = sorted((p["offered_pps"], p["ratio"]) for p in points)
    for (p0, r0), (p1, r1) in itertools.pairwise(pts):
        if p0 <= pps <= p1:
            return r0 + (r1 - r0) * (pps - p0) / (p1 - p0)
    return pts[0][1] * pps / pts[0][0]


def losses(proc) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Where frames can be lost on the way: kernel socket drops and the loop's own."""
    st = xgbench.control(proc, "stats")
    out = {"challenges_lost": st["challenges"]["lost"]}  # type: ignore[index]
    for d in ("in", "out"):
        out[f"{d}_tx_ring_full"] = st["directions"][d]["tx_ring_full"]  # type: ignore[index]
    for side in ("outer", "inner"):
        for k in ("rx_ring_full", "rx_dropped"):
            out[f"{side}_{k}"] = sum(q["xsk"][side][k] for q in st["queues"])  # type: ignore[index]
    return out


def measure_setup(proc, frame: bytes, flood_ratio: float | None) -> dict:  # type: ignore[no-untyped-def]
    xgbench.control(proc, "tcp.verified.clear")
    before = losses(proc)
    stop = threading.Event()
    flooder = None
    if flood_ratio:
        gen = xgbench.LiveGenerator(
            NAMES["CLIENT_NS"],
            "eth0",
            frame,
            random_saddr=True,
            random_sport=True,
            ratio=flood_ratio,
        )

        def flood() -> None:
            # Long calls: each call's start and end cost an RCU grace period
            # with no frames, so short calls would make the flood bursty.
            while not stop.is_set():
                gen.run(3_000_000, cpu=GEN_CPU)

        flooder = threading.Thread(target=flood)
        flooder.start()
        time.sleep(0.3)
    sent = gen.sent if flooder else lambda: 0
    t0, sent0 = time.perf_counter(), sent()
    try:
        challenged = connect_times(SOURCES)
        verified = connect_times(SOURCES)
        flood_pps = (sent() - sent0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        if flooder:
            flooder.join()
            gen.close()
    after = losses(proc)
    return {
        "flood_pps": flood_pps,
        "challenged": summary(challenged),
        "verified": summary(verified),
        "losses": {k: after[k] - before[k] for k in after if after[k] != before[k]},
    }


def forward_rate(frame: bytes, sink: xgbench.Sink, seconds: float) -> float:
    gen = xgbench.LiveGenerator(NAMES["CLIENT_NS"], "eth0", frame)
    try:
        gen.run(50_000, cpu=GEN_CPU)
        before = sink.count()
        elapsed = gen.run(int(2_000_000 * seconds), cpu=GEN_CPU)
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
            with xgbench.xdpguard(state_dir=Path(tmp) / "a") as proc:
                xgbench.control(proc, "tcp.mode", mode="on")
                print("challenges (one worker):", flush=True)
                points = measure_challenges(proc, frame)
                top = max(p["challenges_per_s"] for p in points)
                # Sustained: the highest rate served with (almost) no drops.
                clean = max(
                    (
                        p["challenges_per_s"]
                        for p in points
                        if p["kernel_drops_per_s"] < 0.01 * p["offered_pps"]
                    ),
                    default=0.0,
                )
                report["challenges"] = {
                    "points": points,
                    "max_per_s": top,
                    "without_drops_per_s": clean,
                }
                print("connection setup:", flush=True)
                report["setup"] = {"no_flood": measure_setup(proc, frame, None)}
                # A flood at about half of what one worker challenges without
                # drops (or at all, if no point of the sweep was drop-free).
                half = 0.5 * (clean or top)
                report["setup"]["flood"] = measure_setup(proc, frame, ratio_for(points, half))
                for k, v in report["setup"].items():
                    print(f"  {k}: {v}", flush=True)

            with xgbench.xdpguard("--max-flows", "1000000", state_dir=Path(tmp) / "b") as proc:
                xgbench.control(proc, "tcp.config", syn_mode="off", state_mode="on", learn=0)
                s = Netns(NAMES["CLIENT_NS"]).run(
                    lambda: socket.create_connection((ORIGIN, PORT), timeout=5)
                )
                cport = s.getsockname()[1]
                s.send(b"x")
                time.sleep(0.2)
                flow = next(
                    f
                    for f in xgbench.control(proc, "tcp.flows", top=10)["busiest"]  # type: ignore[index]
                    if f["outside"] == f"169.254.0.1:{cport}"
                )
                # The client's next segment as the flow table sees it: an
                # in-window duplicate ACK, forever.
                segment = xgbench.tcp4_frame(
                    client.mac,
                    origin.mac,
                    "169.254.0.1",
                    ORIGIN,
                    cport,
                    PORT,
                    "A",
                    flow["sides"]["outside"]["next_seq"],
                    flow["sides"]["inside"]["next_seq"],
                )
                sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
                try:
                    few = forward_rate(segment, sink, 2.0)
                    flooder = xgbench.LiveGenerator(
                        NAMES["CLIENT_NS"], "eth0", frame, random_saddr=True, random_sport=True
                    )
                    t = time.perf_counter()
                    while time.perf_counter() - t < 8:
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
