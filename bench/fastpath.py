#!/usr/bin/env python3
"""The XDP fast path against the alternatives, all in one run, one DUT core.

  rate     64-byte UDP, client -> origin, swept up to the generator's full
           rate: xdpguard (fast path on, the default), xdpguard
           --fast-path off, bare-devmap (xg_devmap: every frame redirected
           outer -> inner through a DEVMAP, the limit), bare-devmap-read
           (the same, reading the 42 bytes of the Ethernet, IPv4 and UDP
           headers: the cache lines the generator's core wrote, which any
           filter pays for and the bare forwarder does not), bare-afxdp
           (--no-policy: the AF_XDP path with no logic) and the kernel
           bridge.
  tcp      one established TCP flow (a real connection whose in-window
           segment the generator replays into the origin's XDP sink):
           xdpguard on and off; on again with the flow table filled to
           about 1,000,000 flows by a spoofed SYN flood (mode off).
  iperf3   real TCP through the lab, 1 and 4 streams, each direction:
           goodput and retransmits, and ping RTT; xdpguard (fast path on)
           against the bridge (no XDP anywhere) and bridge-xdp (the same
           with a pass-through XDP program on both ports: what any XDP
           program costs on a veth). Nothing is pinned here: the lab as a
           new user runs it.

For rate and tcp, the DUT core is CPU 1: outer's NAPI runs threaded and
pinned there (so XDP, the fast path's redirect and the bridge's forwarding
all run on it), and so does xdpguard. The generator runs on CPU 0.

Usage: bench/fastpath.py [--seconds-per-point S] [--json PATH] (as root).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from forwarding import bridge, generator_ceiling, summarize, sweep  # noqa: E402
from xgbench import EDGE_NS, FWD_CPU, GEN_CPU, NAMES, lab  # noqa: E402

from xdpguard import _bindings as B  # noqa: E402
from xdpguard.netns import Netns, resolve_device  # noqa: E402

ORIGIN, PORT = "169.254.0.2", 5201


@contextmanager
def bare_devmap(name: str = "xg_devmap"):
    """xg_devmap on outer, its DEVMAP pointing at inner (written from inner's netns)."""
    prog = xgbench.attach(None, NAMES["OUTER"], name)
    inner = resolve_device(Netns(NAMES["INNER_NS"]), NAMES["INNER"])
    Netns(NAMES["INNER_NS"]).run(
        B.map_update,
        prog.map_fd("fwd_peer"),
        struct.pack("=I", 0),
        struct.pack("=I", inner.ifindex),
    )
    try:
        yield None
    finally:
        prog.close()


def rates(seconds: float, ceiling: float, only: set[str] | None = None) -> list[dict]:
    results = []
    for name, extra in (
        ("xdpguard", ()),
        ("xdpguard-fast-off", ("--fast-path", "off")),
        ("bare-afxdp", ("--no-policy",)),
    ):
        if only and name not in only:
            continue
        with (
            tempfile.TemporaryDirectory() as tmp,
            lab(edge=False),
            xgbench.xdpguard(*extra, state_dir=Path(tmp)),
        ):
            xgbench.pin_napi(None, NAMES["OUTER"], FWD_CPU)
            results.append(summarize(name, sweep(seconds, ceiling), None, ceiling))
    for name, prog in (("bare-devmap", "xg_devmap"), ("bare-devmap-read", "xg_devmap_read")):
        if not only or name in only:
            with lab(edge=False), bare_devmap(prog):
                xgbench.pin_napi(None, NAMES["OUTER"], FWD_CPU)
                results.append(summarize(name, sweep(seconds, ceiling), None, ceiling))
    if not only or "bridge" in only:
        with lab(edge=True), bridge(rps=False):
            xgbench.pin_napi(EDGE_NS, NAMES["OUTER"], FWD_CPU)
            results.append(summarize("bridge", sweep(seconds, ceiling), None, ceiling))
    return results


def program_costs() -> dict[str, float]:
    """XDP's own cost per frame of the fast path (a plain BPF_PROG_TEST_RUN
    with repeat, the kernel's timing) on the sweep's UDP frame: xdpguard's
    real outer program (the running one's, fast path on), against the bare
    DEVMAP forwarders."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, lab(edge=False):
        client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
        origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
        frame = xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", ORIGIN, 40000, 9, 60)
        with xgbench.xdpguard(state_dir=Path(tmp)) as proc:
            fd = xgbench.running_prog_fd(proc)
            try:
                out["xdpguard"] = xgbench.xdp_cost(fd, [frame])
            finally:
                os.close(fd)
        for name in ("xg_devmap", "xg_devmap_read"):
            with bare_devmap(name):
                prog = B.Prog(str(xgbench.BENCH_OBJ), name)
                try:
                    out[name.replace("xg_", "bare-").replace("_", "-")] = xgbench.xdp_cost(
                        prog.fd, [frame]
                    )
                finally:
                    prog.close()
    return out


def forward_rate(frame: bytes, sink: xgbench.Sink, count: int = 2_000_000) -> float:
    gen = xgbench.Generator(NAMES["CLIENT_NS"], "eth0", frame)
    try:
        gen.run(50_000, cpu=GEN_CPU)
        before = sink.count()
        elapsed = gen.run(count, cpu=GEN_CPU)
        time.sleep(0.1)
        return (sink.count() - before) / elapsed
    finally:
        gen.close()


def serve_echo(ns: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(HERE.parent / "scripts" / "labtraffic.py"),
         "serve", "--port", str(PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and "serving" in proc.stdout.readline()
    return proc


def tcp_flow() -> dict:
    """One verified flow's in-window segment, replayed: the fast path's rate."""
    out: dict = {}
    for name, extra in (("xdpguard", ()), ("xdpguard-fast-off", ("--fast-path", "off"))):
        with tempfile.TemporaryDirectory() as tmp, lab(edge=False):
            client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
            origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
            srv = serve_echo(NAMES["ORIGIN_NS"])
            try:
                with xgbench.xdpguard(*extra, "--learn", "0", state_dir=Path(tmp)) as proc:
                    xgbench.pin_napi(None, NAMES["OUTER"], FWD_CPU)
                    xgbench.control(proc, "tcp.config", syn_mode="off", state_mode="on")
                    s = Netns(NAMES["CLIENT_NS"]).run(
                        lambda: socket.create_connection((ORIGIN, PORT), timeout=5)
                    )
                    s.sendall(b"ECHO\nx\n")
                    s.recv(16)
                    cport = s.getsockname()[1]
                    segment = xgbench.flow_segment(
                        proc, client.mac, origin.mac, cport, ORIGIN, PORT
                    )
                    sink = xgbench.Sink(NAMES["ORIGIN_NS"], "eth0")
                    try:
                        out[f"{name}_10_flows_pps"] = forward_rate(segment, sink)
                        if name == "xdpguard":
                            flood = xgbench.tcp4_frame(
                                client.mac, origin.mac, "198.18.0.1", ORIGIN, 40000, PORT, "S"
                            )
                            gen = xgbench.Generator(
                                NAMES["CLIENT_NS"], "eth0", flood, random_saddr=True,
                                random_sport=True,
                            )  # fmt: skip
                            deadline = time.monotonic() + 120
                            while time.monotonic() < deadline:
                                gen.run(500_000, cpu=GEN_CPU)
                                n = xgbench.control(proc, "tcp.flows", top=0)["tracked"]  # type: ignore[index]
                                if n >= 950_000:
                                    break
                            gen.close()
                            out["tracked"] = xgbench.control(proc, "tcp.flows", top=0)["tracked"]  # type: ignore[index]
                            out[f"{name}_1m_flows_pps"] = forward_rate(segment, sink)
                    finally:
                        sink.close()
                        s.close()
            finally:
                srv.kill()
                srv.wait()
    out["1m_over_10"] = out["xdpguard_1m_flows_pps"] / out["xdpguard_10_flows_pps"]
    return out


def iperf(streams: int, reverse: bool, seconds: int = 5) -> dict:
    server = subprocess.Popen(
        ["ip", "netns", "exec", NAMES["ORIGIN_NS"], "iperf3", "-s", "-1", "-p", "5202"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        res = xgbench.sh(
            "ip", "netns", "exec", NAMES["CLIENT_NS"], "iperf3", "-c", ORIGIN, "-p", "5202",
            "-t", str(seconds), "-P", str(streams), "-J", *(["-R"] if reverse else []),
        )  # fmt: skip
    finally:
        server.wait(timeout=30)
    end = json.loads(res)["end"]
    return {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits", 0),
    }


def ping_rtt(count: int = 200) -> float:
    out = xgbench.sh(
        "ip", "netns", "exec", NAMES["CLIENT_NS"], "ping", "-c", str(count), "-i", "0.005", "-q",
        ORIGIN,
    )  # fmt: skip
    return float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1))  # type: ignore[union-attr]


def real_tcp() -> dict:
    """iperf3 and ping through the lab as a new user runs them: nothing pinned."""

    def measure() -> dict:
        return {
            "ping_ms": ping_rtt(),
            **{f"{n}x{'down' if r else 'up'}": iperf(n, r) for n in (1, 4) for r in (False, True)},
        }

    out = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        lab(edge=False),
        # A fresh start: no flows to adopt, so no learning window (during
        # which TCP is never forwarded in XDP).
        xgbench.xdpguard("--learn", "0", state_dir=Path(tmp), pin=False) as proc,
    ):
        out["xdpguard"] = measure()
        d = xgbench.control(proc, "stats")["directions"]  # type: ignore[index]
        out["xdpguard"]["in_xdp_share"] = {
            k: v["xdp"]["fast_path"]["packets"]
            / max(v["rx_packets"] + v["xdp"]["fast_path"]["packets"], 1)
            for k, v in d.items()
        }
    # What an operator would run instead: a bridge, no XDP anywhere.
    with lab(edge=True), bridge(rps=False, xdp_on=()):
        out["bridge"] = measure()
    # The same bridge with a pass-through XDP program on both ports: what
    # any XDP program costs on a veth (an skb with paged data, every TCP
    # segment, is copied into a page before XDP sees it; a NIC's native XDP
    # does not copy).
    with lab(edge=True), bridge(rps=False, xdp_on=("OUTER", "INNER")):
        out["bridge-xdp"] = measure()
    return out


def main() -> int:
    ap = xgbench.arguments(__doc__, "fastpath")
    ap.add_argument("--seconds-per-point", type=float, default=1.0)
    args = xgbench.parse_as_root(ap)
    report: dict = xgbench.report("XDP fast path")
    ceiling = generator_ceiling(napi_cpu=FWD_CPU)
    report["generator_ceiling_pps"] = ceiling
    print(f"generator alone (AF_XDP TX, copy mode, one core): {ceiling / 1e6:.3f} Mpps")
    results = rates(args.seconds_per_point, ceiling)
    by = {r["name"]: r["saturated_pps"] for r in results}
    report["rate"] = {
        "results": results,
        "xdpguard_over_bridge": by["xdpguard"] / by["bridge"],
        "xdpguard_over_bare_devmap": by["xdpguard"] / by["bare-devmap"],
        "xdpguard_over_bare_devmap_read": by["xdpguard"] / by["bare-devmap-read"],
        "fast_off_over_bare_afxdp": by["xdpguard-fast-off"] / by["bare-afxdp"],
    }
    print(f"{'config':<20}{'saturated':>12}{'max offered':>14}{'cpu1 ns/frame':>15}  bound")
    for r in results:
        sat, top = r["saturated_pps"] / 1e6, r["max_offered_pps"] / 1e6
        ns = r["dut_ns_per_frame_at_fixed_load"]
        print(
            f"{r['name']:<20}{sat:>9.3f} Mp{top:>11.3f} Mp{(f'{ns:.0f}' if ns else '-'):>15}"
            f"  {r['bound']}"
        )
    print(
        f"(cpu1 ns/frame: the DUT core's busy time per forwarded frame at "
        f"{results[0]['fixed_load_pps'] / 1e6:.2f} Mpps offered)"
    )
    for k, v in report["rate"].items():
        if k != "results":
            print(f"{k}: {v:.2f}")
    costs = program_costs()
    report["xdp_test_run_ns"] = costs
    print(
        "XDP's own cost per frame (BPF_PROG_TEST_RUN): "
        + ", ".join(f"{k} {v:.1f} ns" for k, v in costs.items())
    )
    report["tcp"] = tcp_flow()
    report["tcp"]["fast_over_off"] = (
        report["tcp"]["xdpguard_10_flows_pps"] / report["tcp"]["xdpguard-fast-off_10_flows_pps"]
    )
    print("tcp flow:", json.dumps(report["tcp"]))
    report["real_tcp"] = real_tcp()
    names = ("xdpguard", "bridge", "bridge-xdp")
    print(f"{'iperf3 Gbit/s (retransmits)':<30}" + "".join(f"{n:>20}" for n in names))
    for k in ("1xup", "1xdown", "4xup", "4xdown"):
        cells = (report["real_tcp"][n][k] for n in names)
        print(f"{k:<30}" + "".join(f"{c['gbit_s']:>11.2f} ({c['retransmits']:>6})" for c in cells))
    rtts = (report["real_tcp"][n]["ping_ms"] for n in names)
    print(f"{'ping RTT ms':<30}" + "".join(f"{rtt:>20.3f}" for rtt in rtts))
    xgbench.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
