"""XDP's samples and per-destination counters, frame by frame (BPF_PROG_TEST_RUN).

Every case of test_xdp_verdicts runs again with every frame sampled: the
verdict, the frame and the counters are exactly as without, and the sample
is the frame as it arrived, with its reason and direction. Then the 1 in N
countdown, the cap, and the counting per protected destination and class.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import test_xdp_verdicts as verdicts
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from test_xdp_verdicts import CASES, ETH, WORD, Case, Rig

from xdpguard import _bindings as B
from xdpguard.defs import Direction, Reason, Role
from xdpguard.protect import CLASSES, ProtectMaps
from xdpguard.samples import SampleMaps

pytestmark = pytest.mark.bpf

rig = verdicts.rig  # the fixture: a veth, both programs and the policy maps


@pytest.fixture
def sampled(rig: Rig) -> Iterator[dict[Role, tuple[SampleMaps, B.Ring]]]:
    """Every reason of both instances sampled at every frame, under a high cap."""
    out = {}
    for role, prog in rig.progs.items():
        maps = SampleMaps(prog)
        maps.write(dict.fromkeys(Reason, 1), 100_000)
        ring = B.Ring(maps.ring_fd, "struct xg_sample")
        ring.poll(0)
        out[role] = (maps, ring)
    try:
        yield out
    finally:
        for maps, ring in out.values():
            maps.write(dict.fromkeys(Reason, 0), 1)
            ring.close()


def _drain(ring: B.Ring) -> np.ndarray:
    got = [ring.poll(0)]
    while len(got[-1]):
        got.append(ring.poll(0))
    return np.concatenate(got)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_sample_changes_no_verdict_and_is_the_frame(
    rig: Rig, sampled: dict[Role, tuple[SampleMaps, B.Ring]], case: Case
) -> None:
    rig.set_policy(case)
    prog = rig.progs[case.role]
    _, ring = sampled[case.role]
    _drain(ring)
    before = prog.reason_counters()
    action, out = rig.ns.run(
        B.prog_test_run, prog.fd, case.frame, rig.ifindex, case.queue, 1, case.headroom_taken
    )
    delta = prog.reason_counters() - before
    # As test_verdict: the same action, the same frame, one count.
    assert action == case.action
    if case.role == Role.OUTER and case.reason in ("redirected", "allowlist", "no_socket"):
        out = out[WORD.itemsize :]
    assert out == case.frame
    assert delta[Reason[case.reason]].tolist() == [1, len(case.frame)]
    (s,) = _drain(ring)
    assert Reason(int(s["reason"])).name == case.reason
    assert s["dir"] == (Direction.IN if case.role == Role.OUTER else Direction.OUT)
    assert s["len"] == len(case.frame) and s["every"] == 1 and s["rule"] == 0
    n = min(len(case.frame), B.SAMPLE_BYTES)
    assert s["caplen"] == n
    # The frame as it arrived: never the word pushed in front for the loop.
    assert bytes(s["data"][:n]) == case.frame[:n]


FRAME = bytes(ETH / IP(src="169.254.0.1", dst="169.254.0.2") / UDP(sport=53, dport=9) / (b"x" * 20))


def test_one_in_n_per_reason_and_cpu(
    rig: Rig, sampled: dict[Role, tuple[SampleMaps, B.Ring]]
) -> None:
    rig.set_policy(Case("ports", FRAME, B.XDP_DROP, "udp_src_port", ports=(53,)))
    maps, ring = sampled[Role.OUTER]
    every = dict.fromkeys(Reason, 0)
    every[Reason.udp_src_port] = 10
    maps.write(every, 100_000)
    _drain(ring)
    # One test run of 100 repeats runs on one CPU: its count starts over
    # with the rates written, so frames 1, 11, ..., 91 are sampled.
    rig.ns.run(B.prog_run_time, rig.progs[Role.OUTER].fd, FRAME, 100, rig.ifindex)
    got = _drain(ring)
    assert len(got) == 10
    assert set(got["every"].tolist()) == {10}


def test_the_cap_bounds_every_reason_at_once(
    rig: Rig, sampled: dict[Role, tuple[SampleMaps, B.Ring]]
) -> None:
    rig.set_policy(Case("ports", FRAME, B.XDP_DROP, "udp_src_port", ports=(53,)))
    maps, ring = sampled[Role.OUTER]
    maps.write(dict.fromkeys(Reason, 1), 1)  # one a second, a second's burst
    _drain(ring)
    before = maps.state()
    rig.ns.run(B.prog_run_time, rig.progs[Role.OUTER].fd, FRAME, 1000, rig.ifindex)
    after = maps.state()
    got = _drain(ring)
    # GCRA: a burst of 1 + burst/interval, then nothing within the second.
    assert len(got) == after["taken"] - before["taken"] <= 2
    assert after["capped"] - before["capped"] == 1000 - len(got)


CLASS_FRAMES = {
    "syn": ETH / IP(src="198.18.0.1", dst="169.254.0.2") / TCP(flags="S"),
    "tcp": ETH / IP(src="198.18.0.1", dst="169.254.0.2") / TCP(flags="A"),
    "udp": ETH / IP(src="198.18.0.1", dst="169.254.0.2") / UDP(sport=1, dport=2),
    "icmp": ETH / IP(src="198.18.0.1", dst="169.254.0.2") / ICMP(),
    "fragment": ETH / IP(src="198.18.0.1", dst="169.254.0.2", flags="MF") / UDP() / (b"x" * 8),
    "other": ETH / IP(src="198.18.0.1", dst="169.254.0.2", proto=47) / bytes(8),
}


def test_frames_to_protected_addresses_are_counted_per_class(rig: Rig) -> None:
    from xdpguard.policy import parse_prefix

    rig.set_policy(Case("none", FRAME, B.XDP_DROP, "udp_src_port"))
    protect = ProtectMaps(rig.progs[Role.OUTER], rig.maps.set_protect_bits, 1024)
    try:
        protect.replace([(*parse_prefix("169.254.0.0/24"), "lab"),
                         (*parse_prefix("2001:db8::/64"), None)])  # fmt: skip
        outer = rig.progs[Role.OUTER].fd
        sizes = {}
        for cls, pkt in CLASS_FRAMES.items():
            frame = bytes(pkt)
            sizes[cls] = len(frame)
            for _ in range(3):
                rig.ns.run(B.prog_test_run, outer, frame, rig.ifindex, 0, 1, 0)
        v6 = bytes(ETH / IPv6(src="2001:db8:1::1", dst="2001:db8::9") / UDP())
        rig.ns.run(B.prog_test_run, outer, v6, rig.ifindex, 0, 1, 0)
        # Not protected: not counted.
        elsewhere = bytes(ETH / IP(src="198.18.0.1", dst="169.254.1.2") / UDP())
        rig.ns.run(B.prog_test_run, outer, elsewhere, rig.ifindex, 0, 1, 0)
        protect.refresh()
        (lab, net6) = protect.prefixes()
        assert lab["packets"] == dict.fromkeys(CLASSES, 3)
        assert lab["bytes"] == {c: 3 * sizes[c] for c in CLASSES}
        assert net6["packets"]["udp"] == 1 and sum(net6["packets"].values()) == 1
        keys, sums = B.dests_read(rig.progs[Role.OUTER].map_fd("xg_dests"), 1024)
        by_addr = {bytes(k): s for k, s in zip(keys, sums, strict=True)}
        mapped = bytes(10) + b"\xff\xff" + bytes([169, 254, 0, 2])
        assert by_addr[mapped]["packets"].tolist() == [3] * len(CLASSES)
        assert len(by_addr) == 2
        assert protect.occupancy() == {"tracked": 2, "evicted": 0, "capacity": 1024}
        # A prefix let go of, and its index given to another: an address of
        # the old one (its entry named the index) is counted nowhere.
        protect.replace([(*parse_prefix("2001:db8::/64"), None)])
        protect.replace([(*parse_prefix("2001:db8::/64"), None),
                         (*parse_prefix("169.254.1.0/24"), "new")])  # fmt: skip
        assert protect.entries["169.254.1.0/24"].index == 0  # the old one's
        rig.ns.run(B.prog_test_run, outer, bytes(CLASS_FRAMES["udp"]), rig.ifindex, 0, 1, 0)
        rig.ns.run(B.prog_test_run, outer, elsewhere, rig.ifindex, 0, 1, 0)
        protect.refresh()
        new, net6 = protect.prefixes()
        assert new["prefix"] == "169.254.1.0/24" and sum(new["packets"].values()) == 1
        assert new["packets"]["udp"] == 1
        keys, _ = B.dests_read(rig.progs[Role.OUTER].map_fd("xg_dests"), 1024)
        assert [bytes(k)[12:] for k in keys] == [bytes([169, 254, 1, 2])]
        assert protect.occupancy()["evicted"] == 0
        # Nothing protected: nothing counted, the program skips the lookup.
        protect.replace([])
        before = protect._prefix_totals()
        rig.ns.run(B.prog_test_run, outer, bytes(CLASS_FRAMES["udp"]), rig.ifindex, 0, 1, 0)
        assert (protect._prefix_totals() == before).all()
    finally:
        protect.replace([])
