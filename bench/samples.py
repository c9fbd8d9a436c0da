#!/usr/bin/env python3
"""What seeing the drops costs: samples and per-destination counting.

1. XDP's own cost per frame (a plain BPF_PROG_TEST_RUN with repeat, the
   kernel's timing, on FWD_CPU) of the outer program, configured as
   `ports add 53`, `frags drop` and the fast path on, in five builds and
   settings measured in the same run:

     off            loaded with XG_CFG_NO_SAMPLES: no sampling code at all
     defaults       sampling at its defaults (drops 1 in 1000, the rest 1 in
                    10000, a cap of 1000 a second); nothing protected
     defaults+dests the same, and the destinations protected: every frame
                    counted per protected address and class
     every-frame    every frame sampled (a capture of every reason running):
                    the cap refuses nearly all
     baseline       the minimal filter (bench/xg_bench.bpf.c xg_drdos) on the
                    drop mix; the bare DEVMAP forwarder on the fast path

   on two loads: the DRDoS drop mix (UDP from port 53 and the smallest later
   fragment) and fast-path frames (UDP to the origin, forwarded by XDP).
   The goal: defaults within 1.05x of off.

2. Memory at 1 million distinct destinations and 1 million distinct
   sources: `xdpguard run`, 198.18.0.0/15 and 2001:db8::/32 protected,
   every drop sampled under a cap of 100,000 a second; its outer program
   is then fed 1,000,000 IPv6 frames (BPF_PROG_TEST_RUN, no network), each
   from another source in 2001:db8:1::/48 to another address of
   2001:db8::/64. The daemon's RSS before and after, and the kernel's
   memory of its maps (bpftool's bytes_memlock).

Usage: bench/samples.py [--json PATH] (as root).
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import xgbench  # noqa: E402
from drdos import the_mix  # noqa: E402
from fastpath import bare_devmap  # noqa: E402
from xgbench import NAMES, lab, sh  # noqa: E402

from xdpguard import _bindings as B  # noqa: E402
from xdpguard.defs import Reason, Role  # noqa: E402
from xdpguard.netns import Netns, resolve_device  # noqa: E402
from xdpguard.policy import parse_prefix  # noqa: E402
from xdpguard.protect import ProtectMaps  # noqa: E402
from xdpguard.samples import DEFAULT_CAP, SampleMaps, default_rates  # noqa: E402
from xdpguard.xdp import PolicyMaps, XdpProgram  # noqa: E402

ORIGIN = "169.254.0.2"
DISTINCT = 1_000_000


def configured(name: str) -> tuple[XdpProgram, PolicyMaps, ProtectMaps | None]:
    """xdpguard's outer program as ``name`` of the docstring says."""
    prog = XdpProgram(Role.OUTER, flags=B.CFG_NO_SAMPLES if name == "off" else 0)
    maps = PolicyMaps(prog)
    maps.set_ports([53])
    maps.set_frag_policy("drop")
    B.map_update(prog.map_fd("xg_fastcfg"), struct.pack("=I", 0),
                 B.struct_bytes("struct xg_fast_cfg", flags=B.FAST_ON | B.FAST_TCP))  # fmt: skip
    inner = resolve_device(Netns(NAMES["INNER_NS"]), NAMES["INNER"])
    Netns(NAMES["INNER_NS"]).run(B.map_update, prog.map_fd("xg_peer"), struct.pack("=I", 0),
                                 struct.pack("=I", inner.ifindex))  # fmt: skip
    samples = SampleMaps(prog)
    if name == "every-frame":
        samples.write(dict.fromkeys(Reason, 1), DEFAULT_CAP)
    elif name != "off":
        samples.write({Reason[k]: v for k, v in default_rates()["every"].items()}, DEFAULT_CAP)
    protect = None
    if name in ("defaults+dests", "every-frame"):
        protect = ProtectMaps(prog, maps.set_protect_bits, 65536)
        protect.replace([(*parse_prefix("169.254.0.0/16"), None)])
    return prog, maps, protect


def program_costs() -> dict[str, dict[str, float]]:
    client = resolve_device(Netns(NAMES["CLIENT_NS"]), "eth0")
    origin = resolve_device(Netns(NAMES["ORIGIN_NS"]), "eth0")
    drop = the_mix(xgbench.udp4_frame(client.mac, origin.mac, "198.18.0.53", ORIGIN, 53, 9))
    fast = [xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", ORIGIN, 40000, 9, 60)]
    out: dict[str, dict[str, float]] = {"drop_mix": {}, "fast_path": {}}
    # Every build loaded at once, then 15 interleaved rounds: the machine's
    # drift (and where each build landed in memory) hits every build alike.
    rounds: dict[tuple[str, str], list[float]] = {}
    built = {name: configured(name) for name in ("off", "defaults", "defaults+dests",
                                                 "every-frame")}  # fmt: skip
    minimal = B.Prog(str(xgbench.BENCH_OBJ), "xg_drdos")
    try:
        with bare_devmap():
            devmap = B.Prog(str(xgbench.BENCH_OBJ), "xg_devmap")
            try:
                for _ in range(15):
                    for load, frames, base in (("drop_mix", drop, minimal),
                                               ("fast_path", fast, devmap)):  # fmt: skip
                        for name, (prog, _, _) in built.items():
                            rounds.setdefault((load, name), []).append(
                                xgbench.xdp_cost(prog.fd, frames, repeat=300_000)
                            )
                        rounds.setdefault((load, "baseline"), []).append(
                            xgbench.xdp_cost(base.fd, frames, repeat=300_000)
                        )
            finally:
                devmap.close()
    finally:
        minimal.close()
        for prog, maps, _ in built.values():
            maps.close()
            prog.close()
    # The kernel reports whole ns per run: the mean of each build's middle
    # rounds (an interquartile mean) resolves what one round cannot, and
    # leaves out the rounds another task disturbed.
    for (load, name), values in rounds.items():
        v = sorted(values)
        mid = v[len(v) // 4 : len(v) - len(v) // 4]
        out[load][name] = sum(mid) / len(mid)
    return out


def v6_frame(src: bytes, dst: bytes) -> bytes:
    payload = bytes(18)
    udp = struct.pack("!HHHH", 53, 40000, 8 + len(payload), 0) + payload
    ip6 = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x86\xdd" + ip6 + udp


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def maps_memlock(prog_id: int) -> dict[str, int]:
    """bytes_memlock of each map the program uses (bpftool's view of the kernel's)."""
    prog = json.loads(sh("bpftool", "-j", "prog", "show", "id", str(prog_id)))
    out = {}
    for map_id in prog.get("map_ids", []):
        m = json.loads(sh("bpftool", "-j", "map", "show", "id", str(map_id)))
        out[m.get("name", str(map_id))] = int(m.get("bytes_memlock", 0))
    return out


def memory() -> dict[str, object]:
    rng = random.Random(1)
    print("memory: feeding 1,000,000 distinct sources and destinations (seed 1)")
    with tempfile.TemporaryDirectory() as tmp, xgbench.xdpguard(state_dir=Path(tmp)) as proc:
        xgbench.control(proc, "ports.add", ports=[53])
        xgbench.control(proc, "protect.add", prefixes=["198.18.0.0/15", "2001:db8::/32"])
        xgbench.control(proc, "sample.set", drops=1, cap=100_000)
        time.sleep(1.5)
        before = rss_kb(proc.pid)
        st = xgbench.control(proc, "status")
        prog_id = st["devices"]["outer"]["xdp"]["prog_id"]  # type: ignore[index]
        fd = B.prog_fd_by_id(prog_id)
        start = time.monotonic()
        try:
            for i in range(DISTINCT):
                src = b"\x20\x01\x0d\xb8\x00\x01" + rng.getrandbits(80).to_bytes(10, "big")
                dst = b"\x20\x01\x0d\xb8" + bytes(4) + (i + 1).to_bytes(8, "big")
                B.prog_test_run(fd, v6_frame(src, dst))
        finally:
            os.close(fd)
        fed = time.monotonic() - start
        time.sleep(3)  # the sampler reads the ring, the counters are read once a second
        after = rss_kb(proc.pid)
        # As many again, all new: bounded memory stays where it was.
        fd = B.prog_fd_by_id(prog_id)
        try:
            for i in range(DISTINCT):
                src = b"\x20\x01\x0d\xb8\x00\x02" + rng.getrandbits(80).to_bytes(10, "big")
                dst = b"\x20\x01\x0d\xb8" + bytes(3) + b"\x01" + (i + 1).to_bytes(8, "big")
                B.prog_test_run(fd, v6_frame(src, dst))
        finally:
            os.close(fd)
        time.sleep(3)
        after2 = rss_kb(proc.pid)
        listed = xgbench.control(proc, "protect.list")
        samples = xgbench.control(proc, "sample.get")
        top = xgbench.control(proc, "top", by="src", n=5)
        maps = maps_memlock(prog_id)
    return {
        "distinct_sources": DISTINCT,
        "distinct_destinations": DISTINCT,
        "fed_seconds": fed,
        "rss_kb_before": before,
        "rss_kb_after": after,
        "rss_kb_after_twice_as_many": after2,
        "addresses": listed["addresses"],  # type: ignore[index]
        "samples": {k: samples[k] for k in ("taken", "capped", "ring_full", "received")},  # type: ignore[index]
        "top_rows": len(top["rows"]),  # type: ignore[index]
        "maps_bytes_memlock": maps,
        "maps_total_bytes": sum(maps.values()),
        "dests_map_bytes": maps.get("xg_dests", 0),
    }


def main() -> int:
    ap = xgbench.arguments(__doc__, "samples")
    args = xgbench.parse_as_root(ap)
    report: dict = xgbench.report("samples and per-destination counting")
    with lab(edge=False):
        costs = program_costs()
        report["xdp_test_run_ns"] = costs
        for load, by in costs.items():
            print(f"{load}: " + ", ".join(f"{k} {v:.1f} ns" for k, v in by.items()))
            report[f"{load}_defaults_over_off"] = by["defaults"] / by["off"]
            report[f"{load}_dests_over_off"] = by["defaults+dests"] / by["off"]
            print(f"  defaults/off {by['defaults'] / by['off']:.3f} (goal <= 1.05), "
                  f"+dests/off {by['defaults+dests'] / by['off']:.3f}, "
                  f"off/baseline {by['off'] / by['baseline']:.2f}")  # fmt: skip
        report["memory"] = memory()
    m = report["memory"]
    mib = {k: m[k] / 1024 for k in ("rss_kb_before", "rss_kb_after", "rss_kb_after_twice_as_many")}
    print(
        f"RSS {mib['rss_kb_before']:.1f} MiB before, {mib['rss_kb_after']:.1f} MiB after "
        f"{DISTINCT:,} sources and destinations, {mib['rss_kb_after_twice_as_many']:.1f} MiB "
        f"after as many again; maps {m['maps_total_bytes'] / 2**20:.1f} MiB (xg_dests "
        f"{m['dests_map_bytes'] / 2**20:.1f} MiB); addresses {m['addresses']}; "
        f"samples {m['samples']}"
    )
    xgbench.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
