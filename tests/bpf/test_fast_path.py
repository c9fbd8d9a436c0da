"""The TCP fast path: XDP and the loop share one flow table, and XDP forwards
only what the loop verified, holding it to the same window rules.

The loop's TCP stage (xg_tcp_judge) and the real XDP program
(BPF_PROG_TEST_RUN) work on one xg_flows map, mmap()ed by the one and
looked up by the other, in the same process.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from lab import veth_netns
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.defs import Reason, Role
from xdpguard.netns import Netns, resolve_device
from xdpguard.xdp import XdpProgram

pytestmark = pytest.mark.bpf

CLIENT, ORIGIN = "169.254.0.1", "169.254.0.2"
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")
FAST, LOOP = "fast_path", "redirected"


@dataclass
class Rig:
    ns: Netns
    table: B.FlowTab
    tcp: B.Tcp
    progs: dict[Role, XdpProgram]

    def fastcfg(self, flags: int) -> None:
        for prog in self.progs.values():
            cfg = B.struct_bytes("struct xg_fast_cfg", flags=flags)
            B.map_update(prog.map_fd("xg_fastcfg"), struct.pack("=I", 0), cfg)

    def xdp(self, role: Role, frame: bytes) -> str:
        """The reason XDP gave ``frame`` on the ``role`` device."""
        prog = self.progs[role]
        before = prog.reason_counters()
        action, _ = B.prog_test_run(prog.fd, frame)
        delta = prog.reason_counters() - before
        (reason,) = [Reason(r).name for r in range(len(delta)) if delta[r, 0]]
        if reason == "no_socket":  # headed for the loop: this rig has no socket
            assert action == B.XDP_DROP
            return LOOP
        assert action == B.XDP_REDIRECT
        return reason

    def flow(self) -> dict:
        _, flows = self.tcp.scan(10)
        (f,) = flows
        return f


@pytest.fixture
def rig() -> Iterator[Rig]:
    with veth_netns("xgfast") as name:
        ns = Netns(name)
        table = B.FlowTab(1024)
        tcp = B.Tcp(
            0,
            {
                "syn_mode": B.TCP_MODES["off"],
                "state_mode": B.TCP_MODES["on"],
                "syn_rate": 1000,
                "syn_burst": 2000,
                "state_rate": 1000,
                "state_burst": 2000,
                "verify_ttl": 600,
                "learn_until": 0,
            },
            table,
        )
        progs = {role: XdpProgram(role, shared=table.fds()) for role in Role}
        try:
            peer = resolve_device(ns, "xgv1").ifindex
            for prog in progs.values():
                ns.run(B.map_update, prog.map_fd("xg_peer"), struct.pack("=I", 0),
                       struct.pack("=I", peer))  # fmt: skip
            r = Rig(ns, table, tcp, progs)
            r.fastcfg(B.FAST_ON | B.FAST_TCP)
            yield r
        finally:
            for prog in progs.values():
                prog.close()
            tcp.close()
            table.close()


@dataclass
class Conn:
    rig: Rig
    cseq: int
    oseq: int
    cport: int = 40000

    def frame(self, outside: bool, flags: str, data: bytes = b"", seq: int | None = None) -> bytes:
        src, dst = (CLIENT, ORIGIN) if outside else (ORIGIN, CLIENT)
        sport, dport = (self.cport, 443) if outside else (443, self.cport)
        mine, theirs = (self.cseq, self.oseq) if outside else (self.oseq, self.cseq)
        return bytes(
            Ether(src=MACS[not outside], dst=MACS[outside])
            / IP(src=src, dst=dst)
            / TCP(sport=sport, dport=dport, flags=flags, seq=(mine if seq is None else seq) % 2**32,
                  ack=theirs % 2**32, window=65535)
            / data
        )  # fmt: skip

    def loop(self, outside: bool, flags: str, data: bytes = b"") -> int:
        v, _ = self.rig.tcp.judge(self.frame(outside, flags, data), outside, B.tcp_now())
        return v

    def handshake(self) -> None:
        self.cseq -= 1
        self.oseq -= 1
        assert self.loop(True, "S") == B.VERDICT_FORWARD
        self.cseq += 1
        assert self.loop(False, "SA") == B.VERDICT_FORWARD
        self.oseq += 1
        assert self.loop(True, "A") == B.VERDICT_FORWARD


@pytest.fixture
def conn(rig: Rig) -> Conn:
    c = Conn(rig, random.getrandbits(32), random.getrandbits(32))
    c.handshake()
    return c


def test_a_verified_flow_is_forwarded_in_xdp_and_kept_current(rig: Rig, conn: Conn) -> None:
    before = rig.flow()
    assert before["state"] == 3 and before["flags"] & B.lib.XG_FLOW_FAST
    assert rig.xdp(Role.OUTER, conn.frame(True, "PA", b"x" * 100)) == FAST
    conn.cseq += 100
    assert rig.xdp(Role.INNER, conn.frame(False, "PA", b"y" * 200)) == FAST
    conn.oseq += 200
    after = rig.flow()
    # XDP moved the window edges as the loop would have.
    assert after["end"] == [conn.cseq % 2**32, conn.oseq % 2**32]
    assert after["packets"] == before["packets"] + 2
    # And the loop goes on from there: its next check uses what XDP noted.
    assert conn.loop(True, "PA", b"z") == B.VERDICT_FORWARD


@pytest.mark.parametrize("flags", ["FA", "R", "RA", "S"])
def test_fin_rst_and_syn_go_to_the_loop(rig: Rig, conn: Conn, flags: str) -> None:
    assert rig.xdp(Role.OUTER, conn.frame(True, flags)) == LOOP
    assert rig.xdp(Role.INNER, conn.frame(False, flags)) == LOOP


def test_out_of_window_goes_to_the_loop(rig: Rig, conn: Conn) -> None:
    far = conn.frame(True, "PA", b"x", seq=conn.cseq + 2**30)
    assert rig.xdp(Role.OUTER, far) == LOOP
    assert rig.flow()["end"][0] == conn.cseq % 2**32  # XDP noted nothing of it
    # The loop, judging it, drops it.
    v, _ = rig.tcp.judge(far, True, B.tcp_now())
    assert v == B.VERDICT_DROP


def test_unknown_flows_go_to_the_loop(rig: Rig, conn: Conn) -> None:
    other = Conn(rig, conn.cseq, conn.oseq, cport=40001)
    assert rig.xdp(Role.OUTER, other.frame(True, "A")) == LOOP


def test_a_flow_that_is_not_established_goes_to_the_loop(rig: Rig) -> None:
    c = Conn(rig, random.getrandbits(32), random.getrandbits(32))
    c.cseq -= 1
    c.loop(True, "S")
    c.cseq += 1
    assert rig.xdp(Role.OUTER, c.frame(True, "A")) == LOOP  # SYN_SENT: not verified


def test_a_reopen_claim_takes_the_flow_off_the_fast_path(rig: Rig, conn: Conn) -> None:
    assert conn.loop(True, "S") == B.VERDICT_FORWARD  # a SYN on the live tuple
    assert rig.xdp(Role.OUTER, conn.frame(True, "A")) == LOOP


def test_fast_path_switches(rig: Rig, conn: Conn) -> None:
    udp = bytes(Ether(src=MACS[0], dst=MACS[1]) / IP(src=CLIENT, dst=ORIGIN) / UDP(dport=9))
    rig.fastcfg(B.FAST_ON)  # no TCP: monitor mode or learning
    assert rig.xdp(Role.OUTER, udp) == FAST
    assert rig.xdp(Role.OUTER, conn.frame(True, "A")) == LOOP
    rig.fastcfg(0)
    assert rig.xdp(Role.OUTER, udp) == LOOP
    assert rig.xdp(Role.INNER, udp) == LOOP


def test_closing_takes_the_flow_off_the_fast_path(rig: Rig, conn: Conn) -> None:
    assert conn.loop(True, "FA") == B.VERDICT_FORWARD
    conn.cseq += 1
    assert not rig.flow()["flags"] & B.lib.XG_FLOW_FAST
    assert rig.xdp(Role.INNER, conn.frame(False, "A")) == LOOP


def test_a_lock_left_held_by_a_killed_process_is_freed() -> None:
    """A pinned table outlives a process that may die inside a bucket's lock:
    the next stage on the table frees every lock before XDP sees it."""
    import mmap

    size, offsets = B.struct_layout("struct xg_flow_bucket")
    table = B.FlowTab(8)
    try:
        fd = table.fds()["xg_flows"]
        with mmap.mmap(fd, (8 * size + 4095) & ~4095, mmap.MAP_SHARED) as m:
            locks = [b * size + offsets["lock"] for b in range(8)]
            for off in locks:
                m[off : off + 4] = struct.pack("=I", 1)  # held, by nobody alive
            cfg = dict.fromkeys(B.Tcp.cfg_fields(), 1) | {"syn_mode": 0, "state_mode": 0}
            B.Tcp(0, cfg, table).close()
            assert [struct.unpack("=I", m[o : o + 4])[0] for o in locks] == [0] * 8
    finally:
        table.close()


def test_a_lock_held_briefly_is_waited_for(rig: Rig, conn: Conn) -> None:
    """Another core holding the flow's bucket lock for a moment (the program
    on the other device noting the reverse direction, the loop judging a
    frame) is waited for: a segment sent to the loop instead would arrive
    after its successors and make the sender retransmit. Before, XDP tried
    once: here about half the segments took the loop."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    runs = 100_000
    size, offsets = B.struct_layout("struct xg_flow_bucket")
    nbuckets = rig.table.nbuckets
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    out: dict[str, Any] = {}

    def hold() -> None:
        """Take and drop the flow's bucket lock, holding it about half the time.
        A process of its own (no GIL shared with the runs, which would make it
        stop while holding the lock) and real-time, so that a busy machine
        cannot preempt it while it holds the lock (which would leave XDP
        nothing to wait for)."""
        os.sched_setaffinity(0, {cpus[0]})
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        fd = rig.table.fds()["xg_flows"]
        with mmap.mmap(fd, (nbuckets * size + 4095) & ~4095, mmap.MAP_SHARED) as m:
            # The one flow's bucket: the only one with a slot in use.
            (off,) = [
                b * size + offsets["lock"]
                for b in range(nbuckets)
                if any(m[b * size + offsets["slot"] : (b + 1) * size])
            ]
            held, free = struct.pack("=I", 1), struct.pack("=I", 0)
            while not stop.is_set():
                m[off : off + 4] = held
                for _ in range(20):
                    pass
                m[off : off + 4] = free
                for _ in range(20):
                    pass

    def forward() -> None:
        os.sched_setaffinity(0, {cpus[1]})
        frame = conn.frame(True, "PA", b"x" * 100)  # a retransmission: always in window
        ifindex = resolve_device(rig.ns, "xgv0").ifindex
        before = rig.progs[Role.OUTER].reason_counters()

        def run_all() -> None:
            # One run each: a frame sent to the loop leaves with the loop's
            # word in front, and a repeated run would go on with that.
            runner = B.TestRunner(rig.progs[Role.OUTER].fd)
            for _ in range(runs):
                runner.run(frame, ifindex)

        rig.ns.run(run_all)
        out["delta"] = rig.progs[Role.OUTER].reason_counters() - before

    holder = ctx.Process(target=hold)
    holder.start()
    try:
        forward()
    finally:
        stop.set()
        holder.join()
    fast, loop = out["delta"][Reason.fast_path, 0], out["delta"][Reason.no_socket, 0]
    print(f"{fast} in XDP, {loop} to the loop")
    assert fast + loop == runs
    # A holder preempted while it holds the lock still sends what arrives
    # meanwhile to the loop (correct, only slower): a bound, not zero.
    assert loop < runs // 20
