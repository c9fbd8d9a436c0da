#!/usr/bin/env python3
"""Policy at scale: loading big blocklists, how fast a block bites, LPM depth cost.

All against a running `xdpguard run` (one queue, pinned to CPU 1) in a lab:

  load      wall time of `xdpguard block load FILE` (the CLI a user types,
            start to exit) for 1,000,000 IPv4 prefixes, then 100,000 IPv6
            prefixes, then all 1,100,000 at once with --replace. Goal < 5 s.
  reaction  a UDP flood from one source reaches the origin (counted by an XDP
            sink there); `block add SOURCE` is sent over the control socket
            and the time until the sink stops seeing the source is measured
            (median of 7). Goal < 50 ms. The CLI's own start-up is timed apart.
  drop      drop rate on one core for a blocked source with 10 prefixes in
            the blocklist, and with the 1,100,000 loaded.

Usage: bench/policy_scale.py [--json PATH] (as root).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from xgbench import GEN_CPU, NAMES, XDPGUARD, lab  # noqa: E402

from xdpguard.control import ControlClient  # noqa: E402
from xdpguard.netns import Netns, resolve_device  # noqa: E402

FLOOD_SRC = "169.254.0.7"  # a client address that is never in the random lists
ORIGIN = "169.254.0.2"


def write_lists(tmp: Path, n4: int, n6: int, seed: int = 1) -> tuple[Path, Path, Path]:
    """Random unique prefixes: IPv4 /20../32 in 10/8, IPv6 /48../64 in 2001:db8::/32."""
    rng = random.Random(seed)
    v4 = set()
    while len(v4) < n4:
        plen = rng.choice((20, 24, 24, 28, 32, 32, 32, 32))
        addr = (10 << 24) | (rng.getrandbits(24) & ~((1 << (32 - plen)) - 1) & 0xFFFFFF)
        v4.add(f"{addr >> 24}.{(addr >> 16) & 255}.{(addr >> 8) & 255}.{addr & 255}/{plen}")
    v6 = set()
    while len(v6) < n6:
        plen = rng.choice((48, 56, 64))
        bits = rng.getrandbits(32) & ~((1 << (64 - plen)) - 1) & 0xFFFFFFFF
        v6.add(f"2001:db8:{bits >> 16:x}:{bits & 0xFFFF:x}::/{plen}")
    f4, f6, both = tmp / "v4.txt", tmp / "v6.txt", tmp / "both.txt"
    f4.write_text("\n".join(sorted(v4)) + "\n")
    f6.write_text("\n".join(sorted(v6)) + "\n")
    both.write_text(f4.read_text() + f6.read_text())
    return f4, f6, both


def cli(control: Path, *args: str) -> float:
    t = time.perf_counter()
    subprocess.run(
        [str(XDPGUARD), *args, "--control", str(control)], check=True, capture_output=True
    )
    return time.perf_counter() - t


def reaction(control: Path, sink: xgbench.Sink, trials: int) -> tuple[list[float], list[float]]:
    """Seconds from sending block.add to the last frame of the flood at the origin,
    and to the reply (which comes after the state file is saved). The sink is
    watched from the moment the request leaves, while the daemon works on it."""
    out, replies = [], []
    with ControlClient(control) as c:
        for trial in range(trials):
            if trial:
                c.call("block.del", prefixes=[FLOOD_SRC])
            start = sink.count()
            while sink.count() - start < 1000:  # the flood flows again
                time.sleep(0.001)
            reply: list[float] = []
            t0 = time.perf_counter()

            def send(reply: list[float] = reply, t0: float = t0) -> None:
                c.call("block.add", prefixes=[FLOOD_SRC])
                reply.append(time.perf_counter() - t0)

            caller = threading.Thread(target=send)
            caller.start()
            last, last_t = sink.count(), t0
            while caller.is_alive() or time.perf_counter() - last_t < 0.2:
                n = sink.count()  # 200 ms of silence after the reply: it bit
                if n != last:
                    last, last_t = n, time.perf_counter()
            caller.join()
            out.append(last_t - t0)
            replies.append(reply[0])
    return out, replies


def drop_rate(frame: bytes, runs: int) -> tuple[float, int]:
    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame)
    try:
        gen.run(20_000, cpu=GEN_CPU)
        before = gen.sent()
        elapsed = gen.run(runs, cpu=GEN_CPU)
        return (gen.sent() - before) / elapsed, gen.sent() - before
    finally:
        gen.close()


def main() -> int:
    ap = xgbench.arguments(__doc__, "policy_scale")
    ap.add_argument("--v4", type=int, default=1_000_000)
    ap.add_argument("--v6", type=int, default=100_000)
    args = xgbench.parse_as_root(ap)

    report: dict = xgbench.report("policy scale")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        f4, f6, both = write_lists(tmp, args.v4, args.v6)
        ten = tmp / "ten.txt"
        ten.write_text("".join(f"10.{i}.0.0/16\n" for i in range(9)) + f"{FLOOD_SRC}/32\n")
        state = tmp / "state"
        with lab(edge=False), xgbench.xdpguard(state_dir=state) as proc:
            control = proc.control  # type: ignore[attr-defined]
            ns = Netns(NAMES["CLIENT_NS"])
            xgbench.sh(
                "ip", "-n", NAMES["CLIENT_NS"], "addr", "add", f"{FLOOD_SRC}/24", "dev", "eth0"
            )
            client = resolve_device(ns, "eth0")
            origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
            frame = xgbench.udp4_frame(client.mac, origin.mac, FLOOD_SRC, ORIGIN, 40000, 9, 60)

            # -- load --
            t4 = cli(control, "block", "load", str(f4))
            t6 = cli(control, "block", "load", str(f6))
            tboth = cli(control, "block", "load", str(both), "--replace")
            n = json.loads(
                subprocess.run(
                    [str(XDPGUARD), "block", "list", "--json", "--control", str(control)],
                    check=True,
                    capture_output=True,
                ).stdout
            )["count"]
            report["load"] = {
                "v4_prefixes": args.v4,
                "v4_seconds": t4,
                "v6_prefixes": args.v6,
                "v6_seconds": t6,
                "replace_all_seconds": tboth,
                "listed_after": n,
            }
            print(
                f"load {args.v4} IPv4: {t4:.2f}s, {args.v6} IPv6: {t6:.2f}s, "
                f"--replace all {args.v4 + args.v6}: {tboth:.2f}s (list: {n})",
                flush=True,
            )

            # -- drop rate with the big list (the flood source is not in it yet) --
            with ControlClient(control) as c:
                c.call("block.add", prefixes=[FLOOD_SRC])
            big_rate, _ = drop_rate(frame, 6_000_000)
            with ControlClient(control) as c, open(ten, "rb") as f:
                c.call("block.load", f.fileno(), replace=True)
            small_rate, _ = drop_rate(frame, 6_000_000)
            report["drop"] = {
                "prefixes_10_pps": small_rate,
                f"prefixes_{args.v4 + args.v6}_pps": big_rate,
                "ratio_big_over_small": big_rate / small_rate,
            }
            print(
                f"drop rate, blocked source: {small_rate / 1e6:.2f} Mpps with 10 prefixes, "
                f"{big_rate / 1e6:.2f} Mpps with {args.v4 + args.v6}",
                flush=True,
            )

            # -- reaction time of one block add, under a flood to the origin --
            with ControlClient(control) as c, open(both, "rb") as f:
                c.call("block.load", f.fileno(), replace=True)
            sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
            gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame)
            stop = threading.Event()

            def flood() -> None:
                while not stop.is_set():
                    gen.run(20_000, cpu=GEN_CPU, pps=100_000)

            flooder = threading.Thread(target=flood)
            flooder.start()
            try:
                times, replies = reaction(control, sink, 7)
                cli_times = []
                for _ in range(3):
                    with ControlClient(control) as c:
                        c.call("block.del", prefixes=[FLOOD_SRC])
                    cli_times.append(cli(control, "block", "add", FLOOD_SRC))
            finally:
                stop.set()
                flooder.join()
                gen.close()
                sink.close()
            report["reaction"] = {
                "with_prefixes": args.v4 + args.v6,
                "control_socket_ms": [t * 1e3 for t in times],
                "median_ms": statistics.median(times) * 1e3,
                "reply_ms": [t * 1e3 for t in replies],
                "cli_process_ms": [t * 1e3 for t in cli_times],
            }
            print(
                f"block add takes effect: median {statistics.median(times) * 1e3:.1f} ms "
                f"(max {max(times) * 1e3:.1f}) over the control socket, reply after "
                f"{statistics.median(replies) * 1e3:.1f} ms; the CLI process "
                f"takes {statistics.median(cli_times) * 1e3:.0f} ms end to end",
                flush=True,
            )

    xgbench.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
