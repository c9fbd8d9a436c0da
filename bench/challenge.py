#!/usr/bin/env python3
"""SYN challenges answered in XDP, against the bare responder, in one run.

  rate   a spoofed SYN flood from 198.18.0.0/15 (random sources and ports)
         offered at increasing rates; challenges answered per second on one
         core (outer's NAPI threaded and pinned to CPU 1, the generator on
         CPU 0): xdpguard (`tcp mode on`, the reflection caps lifted so that
         the challenge itself is measured) against xg_synack, a bare XDP
         program that turns every SYN into a SYN-ACK and sends it back
         (no cookie, no policy, no caps).
  setup  connect() time of real clients from 24 fresh source addresses
         (each answers a challenge) and again once verified, with no flood
         and under the largest flood the generator makes, xdpguard with its
         default settings; what the caps did meanwhile.
  fast   the fast path while the flood runs: a real connection (challenged,
         then verified and established) whose in-window segment the
         generator replays into an XDP sink at the origin, alone and with
         the flood at the generator's full rate beside it (two threads
         sharing the generator's core, so each offers about half); what
         reached the origin of what was offered, and the challenges
         answered meanwhile. xdpguard with its default settings, outer's
         NAPI on CPU 1.

The client host stands in for every spoofed source, so an XDP program on
its eth0 drops the answers to 198.18.0.0/15, as the internet would route
them elsewhere (the same in both configurations).

Usage: bench/challenge.py [--seconds S] [--json PATH] (as root).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from tcp import SOURCES, connect_times, server, summary  # noqa: E402
from xgbench import FWD_CPU, GEN_CPU, NAMES, lab, sh  # noqa: E402

from xdpguard.netns import Netns, resolve_device  # noqa: E402

ORIGIN, PORT = "169.254.0.2", 5201
FRACTIONS = (0.25, 0.5, 1.0)  # of the generator's ceiling


def flood_frame() -> bytes:
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    return xgbench.tcp4_frame(client.mac, origin.mac, "198.18.0.1", ORIGIN, 40000, PORT, "S")


def sweep(answered, seconds: float, ceiling: float) -> list[dict]:  # type: ignore[no-untyped-def]
    """Offer the flood at each fraction of the generator's ``ceiling``;
    (offered, answered) per second."""
    frame = flood_frame()
    points = []
    for frac in FRACTIONS:
        gen = xgbench.Generator(
            NAMES["CLIENT_NS"], "eth0", frame, random_saddr=True, random_sport=True
        )
        try:
            gen.run(50_000, cpu=GEN_CPU)
            time.sleep(0.2)
            a0, s0 = answered(), gen.sent()
            pps = int(frac * ceiling) if frac < 1.0 else 0
            elapsed = gen.run(int(frac * ceiling * seconds), cpu=GEN_CPU, pps=pps)
            time.sleep(0.2)
            points.append(
                {
                    "fraction": frac,
                    "offered_pps": (gen.sent() - s0) / elapsed,
                    "answered_per_s": (answered() - a0) / elapsed,
                }
            )
        finally:
            gen.close()
        p = points[-1]
        print(f"  offered {p['offered_pps'] / 1e6:.3f} Mpps -> "
              f"{p['answered_per_s'] / 1e6:.3f} M answers/s", flush=True)  # fmt: skip
    return points


def xdpguard_rate(seconds: float, ceiling: float) -> tuple[list[dict], float]:
    """The sweep, and the real program's own cost per challenge (ns)."""
    with tempfile.TemporaryDirectory() as tmp, xgbench.xdpguard(state_dir=Path(tmp)) as proc:
        xgbench.pin_napi(None, NAMES["OUTER"], FWD_CPU)
        xgbench.control(
            proc, "tcp.config", syn_mode="on", state_mode="on", learn=0,
            challenge_rate=100_000_000, challenge_prefix_rate=100_000_000,
        )  # fmt: skip

        def answered() -> int:
            st = xgbench.control(proc, "stats")
            return st["reasons"]["syn_challenged"]["packets"]  # type: ignore[index]

        points = sweep(answered, seconds, ceiling)
        fd = xgbench.running_prog_fd(proc)
        try:
            cost = xgbench.xdp_cost(fd, syn_frames())
        finally:
            os.close(fd)
        return points, cost


def syn_frames(n: int = 16) -> list[bytes]:
    """SYNs from spoofed sources, as the flood's (the challenge rewrites each
    in place, so xdp_cost runs them one at a time)."""
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    return [
        xgbench.tcp4_frame(
            client.mac, origin.mac, f"198.18.{i}.{i + 1}", ORIGIN, 40000 + i, PORT, "S"
        )
        for i in range(n)
    ]


def bare_rate(seconds: float, ceiling: float) -> tuple[list[dict], float]:
    prog = xgbench.attach(None, NAMES["OUTER"], "xg_synack")
    try:
        xgbench.pin_napi(None, NAMES["OUTER"], FWD_CPU)
        points = sweep(lambda: xgbench.percpu_sum(prog, "synack_count"), seconds, ceiling)
        return points, xgbench.xdp_cost(prog.fd, syn_frames())
    finally:
        prog.close()


def setup_line(name: str, r: dict) -> str:
    def times(s: dict) -> str:
        return f"{s['median_ms']:.3g} / {s['p95_ms']:.3g} / {s['max_ms']:.3g} ms"

    head = f"{r['flood_pps'] / 1e6:.2f} Mpps spoofed SYNs" if r["flood_pps"] else "no flood"
    line = f"  {head + ':':<24}challenged {times(r['challenged'])}, verified {times(r['verified'])}"
    if r["flood_pps"]:
        moved = r["reasons"]
        line += (f";\n  {'':<24}{moved['syn_challenged']:,} challenged, "
                 f"{moved['challenge_rate_limited']:,} over the per-/24 caps")  # fmt: skip
    return line


def setup(seconds: float) -> dict:
    """Connect times with xdpguard's defaults, without and under the largest flood."""
    out: dict = {}
    stop = threading.Event()
    srv = server(stop)
    try:
        with tempfile.TemporaryDirectory() as tmp, xgbench.xdpguard(state_dir=Path(tmp)) as proc:
            xgbench.control(proc, "tcp.config", syn_mode="on", state_mode="on", learn=0)
            for name, flood in (("no_flood", False), ("largest_flood", True)):
                xgbench.control(proc, "tcp.verified.clear")
                before = xgbench.control(proc, "stats")["reasons"]  # type: ignore[index]
                gen = None
                if flood:
                    gen = xgbench.Generator(
                        NAMES["CLIENT_NS"], "eth0", flood_frame(), random_saddr=True,
                        random_sport=True,
                    )  # fmt: skip

                    def run(g: xgbench.Generator = gen) -> None:
                        g.run(10**9, cpu=GEN_CPU, max_seconds=60)  # bounded; stopped sooner

                    flooder = threading.Thread(target=run)
                    flooder.start()
                    time.sleep(0.3)
                t0, s0 = time.perf_counter(), gen.sent() if gen else 0
                try:
                    challenged = connect_times(SOURCES)
                    verified = connect_times(SOURCES)
                    pps = ((gen.sent() - s0) if gen else 0) / (time.perf_counter() - t0)
                finally:
                    if gen:
                        gen.stop()
                        flooder.join()
                        gen.close()
                after = xgbench.control(proc, "stats")["reasons"]  # type: ignore[index]
                moved = {
                    k: after[k]["packets"] - before[k]["packets"]  # type: ignore[index]
                    for k in ("syn_challenged", "challenge_passed", "challenge_rate_limited")
                }
                out[name] = {"flood_pps": pps, "challenged": summary(challenged),
                             "verified": summary(verified), "reasons": moved}  # fmt: skip
                print(setup_line(name, out[name]), flush=True)
    finally:
        stop.set()
        srv.join(3)
    return out


def fast_line(r: dict) -> str:
    head = "with the flood" if r["flood_pps"] else "alone"
    line = (f"  {head:<15}flow offered {r['offered_pps'] / 1e6:.3f} Mpps, "
            f"forwarded {r['forwarded_pps'] / 1e6:.3f} Mpps")  # fmt: skip
    if r["flood_pps"]:
        line += (f";\n  {'':<15}flood offered {r['flood_pps'] / 1e6:.2f} Mpps: XDP challenged "
                 f"{r['challenged_per_s'] / 1e6:.2f} M/s, dropped "
                 f"{r['over_caps_per_s'] / 1e6:.2f} M/s over the caps")  # fmt: skip
    return line


def fast_under_flood(seconds: float) -> dict:
    """An established flow's segments through the fast path, without and with the flood."""
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    stop = threading.Event()
    srv = server(stop)
    out: dict = {}
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            xgbench.xdpguard("--queues", "2", state_dir=Path(tmp)) as proc,
        ):
            xgbench.pin_napi(None, NAMES["OUTER"], FWD_CPU)
            xgbench.control(proc, "tcp.config", syn_mode="on", state_mode="on", learn=0)
            s = Netns(NAMES["CLIENT_NS"]).run(
                lambda: socket.create_connection((ORIGIN, PORT), timeout=5)
            )
            try:
                cport = s.getsockname()[1]
                s.send(b"x")
                time.sleep(0.2)
                flows = xgbench.control(proc, "tcp.flows", top=0)
                assert flows["fast_path"] >= 1, flows  # type: ignore[index]
                segment = xgbench.flow_segment(proc, client.mac, origin.mac, cport, ORIGIN, PORT)
                sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
                try:
                    for name, flood in (("alone", False), ("with_flood", True)):
                        out[name] = replay(proc, segment, sink, flood, seconds)
                        print(fast_line(out[name]), flush=True)
                finally:
                    sink.close()
            finally:
                s.close()
    finally:
        stop.set()
        srv.join(3)
    return out


def replay(proc, segment: bytes, sink: xgbench.Sink, flood: bool, seconds: float) -> dict:  # type: ignore[no-untyped-def]
    """Replay ``segment`` for ``seconds``, with the flood beside it or not: the rates."""

    def flood_seen() -> tuple[int, int]:
        """SYNs XDP challenged, and SYNs it dropped over the caps, so far."""
        reasons = xgbench.control(proc, "stats")["reasons"]  # type: ignore[index]
        return tuple(reasons[r]["packets"] for r in ("syn_challenged", "challenge_rate_limited"))  # type: ignore[return-value]

    gens = [xgbench.Generator(NAMES["CLIENT_NS"], "eth0", segment)]
    if flood:
        gens.append(xgbench.Generator(
            NAMES["CLIENT_NS"], "eth0", flood_frame(), queue=1, random_saddr=True,
            random_sport=True,
        ))  # fmt: skip

    def run(g: xgbench.Generator) -> None:
        g.run(10**9, cpu=GEN_CPU, max_seconds=seconds + 30)  # bounded; stopped sooner

    threads = [threading.Thread(target=run, args=(g,)) for g in gens]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        sent0 = [g.sent() for g in gens]
        k0, c0, t0 = sink.count(), flood_seen(), time.perf_counter()
        time.sleep(seconds)
    finally:
        for g in gens:
            g.stop()
        for t in threads:
            t.join()
    dt = time.perf_counter() - t0
    sent = [g.sent() - s for g, s in zip(gens, sent0, strict=True)]
    for g in gens:
        g.close()
    # Frames already past XDP reach the sink a moment later.
    forwarded = int(xgbench.wait_quiet(sink.count)) - k0  # type: ignore[call-overload]
    c1 = flood_seen()
    return {
        "offered_pps": sent[0] / dt,
        "forwarded_pps": forwarded / dt,
        "delivered": forwarded / sent[0] if sent[0] else 0.0,
        "flood_pps": sent[1] / dt if flood else 0.0,
        "challenged_per_s": (c1[0] - c0[0]) / dt,
        "over_caps_per_s": (c1[1] - c0[1]) / dt,
    }


def main() -> int:
    ap = xgbench.arguments(__doc__, "challenge")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = xgbench.parse_as_root(ap)
    report: dict = xgbench.report("SYN challenges in XDP")
    with lab(edge=False):
        for src in SOURCES:
            sh("ip", "-n", NAMES["CLIENT_NS"], "addr", "add", f"{src}/24", "dev", "eth0")
        shield = xgbench.attach(NAMES["CLIENT_NS"], "eth0", "xg_drop_spoofed")
        try:
            ceiling = xgbench.gen_ceiling(
                flood_frame(), napi_cpu=FWD_CPU, random_saddr=True, random_sport=True
            )
            print(f"generator alone (AF_XDP TX, copy mode, one core): {ceiling / 1e6:.3f} Mpps")
            report["generator_ceiling_pps"] = ceiling
            print("xdpguard:", flush=True)
            mine, mine_ns = xdpguard_rate(args.seconds, ceiling)
            print("bare XDP_TX responder:", flush=True)
            bare, bare_ns = bare_rate(args.seconds, ceiling)
            print("connection setup (median / p95 / max):", flush=True)
            report["setup"] = setup(args.seconds)
        finally:
            shield.close()
    # Two generators (the flow's segment, the flood) need a queue each: an
    # AF_XDP socket binds a queue alone.
    with lab(edge=False, queues=2):
        shield = xgbench.attach(NAMES["CLIENT_NS"], "eth0", "xg_drop_spoofed")
        try:
            print("the fast path while the flood runs (one verified TCP flow):", flush=True)
            report["fast"] = fast_under_flood(args.seconds)
        finally:
            shield.close()
    top = {"xdpguard": max(p["answered_per_s"] for p in mine),
           "bare": max(p["answered_per_s"] for p in bare)}  # fmt: skip
    bounds = {
        n: xgbench.bound(p[-1]["offered_pps"], p[-1]["answered_per_s"], ceiling)
        for n, p in (("xdpguard", mine), ("bare", bare))
    }
    report["rate"] = {"xdpguard": mine, "bare": bare, "max_per_s": top,
                      "xdpguard_over_bare": top["xdpguard"] / top["bare"],
                      "xdp_test_run_ns": {"xdpguard": mine_ns, "bare": bare_ns},
                      "bound": bounds}  # fmt: skip
    print(f"challenges/s on one core: xdpguard {top['xdpguard'] / 1e6:.2f} M, "
          f"bare responder {top['bare'] / 1e6:.2f} M, ratio "
          f"{report['rate']['xdpguard_over_bare']:.2f} (goal >= 3 M/s and >= 0.8); "
          f"{report['rate']['bound']}")  # fmt: skip
    print(f"XDP's own cost per challenge (BPF_PROG_TEST_RUN, one frame a run): xdpguard "
          f"{mine_ns:.0f} ns, bare responder {bare_ns:.0f} ns, ratio "
          f"{bare_ns / mine_ns:.2f} (as a rate: {1e3 / mine_ns:.2f} M/s vs "
          f"{1e3 / bare_ns:.2f} M/s)")  # fmt: skip
    xgbench.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
