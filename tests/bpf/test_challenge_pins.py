"""The challenge maps a start takes over from the last one (open_pinned()):
all of them as they are; and when --max-flows changed the verified
sources' capacity, the secret as it is and the verified sources carried
into the new table. Real programs, real pins."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.challenges import PINNED, Challenges, max_entries, open_pinned, pin_maps
from xdpguard.defs import Reason, Role
from xdpguard.flowtable import PIN_ROOT, ensure_bpffs
from xdpguard.tcp import DEFAULTS
from xdpguard.xdp import XdpProgram

pytestmark = pytest.mark.bpf

V4_MAPPED = bytes(10) + b"\xff\xff"


@pytest.fixture
def pin() -> Iterator[Path]:
    ensure_bpffs()
    d = PIN_ROOT / f"test-{uuid.uuid4().hex[:12]}"
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def start(pin: Path, max_verified: int) -> tuple[XdpProgram, Challenges, bool]:
    """As xdpguard/engine.py starts: what was pinned, the program, the pins."""
    pinned = open_pinned(pin, max_verified)
    try:
        prog = XdpProgram(Role.OUTER, shared=pinned.fds, max_entries=max_entries(max_verified))
    finally:
        for fd in pinned.fds.values():
            os.close(fd)
    if not pinned.whole():
        pin_maps(pin, {name: prog.map_fd(name) for name in PINNED})
    ch = Challenges(prog, "xg_secret" in pinned.fds)
    if pinned.carried:
        ch.verified_carry(pinned.carried)
    cfg = {k: v for k, v in DEFAULTS.items() if not k.endswith("_mode")}
    cfg |= {"syn_mode": B.TCP_MODES["on"], "state_mode": B.TCP_MODES["on"], "ncpus": 1}
    ch.configure(cfg)  # type: ignore[arg-type]
    return prog, ch, pinned.whole()


def syn_verdict(prog: XdpProgram, src: str) -> str:
    frame = bytes(Ether() / IP(src=src, dst="169.254.0.2") / TCP(sport=40000, dport=443, flags="S"))
    before = prog.reason_counters()
    B.TestRunner(prog.fd).run(frame)
    delta = prog.reason_counters() - before
    (reason,) = [Reason(r).name for r in range(len(delta)) if delta[r, 0]]
    return reason


def test_a_restart_takes_the_maps_as_they_are(pin: Path) -> None:
    prog, ch, whole = start(pin, 65536)
    assert not whole
    ch.verified_add(V4_MAPPED + bytes([192, 0, 2, 1]), B.tcp_now() + 600)
    prog.close()
    prog, ch, whole = start(pin, 65536)
    try:
        assert whole and [a for a, _ in ch.verified(B.tcp_now())] == [
            V4_MAPPED + bytes([192, 0, 2, 1])
        ]
    finally:
        prog.close()


def test_a_new_capacity_keeps_the_secret_and_carries_the_sources(pin: Path) -> None:
    prog, ch, _ = start(pin, 65536)
    now = B.tcp_now()
    ch.verified_add(V4_MAPPED + bytes([192, 0, 2, 1]), now + 600)
    ch.verified_add(V4_MAPPED + bytes([192, 0, 2, 2]), now - 1)  # expired: not carried
    secret = ch._read_secret().tobytes()
    prog.close()
    prog, ch, whole = start(pin, 131072)  # --max-flows went from 262,144 to 524,288
    try:
        assert not whole
        assert B.map_shape(prog.map_fd("xg_verified"))["max_entries"] == 131072
        assert ch._read_secret().tobytes() == secret  # a challenge made before still checks
        assert [(a, e) for a, e in ch.verified(B.tcp_now())] == [
            (V4_MAPPED + bytes([192, 0, 2, 1]), now + 600)
        ]
        assert syn_verdict(prog, "192.0.2.1") == "no_socket"  # verified: to the loop
        assert syn_verdict(prog, "192.0.2.3") == "syn_challenged"
    finally:
        prog.close()
    prog, ch, whole = start(pin, 131072)  # and the new maps are the pinned ones now
    try:
        assert whole and len(ch.verified(B.tcp_now())) == 1
    finally:
        prog.close()
