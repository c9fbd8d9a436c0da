"""SYN challenges answered by the outer XDP program (bpf/xg_challenge.h), run
with BPF_PROG_TEST_RUN on the real object and its real maps: the rewrite
into a SYN-ACK, the RST that verifies, the secret's rotation, the
reflection caps, the verified sources' SYN rate, monitor and auto modes.
What a real client and a real flood make of it: tests/netns/.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Dot1Q, Ether

from xdpguard import _bindings as B
from xdpguard.challenges import Challenges
from xdpguard.defs import Reason, Role
from xdpguard.tcp import DEFAULTS
from xdpguard.xdp import XdpProgram

pytestmark = pytest.mark.bpf

MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")  # client, origin
ORIGIN_V4, ORIGIN_V6 = "169.254.0.2", "2001:db8::2"
META = B.struct_dtype("struct xg_meta")
LOOP = "to the loop"
SALT = 0x9E3779B97F4A7C15  # odd


def prefix_slot(addr: str) -> int:
    """bpf/xg_challenge.h xg_prefix_slot(): the cap slot of a source's /24 or /48."""
    import ipaddress

    packed = ipaddress.ip_address(addr).packed
    p = int.from_bytes(packed[:6], "little") | 1 << 63 if len(packed) == 16 else 0
    p = p or int.from_bytes(packed[:3], "little")
    return ((p * SALT) % 2**64) >> (64 - 14)


@dataclass
class Rig:
    prog: XdpProgram
    ch: Challenges
    table: B.FlowTab
    tcp: B.Tcp
    runner: B.TestRunner

    def configure(self, **over: object) -> None:
        """The whole TCP policy, as TcpStage writes it; one CPU's share is all."""
        cfg = {k: v for k, v in DEFAULTS.items() if not k.endswith("_mode")}
        cfg |= {"syn_mode": "on", "state_mode": "on", "learn_until": 0, "ncpus": 1}
        cfg |= over
        for k in ("syn_mode", "state_mode"):
            cfg[k] = B.TCP_MODES[cfg[k]] if isinstance(cfg[k], str) else cfg[k]
        self.ch.configure(cfg)  # type: ignore[arg-type]
        self.tcp.configure(cfg)  # type: ignore[arg-type]

    def run(self, frame: bytes) -> tuple[str, bytes, int]:
        """XDP's verdict on ``frame``: (reason, frame as it left, meta flags)."""
        before = self.prog.reason_counters()
        action, out = self.runner.run(frame)
        delta = self.prog.reason_counters() - before
        (reason,) = [Reason(r).name for r in range(len(delta)) if delta[r, 0]]
        flags = 0
        if reason == "no_socket":  # headed for the loop: this rig has no socket
            assert action == B.XDP_DROP
            meta = np.frombuffer(out[: META.itemsize], dtype=META)[0]
            assert meta["magic"] == B.META_MAGIC
            flags = int(meta["flags"])
            return LOOP, out[META.itemsize :], flags
        expect = B.XDP_TX if reason == "syn_challenged" else B.XDP_DROP
        assert action == expect, (reason, action)
        return reason, out, flags

    def monitor(self) -> dict[str, int]:
        m = self.ch.monitor_counters()
        return {Reason(r).name: int(m[r, 0]) for r in range(len(m)) if m[r, 0]}


@pytest.fixture
def rig() -> Iterator[Rig]:
    table = B.FlowTab(1024)
    prog = XdpProgram(Role.OUTER, shared=table.fds())
    tcp = B.Tcp(0, dict.fromkeys(B.Tcp.cfg_fields(), 0), table)
    r = Rig(prog, Challenges(prog, restored=False), table, tcp, B.TestRunner(prog.fd))
    r.configure()
    # A known salt: which prefixes share a cap's slot is then known too.
    secret = B.struct_dtype("struct xg_cookie_secret")
    fd = prog.map_fd("xg_secret")
    raw = B.map_lookup(fd, struct.pack("=I", 0), secret.itemsize)
    assert raw is not None
    value = np.frombuffer(raw, dtype=secret).copy()
    value["prefix_salt"] = SALT
    B.map_update(fd, struct.pack("=I", 0), value.tobytes())
    try:
        yield r
    finally:
        tcp.close()
        prog.close()
        table.close()


def syn(
    src: str,
    sport: int = 40000,
    seq: int = 1000,
    v6: bool = False,
    dst: str | None = None,
    **opts: object,
) -> bytes:
    ip = IPv6(src=src, dst=dst or ORIGIN_V6) if v6 else IP(src=src, dst=dst or ORIGIN_V4)
    options = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)]
    return bytes(
        Ether(src=MACS[0], dst=MACS[1])
        / ip
        / TCP(sport=sport, dport=443, flags="S", seq=seq, options=opts.get("options", options))
    )


def rst(src: str, seq: int, sport: int = 40000, v6: bool = False) -> bytes:
    ip = IPv6(src=src, dst=ORIGIN_V6) if v6 else IP(src=src, dst=ORIGIN_V4)
    return bytes(Ether(src=MACS[0], dst=MACS[1]) / ip / TCP(sport=sport, dport=443, flags="R",
                                                             seq=seq))  # fmt: skip


def check_challenge(request: bytes, reply: bytes) -> int:
    """``reply`` is a well-formed challenge to the SYN ``request``; its cookie."""
    req, rep = Ether(request), Ether(reply)
    assert len(reply) <= len(request)
    assert (rep.src, rep.dst) == (req.dst, req.src)
    l3 = IPv6 if IPv6 in req else IP
    assert (rep[l3].src, rep[l3].dst) == (req[l3].dst, req[l3].src)
    assert (rep[TCP].sport, rep[TCP].dport) == (req[TCP].dport, req[TCP].sport)
    assert rep[TCP].flags == "SA" and rep[TCP].options == [] and rep[TCP].dataofs == 5
    assert rep[TCP].ack != (req[TCP].seq + 1) % 2**32  # deliberately unacceptable
    fresh = rep.copy()
    del fresh[TCP].chksum
    if l3 is IP:
        del fresh[IP].chksum
        assert Ether(bytes(fresh))[IP].chksum == rep[IP].chksum
        assert rep[IP].ihl == 5 and rep[IP].len == 40
    else:
        assert rep[IPv6].nh == 6 and rep[IPv6].plen == 20
    assert Ether(bytes(fresh))[TCP].chksum == rep[TCP].chksum
    return int(rep[TCP].ack)


def verified(rig: Rig) -> list[str]:
    return sorted(e["source"] for e in _entries(rig))


def _entries(rig: Rig) -> list[dict[str, object]]:
    from xdpguard.challenges import addr_text

    return [{"source": addr_text(a), "expires": e} for a, e in rig.ch.verified(B.tcp_now())]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_challenge_round_trip(rig: Rig, v6: bool) -> None:
    client = "2001:db8::1" if v6 else "169.254.0.1"
    request = syn(client, v6=v6)
    reason, reply, _ = rig.run(request)
    assert reason == "syn_challenged"
    cookie = check_challenge(request, reply)
    assert rig.table is not None and rig.tcp.scan()[0]["states"][1:] == [0] * 7  # nothing kept
    # The client's stack answers <SEQ=SEG.ACK><CTL=RST>: verified, dropped.
    assert rig.run(rst(client, cookie, v6=v6))[0] == "challenge_passed"
    assert verified(rig) == [client]
    # Its SYN now goes to the loop, and so does a new connection's.
    assert rig.run(syn(client, v6=v6))[0] == LOOP
    assert rig.run(syn(client, sport=40001, seq=99, v6=v6))[0] == LOOP


def test_the_cookie_is_bound_to_the_tuple_the_key_and_the_slot(rig: Rig) -> None:
    client = "169.254.0.1"
    cookie = check_challenge(request := syn(client), rig.run(request)[1])
    assert rig.run(rst(client, cookie, sport=40001))[0] == "challenge_failed"  # another port
    assert rig.run(rst("169.254.0.9", cookie))[0] == "challenge_failed"  # another host
    assert rig.run(rst(client, cookie ^ 0x100))[0] == "challenge_failed"  # a bit flipped
    # The slot bits say when it was made: two slots back is too old.
    stale = (cookie & ~6) | ((((cookie >> 1) & 3) - 2) & 3) << 1
    assert rig.run(rst(client, stale))[0] == "challenge_failed"
    assert verified(rig) == []
    assert rig.run(rst(client, cookie))[0] == "challenge_passed"


def test_a_rotated_secret_still_checks_answers_once(rig: Rig) -> None:
    cookies = [check_challenge(s, rig.run(s)[1]) for s in (syn("169.254.0.1"), syn("169.254.0.2"))]
    rig.ch.rotate_secret(os.urandom(16))
    assert rig.run(rst("169.254.0.1", cookies[0]))[0] == "challenge_passed"
    rig.ch.rotate_secret(os.urandom(16))
    assert rig.run(rst("169.254.0.2", cookies[1]))[0] == "challenge_failed"


def test_allowlisted_and_verified_sources_skip_challenges(rig: Rig) -> None:
    assert rig.run(syn("169.254.0.7"))[0] == "syn_challenged"
    rig.ch.verified_add(bytes(10) + b"\xff\xff" + bytes([169, 254, 0, 9]), B.tcp_now() + 60)
    assert rig.run(syn("169.254.0.9"))[0] == LOOP
    # An expired verification counts for nothing.
    rig.ch.verified_add(bytes(10) + b"\xff\xff" + bytes([169, 254, 0, 9]), B.tcp_now() - 1)
    assert rig.run(syn("169.254.0.9"))[0] == "syn_challenged"


def test_monitor_counts_and_passes(rig: Rig) -> None:
    rig.configure(syn_mode="monitor")
    assert rig.run(syn("169.254.0.1"))[0] == LOOP
    reason, _, flags = rig.run(rst("169.254.0.1", 12345))
    assert reason == LOOP and flags & B.META_FORWARD  # forwarded as it is, no state check
    assert rig.monitor() == {"syn_challenged": 1, "challenge_failed": 1}


def test_an_unanswered_rst_passes_while_learning(rig: Rig) -> None:
    rig.configure(learn_until=B.tcp_now() + 60)
    reason, _, flags = rig.run(rst("169.254.0.1", 12345))
    assert reason == LOOP and flags & B.META_FORWARD
    assert rig.monitor() == {}
    rig.configure(learn_until=0)
    assert rig.run(rst("169.254.0.1", 12345))[0] == "challenge_failed"


def test_a_rst_of_a_live_flow_is_the_loops(rig: Rig) -> None:
    rig.configure(syn_mode="off")
    frame = syn("169.254.0.1", seq=500)
    assert rig.run(frame)[0] == LOOP
    v, _ = rig.tcp.judge(frame, True, B.tcp_now())  # the loop tracks it: SYN_SENT
    assert v == B.VERDICT_FORWARD
    rig.configure()
    assert rig.run(rst("169.254.0.1", 501))[0] == LOOP
    assert rig.run(rst("169.254.0.1", 501, sport=40001))[0] == "challenge_failed"  # no flow


def test_auto_challenges_only_above_the_rate(rig: Rig) -> None:
    rig.configure(syn_mode="auto", syn_rate=10, syn_burst=5)
    verdicts = [rig.run(syn(f"198.18.0.{i + 1}"))[0] for i in range(20)]
    assert verdicts[:5] == [LOOP] * 5  # the burst, to one destination
    assert verdicts[5:] == ["syn_challenged"] * 15


def test_auto_state_says_when_a_destination_is_over_its_rate(rig: Rig) -> None:
    rig.configure(state_mode="auto", state_rate=10, state_burst=3)
    flags = []
    for i in range(6):
        ack = bytes(Ether(src=MACS[0], dst=MACS[1]) / IP(src="198.18.0.1", dst=ORIGIN_V4)
                    / TCP(sport=2000 + i, dport=443, flags="A", seq=i, ack=i))  # fmt: skip
        reason, _, f = rig.run(ack)
        assert reason == LOOP
        flags.append(bool(f & B.META_STATE_OVER))
    assert flags == [False] * 3 + [True] * 3


def test_the_reflection_caps_hold(rig: Rig) -> None:
    # Each prefix below counts in a slot of its own (a shared one would
    # share its cap: fewer challenges, never more).
    firsts = ["198.18.7.1", "198.18.8.1", "2001:db8:1:1::1"]  # two /24s, one /48
    assert len({prefix_slot(a) for a in firsts}) == len(firsts)
    rig.configure(challenge_prefix_rate=3, challenge_rate=8)
    # One /24, many hosts and ports: three challenges, then none.
    a = [rig.run(syn(f"198.18.7.{i}", sport=1000 + i))[0] for i in range(1, 7)]
    assert a == ["syn_challenged"] * 3 + ["challenge_rate_limited"] * 3
    # Another /24 has its own cap; an IPv6 /48 likewise.
    assert [rig.run(syn(f"198.18.8.{i}"))[0] for i in (1, 2)] == ["syn_challenged"] * 2
    v6 = [rig.run(syn(f"2001:db8:1:{i}::1", v6=True))[0] for i in range(1, 5)]
    assert v6 == ["syn_challenged"] * 3 + ["challenge_rate_limited"]
    # Everyone's cap: 8 challenges in all.
    assert rig.run(syn("198.18.9.1"))[0] == "challenge_rate_limited"


def test_a_verified_source_is_held_to_its_syn_rate(rig: Rig) -> None:
    rig.configure(verified_syn_rate=4)
    cookie = check_challenge(request := syn("169.254.0.1"), rig.run(request)[1])
    assert rig.run(rst("169.254.0.1", cookie))[0] == "challenge_passed"
    got = [rig.run(syn("169.254.0.1", sport=2000 + i))[0] for i in range(7)]
    assert got == [LOOP] * 4 + ["verified_syn_rate_limited"] * 3
    rig.configure(syn_mode="monitor", verified_syn_rate=4)
    assert rig.run(syn("169.254.0.1", sport=3000))[0] == LOOP
    assert rig.monitor() == {"verified_syn_rate_limited": 1}


def test_verified_sources_skip_the_challenge_only_within_their_budgets(rig: Rig) -> None:
    """Issue 23, 3: a spoofer can get real hosts verified (each answers a stray
    SYN-ACK with a RST). The SYNs that skip the challenge because their
    source is verified have a budget per destination and one over everyone;
    beyond, they are challenged, which no spoofer can answer."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one CPU: one share of each per-CPU bucket
    try:
        rig.configure(verified_syn_rate=1000, verified_dest_syn_rate=3,
                      verified_total_syn_rate=1000)  # fmt: skip
        sources = [f"169.254.0.{i}" for i in range(1, 4)]
        for src in sources:
            cookie = check_challenge(request := syn(src), rig.run(request)[1])
            assert rig.run(rst(src, cookie))[0] == "challenge_passed"
        # Three verified hosts, one destination: three skip (and what the
        # bucket refilled meanwhile, 3/s), the rest are challenged.
        t0 = time.monotonic()
        got = [rig.run(syn(src, sport=4000 + i))[0] for i, src in enumerate(sources * 8)]
        refilled = int(3 * (time.monotonic() - t0)) + 1
        assert got[:3] == [LOOP] * 3 and set(got) == {LOOP, "syn_challenged"}, got
        assert got.count(LOOP) <= 3 + refilled, got
        # Another destination has a budget of its own; everyone's is 2 in all.
        rig.configure(verified_syn_rate=1000, verified_dest_syn_rate=1000,
                      verified_total_syn_rate=2)  # fmt: skip
        t0 = time.monotonic()
        got = [rig.run(syn(s, dst="169.254.0.99", sport=5000 + i))[0]
               for i, s in enumerate(sources * 4)]  # fmt: skip
        refilled = int(2 * (time.monotonic() - t0)) + 1
        assert got[:2] == [LOOP] * 2 and "syn_challenged" in got, got
        assert got.count(LOOP) <= 2 + refilled, got
    finally:
        os.sched_setaffinity(0, cpus)


def test_syns_of_any_shape_get_a_well_formed_challenge(rig: Rig) -> None:
    """Fuzz: VLAN tags, IPv4 options, IPv6 extension headers, odd TCP options
    and payloads. Every reply is a SYN-ACK no longer than its SYN, going back
    where the SYN came from."""
    seed = int(os.environ.get("XDPGUARD_TEST_SEED", "0")) or random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    rig.configure(challenge_prefix_rate=10**8, challenge_rate=10**8)
    kinds = ["MSS", "WScale", "SAckOK", "Timestamp", "NOP", "EOL"]
    values = {"MSS": 1400, "WScale": 3, "SAckOK": b"", "Timestamp": (5, 0), "NOP": None,
              "EOL": None}  # fmt: skip
    for n in range(2000):
        v6 = rng.random() < 0.5
        src = f"2001:db8:{n}::1" if v6 else f"198.18.{n >> 8 & 255}.{n & 255}"
        ip = IPv6(src=src, dst=ORIGIN_V6) if v6 else IP(src=src, dst=ORIGIN_V4)
        if not v6 and rng.random() < 0.3:
            ip.options = [b"\x01" * rng.choice((4, 8, 12))]  # NOPs
        ext = IPv6ExtHdrDestOpt() if v6 and rng.random() < 0.3 else None
        opts = [(k, values[k]) for k in rng.sample(kinds, rng.randrange(len(kinds)))]
        seg = TCP(sport=rng.randrange(1, 65536), dport=rng.randrange(1, 65536), flags="S",
                  seq=rng.getrandbits(32), window=rng.getrandbits(16), options=opts)  # fmt: skip
        l2 = Ether(src=MACS[0], dst=MACS[1])
        if rng.random() < 0.3:
            l2 = l2 / Dot1Q(vlan=rng.randrange(1, 4095))
        pkt = l2 / ip / (ext / seg if ext else seg) / (b"x" * rng.choice((0, 0, 7, 100)))
        request = bytes(pkt)
        reason, reply, _ = rig.run(request)
        assert reason == "syn_challenged", (seed, n)
        check_challenge(request, reply)
        if Dot1Q in Ether(request):
            assert Ether(reply)[Dot1Q].vlan == Ether(request)[Dot1Q].vlan


def test_a_secret_is_made_once_and_kept_with_its_pin(rig: Rig) -> None:
    size, off = B.struct_layout("struct xg_cookie_secret")
    raw = B.map_lookup(rig.prog.map_fd("xg_secret"), struct.pack("=I", 0), size)
    assert raw is not None and raw[off["key"] : off["key"] + 32] != bytes(32)
    assert struct.unpack_from("=Q", raw, off["prefix_salt"])[0] & 1  # odd
    again = Challenges(rig.prog, restored=True)  # a restart that found the pin
    assert B.map_lookup(rig.prog.map_fd("xg_secret"), struct.pack("=I", 0), size) == raw
    assert again.capacity == rig.ch.capacity
