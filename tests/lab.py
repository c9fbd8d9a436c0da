"""Labs and a running appliance for the netns tier.

A Lab is the topology of docs/ARCHITECTURE.md section 1 built by scripts/netns-setup.sh
under names unique to this test, and always removed again. An Appliance is
``xdpguard run`` as a subprocess on a lab, talked to through its own control
socket. Set XDPGUARD_KEEP_LAB=1 to leave a failed test's lab for debugging.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from xdpguard.control import ControlClient, wait_ready
from xdpguard.errors import XdpguardError
from xdpguard.netns import Netns

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
XDPGUARD = Path(sys.executable).parent / "xdpguard"
TRAFFIC = [sys.executable, str(SCRIPTS / "labtraffic.py")]

CLIENT_V4, ORIGIN_V4 = "169.254.0.1", "169.254.0.2"
CLIENT_V6, ORIGIN_V6 = "2001:db8::1", "2001:db8::2"

_serial = itertools.count()
# State directories of the appliances started here: their pinned flow
# tables are forgotten after each test (tests/conftest.py).
STATE_DIRS: set[Path] = set()


def sh(
    *cmd: str, check: bool = True, timeout: float = 60, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


# Every kernel feature xdpguard can do without (xdpguard.features.OPTIONAL):
# the tests of the TCP protection, the fast path and the policy run again
# with each forced off (run --without), so that no fallback is tested only
# on the kernels that need it.
FALLBACKS = ("ktime_coarse", "af_xdp_need_wakeup", "devmap_redirect")
WITHOUT = tuple(f"without-{name}" for name in FALLBACKS)


def without_args(param: str) -> tuple[str, ...]:
    """run's options for a lab fixture's param "without-NAME" (else none)."""
    return ("--without", param.removeprefix("without-")) if param.startswith("without-") else ()


@dataclass
class Lab:
    queues: int = 2
    index: int | None = None
    edge: bool = False  # OUTER in a namespace of its own, not the test's
    anyport: bool = False  # the service prefix of scripts/anyport-origin.py
    # Options every Appliance on this lab gets (e.g. "--fast-path", "off").
    run_args: tuple[str, ...] = ()
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}{next(_serial)}")

    def __post_init__(self) -> None:
        self.outer = f"xo{self.tag}"
        self.inner = f"xi{self.tag}"
        self.inner_ns = f"xg{self.tag}-inner"
        self.client_ns = f"xg{self.tag}-client"
        self.origin_ns = f"xg{self.tag}-origin"
        self.outer_ns = f"xg{self.tag}-edge" if self.edge else None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            QUEUES=str(self.queues),
            OUTER=self.outer,
            INNER=self.inner,
            INNER_NS=self.inner_ns,
            CLIENT_NS=self.client_ns,
            ORIGIN_NS=self.origin_ns,
        )
        for knob, value in (
            ("INDEX", self.index),
            ("OUTER_NS", self.outer_ns),
            ("ANYPORT", "1" if self.anyport else None),
        ):
            if value is not None:
                env[knob] = str(value)
            else:
                env.pop(knob, None)
        return env

    def up(self) -> Lab:
        sh(str(SCRIPTS / "netns-setup.sh"), env=self.env)
        return self

    def down(self) -> None:
        sh(str(SCRIPTS / "netns-teardown.sh"), env=self.env, check=False)

    def ns_exec(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def client(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run a labtraffic client command in the client namespace; its JSON verdict."""
        res = self.ns_exec(self.client_ns, *TRAFFIC, *args, check=False, timeout=timeout)
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise AssertionError(f"labtraffic {args} failed: {res.stdout}{res.stderr}") from None

    def ping(self, addr: str, count: int = 3, ns: str | None = None) -> bool:
        res = self.ns_exec(
            ns or self.client_ns,
            "ping",
            "-c",
            str(count),
            "-i",
            "0.2",
            "-W",
            "1",
            addr,
            check=False,
        )
        return res.returncode == 0

    def xdp_attached(self) -> dict[str, bool]:
        """Whether outer and inner carry any XDP program right now."""
        outer_ns = ["-n", self.outer_ns] if self.outer_ns else []
        out = sh("ip", *outer_ns, "-d", "link", "show", self.outer).stdout
        inn = sh("ip", "-n", self.inner_ns, "-d", "link", "show", self.inner).stdout
        return {
            "outer": " xdp" in out or "prog/xdp" in out,
            "inner": " xdp" in inn or "prog/xdp" in inn,
        }

    def inject(self, frames: Iterable[bytes]) -> None:
        """Send ``frames`` out of the client's eth0 through a packet socket made
        in its namespace (scapy's sendp resolves "eth0" where it was imported)."""

        def send() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind(("eth0", 0))
                for frame in frames:
                    raw.send(frame)

        Netns(self.client_ns).run(send)

    def add_client_address(self, v4: str, v6: str) -> None:
        """A second client on the same eth0 (the lab's /24 and /64)."""
        self.ns_exec(self.client_ns, "ip", "addr", "add", f"{v4}/24", "dev", "eth0")
        self.ns_exec(self.client_ns, "ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")

    def probe(
        self,
        src: str,
        to: str,
        proto: str,
        seconds: float,
        interval: float = 0.05,
        timeout: float = 0.25,
        *extra: str,
    ) -> Probe:
        """Echo exchanges from ``src`` in the background (labtraffic probe)."""
        return Probe(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.client_ns,
                    *TRAFFIC,
                    "probe",
                    "--from",
                    src,
                    "--to",
                    to,
                    "--proto",
                    proto,
                    "--seconds",
                    str(seconds),
                    "--interval",
                    str(interval),
                    "--timeout",
                    str(timeout),
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )

    def attempts(
        self, src: str, to: str, proto: str, *extra: str, timeout: float = 1.0, seconds: float = 60
    ) -> list[Attempt]:
        """Echo exchanges from ``src`` now, in the foreground (see labtraffic probe)."""
        return self.probe(src, to, proto, seconds, 0.05, timeout, *extra).result(seconds + 30)

    @contextlib.contextmanager
    def origin_counters(
        self, *sources: str, **matches: str
    ) -> Iterator[Callable[[], dict[str, int]]]:
        """nftables counters at the origin's eth0 ingress, before its IP stack.

        Each source address gets a counter named after it; each keyword is a
        counter for an nft match expression, e.g.
        ``spoofed_syns="ip saddr 198.18.0.0/15 tcp flags & (syn|ack) == syn"``.
        """
        table = f"xgt{self.tag}"
        named = {src: f"{'ip6' if ':' in src else 'ip'} saddr {src}" for src in sources}
        named.update(matches)
        rules = "\n".join(f'{expr} counter comment "{name}"' for name, expr in named.items())
        ruleset = (
            f"table netdev {table} {{\n chain in {{\n"
            f'  type filter hook ingress device "eth0" priority 0;\n{rules}\n }}\n}}\n'
        )
        subprocess.run(
            ["ip", "netns", "exec", self.origin_ns, "nft", "-f", "-"],
            input=ruleset,
            text=True,
            check=True,
            capture_output=True,
        )

        def read() -> dict[str, int]:
            out = json.loads(
                self.ns_exec(self.origin_ns, "nft", "-j", "list", "table", "netdev", table).stdout
            )
            counts = {}
            for item in out["nftables"]:
                rule = item.get("rule")
                if rule:
                    counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
                    counts[rule["comment"]] = counter["packets"]
            return counts

        try:
            yield read
        finally:
            self.ns_exec(self.origin_ns, "nft", "delete", "table", "netdev", table, check=False)

    @contextlib.contextmanager
    def _origin_server(self, what: str, *argv: str) -> Iterator[subprocess.Popen[str]]:
        """@argv in the origin namespace until the block ends; it says "serving"
        on its first line once it listens."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.origin_ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "serving" in line, f"{what} did not start: {line}"
            yield proc
        finally:
            # SIGTERM first: the any-port origin detaches its sk_lookup program.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def anyport_server(
        self, workers: int = 1
    ) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
        """scripts/anyport-origin.py in the origin namespace (a lab with anyport)."""
        script = str(SCRIPTS / "anyport-origin.py")
        return self._origin_server(
            "anyport origin", sys.executable, script, "--workers", str(workers)
        )

    def server(self, port: int = 5201) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
        """labtraffic's server in the origin namespace for the duration of the block."""
        return self._origin_server("server", *TRAFFIC, "serve", "--port", str(port))


@contextlib.contextmanager
def lab(
    queues: int = 2, index: int | None = None, edge: bool = False, anyport: bool = False
) -> Iterator[Lab]:
    the_lab = Lab(queues=queues, index=index, edge=edge, anyport=anyport)
    ok = False
    try:
        yield the_lab.up()
        ok = True
    finally:
        if ok or not os.environ.get("XDPGUARD_KEEP_LAB"):
            the_lab.down()


class Appliance:
    """``xdpguard run`` on a lab, as a subprocess with its own control socket."""

    def __init__(self, the_lab: Lab, workdir: Path, *extra: str) -> None:
        self.lab = the_lab
        self.control = workdir / f"{the_lab.tag}.sock"
        self.log = workdir / f"{the_lab.tag}.log"
        # Per lab, not per start: a restart finds what the last run saved.
        self.state_dir = workdir / f"{the_lab.tag}-state"
        STATE_DIRS.add(self.state_dir)
        self.args = [
            str(XDPGUARD),
            "run",
            "--outer",
            the_lab.outer,
            "--inner",
            the_lab.inner,
            "--inner-netns",
            the_lab.inner_ns,
            *(["--outer-netns", the_lab.outer_ns] if the_lab.outer_ns else []),
            "--control",
            str(self.control),
            "--state-dir",
            str(self.state_dir),
            *the_lab.run_args,
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Appliance:
        """Start ``xdpguard run`` and wait until it says it is ready (status --wait)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_ready(self.control, 1.0)
                return self
            except XdpguardError as exc:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"xdpguard run exited {self.proc.returncode}:\n{self.output()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"xdpguard did not come up ({exc}):\n{self.output()}"
                    ) from None

    def call(self, cmd: str, **args: Any) -> Any:
        with ControlClient(self.control) as c:
            return c.call(cmd, **args)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run an xdpguard client command against this appliance."""
        return sh(str(XDPGUARD), *args, "--control", str(self.control), check=check)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        """Signal the daemon; its exit code and how long it took to exit."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"xdpguard ignored signal {sig}:\n{self.output()}") from None
        return rc, time.monotonic() - start

    def __enter__(self) -> Appliance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def forwarded_bytes(app: Appliance, direction: str = "in") -> int:
    """Bytes the appliance forwarded one way, by the loop and by XDP's fast path."""
    d = app.call("stats")["directions"][direction]
    return d["tx_bytes"] + d["xdp"]["fast_path"]["bytes"]


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what or predicate}"
        time.sleep(0.02)


def ethtool_stats(ns: str | None, dev: str) -> dict[str, int]:
    """``ethtool -S`` of a device (in ``ns``), as numbers."""
    cmd = ("ethtool", "-S", dev)
    out = sh("ip", "netns", "exec", ns, *cmd).stdout if ns else sh(*cmd).stdout
    stats = {}
    for line in out.splitlines()[1:]:
        name, _, value = line.strip().partition(": ")
        if value.lstrip("-").isdigit():
            stats[name] = int(value)
    return stats


def _sum(stats: dict[str, int], suffix: str) -> int:
    """Sum of a per-queue veth counter (rx_queue_N_<suffix> or tx_queue_N_<suffix>)."""
    return sum(v for k, v in stats.items() if re.fullmatch(rf"(rx|tx)_queue_\d+_{suffix}", k))


@dataclass
class Account:
    """Where the frames sent into ``outer`` went between two readings (deltas)."""

    xmit: int  # frames from the client's veth that reached outer (its XDP ran on them)
    veth_dropped: int  # ... and those the veth dropped on the way (outer's ring full)
    xdp_seen: int  # frames outer's XDP program ran on (the veth's count)
    xdp: dict[str, int]  # XDP's verdicts, by reason
    loop: dict[str, int]  # the loop's verdicts (drops), by reason
    monitor: dict[str, int]  # what monitor mode passed but counted
    xsk_dropped: int  # redirected to a socket, dropped by the kernel (ring full, no buffer)
    rx: int  # taken from outer's RX rings by the loop
    tx: int  # put on inner's TX rings
    tx_ring_full: int
    dropped: int  # freed by a verdict of the loop
    origin_dropped: int  # dropped on the way out of inner to the origin (veth)

    def check(self, sent: int | None = None) -> None:
        """The conservation laws; ``sent`` is what the generator counted (None:
        no generator ran, the frames came from sockets). The client's own
        stack sends too (ARP, a test's connections) through the same veth,
        so the generator's frames are at most what reached outer or was
        dropped on the way."""
        law = {
            "sent <= xmit + veth dropped": (
                True,
                sent is None or sent <= self.xmit + self.veth_dropped,
            ),
            "xdp seen = sum of XDP verdicts": (self.xdp_seen, sum(self.xdp.values())),
            "to sockets = loop rx + kernel drops": (
                self.xdp.get("redirected", 0) + self.xdp.get("allowlist", 0),
                self.rx + self.xsk_dropped,
            ),
            "loop rx = tx + ring full + drops": (
                self.rx,
                self.tx + self.tx_ring_full + self.dropped,
            ),
            "loop verdicts = drops": (sum(self.loop.values()), self.dropped),
        }
        broken = {name: v for name, v in law.items() if v[0] != v[1]}
        assert not broken, (broken, self)

    def reached(self, sent: int) -> int:
        """How many of the generator's ``sent`` frames entered XDP, at the least."""
        return max(0, sent - self.veth_dropped)

    def judged_at_least(self, sent: int) -> int:
        """How many of the generator's frames the loop judged, at the least: all
        that entered XDP, less those XDP dropped or the kernel dropped at a socket."""
        passed = ("redirected", "allowlist", "fast_path")
        xdp_dropped = sum(n for r, n in self.xdp.items() if r not in passed)
        return max(0, self.reached(sent) - xdp_dropped - self.xsk_dropped)


class Ledger:
    """Counters of the generator's veth, XDP and the loop around a flood.

    ``with Ledger(lab, app) as ledger: ...`` then ``ledger.account()`` waits
    until the appliance has settled (rings drained, nothing moving) and
    returns what happened in between as an Account.
    """

    def __init__(self, the_lab: Lab, app: Appliance) -> None:
        self.lab, self.app = the_lab, app
        self.before: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        client = json.loads(
            sh("ip", "-n", self.lab.client_ns, "-j", "-s", "link", "show", "eth0").stdout
        )[0]["stats64"]
        outer = ethtool_stats(self.lab.outer_ns, self.lab.outer)
        inner = json.loads(
            sh("ip", "-n", self.lab.inner_ns, "-j", "-s", "link", "show", self.lab.inner).stdout
        )[0]["stats64"]
        st = self.app.call("stats")
        d = st["directions"]["in"]
        return {
            "xmit": _sum(outer, "xdp_packets"),
            "veth_dropped": client["tx"]["dropped"],
            "xdp_seen": _sum(outer, "xdp_packets"),
            "xdp": {k: v["packets"] for k, v in d["xdp"].items()},
            "loop": {k: v["packets"] for k, v in d["loop"].items()},
            "monitor": {k: v["packets"] for k, v in st["monitor"].items()},
            "xsk_dropped": sum(
                q["xsk"]["outer"]["rx_dropped"] + q["xsk"]["outer"]["rx_ring_full"]
                for q in st["queues"]
            ),
            "rx": d["rx_packets"],
            "tx": d["tx_packets"],
            "tx_ring_full": d["tx_ring_full"],
            "dropped": d["dropped"],
            "origin_dropped": inner["tx"]["dropped"],
            "busy": st["frames"]["rx"],
        }

    def __enter__(self) -> Ledger:
        self.before = self._settled()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _settled(self, timeout: float = 60) -> dict[str, Any]:
        """A reading with the RX rings drained and equal to the one before it."""
        deadline = time.monotonic() + timeout
        prev = self._read()
        while True:
            time.sleep(0.2)
            cur = self._read()
            if cur == prev and not cur["busy"]:
                return cur
            assert time.monotonic() < deadline, f"counters never settled: {cur}"
            prev = cur

    def account(self) -> Account:
        a, b = self.before, self._settled()
        delta = {k: b[k] - a[k] for k in b if isinstance(b[k], int)}

        def moved(key: str) -> dict[str, int]:
            return {k: n - a[key].get(k, 0) for k, n in b[key].items() if n - a[key].get(k, 0)}

        acct = Account(
            xmit=delta["xmit"],
            veth_dropped=delta["veth_dropped"],
            xdp_seen=delta["xdp_seen"],
            xdp=moved("xdp"),
            loop=moved("loop"),
            monitor=moved("monitor"),
            xsk_dropped=delta["xsk_dropped"],
            rx=delta["rx"],
            tx=delta["tx"],
            tx_ring_full=delta["tx_ring_full"],
            dropped=delta["dropped"],
            origin_dropped=delta["origin_dropped"],
        )
        print(acct)  # shown with a failure's output
        return acct


class Attempt(NamedTuple):
    """One probe exchange: wall-clock start and end, and whether it succeeded."""

    start: float
    end: float
    ok: bool


class Probe:
    """A running labtraffic probe; result() waits for it, stop() ends it early."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        """Ended, its verdict unread (a background stream of traffic)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()

    def stop(self) -> list[Attempt]:
        self.proc.send_signal(signal.SIGTERM)
        return self.result()

    def result(self, timeout: float = 60) -> list[Attempt]:
        out, _ = self.proc.communicate(timeout=timeout)
        try:
            return [Attempt(*e) for e in json.loads(out.strip().splitlines()[-1])["events"]]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):
            raise AssertionError(f"probe failed: {out}") from None


@contextlib.contextmanager
def veth_netns(prefix: str, queues: int = 1) -> Iterator[str]:
    """A private namespace holding an up veth pair xgv0 <-> xgv1 (BPF-tier fixtures)."""
    name = f"{prefix}{os.getpid()}"
    q = ["numrxqueues", str(queues), "numtxqueues", str(queues)]
    sh("ip", "netns", "add", name)
    try:
        sh(
            "ip",
            "-n",
            name,
            "link",
            "add",
            "name",
            "xgv0",
            *q,
            "type",
            "veth",
            "peer",
            "name",
            "xgv1",
            *q,
        )
        for dev in ("xgv0", "xgv1"):
            sh("ip", "-n", name, "link", "set", dev, "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def import_bench():  # type: ignore[no-untyped-def]
    """The benchmarks' building blocks (generator, sink), shared with the tests."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import xgbench

    return xgbench
