#!/usr/bin/env python3
"""Forwarding rate client -> origin, 64-byte UDP, one queue, against the alternatives.

Every configuration runs in the same invocation, on the same machine, with
the same generator and the same sink:

  xdpguard     xdpguard run --queues 1 --fast-path off, its process pinned
               to CPU 1: every frame through the AF_XDP loop (fastpath.py
               measures the XDP fast path, on by default)
  bare-afxdp   the same, --no-policy: the same UMEM and rings, no per-frame logic
  bridge-rps   Linux bridge between outer and inner in one namespace, RPS
               steering the forwarding to CPU 1 (the core the worker gets)
  bridge       the same bridge without RPS: it forwards inside the
               generator's own softirq on CPU 0 (reference only)

Load: bench/xg_bench.bpf.o's xg_gen in live-frame mode on the client's eth0,
pinned to CPU 0, thinned inside the program to a set fraction of its full
rate. Sink: xg_sink on the origin's eth0 counts and drops in XDP. For each
offered load the forwarded rate is the sink's count over the generator's
run time. Per-CPU busy time comes from /proc/stat over each run.

Usage: bench/forwarding.py [--seconds-per-point S] [--json PATH]
(as root; builds and removes its own labs).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from xgbench import EDGE_NS, FWD_CPU, GEN_CPU, NAMES, cpu_times, lab, sh  # noqa: E402

from xdpguard.netns import Netns, resolve_device  # noqa: E402

RATIOS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@contextmanager
def bridge(rps: bool, xdp_on: tuple[str, ...] = ("OUTER",)):
    """Kernel forwarding: inner joins outer's namespace, a bridge links them.
    ``xdp_on`` (NAMES keys) get a pass-through XDP program."""
    sh("ip", "-n", NAMES["INNER_NS"], "link", "set", NAMES["INNER"], "netns", EDGE_NS)
    e = ["ip", "-n", EDGE_NS]
    sh(*e, "link", "add", "xgb-br", "type", "bridge")
    sh(*e, "link", "set", NAMES["OUTER"], "master", "xgb-br")
    sh(*e, "link", "set", NAMES["INNER"], "master", "xgb-br")
    sh(*e, "link", "set", NAMES["INNER"], "up")
    sh(*e, "link", "set", "xgb-br", "up")
    if rps:
        sh(
            "ip",
            "netns",
            "exec",
            EDGE_NS,
            "sh",
            "-c",
            f"echo {1 << FWD_CPU:x} > /sys/class/net/{NAMES['OUTER']}/queues/rx-0/rps_cpus",
        )
    # A veth takes XDP_TX frames (the generator's) from its peer only with
    # XDP (or GRO) on.
    progs = [xgbench.attach(EDGE_NS, NAMES[dev], "xg_pass") for dev in xdp_on]
    try:
        yield None
    finally:
        for prog in progs:
            prog.close()


def sweep(seconds: float) -> list[dict]:
    """Offer each load in RATIOS; what the sink saw."""
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    frame = xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", "169.254.0.2", 40000, 9, 60)
    sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
    points = []
    try:
        # Calibrate: program runs per second at full load, to size each point.
        probe = xgbench.LiveGenerator(NAMES["CLIENT_NS"], "eth0", frame)
        rate = 200_000 / probe.run(200_000, cpu=GEN_CPU)
        probe.close()
        for ratio in RATIOS:
            gen = xgbench.LiveGenerator(NAMES["CLIENT_NS"], "eth0", frame, ratio=ratio)
            runs = int(min(rate / max(ratio, 0.05), 20e6) * seconds)
            time.sleep(0.3)
            c0, t0 = sink.count(), cpu_times()
            elapsed = gen.run(runs, cpu=GEN_CPU)
            t1 = cpu_times()
            time.sleep(0.2)
            got = sink.count() - c0
            busy = [(b1 - b0) / max(a1 - a0, 1) for (b0, a0), (b1, a1) in zip(t0, t1, strict=True)]
            points.append(
                {
                    "ratio": ratio,
                    "offered_pps": gen.sent() / elapsed,
                    "forwarded_pps": got / elapsed,
                    "seconds": elapsed,
                    "cpu_busy": busy,
                }
            )
            gen.close()
    finally:
        sink.close()
    return points


def idle_cpu(pid: int, seconds: float = 5.0) -> float:
    time.sleep(1.0)
    return xgbench.CpuMeter(pid).measure(seconds)


def summarize(name: str, points: list[dict], idle: float | None) -> dict:
    sat = max(p["forwarded_pps"] for p in points)
    top = max(points, key=lambda p: p["offered_pps"])
    return {
        "name": name,
        "saturated_pps": sat,
        "max_offered_pps": top["offered_pps"],
        "overload_factor": top["offered_pps"] / sat,
        "forwarded_at_max_offered_pps": top["forwarded_pps"],
        "cpu_busy_at_max": top["cpu_busy"],
        "idle_cpu": idle,
        "points": points,
    }


def main() -> int:
    ap = xgbench.arguments(__doc__, "forwarding")
    ap.add_argument("--seconds-per-point", type=float, default=1.0)
    args = xgbench.parse_as_root(ap)
    if os.cpu_count() < 2:
        ap.error("needs two CPUs: one for the generator, one for the forwarder")
    results = []
    loop = ("--fast-path", "off")
    for name, extra in (("xdpguard", loop), ("bare-afxdp", (*loop, "--no-policy"))):
        with (
            tempfile.TemporaryDirectory() as tmp,
            lab(edge=False),
            xgbench.xdpguard(*extra, state_dir=Path(tmp)) as proc,
        ):
            idle = idle_cpu(proc.pid)
            results.append(summarize(name, sweep(args.seconds_per_point), idle))
    for name, rps in (("bridge-rps", True), ("bridge", False)):
        with lab(edge=True), bridge(rps):
            results.append(summarize(name, sweep(args.seconds_per_point), None))

    by = {r["name"]: r for r in results}
    report = xgbench.report("forwarding, 64-byte UDP, one queue") | {
        "results": results,
        "xdpguard_over_bare": by["xdpguard"]["saturated_pps"] / by["bare-afxdp"]["saturated_pps"],
        "xdpguard_over_bridge_rps": (
            by["xdpguard"]["saturated_pps"] / by["bridge-rps"]["saturated_pps"]
        ),
    }
    xgbench.write_report(report, args.json)

    print(
        f"{'config':<12}{'saturated':>12}{'max offered':>14}{'x':>6}{'fwd there':>12}"
        f"{'cpu0/cpu1 busy':>16}{'idle cpu':>10}"
    )
    for r in results:
        busy = "/".join(f"{b:.0%}" for b in r["cpu_busy_at_max"][:2])
        idle = f"{r['idle_cpu']:.1%}" if r["idle_cpu"] is not None else "-"
        sat, top = r["saturated_pps"] / 1e6, r["max_offered_pps"] / 1e6
        there = r["forwarded_at_max_offered_pps"] / 1e6
        print(
            f"{r['name']:<12}{sat:>9.3f} Mp{top:>11.3f} Mp{r['overload_factor']:>6.1f}"
            f"{there:>9.3f} Mp{busy:>16}{idle:>10}"
        )
    print(f"xdpguard / bare AF_XDP: {report['xdpguard_over_bare']:.2f} (goal >= 0.9)")
    print(f"xdpguard / kernel bridge (RPS to one core): {report['xdpguard_over_bridge_rps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
