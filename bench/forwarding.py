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

Load: xgbench.Generator (a TX-only AF_XDP socket in copy mode) on the
client's eth0, pinned to CPU 0, paced to fractions of its own ceiling
(measured alone into a sink first). Sink: xg_sink on the origin's eth0
counts and drops in XDP. For each offered load the forwarded rate is the
sink's count over the generator's run time. Per-CPU busy time comes from
/proc/stat over each run; CPU 1's busy time per frame at a fixed load is
the DUT's cost where the generator, not the DUT, is the limit.

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
from xgbench import EDGE_NS, FWD_CPU, GEN_CPU, NAMES, RATE_POINTS, cpu_times, lab, sh  # noqa: E402

from xdpguard.netns import Netns, resolve_device  # noqa: E402


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


def sweep(seconds: float, ceiling: float) -> list[dict]:
    """Offer each load of RATE_POINTS (fractions of the generator's
    ``ceiling``); what the sink saw."""
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    frame = xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", "169.254.0.2", 40000, 9, 60)
    sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame)
    points = []
    try:
        gen.run(20_000, cpu=GEN_CPU)
        for frac in RATE_POINTS:
            pps = int(frac * ceiling) if frac < 1.0 else 0
            count = int(frac * ceiling * seconds)
            time.sleep(0.3)
            s0, c0, t0 = gen.sent(), sink.count(), cpu_times()
            elapsed = gen.run(count, cpu=GEN_CPU, pps=pps)
            t1 = cpu_times()
            time.sleep(0.2)
            got = sink.count() - c0
            busy = [(b1 - b0) / max(a1 - a0, 1) for (b0, a0), (b1, a1) in zip(t0, t1, strict=True)]
            points.append(
                {
                    "fraction": frac,
                    "offered_pps": (gen.sent() - s0) / elapsed,
                    "forwarded_pps": got / elapsed,
                    "seconds": elapsed,
                    "cpu_busy": busy,
                }
            )
    finally:
        gen.close()
        sink.close()
    return points


def generator_ceiling(napi_cpu: int | None = None) -> float:
    """The generator's own ceiling with the sweep's frame (into a bare sink)."""
    frame = xgbench.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "169.254.0.1",
                               "169.254.0.2", 40000, 9, 60)  # fmt: skip
    return xgbench.gen_ceiling(frame, napi_cpu=napi_cpu)


def idle_cpu(pid: int, seconds: float = 5.0) -> float:
    time.sleep(1.0)
    return xgbench.CpuMeter(pid).measure(seconds)


def summarize(name: str, points: list[dict], idle: float | None, ceiling: float) -> dict:
    sat = max(p["forwarded_pps"] for p in points)
    top = max(points, key=lambda p: p["offered_pps"])
    # The DUT core's busy time per forwarded frame at a fixed offered load
    # (half the generator's ceiling).
    fixed = next(p for p in points if p["fraction"] == 0.5)
    return {
        "name": name,
        "saturated_pps": sat,
        "max_offered_pps": top["offered_pps"],
        "overload_factor": top["offered_pps"] / sat,
        "forwarded_at_max_offered_pps": top["forwarded_pps"],
        "cpu_busy_at_max": top["cpu_busy"],
        "bound": xgbench.bound(top["offered_pps"], top["forwarded_pps"], ceiling),
        "fixed_load_pps": fixed["offered_pps"],
        "dut_ns_per_frame_at_fixed_load": (
            fixed["cpu_busy"][FWD_CPU] * 1e9 / fixed["forwarded_pps"]
            if fixed["forwarded_pps"]
            else None
        ),
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
    ceiling = generator_ceiling()
    print(f"generator alone: {ceiling / 1e6:.3f} Mpps", flush=True)
    loop = ("--fast-path", "off")
    for name, extra in (("xdpguard", loop), ("bare-afxdp", (*loop, "--no-policy"))):
        with (
            tempfile.TemporaryDirectory() as tmp,
            lab(edge=False),
            xgbench.xdpguard(*extra, state_dir=Path(tmp)) as proc,
        ):
            idle = idle_cpu(proc.pid)
            results.append(summarize(name, sweep(args.seconds_per_point, ceiling), idle, ceiling))
    for name, rps in (("bridge-rps", True), ("bridge", False)):
        with lab(edge=True), bridge(rps):
            results.append(summarize(name, sweep(args.seconds_per_point, ceiling), None, ceiling))

    by = {r["name"]: r for r in results}
    report = xgbench.report("forwarding, 64-byte UDP, one queue") | {
        "generator_ceiling_pps": ceiling,
        "results": results,
        "xdpguard_over_bare": by["xdpguard"]["saturated_pps"] / by["bare-afxdp"]["saturated_pps"],
        "xdpguard_over_bridge_rps": (
            by["xdpguard"]["saturated_pps"] / by["bridge-rps"]["saturated_pps"]
        ),
    }
    xgbench.write_report(report, args.json)

    print(f"generator alone (AF_XDP TX, copy mode, one core): {ceiling / 1e6:.3f} Mpps")
    print(
        f"{'config':<12}{'saturated':>12}{'max offered':>14}{'x':>6}{'fwd there':>12}"
        f"{'cpu0/cpu1 busy':>16}{'cpu1 ns/frame':>14}{'idle cpu':>10}  bound"
    )
    for r in results:
        busy = "/".join(f"{b:.0%}" for b in r["cpu_busy_at_max"][:2])
        idle = f"{r['idle_cpu']:.1%}" if r["idle_cpu"] is not None else "-"
        sat, top = r["saturated_pps"] / 1e6, r["max_offered_pps"] / 1e6
        there = r["forwarded_at_max_offered_pps"] / 1e6
        ns = r["dut_ns_per_frame_at_fixed_load"]
        print(
            f"{r['name']:<12}{sat:>9.3f} Mp{top:>11.3f} Mp{r['overload_factor']:>6.1f}"
            f"{there:>9.3f} Mp{busy:>16}{(f'{ns:.0f}' if ns else '-'):>14}{idle:>10}  {r['bound']}"
        )
    print(
        f"(cpu1 ns/frame: CPU 1's busy time per forwarded frame at "
        f"{results[0]['fixed_load_pps'] / 1e6:.2f} Mpps offered)"
    )
    print(f"xdpguard / bare AF_XDP: {report['xdpguard_over_bare']:.2f} (goal >= 0.9)")
    print(f"xdpguard / kernel bridge (RPS to one core): {report['xdpguard_over_bridge_rps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
