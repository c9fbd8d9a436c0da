"""Building blocks of the benchmarks (and of the tests that need real load).

Generator sends frames from a device through a TX-only AF_XDP socket in copy
mode (what works on every kernel: live-frame BPF_PROG_RUN, faster, is
refused by locked-down kernels). Sink counts what reaches a device and drops
it in XDP, so a measurement does not include the receiver's network stack.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from xdpguard import _bindings as B
from xdpguard.control import ControlClient, wait_ready
from xdpguard.errors import XdpguardError
from xdpguard.flowtable import forget
from xdpguard.netns import Netns, resolve_device

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_OBJ = HERE / "xg_bench.bpf.o"
XDPGUARD = Path(sys.executable).parent / "xdpguard"
GEN_CPU, FWD_CPU = 0, 1

# Lab names of the benchmarks (never those of a lab someone built by hand).
NAMES = {
    "OUTER": "xgb-out",
    "INNER": "xgb-in",
    "INNER_NS": "xgb-inner",
    "CLIENT_NS": "xgb-client",
    "ORIGIN_NS": "xgb-origin",
}
EDGE_NS = "xgb-edge"


def arguments(doc: str | None, name: str) -> argparse.ArgumentParser:
    """A benchmark's command line: @doc as its help, --json results/<name>.json."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", type=Path, default=HERE / "results" / f"{name}.json")
    return ap


def parse_as_root(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Every benchmark builds labs; a one-line error instead of a traceback."""
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root")
    return args


def report(benchmark: str) -> dict:
    """The head of every benchmark's JSON: what ran, when, on what."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
    }


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")


def sh(*cmd: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    return subprocess.run(
        cmd, check=True, capture_output=True, text=True, env=env, input=stdin
    ).stdout


@contextmanager
def lab(edge: bool, queues: int = 1, anyport: bool = False) -> Iterator[None]:
    """The lab of scripts/netns-setup.sh under NAMES; OUTER in EDGE_NS if ``edge``;
    the any-port service prefix if ``anyport``."""
    env = dict(os.environ, QUEUES=str(queues), **NAMES)
    if edge:
        env["OUTER_NS"] = EDGE_NS
    if anyport:
        env["ANYPORT"] = "1"
    try:
        sh(str(ROOT / "scripts" / "netns-setup.sh"), env=env)
        yield
    finally:
        subprocess.run([str(ROOT / "scripts" / "netns-teardown.sh")], env=env, capture_output=True)


@contextmanager
def xdpguard(
    *extra: str, state_dir: Path, edge: bool = False, pin: bool = True, forget_pins: bool = True
) -> Iterator[subprocess.Popen]:
    """``xdpguard run`` on the bench lab, pinned to FWD_CPU unless not ``pin``,
    until the block ends; then its pinned tables go too, unless not
    ``forget_pins`` (a restart to come needs them: the caller forgets)."""
    control = state_dir / "control.sock"
    args = [
        *(["taskset", "-c", str(FWD_CPU)] if pin else []),
        str(XDPGUARD),
        "run",
        "--outer",
        NAMES["OUTER"],
        "--inner",
        NAMES["INNER"],
        "--inner-netns",
        NAMES["INNER_NS"],
        "--queues",
        "1",
        "--control",
        str(control),
        "--state-dir",
        str(state_dir),
        *(["--outer-netns", EDGE_NS] if edge else []),
        *extra,
    ]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_ready(control, 1.0)
                break
            except XdpguardError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"xdpguard did not start: {proc.stderr.read()}") from None
        proc.control = control  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        if forget_pins:
            forget(state_dir)  # the pinned flow table of this run goes with it


def control(proc: subprocess.Popen, cmd: str, **args: object) -> object:
    with ControlClient(proc.control) as c:  # type: ignore[attr-defined]
        return c.call(cmd, **args)


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                out.append((sum(v) - idle, sum(v)))
    return out


def attach(netns: str | None, ifname: str, prog_name: str) -> B.Prog:
    """Load one of xg_bench.bpf.o's programs and attach it (native) to a device."""
    ns = Netns(netns)
    prog = B.Prog(str(BENCH_OBJ), prog_name)
    ns.run(prog.attach, resolve_device(ns, ifname).ifindex, B.XDP_FLAGS_DRV_MODE)
    return prog


def pin_napi(netns: str | None, ifname: str, cpu: int) -> None:
    """Run ``ifname``'s NAPI in kernel threads pinned to ``cpu`` (threaded NAPI):
    the receive work, XDP included, then runs on the forwarder's core and not
    in the generator's softirq. Call once NAPI is on (an XDP program, or GRO)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    sh(*prefix, "sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                comm = (proc / "comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(f"napi/{ifname}-"):
                os.sched_setaffinity(int(proc.name), {cpu})


def percpu_sum(prog: B.Prog, map_name: str) -> int:
    ncpus = B.num_possible_cpus()
    raw = B.map_lookup(prog.map_fd(map_name), struct.pack("=I", 0), 8 * ncpus)
    assert raw is not None
    return sum(struct.unpack(f"={ncpus}Q", raw))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0) -> bytes:
    """An IPv4 header (checksum right) followed by ``payload``."""
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        frag,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def _l4_csum(src: str, dst: str, proto: int, segment: bytes) -> int:
    pseudo = (
        socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(segment))
    )
    return _csum(pseudo + segment)


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
    payload = bytes(max(size - 14 - 20 - 8, 0))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    udp = udp[:6] + struct.pack("!H", _l4_csum(src, dst, 17, udp) or 0xFFFF) + udp[8:]
    frag = (0x2000 if more_frags else 0) | (frag_offset // 8)
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + _ipv4(src, dst, 17, udp, frag)


def tcp4_frame(
    src_mac: str,
    dst_mac: str,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str,
    seq: int = 1,
    ack: int = 0,
    frag: int = 0x4000,
) -> bytes:
    """An Ethernet/IPv4/TCP segment without payload (64 bytes on the wire), checksums right.

    ``frag`` is the IPv4 flags and fragment offset field (default: DF).
    """
    bits = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16, "U": 32}
    tcp = struct.pack(
        "!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, sum(bits[f] for f in flags), 64240, 0, 0
    )
    tcp = tcp[:16] + struct.pack("!H", _l4_csum(src, dst, 6, tcp)) + tcp[18:]
    frame = mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + _ipv4(src, dst, 6, tcp, frag)
    return frame + bytes(max(0, 60 - len(frame)))


def flow_segment(
    proc: subprocess.Popen, client_mac: str, origin_mac: str, cport: int, dst: str, dport: int
) -> bytes:
    """The next segment of the client's connection from 169.254.0.1:``cport`` as
    xdpguard's flow table sees it: an in-window duplicate ACK, which a
    generator can replay forever."""
    flow = next(
        f
        for f in control(proc, "tcp.flows", top=10)["busiest"]  # type: ignore[index]
        if f["outside"] == f"169.254.0.1:{cport}"
    )
    sides = flow["sides"]
    return tcp4_frame(client_mac, origin_mac, "169.254.0.1", dst, cport, dport, "A",
                      sides["outside"]["next_seq"], sides["inside"]["next_seq"])  # fmt: skip


class Generator:
    """Sends a template frame out of ``ifname`` (in ``netns``) from a TX-only
    AF_XDP socket in copy mode (libxdp_shim/xg_gen.c): the kernel builds and
    sends one skb per frame, on the calling core. ``random_saddr`` and
    ``random_sport`` vary the frame (checksums kept right), ``mix_fragments``
    makes every other frame the smallest later IPv4 fragment,
    ``random_host_bits`` varies the low bits of the frame's own source,
    ``random_len_min`` cuts each UDP frame to a random length from that to the
    template's, ``random_dst_bits`` varies the destination's low bits; ``seed`` (a
    fresh one, printed, if None) makes a run repeatable."""

    def __init__(
        self,
        netns: str | None,
        ifname: str,
        frame: bytes,
        random_saddr: bool = False,
        random_sport: bool = False,
        mix_fragments: bool = False,
        queue: int = 0,
        seed: int | None = None,
        random_host_bits: int = 0,
        random_len_min: int = 0,
        random_dst_bits: int = 0,
    ) -> None:
        self.ns = Netns(netns)
        self.dev = resolve_device(self.ns, ifname)
        self.frame = frame
        if seed is None and (
            random_saddr or random_sport or random_host_bits or random_len_min or random_dst_bits
        ):
            seed = random.getrandbits(63) | 1
            print(f"generator seed {seed}")
        args = (
            ifname, frame, queue, random_saddr, random_sport, mix_fragments, seed or 0,
            random_host_bits, random_len_min, random_dst_bits,
        )  # fmt: skip
        # The kernel lets go of a closed socket's hold on the queue a moment
        # later (deferred work): a generator made right after another waits.
        deadline = time.monotonic() + 10
        while True:
            try:
                self._gen = self.ns.run(B.Generator, *args)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def sent(self) -> int:
        """Frames the kernel has sent so far."""
        return self._gen.sent()

    def run(
        self, count: int, cpu: int | None = None, pps: int = 0, max_seconds: float = 60
    ) -> float:
        """Send ``count`` frames (at ``pps``, 0: as fast as it can; from ``cpu``),
        for ``max_seconds`` at most; the seconds it took."""

        def body() -> float:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            start = time.perf_counter()
            self._gen.send(count, pps, int(max_seconds * 1000))
            return time.perf_counter() - start

        return self.ns.run(body)

    def send(self, count: int) -> float:
        """Send ``count`` frames as fast as possible; the seconds it took."""
        return self.run(count)

    def stop(self) -> None:
        """Make a run in another thread return soon (for good)."""
        self._gen.stop()

    def close(self) -> None:
        self._gen.close()


# Offered loads of a sweep, as fractions of the generator's own ceiling (1.0:
# as fast as it sends).
RATE_POINTS = (0.05, 0.1, 0.2, 0.5, 0.8, 1.0)


def gen_ceiling(
    frame: bytes, seconds: float = 1.0, napi_cpu: int | None = None, **vary: bool
) -> float:
    """The generator alone: frames per second from GEN_CPU into an XDP sink on
    a veth pair of its own, the receiving NAPI on the generator's core (as in
    the labs where outer's NAPI is not pinned) or threaded on ``napi_cpu``
    (as where it is). Every figure taken with it is at most this."""
    ns = "xgb-gen"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "g0", "type", "veth", "peer", "name", "g1")
        for dev in ("g0", "g1"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sink = Sink(ns, "g1")
        if napi_cpu is not None:
            pin_napi(ns, "g1", napi_cpu)
        gen = Generator(ns, "g0", frame, **vary)
        try:
            gen.run(20_000, cpu=GEN_CPU)
            count = 200_000
            while True:
                elapsed = gen.run(count, cpu=GEN_CPU)
                if elapsed >= seconds or count >= 50_000_000:
                    return count / elapsed
                count = int(count * max(2.0, 1.2 * seconds / max(elapsed, 1e-3)))
        finally:
            gen.close()
            sink.close()
    finally:
        sh("ip", "netns", "del", ns)


def bound(offered_pps: float, forwarded_pps: float, ceiling_pps: float) -> str:
    """Whether a saturated figure is the generator's limit or the DUT's: the
    DUT is the limit when it let a share of what was offered go, or when the
    generator, sharing its core with the DUT's receive path, offered well
    under its own ceiling."""
    if forwarded_pps < 0.95 * offered_pps:
        return "DUT-bound"
    if offered_pps < 0.8 * ceiling_pps:
        return "DUT-bound (slows the generator's core)"
    return "generator-bound"


def running_prog_fd(proc: subprocess.Popen, role: str = "outer") -> int:
    """An fd of the XDP program a running xdpguard attached to its ``role`` device."""
    st = control(proc, "status")
    return B.prog_fd_by_id(st["devices"][role]["xdp"]["prog_id"])  # type: ignore[index]


def xdp_cost(prog_fd: int, frames: list[bytes], repeat: int = 100_000, cpu: int = FWD_CPU) -> float:
    """The XDP program's own mean cost per frame over ``frames`` (ns), from a
    plain BPF_PROG_TEST_RUN: the kernel's own timing of ``repeat`` runs on
    ``cpu``. A frame the program changes (a challenge's SYN-ACK, the loop's
    word in front) would be seen changed by the next run: such frames run
    one at a time, ``repeat`` times, and the kernel's times are averaged
    (each then carries the timer's own few ns, as do the baselines)."""

    def body() -> None:
        os.sched_setaffinity(0, {cpu})
        costs = []
        for frame in frames:
            _, left = B.prog_test_run(prog_fd, frame)
            if left == frame:
                B.prog_run_time(prog_fd, frame, 1000)  # warm
                costs.append(B.prog_run_time(prog_fd, frame, repeat)[1])
            else:
                n = max(1000, repeat // 20)
                costs.append(sum(B.prog_run_time(prog_fd, frame, 1)[1] for _ in range(n)) / n)
        result.append(sum(costs) / len(costs))

    result: list[float] = []
    thread = threading.Thread(target=body)  # pinned, not the caller
    thread.start()
    thread.join()
    return result[0]


class Sink:
    """Counts and drops every frame arriving on ``ifname`` (in ``netns``)."""

    def __init__(self, netns: str | None, ifname: str) -> None:
        self.prog = attach(netns, ifname, "xg_sink")

    def count(self) -> int:
        return percpu_sum(self.prog, "sink_count")

    def close(self) -> None:
        self.prog.close()


def wait_quiet(read: Callable[[], object], settle: float = 0.3, timeout: float = 20.0) -> object:
    """Poll ``read()`` until it stops changing for ``settle`` seconds; its last value."""
    return settled(read, settle, timeout)[0]


def settled(
    read: Callable[[], object], settle: float = 0.3, timeout: float = 20.0
) -> tuple[object, float]:
    """As wait_quiet(); also the monotonic time of the first reading that
    showed the last value: the change happened before it, never after."""
    deadline = time.monotonic() + timeout
    last = read()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        cur = read()
        if cur != last:
            last, stable_since = cur, time.monotonic()
        elif time.monotonic() - stable_since >= settle:
            break
    return last, stable_since


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
