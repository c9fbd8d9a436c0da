"""A flow table pinned with another size (--max-flows changed across a
restart) gives its flows to the new one (xg_flowtab_migrate()): real maps,
real pins, flows made by the loop's TCP stage from real handshakes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.flowtable import forget, open_table
from xdpguard.tcp import DEFAULTS

pytestmark = pytest.mark.bpf

CLIENT, ORIGIN = "198.18.0.1", "169.254.0.2"
ESTABLISHED, SYN_SENT = 3, 1  # enum xg_tcp_state
# The defaults, with state enforced, no challenges (the loop's alone) and no learning.
CFG = {k: v for k, v in DEFAULTS.items() if not k.endswith("_mode")} | {
    "syn_mode": B.TCP_MODES["off"],
    "state_mode": B.TCP_MODES["on"],
    "learn_until": 0,
}


def seg(outside: bool, port: int, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
    src, dst = (CLIENT, ORIGIN) if outside else (ORIGIN, CLIENT)
    sport, dport = (port, 443) if outside else (443, port)
    return bytes(
        Ether() / IP(src=src, dst=dst)
        / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535) / data
    )  # fmt: skip


class Flows:
    """Connections made through a TCP stage over ``table``."""

    def __init__(self, table: B.FlowTab) -> None:
        self.tcp = B.Tcp(0, CFG, table)

    def judge(self, frame: bytes, outside: bool) -> int:
        return self.tcp.judge(frame, outside, B.tcp_now())[0]

    def established(self, port: int) -> None:
        assert self.judge(seg(True, port, "S", 999, 0), True) == B.VERDICT_FORWARD
        assert self.judge(seg(False, port, "SA", 4999, 1000), False) == B.VERDICT_FORWARD
        assert self.judge(seg(True, port, "A", 1000, 5000), True) == B.VERDICT_FORWARD

    def syn_sent(self, port: int) -> None:
        assert self.judge(seg(True, port, "S", 999, 0), True) == B.VERDICT_FORWARD

    def data_passes(self, port: int) -> bool:
        return self.judge(seg(True, port, "PA", 1000, 5000, b"x"), True) == B.VERDICT_FORWARD

    def states(self) -> list[int]:
        return self.tcp.scan()[0]["states"]

    def close(self) -> None:
        self.tcp.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    d.mkdir()
    try:
        yield d
    finally:
        forget(d)


def make(state_dir: Path, max_flows: int, est: list[int], syn: list[int]) -> None:
    table, restored = open_table(max_flows, state_dir)
    assert not restored
    flows = Flows(table)
    for p in est:
        flows.established(p)
    for p in syn:
        flows.syn_sent(p)
    flows.close()
    table.close()  # the pins stay, as after a SIGTERM or a SIGKILL


def test_a_bigger_table_takes_every_flow(state_dir: Path) -> None:
    ports = random.Random(7).sample(range(1024, 65536), 350)
    make(state_dir, 4096, ports[:300], ports[300:])
    table, restored = open_table(65536, state_dir)
    flows = Flows(table)
    try:
        assert restored and table.nbuckets == 8192
        states = flows.states()
        assert (states[ESTABLISHED], states[SYN_SENT]) == (300, 50)
        assert all(flows.data_passes(p) for p in ports[:300])  # the flows as they were
        assert not flows.data_passes(1000)  # and no flow of nothing
    finally:
        flows.close()
        table.close()
    table, restored = open_table(65536, state_dir)  # the new size is pinned now
    assert restored
    table.close()


def test_a_smaller_table_keeps_the_established_flows_first(state_dir: Path) -> None:
    """One bucket of 8 slots: 5 established flows and 5 half-open ones."""
    make(state_dir, 4096, list(range(2000, 2005)), list(range(3000, 3005)))
    table, restored = open_table(8, state_dir)
    flows = Flows(table)
    try:
        assert not restored  # three left behind: the learning window stays
        states = flows.states()
        assert (states[ESTABLISHED], states[SYN_SENT]) == (5, 3)
        assert all(flows.data_passes(p) for p in range(2000, 2005))
    finally:
        flows.close()
        table.close()
