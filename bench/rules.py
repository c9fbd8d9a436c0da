#!/usr/bin/env python3
"""N-tuple rules at scale, and BGP FlowSpec's announcement to effect.

Every configuration in the same run:

  DRDoS drop (drdos.py's flood: 1:1 UDP from source port 53 and the
  smallest later IPv4 fragments, one core generating and dropping):
    xdp-minimal        a hand-written XDP program doing only the two checks
    xdpguard           xdpguard, `ports add 53`, `frags drop` (drdos.py's)
    xdpguard+10k       the same, with 10,000 rules loaded: 9,990 on other
                       destinations, 10 on the flooded one (TCP ports, and
                       UDP from ports 19 and 123)
    xdpguard-by-rules  no lists: 10,000 rules, of which the flood meets 8
                       that do not match (TCP ports) before the one that
                       drops it (proto udp sport 53, or fragment
                       is-fragment)
  Forwarding (forwarding.py's sweep, 64-byte UDP client -> origin, the
  fast path on, XDP forwarding on the generator's core):
    no-rules           xdpguard as it starts
    10k-elsewhere      10,000 rules, none for the origin: the filter in
                       front of the walk is all the legitimate frames meet
    10k-on-origin      the same with 10 of them for the origin, none
                       matching the legitimate UDP: it walks them all
  Announcement to effect (--announcements N, default 100): GoBGP
  announces a discard of UDP to one port of the origin while the client
  sends to it (a datagram a millisecond), and the time to the first drop
  XDP counts; then the withdrawal, and the time until the rule is gone.

The DRDoS droppers and the forwarding configurations run --repeat times in
turns (this VM's rates drift by several per cent); each figure is the median.

Usage: bench/rules.py [--seconds S] [--repeat N] [--announcements N] [--json PATH]
(as root; builds and removes its own labs).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

import drdos  # noqa: E402
import forwarding  # noqa: E402
import xgbench  # noqa: E402
from bgplab import CONTROLLER, BgpLab  # noqa: E402
from xgbench import EDGE_NS, NAMES, lab, sh  # noqa: E402

from xdpguard.flowtable import forget  # noqa: E402
from xdpguard.netns import Netns, resolve_device  # noqa: E402

N_RULES = 10_000


def rule_set(victim: str | None, flood_rules: bool) -> list[str]:
    """10,000 rules: 9,990 (10,000 without ``victim``) over other /32s, and
    10 on ``victim``: 8 on TCP ports, and 2 that drop the DRDoS flood if
    ``flood_rules`` (UDP from port 53, later fragments), else UDP from
    ports 19 and 123."""
    rules = []
    for i in range(N_RULES - (10 if victim else 0)):
        a, b = divmod(i, 250)
        rules.append(f"dst 198.18.{a}.{b + 1}/32 proto udp sport {19 + i % 7} drop")
    if victim:
        rules += [f"dst {victim}/32 proto tcp dport {8000 + port} drop" for port in range(8)]
        if flood_rules:
            rules.append(f"dst {victim}/32 proto udp sport 53 drop")
            rules.append(f"dst {victim}/32 fragment is-fragment drop")
        else:
            rules.append(f"dst {victim}/32 proto udp sport 19 drop")
            rules.append(f"dst {victim}/32 proto udp sport 123 drop")
    return rules


def load_rules(proc: subprocess.Popen, rules: list[str]) -> float:
    t = time.perf_counter()
    xgbench.control(proc, "rule.load", text="\n".join(rules))
    return time.perf_counter() - t


@contextmanager
def xdpguard_with(lists: bool, rules: list[str], load: list[float]) -> Iterator:
    with (
        tempfile.TemporaryDirectory() as tmp,
        xgbench.xdpguard(state_dir=Path(tmp), edge=True) as p,
    ):
        if lists:
            xgbench.control(p, "ports.add", ports=[53])
            xgbench.control(p, "frags.set", policy="drop")
        if rules:
            load.append(load_rules(p, rules))

        def dropped() -> int:
            r = xgbench.control(p, "stats")["reasons"]  # type: ignore[index]
            return sum(r[k]["packets"] for k in ("udp_src_port", "fragment", "rule_drop"))

        yield dropped


def outer_cost(netns: str | None, frames: list[bytes]) -> float:
    """The cost per frame of the XDP program on outer (BPF_PROG_TEST_RUN)."""
    from xdpguard import _bindings as B

    ns = Netns(netns)
    outer = resolve_device(ns, NAMES["OUTER"])
    prog_id, _ = ns.run(B.xdp_query, outer.ifindex)
    fd = B.prog_fd_by_id(prog_id)
    try:
        return xgbench.xdp_cost(fd, frames)
    finally:
        import os

        os.close(fd)


def drdos_part(seconds: float, repeat: int) -> tuple[dict, float]:
    """Each dropper ``repeat`` times, in turns (this VM's rate drifts by a
    few per cent between runs): the median of each."""
    runs: dict[str, list[dict]] = {}
    load: list[float] = []
    with lab(edge=True):
        sh("ip", "-n", EDGE_NS, "addr", "add", f"{drdos.OUTER_ADDR}/24", "dev", drdos.OUTER)
        client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
        outer = resolve_device(Netns(EDGE_NS), drdos.OUTER)
        frame = xgbench.udp4_frame(
            client.mac, outer.mac, drdos.FLOOD_SRC, drdos.OUTER_ADDR, 53, 33000, 60
        )
        victim = drdos.OUTER_ADDR
        droppers = (
            ("xdp-minimal", drdos.xdp_minimal),
            ("xdpguard", lambda: xdpguard_with(True, [], load)),
            ("xdpguard+10k", lambda: xdpguard_with(True, rule_set(victim, False), load)),
            ("xdpguard-by-rules", lambda: xdpguard_with(False, rule_set(victim, True), load)),
        )
        for turn in range(repeat):
            for name, make in droppers:
                with make() as dropped:
                    r = drdos.measure(frame, seconds, dropped)
                    # The generator (about 1 Mpps) is slower than any of them: the
                    # program attached to outer, timed alone on the flood's frames.
                    r["xdp_ns"] = outer_cost(EDGE_NS, drdos.the_mix(frame))
                runs.setdefault(name, []).append(r)
                print(
                    f"  [{turn + 1}/{repeat}] {name:<18} {r['pps'] / 1e6:7.3f} Mpps  "
                    f"dropped {r['dropped']}/{r['sent']}, XDP {r['xdp_ns']:.1f} ns/frame"
                )
    results = {}
    for name, rs in runs.items():
        mid = sorted(rs, key=lambda r: r["pps"])[len(rs) // 2]
        results[name] = mid | {"runs_pps": [r["pps"] for r in rs]}
    return results, max(load)


def forwarding_part(seconds: float, repeat: int) -> dict:
    """Each configuration ``repeat`` times, in turns: the median of each."""
    runs: dict[str, list[dict]] = {}
    ceiling = forwarding.generator_ceiling()
    configs = (
        ("no-rules", []),
        ("10k-elsewhere", rule_set(None, False)),
        ("10k-on-origin", rule_set("169.254.0.2", False)),
    )
    for turn in range(repeat):
        for name, rules in configs:
            with (
                tempfile.TemporaryDirectory() as tmp,
                lab(edge=False),
                xgbench.xdpguard(state_dir=Path(tmp)) as p,
            ):
                if rules:
                    load_rules(p, rules)
                points = forwarding.sweep(seconds, ceiling)
                reasons = xgbench.control(p, "stats")["reasons"]  # type: ignore[index]
                client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
                origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
                udp = xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", "169.254.0.2",
                                         40000, 9, 60)  # fmt: skip
                r = {
                    "saturated_pps": max(pt["forwarded_pps"] for pt in points),
                    "rule_drops": reasons["rule_drop"]["packets"],  # 0: nothing matches
                    "xdp_ns": outer_cost(None, [udp]),
                    "points": points,
                }
            runs.setdefault(name, []).append(r)
            print(f"  [{turn + 1}/{repeat}] {name:<14} {r['saturated_pps'] / 1e6:7.3f} Mpps, "
                  f"XDP {r['xdp_ns']:.1f} ns/frame")  # fmt: skip
    results = {}
    for name, rs in runs.items():
        mid = sorted(rs, key=lambda r: r["saturated_pps"])[len(rs) // 2]
        results[name] = mid | {"runs_pps": [r["saturated_pps"] for r in rs]}
    return results


def announce_part(n: int) -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from lab import CLIENT_V4, ORIGIN_V4, Appliance
    from lab import lab as test_lab

    on, off = [], []
    source = f"bgp:{CONTROLLER}"
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        the_lab = stack.enter_context(test_lab(queues=1))
        app = Appliance(the_lab, tmp)
        stack.callback(forget, app.state_dir)  # its pinned flow table, after it stopped
        stack.enter_context(app)
        bgp = stack.enter_context(BgpLab(tmp, app.control, hold=30))
        bgp.wait_up(lambda: app.call("rule.list"))

        def dropped(rule: str) -> int:
            for r in app.call("rule.list", source=source)["rules"]:
                if r["rule"] == rule:
                    return r["dropped_packets"]
            return -1

        for i in range(n):
            port = 20000 + i
            rule = f"dst {ORIGIN_V4}/32 proto udp dport {port} drop"
            match = [
                "destination",
                f"{ORIGIN_V4}/32",
                "protocol",
                "udp",
                "destination-port",
                f"=={port}",
            ]
            # UDP to the port, a datagram a millisecond, flowing before the route exists
            with the_lab.probe(CLIENT_V4, ORIGIN_V4, "udp", 30, 0.001, 0.001, "--port", str(port)):
                time.sleep(0.05)
                t0 = time.perf_counter()
                bgp.announce("ipv4", *match, "then", "discard")
                while dropped(rule) <= 0:
                    time.sleep(0.001)
                on.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                bgp.withdraw("ipv4", *match)
                while dropped(rule) >= 0:
                    time.sleep(0.001)
                off.append(time.perf_counter() - t0)

    def summary(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {
            "n": len(xs),
            "median_ms": statistics.median(xs) * 1e3,
            "p95_ms": xs[max(0, int(len(xs) * 0.95) - 1)] * 1e3,
            "max_ms": xs[-1] * 1e3,
        }

    return {"announce": summary(on), "withdraw": summary(off)}


def main() -> int:
    ap = xgbench.arguments(__doc__, "rules")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--announcements", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="turns of the DRDoS droppers")
    args = xgbench.parse_as_root(ap)

    print("DRDoS drop, one core:")
    drop, load_s = drdos_part(args.seconds, args.repeat)
    print("Forwarding, fast path:")
    fwd = forwarding_part(args.seconds / 2, args.repeat)
    print(f"Announcement to effect, {args.announcements} announcements:")
    bgp = announce_part(args.announcements)

    report = xgbench.report("n-tuple rules at scale, FlowSpec announcement to effect") | {
        "rules": N_RULES,
        "load_seconds": load_s,
        "drdos": drop,
        "forwarding": fwd,
        "bgp": bgp,
        "loaded_over_xdp_minimal": drop["xdpguard+10k"]["pps"] / drop["xdp-minimal"]["pps"],
        "by_rules_over_xdp_minimal": drop["xdpguard-by-rules"]["pps"] / drop["xdp-minimal"]["pps"],
        "forwarding_elsewhere_over_none": fwd["10k-elsewhere"]["saturated_pps"]
        / fwd["no-rules"]["saturated_pps"],
        "forwarding_on_origin_over_none": fwd["10k-on-origin"]["saturated_pps"]
        / fwd["no-rules"]["saturated_pps"],
    }
    xgbench.write_report(report, args.json)
    print(f"\n10,000 rules loaded in {load_s:.2f} s (rule load, one control request)")
    print(f"{'DRDoS dropper':<18}{'drop rate':>12}{'XDP ns/frame':>14}")
    for name, r in drop.items():
        print(f"{name:<18}{r['pps'] / 1e6:>8.3f} Mpps{r['xdp_ns']:>14.1f}")
    print(
        f"xdpguard with 10,000 rules loaded / xdp-minimal: "
        f"{report['loaded_over_xdp_minimal']:.2f} (goal >= 0.9); the rules dropping it: "
        f"{report['by_rules_over_xdp_minimal']:.2f}"
    )
    print(f"{'forwarding':<18}{'saturated':>12}{'XDP ns/frame':>14}")
    for name, r in fwd.items():
        print(f"{name:<18}{r['saturated_pps'] / 1e6:>8.3f} Mpps{r['xdp_ns']:>14.1f}")
    print(
        f"10,000 rules elsewhere / none: {report['forwarding_elsewhere_over_none']:.2f} "
        f"(goal >= 0.9); 10 of them on the origin: "
        f"{report['forwarding_on_origin_over_none']:.2f}"
    )
    for what, s in bgp.items():
        print(
            f"{what:<9} to effect: median {s['median_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
            f"max {s['max_ms']:.1f} ms over {s['n']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
