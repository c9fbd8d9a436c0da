#!/usr/bin/env python3
"""A long soak of xdpguard: held connections, churn, floods and policy
changes at once, with the daemon's footprint read at the start and the end.

  held     --conns long-lived connections to every port of the service
           prefix (connscale), checked with a numbered echo every cycle:
           every one must answer, every time
  churn    a client opening, using and closing short connections
           (--churn per second) from other client addresses the whole time;
           each must echo, none may fail
  floods   each cycle, one after the other and each bounded in frames and
           time: spoofed SYNs from 198.18.0.0/15 (challenged in the loop),
           ACKs of unknown flows (dropped as tcp_no_flow), UDP from source
           port 53 (dropped in XDP: the drdos preset is on meanwhile), each
           at about 200 kpps (the generator's ratio calibrated first; the
           rates reached are reported), then 2,000,000 frames of UDP at the
           generator's full rate. They begin once the learning window of
           the cold start has closed.
  policy   each cycle a block list of 1,000 prefixes is loaded with
           --replace, a TTL block is added, a port preset goes on and off
  sampled  every cycle: the daemon's resident memory, its open files,
           threads, the frame account, flows tracked, and whether the
           control socket answered within a second

It stops by itself after --minutes (every flood and the churn are bounded in
count and time) and reports the first and last samples, the drift, and the
verdict: memory, files and threads flat, the frame account consistent with
nothing in flight at rest, no held or churned connection lost.

Usage: bench/soak.py [--minutes 30] [--conns 5000] [--churn 100] [--json PATH]
(as root; its own lab). bench/soak.py churn ... is the churn client itself.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PREFIX = "169.254.100.0/24"
HELD_SOURCES = ("169.254.0.11", "169.254.0.12")
CHURN_SOURCES = ("169.254.0.13", "169.254.0.14")
CYCLE_S = 60.0
FLOOD_S = 4.0  # each rate-limited flood
FLOOD_PPS = 200_000  # below the loop's drop-free challenge rate here (bench/tcp.py)
BURST_FRAMES = 2_000_000  # the full-rate UDP burst, dropped in XDP
BLOCKS = 1000


# ---- the churn client (runs in the client's namespace) ----


def churn_main(args: argparse.Namespace) -> int:
    """Open, echo, close at --rate per second until --seconds pass; a JSON
    line of totals every --report seconds and at the end."""
    rng = random.Random(args.seed)
    net = ipaddress.ip_network(args.prefix)
    sources = args.sources.split(",")
    sel = selectors.DefaultSelector()
    live: dict[socket.socket, dict[str, Any]] = {}
    totals = {"opened": 0, "ok": 0, "failed": 0, "errors": {}}
    start = time.monotonic()
    next_open, next_report = start, start + args.report

    def fail(s: socket.socket, why: str) -> None:
        sel.unregister(s)
        live.pop(s)
        s.close()
        totals["failed"] += 1
        totals["errors"][why] = totals["errors"].get(why, 0) + 1

    while True:
        now = time.monotonic()
        running = now - start < args.seconds
        if not running and not live:
            break
        while running and now >= next_open and len(live) < 1000:
            next_open += 1.0 / args.rate
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.bind((rng.choice(sources), 0))
            s.connect_ex((str(net[1 + rng.randrange(254)]), 10000 + rng.randrange(1000)))
            live[s] = {
                "deadline": now + args.timeout,
                "want": f"{rng.getrandbits(64)}\n".encode(),
                "got": b"",
                "sent": False,
            }
            sel.register(s, selectors.EVENT_WRITE)
            totals["opened"] += 1
        for key, _ in sel.select(timeout=0.02):
            s = key.fileobj  # type: ignore[assignment]
            st = live[s]
            if not st["sent"]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(s, os.strerror(err))
                    continue
                s.send(st["want"])
                st["sent"] = True
                sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(64)
            except OSError as exc:
                fail(s, exc.strerror or "recv")
                continue
            if not data:
                fail(s, "closed by the peer")
                continue
            st["got"] += data
            if st["got"] == st["want"]:
                sel.unregister(s)
                live.pop(s)
                s.close()
                totals["ok"] += 1
        now = time.monotonic()
        for s in [s for s, st in live.items() if now > st["deadline"]]:
            fail(s, "timed out")
        if now >= next_report or (not running and not live):
            print(json.dumps(totals), flush=True)
            next_report += args.report
    print(json.dumps(totals), flush=True)
    return 0


# ---- the soak ----


def sample(pid: int, control: Any) -> dict[str, Any]:
    """The daemon's footprint now. Files and threads are the fewest of a few
    reads: a control client just served may hold one of each a moment longer."""
    reads = []
    for _ in range(5):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        field = dict(line.split(":", 1) for line in status)
        reads.append((len(os.listdir(f"/proc/{pid}/fd")), int(field["Threads"])))
        time.sleep(0.05)
    rss = int(field["VmRSS"].split()[0])
    fds, threads = min(r[0] for r in reads), min(r[1] for r in reads)
    t0 = time.monotonic()
    stats = control("stats")
    answered = time.monotonic() - t0
    flows = control("tcp.flows", top=0)
    return {
        "t": time.time(),
        "rss_kb": rss,
        "fds": fds,
        "threads": threads,
        "frames": stats["frames"],
        "flows_tracked": flows["tracked"],
        "control_s": answered,
        "reasons": {k: v["packets"] for k, v in stats["reasons"].items()},
    }


def policy_churn(cli: Callable[..., None], rng: random.Random, tmp: Path) -> None:
    """A block list swapped whole, a TTL entry, a preset on and off: as an operator would."""
    feed = tmp / "feed.txt"
    nets = {f"198.19.{rng.randrange(256)}.{rng.randrange(256)}/32" for _ in range(BLOCKS)}
    feed.write_text("\n".join(sorted(nets)) + "\n")
    for args in (
        ("block", "load", str(feed), "--replace"),
        ("block", "add", "192.0.2.0/24", "--ttl", "30"),
        ("ports", "add", "--preset", "drdos"),
    ):
        cli(*args)


def paced(frame: bytes, pps: float, seconds: float, full_rate: float, **kw: bool) -> dict:
    """Offer ``frame`` at ``pps`` (at most the generator's ``full_rate``) for
    ``seconds`` (random parts per ``kw``); what was sent and at what rate."""
    import xgbench
    from xgbench import GEN_CPU, NAMES

    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame, **kw)
    try:
        rate = min(pps, full_rate)
        elapsed = gen.run(int(rate * seconds), cpu=GEN_CPU, pps=int(rate))
        return {"sent": gen.sent(), "pps": gen.sent() / elapsed}
    finally:
        gen.close()


def floods(macs: tuple[str, str], full_rate: float) -> dict[str, dict]:
    """One flood after the other, each bounded in frames and time."""
    import xgbench

    client, origin = macs
    src, dst = "198.18.0.1", "169.254.100.1"
    syn = xgbench.tcp4_frame(client, origin, src, dst, 40000, 10000, "S")
    ack = xgbench.tcp4_frame(client, origin, src, dst, 40000, 10000, "A", 1, 1)
    udp53 = xgbench.udp4_frame(client, origin, src, dst, 53, 40000)
    out = {
        "syn": paced(syn, FLOOD_PPS, FLOOD_S, full_rate, random_saddr=True, random_sport=True),
        "ack": paced(ack, FLOOD_PPS, FLOOD_S, full_rate, random_saddr=True, random_sport=True),
        "udp53": paced(udp53, FLOOD_PPS, FLOOD_S, full_rate, random_saddr=True),
    }
    burst = xgbench.Generator(xgbench.NAMES["CLIENT_NS"], "eth0", udp53, random_saddr=True)
    try:
        elapsed = burst.run(BURST_FRAMES, cpu=xgbench.GEN_CPU)
        out["udp53_burst"] = {"sent": burst.sent(), "pps": burst.sent() / elapsed}
    finally:
        burst.close()
    return out


def soak(args: argparse.Namespace) -> dict[str, Any]:
    import xgbench
    from connscale import ConnScale
    from scale import origin, stop
    from xgbench import NAMES, lab

    from xdpguard.netns import Netns, resolve_device

    rng = random.Random(args.seed)
    report: dict[str, Any] = {
        "seed": args.seed,
        "minutes": args.minutes,
        "conns": args.conns,
        "churn_per_s": args.churn,
        "cycles": [],
    }
    print(f"seed {args.seed}", flush=True)
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory() as tmpdir, lab(edge=False, queues=2, anyport=True):
        tmp = Path(tmpdir)
        srv = origin(max(1, -(-(args.conns + 2000) // 16_000)))
        churn = None
        try:
            with xgbench.xdpguard("--queues", "2", state_dir=tmp, pin=False) as proc:
                sock = str(proc.control)  # type: ignore[attr-defined]

                def cli(*a: str) -> None:
                    """The command an operator types, against this daemon."""
                    cmd = [str(xgbench.XDPGUARD), *a, "--control", sock]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode:
                        raise RuntimeError(f"{' '.join(a)}: {res.stderr.strip()}")

                cli("tcp", "mode", "on")
                macs = (
                    resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0").mac,
                    resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0").mac,
                )
                # The client host stands in for every spoofed source: drop
                # the challenges sent back to 198.18.0.0/15, as the internet
                # would route them elsewhere (bench/tcp.py says why).
                shield = xgbench.attach(NAMES["CLIENT_NS"], "eth0", "xg_drop_spoofed")
                probe = xgbench.Generator(
                    NAMES["CLIENT_NS"],
                    "eth0",
                    xgbench.udp4_frame(macs[0], macs[1], "198.18.0.1", "169.254.100.1", 53, 40000),
                )
                rate = 100_000 / probe.run(100_000, cpu=xgbench.GEN_CPU)
                probe.close()

                def control(cmd: str, **a: Any) -> Any:
                    return xgbench.control(proc, cmd, **a)

                with ConnScale(
                    NAMES["CLIENT_NS"], args.conns, HELD_SOURCES, addrs=20, ports=250, in_flight=256
                ) as held:
                    opened = held.opened()
                    report["held_open"] = opened
                    print("held:", json.dumps(opened), flush=True)
                    churn = subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            NAMES["CLIENT_NS"],
                            sys.executable,
                            __file__,
                            "churn",
                            "--rate",
                            str(args.churn),
                            "--seconds",
                            str(seconds),
                            "--sources",
                            ",".join(CHURN_SOURCES),
                            "--seed",
                            str(args.seed),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    # Floods begin once the learning window of this cold
                    # start has closed: while it is open, segments of flows
                    # nobody saw open are adopted, not dropped.
                    while control("tcp.config")["learning_left"] > 0:
                        time.sleep(0.2)
                    report["first"] = sample(proc.pid, control)
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        t0 = time.monotonic()
                        cycle: dict[str, Any] = {"policy_s": time.monotonic()}
                        policy_churn(cli, rng, tmp)
                        cycle["policy_s"] = time.monotonic() - cycle["policy_s"]
                        cycle["sent"] = floods(macs, rate)
                        drdos = ("19", "53", "123", "161", "389", "1900", "3702", "11211")
                        cli("ports", "del", *drdos)
                        cycle["held"] = held.check()
                        cycle["sample"] = sample(proc.pid, control)
                        report["cycles"].append(cycle)
                        s = cycle["sample"]
                        minutes = (time.monotonic() - end + seconds) / 60
                        print(
                            f"{minutes:5.1f} min: held {cycle['held']['ok']}/{args.conns}, "
                            f"rss {s['rss_kb'] / 1024:.1f} MB, fds {s['fds']}, "
                            f"threads {s['threads']}, flows {s['flows_tracked']}, "
                            f"frames consistent {s['frames']['consistent']}, "
                            f"control {s['control_s'] * 1000:.0f} ms",
                            flush=True,
                        )
                        time.sleep(
                            max(0.0, min(CYCLE_S - (time.monotonic() - t0), end - time.monotonic()))
                        )
                    assert churn.stdout is not None
                    churn_lines = churn.stdout.read().splitlines()
                    churn.wait(timeout=60)
                    report["churn"] = json.loads(churn_lines[-1])
                    # At rest: nothing in flight, every frame where it belongs.
                    time.sleep(2)
                    report["last"] = sample(proc.pid, control)
                shield.close()
        finally:
            if churn is not None and churn.poll() is None:
                churn.kill()
                churn.wait()
            stop(srv)
    return report


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    first, last = r["first"], r["last"]
    held_ok = all(c["held"]["ok"] == r["conns"] for c in r["cycles"])
    frames = last["frames"]
    out = {
        "held_all_open": r["held_open"]["established"] == r["conns"],
        "held_never_lost": held_ok,
        "churn_none_failed": r["churn"]["failed"] == 0 and r["churn"]["ok"] > 0,
        "frames_consistent_always": all(c["sample"]["frames"]["consistent"] for c in r["cycles"])
        and frames["consistent"],
        "frames_none_in_flight_at_rest": frames["in_flight"] == 0,
        "fds_flat": last["fds"] <= first["fds"],
        "threads_flat": last["threads"] <= first["threads"],
        # Flat: within 5 % (allocator noise), not growing with time.
        "rss_flat": last["rss_kb"] <= first["rss_kb"] * 1.05,
        "control_answered_within_1s": all(c["sample"]["control_s"] < 1.0 for c in r["cycles"]),
    }
    out["pass"] = all(out.values())
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "churn":
        ap = argparse.ArgumentParser(prog="soak.py churn")
        ap.add_argument("--rate", type=float, required=True)
        ap.add_argument("--seconds", type=float, required=True)
        ap.add_argument("--sources", required=True)
        ap.add_argument("--prefix", default=PREFIX)
        ap.add_argument("--timeout", type=float, default=20.0)
        ap.add_argument("--report", type=float, default=60.0)
        ap.add_argument("--seed", type=int, default=0)
        return churn_main(ap.parse_args(sys.argv[2:]))

    import xgbench

    ap = xgbench.arguments(__doc__, "soak")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--churn", type=float, default=100.0, help="short connections per second")
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = xgbench.parse_as_root(ap)
    if not 0 < args.minutes <= 24 * 60:
        ap.error("--minutes must be in (0, 1440]")
    report = xgbench.report(f"soak, {args.minutes:g} minutes") | soak(args)
    report["verdict"] = verdict(report)
    first, last = report["first"], report["last"]
    print(f"\n{'':<24}{'start':>14}{'end':>14}")
    rows = (
        ("daemon RSS (MB)", "rss_kb", 1 / 1024),
        ("open files", "fds", 1),
        ("threads", "threads", 1),
        ("flows tracked", "flows_tracked", 1),
    )
    for label, key, scale in rows:
        print(f"{label:<24}{first[key] * scale:>14.1f}{last[key] * scale:>14.1f}")
    print(
        f"{'frames free+fill':<24}{first['frames']['free'] + first['frames']['fill']:>14}"
        f"{last['frames']['free'] + last['frames']['fill']:>14}"
    )
    print(f"churn: {json.dumps(report['churn'])}")
    print(f"verdict: {json.dumps(report['verdict'])}")
    xgbench.write_report(report, args.json)
    return 0 if report["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
