#!/usr/bin/env python3
"""The classic DRDoS comparison: who drops a reflection flood fastest on one core.

Load: a 1:1 mix of 64-byte UDP packets from source port 53 and the smallest
later IPv4 fragments (8 bytes at offset 1480, checksums right), from the
AF_XDP generator on the client's eth0, pinned to CPU 0. The flood
arrives on `outer` (in its own namespace); the receiving NAPI runs on the
generator's core, so each figure is what one core does generating and
dropping. `gen-only` (an XDP program that drops everything) is that core's
ceiling; the mechanism's own cost per packet is 1/rate - 1/ceiling. The
generator (about 1 Mpps) is far slower than an XDP drop, so the XDP
droppers are also timed alone on the same frames: a plain BPF_PROG_TEST_RUN
with repeat of xdpguard's real, configured program (the running one's),
the minimal filter and a drop-everything program.

Droppers, each measured in the same run:
  (a) xdpguard     xdpguard run, `ports add 53`, `frags drop`
  (b) iptables     raw PREROUTING: `-f -j DROP` and an ipset bitmap:port set,
                   with iptables-legacy (xtables); iptables-nft (Debian's
                   default `iptables`, the same rules on nf_tables) too
  (c) tc           clsact ingress, a cls_bpf direct-action filter
                   (bench/xg_tc.bpf.c): this kernel has no flower, matchall
                   or gact, so u32 could not drop either
  (d) nftables     netdev ingress: ip frag-off, udp sport 53
  (e) xdp-minimal  a hand-written XDP program doing only those two checks
(b)-(d) see frames after XDP_PASS turned them into skbs, as a kernel path would.

Usage: bench/drdos.py [--seconds S] [--json PATH] (as root).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from xgbench import EDGE_NS, GEN_CPU, NAMES, lab, sh  # noqa: E402

from xdpguard import _bindings as B  # noqa: E402
from xdpguard.netns import Netns, resolve_device  # noqa: E402

OUTER = NAMES["OUTER"]
OUTER_ADDR = "169.254.1.1"  # so the kernel baselines' IP layer takes the frames
FLOOD_SRC = "198.18.0.53"  # the benchmark range: a spoofed reflector


def ns_sh(*cmd: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", EDGE_NS, *cmd, stdin=stdin)


@contextmanager
def skb_path() -> Iterator[None]:
    """XDP_PASS on outer: the veth takes XDP_TX frames and hands skbs to the stack."""
    prog = xgbench.attach(EDGE_NS, OUTER, "xg_pass")
    try:
        yield
    finally:
        prog.close()


@contextmanager
def gen_only() -> Iterator[Callable[[], int]]:
    prog = xgbench.attach(EDGE_NS, OUTER, "xg_sink")
    try:
        yield lambda: xgbench.percpu_sum(prog, "sink_count")
    finally:
        prog.close()


@contextmanager
def xdp_minimal() -> Iterator[Callable[[], int]]:
    prog = xgbench.attach(EDGE_NS, OUTER, "xg_drdos")
    try:
        yield lambda: xgbench.percpu_sum(prog, "drdos_count")
    finally:
        prog.close()


@contextmanager
def xdpguard() -> Iterator[Callable[[], int]]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        xgbench.xdpguard(state_dir=Path(tmp), edge=True) as p,
    ):
        xgbench.control(p, "ports.add", ports=[53])
        xgbench.control(p, "frags.set", policy="drop")

        def dropped() -> int:
            r = xgbench.control(p, "stats")["reasons"]  # type: ignore[index]
            return r["udp_src_port"]["packets"] + r["fragment"]["packets"]

        yield dropped


def _iptables(binary: str) -> Callable[[], Iterator[Callable[[], int]]]:
    @contextmanager
    def dropper() -> Iterator[Callable[[], int]]:
        with skb_path():
            ns_sh("ipset", "create", "xgb-drdos", "bitmap:port", "range", "0-65535")
            try:
                ns_sh("ipset", "add", "xgb-drdos", "53")
                ns_sh(binary, "-t", "raw", "-A", "PREROUTING", "-f", "-j", "DROP")
                ns_sh(
                    binary,
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "udp",
                    "-m",
                    "set",
                    "--match-set",
                    "xgb-drdos",
                    "src",
                    "-j",
                    "DROP",
                )

                def dropped() -> int:
                    out = ns_sh(binary, "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n")
                    return sum(
                        int(line.split()[0]) for line in out.splitlines()[2:] if line.strip()
                    )

                yield dropped
            finally:
                ns_sh(binary, "-t", "raw", "-F", "PREROUTING")
                ns_sh("ipset", "destroy", "xgb-drdos")

    return dropper


@contextmanager
def tc() -> Iterator[Callable[[], int]]:
    with skb_path():
        ns_sh("tc", "qdisc", "add", "dev", OUTER, "clsact")
        try:
            ns_sh(
                "tc",
                "filter",
                "add",
                "dev",
                OUTER,
                "ingress",
                "bpf",
                "da",
                "obj",
                str(HERE / "xg_tc.bpf.o"),
                "sec",
                "tc",
            )

            def dropped() -> int:
                out = json.loads(sh("bpftool", "-j", "map", "dump", "name", "xgb_tc_drops"))
                return sum(v["value"] for e in out for v in e["formatted"]["values"])

            yield dropped
        finally:
            ns_sh("tc", "qdisc", "del", "dev", OUTER, "clsact")


@contextmanager
def nftables() -> Iterator[Callable[[], int]]:
    with skb_path():
        ns_sh(
            "nft",
            "-f",
            "-",
            stdin=(
                "table netdev xgb {\n chain in {\n"
                f'  type filter hook ingress device "{OUTER}" priority 0;\n'
                "  ip frag-off & 0x1fff != 0 counter drop\n"
                "  udp sport 53 counter drop\n }\n}\n"
            ),
        )
        try:

            def dropped() -> int:
                out = json.loads(ns_sh("nft", "-j", "list", "table", "netdev", "xgb"))
                return sum(
                    e["counter"]["packets"]
                    for item in out["nftables"]
                    if "rule" in item
                    for e in item["rule"]["expr"]
                    if "counter" in e
                )

            yield dropped
        finally:
            ns_sh("nft", "delete", "table", "netdev", "xgb")


DROPPERS = {
    "gen-only": gen_only,
    "xdpguard": xdpguard,
    "iptables": _iptables("iptables-legacy"),
    "iptables-nft": _iptables("iptables-nft"),
    "tc": tc,
    "nftables": nftables,
    "xdp-minimal": xdp_minimal,
}


def measure(frame: bytes, seconds: float, dropped: Callable[[], int]) -> dict:
    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame, mix_fragments=True)
    try:
        gen.run(20_000, cpu=GEN_CPU)  # warm up, and calibrate the count
        t = time.perf_counter()
        gen.run(200_000, cpu=GEN_CPU)
        rate = 200_000 / (time.perf_counter() - t)
        before_sent, before_drop = gen.sent(), dropped()
        elapsed = gen.run(int(rate * seconds), cpu=GEN_CPU)
        time.sleep(0.2)
        sent = gen.sent() - before_sent
        drops = dropped() - before_drop
    finally:
        gen.close()
    return {"pps": sent / elapsed, "sent": sent, "dropped": drops, "seconds": elapsed}


def the_mix(frame: bytes) -> list[bytes]:
    """The flood's two frames, as the generator varies them: a UDP datagram
    from port 53 and the smallest later fragment of one."""
    frag = bytearray(frame)
    frag[16:18] = (28).to_bytes(2, "big")
    frag[20:22] = (1480 // 8).to_bytes(2, "big")
    frag[24:26] = b"\0\0"
    frag[24:26] = xgbench._csum(bytes(frag[14:34])).to_bytes(2, "big")
    return [frame, bytes(frag)]


def program_costs(frame: bytes) -> dict[str, float]:
    """Each XDP dropper's own cost per frame on the flood's frames (a plain
    BPF_PROG_TEST_RUN with repeat, the kernel's timing), in one lab: the
    generator's core, which also runs the drop, hides it otherwise."""
    frames = the_mix(frame)
    out: dict[str, float] = {}
    for name, prog in (("gen-only", "xg_sink"), ("xdp-minimal", "xg_drdos")):
        p = B.Prog(str(xgbench.BENCH_OBJ), prog)
        try:
            out[name] = xgbench.xdp_cost(p.fd, frames)
        finally:
            p.close()
    with (
        tempfile.TemporaryDirectory() as tmp,
        xgbench.xdpguard(state_dir=Path(tmp), edge=True) as proc,
    ):
        xgbench.control(proc, "ports.add", ports=[53])
        xgbench.control(proc, "frags.set", policy="drop")
        fd = xgbench.running_prog_fd(proc)
        try:
            out["xdpguard"] = xgbench.xdp_cost(fd, frames)
        finally:
            os.close(fd)
    return out


def main() -> int:
    ap = xgbench.arguments(__doc__, "drdos")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = xgbench.parse_as_root(ap)

    results = {}
    with lab(edge=True):
        sh("ip", "-n", EDGE_NS, "addr", "add", f"{OUTER_ADDR}/24", "dev", OUTER)
        client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
        outer = resolve_device(Netns(EDGE_NS), OUTER)
        frame = xgbench.udp4_frame(client.mac, outer.mac, FLOOD_SRC, OUTER_ADDR, 53, 33000, 60)
        for name, dropper in DROPPERS.items():
            with dropper() as dropped:
                results[name] = measure(frame, args.seconds, dropped)
            r = results[name]
            print(
                f"{name:<12} {r['pps'] / 1e6:7.3f} Mpps  dropped {r['dropped']}/{r['sent']}",
                flush=True,
            )

        costs = program_costs(frame)
    gen_alone = xgbench.gen_ceiling(frame, mix_fragments=True)

    ceiling = results["gen-only"]["pps"]
    for r in results.values():
        r["ns_per_packet_net"] = max(0.0, (1 / r["pps"] - 1 / ceiling) * 1e9)
    for name, ns in costs.items():
        results[name]["xdp_test_run_ns"] = ns
    x = results["xdpguard"]["pps"]
    report = xgbench.report(
        "DRDoS drop: 1:1 UDP sport 53 and smallest IPv4 fragments, one core"
    ) | {
        "generator_ceiling_pps": gen_alone,
        "results": results,
        "xdpguard_over_xdp_minimal": x / results["xdp-minimal"]["pps"],
        "xdpguard_over_iptables": x / results["iptables"]["pps"],
        "xdpguard_test_run_over_xdp_minimal": costs["xdpguard"] / costs["xdp-minimal"],
    }
    xgbench.write_report(report, args.json)

    print(f"\ngenerator alone (AF_XDP TX, copy mode, one core): {gen_alone / 1e6:.3f} Mpps")
    print(
        f"{'dropper':<12}{'drop rate':>12}{'own ns/pkt':>12}{'vs xdpguard':>13}{'XDP ns/frame':>14}"
    )
    for name, r in results.items():
        run = r.get("xdp_test_run_ns")
        print(
            f"{name:<12}{r['pps'] / 1e6:>8.3f} Mpps{r['ns_per_packet_net']:>10.0f}"
            f"{r['pps'] / x:>12.2f}x{(f'{run:.1f}' if run is not None else '-'):>14}"
        )
    print(
        "(drop rate and own ns/pkt: one core generating and dropping, generator-bound for "
        "the XDP droppers; XDP ns/frame: BPF_PROG_TEST_RUN, the program alone)"
    )
    print(f"xdpguard / xdp-minimal, rate: {report['xdpguard_over_xdp_minimal']:.2f} (goal >= 0.9)")
    print(
        f"xdpguard / xdp-minimal, XDP cost per frame: "
        f"{costs['xdpguard']:.1f} / {costs['xdp-minimal']:.1f} ns "
        f"({report['xdpguard_test_run_over_xdp_minimal']:.2f}x)"
    )
    print(f"xdpguard / iptables+ipset: {report['xdpguard_over_iptables']:.2f} (goal >= 2.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
