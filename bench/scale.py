#!/usr/bin/env python3
"""100,000 real TCP connections through xdpguard, to every port of a prefix.

  setup     time to establish them (TCP protection on: each client address
            answers one challenge), through xdpguard and through the kernel
            bridge (the setup rate an operator would otherwise get)
  memory    the daemon's resident memory and the kernel memory of the maps it
            pinned (the flow table, the challenges' verified sources)
  flows     what `tcp flows` costs with them tracked (the control request,
            median of 5: it reads every slot of the table)
  restarts  survivors after a SIGTERM restart, after a SIGKILL restart, and
            after a SIGKILL and a restart with twice the --max-flows (the
            flows move to the new table), the connections idle all the
            while (no learning window: the pinned table comes back)
  rate      one established flow's forwarding rate (its in-window segment
            replayed into the origin's XDP sink) with the table holding them

Usage: bench/scale.py [--conns N] [--json PATH] (as root; its own labs).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from connscale import ConnScale  # noqa: E402
from forwarding import bridge  # noqa: E402
from xgbench import GEN_CPU, NAMES, lab  # noqa: E402

from xdpguard.flowtable import forget, pin_dir_for  # noqa: E402
from xdpguard.netns import Netns, resolve_device  # noqa: E402

SOURCES = ("169.254.0.11", "169.254.0.12", "169.254.0.13", "169.254.0.14")


def origin(workers: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", NAMES["ORIGIN_NS"], sys.executable,
         str(HERE.parent / "scripts" / "anyport-origin.py"), "--workers", str(workers)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and "serving" in proc.stdout.readline()
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pinned_maps_mb(state: Path) -> dict[str, float]:
    """Kernel memory of the maps this appliance pinned (the flow table, the
    challenges' verified sources), by name."""
    out = {}
    for path in sorted(pin_dir_for(state).iterdir()):
        info = json.loads(xgbench.sh("bpftool", "-j", "map", "show", "pinned", str(path)))
        out[path.name] = info.get("bytes_memlock", 0) / 2**20
    return out


def start(state: Path, max_flows: int = 1_000_000) -> subprocess.Popen:
    """xdpguard without a learning window: a connection that survives a restart
    does so because the pinned table came back, not because it was adopted.
    Its pins stay when it stops (through_xdpguard() forgets them at the end)."""
    cm = xgbench.xdpguard(
        "--max-flows", str(max_flows), "--learn", "0", state_dir=state, forget_pins=False
    )
    proc = cm.__enter__()
    proc.cm = cm  # type: ignore[attr-defined]
    return proc


def through_xdpguard(conns: int, workers: int) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, lab(edge=False, anyport=True):
        srv = origin(workers)
        state = Path(tmp)
        proc = start(state)
        try:
            xgbench.control(proc, "tcp.mode", mode="on")
            # Four addresses stand in for 100,000 clients: each would be held
            # to a real client's SYN rate (verified_syn_rate, 1,000/s), and
            # that is not what this measures.
            xgbench.control(proc, "tcp.config", verified_syn_rate=1_000_000)
            with ConnScale(NAMES["CLIENT_NS"], conns, SOURCES, addrs=200, ports=500) as cs:
                out["open"] = cs.opened()
                out["tracked"] = xgbench.control(proc, "tcp.flows", top=0)["tracked"]  # type: ignore[index]
                took = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    xgbench.control(proc, "tcp.flows", top=10)
                    took.append(1000 * (time.perf_counter() - t0))
                out["tcp_flows_ms"] = sorted(took)[2]
                out["daemon_rss_mb"] = rss_mb(proc.pid)
                out["pinned_maps_mb"] = pinned_maps_mb(state)
                out["before_restart"] = cs.check()
                print(json.dumps(out), flush=True)
                for name, sig, max_flows in (
                    ("sigterm", signal.SIGTERM, 1_000_000),
                    ("sigkill", signal.SIGKILL, 1_000_000),
                    ("sigkill_resized", signal.SIGKILL, 2_000_000),
                ):
                    proc.send_signal(sig)
                    proc.wait(timeout=30)
                    proc.cm.__exit__(None, None, None)  # type: ignore[attr-defined]
                    t0 = time.monotonic()
                    proc = start(state, max_flows)
                    out[f"{name}_restart_s"] = time.monotonic() - t0
                    out[f"{name}_survivors"] = cs.check()
                    print(name, json.dumps(out[f"{name}_survivors"]), flush=True)
                flow = xgbench.control(proc, "tcp.flows", top=1)["busiest"][0]  # type: ignore[index]
                out["rate_pps"] = replay_rate(flow)
        finally:
            proc.cm.__exit__(None, None, None)  # type: ignore[attr-defined]
            forget(state)
            stop(srv)
    return out


def replay_rate(flow: dict) -> float:
    """The forwarding rate of one established flow of the full table."""
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin_dev = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    src, sport = flow["outside"].rsplit(":", 1)
    dst, dport = flow["inside"].rsplit(":", 1)
    segment = xgbench.tcp4_frame(
        client.mac, origin_dev.mac, src, dst, int(sport), int(dport), "A",
        flow["sides"]["outside"]["next_seq"], flow["sides"]["inside"]["next_seq"],
    )  # fmt: skip
    sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", segment)
    try:
        before = sink.count()
        elapsed = gen.run(2_000_000, cpu=GEN_CPU)
        time.sleep(0.1)
        return (sink.count() - before) / elapsed
    finally:
        gen.close()
        sink.close()


def through_bridge(conns: int, workers: int) -> dict:
    with lab(edge=True, anyport=True), bridge(rps=False):
        srv = origin(workers)
        try:
            with ConnScale(NAMES["CLIENT_NS"], conns, SOURCES, addrs=200, ports=500) as cs:
                return {"open": cs.opened(), "check": cs.check()}
        finally:
            stop(srv)


def main() -> int:
    ap = xgbench.arguments(__doc__, "scale")
    ap.add_argument("--conns", type=int, default=100_000)
    args = xgbench.parse_as_root(ap)
    workers = -(-args.conns // 16_000)
    report = xgbench.report(f"{args.conns} connections") | {
        "xdpguard": through_xdpguard(args.conns, workers),
        "bridge": through_bridge(args.conns, workers),
    }
    for k in ("xdpguard", "bridge"):
        o = report[k]["open"]
        print(f"{k}: {o['established']} established in {o['seconds']:.1f} s "
              f"({o['established'] / o['seconds']:.0f}/s), {o['failed']} failed")  # fmt: skip
    xgbench.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
