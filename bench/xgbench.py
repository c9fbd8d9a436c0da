"""Building blocks of the benchmarks (and of the tests that need real load).

LiveGenerator sends frames from a device with BPF_PROG_RUN in live-frame
mode (XDP_TX out of the device, several Mpps from one core, where trafgen
tops out near 1 Mpps). Sink counts what reaches a device and drops it in
XDP, so a measurement does not include the receiver's network stack.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from xdpguard import _bindings as B
from xdpguard.netns import Netns, resolve_device

BENCH_OBJ = Path(__file__).resolve().parent / "xg_bench.bpf.o"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def udp4_frame(
    src_mac: str,
    dst_mac: str,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    size: int = 64,
    frag_offset: int = 0,
    more_frags: bool = False,
) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes (without FCS), checksums right."""
    payload_len = max(size - 14 - 20 - 8, 0)
    payload = bytes(payload_len)
    udp_len = 8 + payload_len
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    ucs = _csum(pseudo + udp) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, udp_len, ucs) + payload
    flags_frag = (0x2000 if more_frags else 0) | (frag_offset // 8)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + udp_len,
        1,
        flags_frag,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + ip + udp


class LiveGenerator:
    """Sends a template frame out of ``ifname`` (in ``netns``) with XDP_TX live frames.

    ``ratio`` thins the output inside the program (see xg_bench.bpf.c): one
    long BPF_PROG_RUN gives a smooth load of about ratio x the full rate.
    """

    def __init__(
        self,
        netns: str | None,
        ifname: str,
        frame: bytes,
        random_saddr: bool = False,
        random_sport: bool = False,
        ratio: float = 1.0,
    ) -> None:
        self.ns = Netns(netns)
        self.dev = resolve_device(self.ns, ifname)
        self.frame = frame
        threshold = 0xFFFFFFFF if ratio >= 1.0 else int(ratio * 0xFFFFFFFF)
        self.prog = B.Prog(
            str(BENCH_OBJ),
            "xg_gen",
            {
                "gen_random_saddr": struct.pack("=I", int(random_saddr)),
                "gen_random_sport": struct.pack("=I", int(random_sport)),
                "gen_tx_ratio": struct.pack("=I", threshold),
            },
        )
        self._sent = self.prog.map_fd("gen_sent")
        self._ncpus = B.num_possible_cpus()

    def sent(self) -> int:
        """Frames transmitted so far (runs that were not thinned out)."""
        raw = B.map_lookup(self._sent, struct.pack("=I", 0), 8 * self._ncpus)
        assert raw is not None
        return sum(struct.unpack(f"={self._ncpus}Q", raw))

    def run(self, runs: int, cpu: int | None = None, batch: int = 64) -> float:
        """Execute the program ``runs`` times (pinned to ``cpu``); the seconds it took."""

        def body() -> float:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            start = time.perf_counter()
            left = runs
            while left:
                n = min(left, 1 << 30)
                B.prog_run_live(self.prog.fd, self.frame, self.dev.ifindex, n, batch)
                left -= n
            return time.perf_counter() - start

        return self.ns.run(body)

    def send(self, count: int) -> float:
        """Send ``count`` frames (ratio 1) as fast as possible; the seconds it took."""
        return self.run(count)

    def close(self) -> None:
        self.prog.close()


class Sink:
    """Counts and drops every frame arriving on ``ifname`` (in ``netns``)."""

    def __init__(self, netns: str | None, ifname: str) -> None:
        self.ns = Netns(netns)
        self.dev = resolve_device(self.ns, ifname)
        self.prog = B.Prog(str(BENCH_OBJ), "xg_sink")
        self._map = self.prog.map_fd("sink_count")
        self._ncpus = B.num_possible_cpus()
        self.ns.run(self.prog.attach, self.dev.ifindex, B.XDP_FLAGS_DRV_MODE)

    def count(self) -> int:
        raw = B.map_lookup(self._map, struct.pack("=I", 0), 8 * self._ncpus)
        assert raw is not None
        return sum(struct.unpack(f"={self._ncpus}Q", raw))

    def close(self) -> None:
        self.prog.close()


def wait_quiet(read: Callable[[], object], settle: float = 0.3, timeout: float = 20.0) -> object:
    """Poll ``read()`` until it stops changing for ``settle`` seconds; its last value."""
    deadline = time.monotonic() + timeout
    last = read()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        cur = read()
        if cur != last:
            last, stable_since = cur, time.monotonic()
        elif time.monotonic() - stable_since >= settle:
            return cur
    return last


class CpuMeter:
    """CPU seconds used by a process (all threads) between start() and stop()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def _cpu(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._tick

    def measure(self, seconds: float) -> float:
        """Fraction of one core used over ``seconds``."""
        c0, t0 = self._cpu(), time.monotonic()
        time.sleep(seconds)
        return (self._cpu() - c0) / (time.monotonic() - t0)
