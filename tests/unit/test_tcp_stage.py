"""The loop's TCP stage, frame by frame, with a clock the test controls.

xg_tcp_judge() runs exactly the code the hot loop runs for each frame; here
it is fed real TCP conversations built with scapy, with what XDP would
have said of each (its metadata flags). No kernel is involved: what the
kernel sees of it is tested in tests/netns/test_tcp_*.py, and the SYN
challenges, which XDP answers, in tests/bpf/test_challenge.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from framegen import tcp4_with_seq
from scapy.layers.inet import IP, TCP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.defs import Reason

pytestmark = pytest.mark.unit

FWD, DROP = B.VERDICT_FORWARD, B.VERDICT_DROP
CLIENT_MAC, ORIGIN_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
T0 = 100_000  # seconds on the stage's clock
V4_PAIR = ("169.254.0.1", "169.254.0.2")
V6_PAIR = ("2001:db8::1", "2001:db8::2")


def stage(syn: str = "off", state: str = "on", max_flows: int = 4096, **cfg: int) -> B.Tcp:
    settings = {
        "syn_mode": B.TCP_MODES[syn],
        "state_mode": B.TCP_MODES[state],
        "syn_rate": 1000,
        "syn_burst": 2000,
        "state_rate": 1000,
        "state_burst": 2000,
        "verify_ttl": 600,
        "learn_until": 0,
        **cfg,
    }
    return B.Tcp(max_flows, settings)


@dataclass
class Conv:
    """One TCP connection, its sequence numbers kept like the two stacks would."""

    tcp: B.Tcp
    client: str = "169.254.0.1"
    origin: str = "169.254.0.2"
    cport: int = 40000
    oport: int = 443
    now: int = T0
    cseq: int = field(default_factory=lambda: random.getrandbits(32))
    oseq: int = field(default_factory=lambda: random.getrandbits(32))
    wscale: int | None = 7
    stats: object = field(default_factory=B.Tcp.new_stats)

    def _ip(self, src: str, dst: str):  # type: ignore[no-untyped-def]
        return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)

    def frame(
        self,
        outside: bool,
        flags: str,
        seq: int,
        ack: int = 0,
        data: bytes = b"",
        win: int = 502,
        opts: list | None = None,
    ) -> bytes:
        src, dst = (self.client, self.origin) if outside else (self.origin, self.client)
        sport, dport = (self.cport, self.oport) if outside else (self.oport, self.cport)
        macs = (CLIENT_MAC, ORIGIN_MAC) if outside else (ORIGIN_MAC, CLIENT_MAC)
        pkt = (
            Ether(src=macs[0], dst=macs[1])
            / self._ip(src, dst)
            / TCP(
                sport=sport,
                dport=dport,
                flags=flags,
                seq=seq % 2**32,
                ack=ack % 2**32,
                window=win,
                options=opts or [],
            )
            / data
        )
        return bytes(pkt)

    def judge(self, outside: bool, frame: bytes, meta: int = 0) -> tuple[int, bytes]:
        return self.tcp.judge(frame, outside, self.now, meta=meta, stats=self.stats)

    def syn_opts(self) -> list:
        return [("MSS", 1460)] + ([("WScale", self.wscale)] if self.wscale is not None else [])

    # The three steps of the handshake and ordinary traffic.
    def syn(self) -> int:
        return self.judge(True, self.frame(True, "S", self.cseq, opts=self.syn_opts()))[0]

    def synack(self) -> int:
        v = self.judge(
            False,
            self.frame(False, "SA", self.oseq, self.cseq + 1, win=65160, opts=self.syn_opts()),
        )[0]
        return v

    def ack(self) -> int:
        self.cseq += 1
        self.oseq += 1
        return self.judge(True, self.frame(True, "A", self.cseq, self.oseq))[0]

    def open(self) -> None:
        assert (self.syn(), self.synack(), self.ack()) == (FWD, FWD, FWD)

    def send(self, n: int, flags: str = "PA") -> int:
        v = self.judge(True, self.frame(True, flags, self.cseq, self.oseq, b"x" * n))[0]
        self.cseq += n + ("F" in flags)
        return v

    def reply(self, n: int, flags: str = "PA") -> int:
        v = self.judge(False, self.frame(False, flags, self.oseq, self.cseq, b"y" * n))[0]
        self.oseq += n + ("F" in flags)
        return v

    def reasons(self) -> dict[str, int]:
        st = B.Tcp.stats_dict(self.stats)
        return {r.name: st["reasons"][r]["packets"] for r in Reason if st["reasons"][r]["packets"]}

    def monitor(self) -> dict[str, int]:
        st = B.Tcp.stats_dict(self.stats)
        return {r.name: st["monitor"][r]["packets"] for r in Reason if st["monitor"][r]["packets"]}


def states(tcp: B.Tcp) -> dict[int, int]:
    counts, _ = tcp.scan()
    return {i: n for i, n in enumerate(counts["states"]) if n and i}


SYN_SENT, SYN_RECV, ESTABLISHED, CLOSING, CLOSED, LEARNING = 1, 2, 3, 4, 5, 6


def test_handshake_data_and_close() -> None:
    tcp = stage()
    c = Conv(tcp)
    assert c.syn() == FWD and states(tcp) == {SYN_SENT: 1}
    assert c.synack() == FWD and states(tcp) == {SYN_RECV: 1}
    assert c.ack() == FWD and states(tcp) == {ESTABLISHED: 1}
    for _ in range(50):
        assert c.send(1000) == FWD
        assert c.reply(1400) == FWD
    assert c.send(0, "FA") == FWD and states(tcp) == {CLOSING: 1}
    assert c.reply(0, "FA") == FWD
    assert c.send(0, "A") == FWD
    assert c.reasons() == {}


def test_window_scaling_lets_big_windows_through() -> None:
    tcp = stage()
    c = Conv(tcp, wscale=7)
    c.open()
    # The origin advertises 2000 << 7 = 256 KB: the client may send that far ahead.
    c.judge(False, c.frame(False, "A", c.oseq, c.cseq, win=2000))
    for _ in range(150):
        assert c.send(1448) == FWD
    assert c.reasons() == {}


def test_without_window_scaling_the_window_is_64k() -> None:
    tcp = stage()
    c = Conv(tcp, wscale=None)
    c.open()
    c.judge(False, c.frame(False, "A", c.oseq, c.cseq, win=65535))
    assert c.send(60000) == FWD
    # Far beyond what the origin ever allowed.
    far = c.frame(True, "PA", c.cseq + 500_000, c.oseq, b"z")
    assert c.judge(True, far)[0] == DROP
    assert c.reasons() == {"tcp_out_of_window": 1}


def test_out_of_window_rst_does_not_kill_the_flow() -> None:
    tcp = stage()
    c = Conv(tcp)
    c.open()
    c.send(100)
    bogus = c.frame(True, "R", c.cseq + 2**31)
    assert c.judge(True, bogus)[0] == DROP
    assert states(tcp) == {ESTABLISHED: 1}
    assert c.send(100) == FWD
    # A RST at the right place closes it, and passes.
    assert c.judge(True, c.frame(True, "R", c.cseq))[0] == FWD
    assert states(tcp) == {CLOSED: 1}
    assert c.reasons() == {"tcp_out_of_window": 1}


def test_acks_of_unsent_data_are_out_of_window() -> None:
    tcp = stage()
    c = Conv(tcp)
    c.open()
    c.reply(100)
    assert c.judge(True, c.frame(True, "A", c.cseq, c.oseq + 10**6))[0] == DROP
    assert c.reasons() == {"tcp_out_of_window": 1}


def test_floods_of_unknown_flows() -> None:
    tcp = stage(syn="on")
    c = Conv(tcp)
    rng = random.Random(1)
    for i in range(300):
        c.cport = 1024 + i
        seq, ack = rng.getrandbits(32), rng.getrandbits(32)
        assert c.judge(True, c.frame(True, "A", seq, ack))[0] == DROP
        assert c.judge(True, c.frame(True, "RA", seq, ack))[0] == DROP
        assert c.judge(True, c.frame(True, "SA", seq, ack))[0] == DROP
        # A bare RST of no flow is XDP's (a challenge's answer, or
        # challenge_failed); one that reaches the loop lost its flow.
        assert c.judge(True, c.frame(True, "R", seq))[0] == DROP
    assert c.reasons() == {"tcp_no_flow": 900, "tcp_synack_reflection": 300}
    assert states(tcp) == {}


def test_what_xdp_let_through_as_it_is_passes() -> None:
    """XG_META_FORWARD: a RST of no flow XDP passed while challenges are only
    monitored or the learning window is open; the loop keeps no state of it."""
    tcp = stage(syn="on")
    c = Conv(tcp)
    assert c.judge(True, c.frame(True, "R", c.cseq), meta=B.META_FORWARD)[0] == FWD
    assert c.reasons() == c.monitor() == {} and states(tcp) == {}


def _fragments(c: Conv) -> list[bytes]:
    """A TCP ACK segment cut into fragments: first, middle and last, v4 or v6."""
    pkt = Ether(c.frame(True, "A", c.cseq, c.oseq, b"z" * 64))
    eth = Ether(src=pkt.src, dst=pkt.dst)
    if ":" in c.client:
        ip6 = pkt[IPv6]
        whole = IPv6(src=ip6.src, dst=ip6.dst) / IPv6ExtHdrFragment() / ip6[TCP]
        # Each fragment carries 32 bytes: the first has the whole TCP header
        # (a first fragment without it is malformed, see test_xdp_verdicts).
        return [bytes(eth / f) for f in fragment6(whole, 80)]
    return [bytes(eth / f) for f in fragment(pkt[IP], 24)]


@pytest.mark.parametrize("client,origin", [V4_PAIR, V6_PAIR])
def test_tcp_fragments_from_outside(client: str, origin: str) -> None:
    """No flow can vouch for a fragment, even of an open connection's segment."""
    on, monitor, off = (stage(state=m) for m in ("on", "monitor", "off"))
    for tcp, verdict in ((on, DROP), (monitor, FWD), (off, FWD)):
        c = Conv(tcp, client=client, origin=origin)
        c.open()
        frags = _fragments(c)
        assert len(frags) >= 3
        assert [c.judge(True, f)[0] for f in frags] == [verdict] * len(frags)
        assert c.send(10) == FWD  # the flow itself is untouched
        if tcp is on:
            assert c.reasons() == {"tcp_fragment": len(frags)}
        elif tcp is monitor:
            assert c.reasons() == {} and c.monitor() == {"tcp_fragment": len(frags)}
        else:
            assert c.reasons() == c.monitor() == {}


def test_no_out_of_state_drops_while_learning() -> None:
    """Frames of flows opened before the start, whatever they look like,
    pass until the window closes; then the same frames are dropped."""
    tcp = stage(syn="on", learn_until=T0 + 10)
    c = Conv(tcp)
    seq, ack = c.cseq, c.oseq
    for _ in range(2):
        assert c.judge(True, c.frame(True, "SA", seq, ack))[0] == FWD  # origin's connect
        assert c.judge(True, c.frame(True, "RA", seq, ack))[0] == FWD  # a late reset
        assert all(c.judge(True, f)[0] == FWD for f in _fragments(c))
    assert c.reasons() == {}
    # A flow whose handshake the stage saw is checked from the start.
    known = Conv(tcp, cport=40001)
    assert (known.syn(), known.synack(), known.ack()) == (FWD, FWD, FWD)
    assert known.judge(True, known.frame(True, "A", known.cseq, known.oseq + 10**6))[0] == DROP
    assert known.reasons() == {"tcp_out_of_window": 1}
    c.now = T0 + 11
    assert c.judge(True, c.frame(True, "SA", seq, ack))[0] == DROP
    assert c.judge(True, c.frame(True, "RA", seq, ack))[0] == DROP
    assert c.reasons() == {"tcp_synack_reflection": 1, "tcp_no_flow": 1}


def test_monitor_counts_and_passes() -> None:
    tcp = stage(syn="monitor", state="monitor")
    c = Conv(tcp)
    assert c.syn() == FWD
    assert c.judge(True, c.frame(True, "A", 1, 2))[0] == FWD  # wrong flow state
    c.cport += 1
    assert c.judge(True, c.frame(True, "A", 5, 6))[0] == FWD  # no flow
    assert c.reasons() == {}
    assert c.monitor() == {"tcp_out_of_window": 1, "tcp_no_flow": 1}


def test_auto_state_drops_only_what_xdp_found_above_the_rate() -> None:
    """XDP keeps the per-destination rate; the loop drops out-of-state frames
    only when it says the destination is above it (XG_META_STATE_OVER)."""
    tcp = stage(state="auto")
    c = Conv(tcp)
    verdicts = []
    for i in range(8):
        c.cport = 2000 + i
        meta = B.META_STATE_OVER if i >= 3 else 0
        verdicts.append(c.judge(True, c.frame(True, "A", i, i), meta=meta)[0])
    assert verdicts == [FWD] * 3 + [DROP] * 5
    assert c.monitor() == {"tcp_no_flow": 3}
    assert c.reasons() == {"tcp_no_flow": 5}


def test_learning_window_adopts_flows_seen_from_both_sides() -> None:
    tcp = stage(learn_until=T0 + 10)
    c = Conv(tcp)
    # Mid-stream: nothing known about either sequence space.
    assert c.send(100) == FWD and states(tcp) == {LEARNING: 1}
    assert c.reply(100) == FWD and states(tcp) == {ESTABLISHED: 1}
    lone = Conv(tcp, cport=40001)
    assert lone.send(100) == FWD  # seen from outside only, so far
    c.now = lone.now = T0 + 11  # the window closed
    assert c.send(100) == FWD
    assert lone.send(100) == DROP
    assert lone.reasons() == {"tcp_no_flow": 1}


def test_the_origin_speaking_adopts_a_flow_after_learning() -> None:
    tcp = stage()
    c = Conv(tcp)
    assert c.reply(500) == FWD
    assert c.send(100) == FWD
    assert states(tcp) == {ESTABLISHED: 1}


def test_connection_opened_by_the_origin() -> None:
    tcp = stage()
    c = Conv(tcp)
    # origin -> outside server: SYN from inside, SYN-ACK from outside.
    assert c.judge(False, c.frame(False, "S", c.oseq, opts=c.syn_opts()))[0] == FWD
    v = c.judge(True, c.frame(True, "SA", c.cseq, c.oseq + 1, opts=c.syn_opts()))[0]
    assert v == FWD
    c.oseq += 1
    c.cseq += 1
    assert c.judge(False, c.frame(False, "A", c.oseq, c.cseq))[0] == FWD
    assert states(tcp) == {ESTABLISHED: 1}
    assert c.send(100) == FWD and c.reasons() == {}
    # A SYN-ACK for a SYN nobody sent is a reflection.
    c2 = Conv(tcp, cport=40002)
    assert c2.judge(True, c2.frame(True, "SA", 1, 2))[0] == DROP
    assert c2.reasons() == {"tcp_synack_reflection": 1}


def test_ipv6_flow() -> None:
    tcp = stage(syn="on")
    c = Conv(tcp, client="2001:db8::1", origin="2001:db8::2")
    c.open()
    assert c.send(1000) == FWD and c.reply(1000) == FWD
    assert c.judge(True, c.frame(True, "A", c.cseq, c.oseq + 10**6))[0] == DROP
    assert c.reasons() == {"tcp_out_of_window": 1}


def test_full_table_keeps_established_flows() -> None:
    tcp = stage(max_flows=64)  # 8 buckets of 8
    established = []
    port = 1024
    while True:  # fill with established flows until a new one finds no room
        c = Conv(tcp, cport=port)
        port += 1
        if c.syn() == DROP:
            assert c.reasons() == {"flow_table_full": 1}
            break
        assert c.synack() == FWD and c.ack() == FWD
        established.append(c)
    # The first bucket to fill ends it (8 buckets of 8: about 40 flows in).
    assert len(established) >= 8
    for c in established:
        assert c.send(10) == FWD
    counts, _ = tcp.scan()
    assert counts["evictions"] == 0


def tracked_ports(tcp: B.Tcp) -> dict[int, int]:
    """Client port -> state of every live flow (ports as the test wrote them)."""
    _, flows = tcp.scan(1000)
    return {
        int.from_bytes(f["key"]["out_port"].to_bytes(2, "little"), "big"): f["state"] for f in flows
    }


def test_full_table_evicts_the_oldest_half_open_flows() -> None:
    tcp = stage(max_flows=8)  # one bucket of 8: every flow competes for it
    first = [Conv(tcp, cport=1024 + i) for i in range(8)]
    for c in first:
        assert c.syn() == FWD
    assert tracked_ports(tcp) == {c.cport: SYN_SENT for c in first}
    assert tcp.scan()[0]["evictions"] == 0
    # Each later SYN takes the slot of the oldest half-open flow.
    late = [Conv(tcp, cport=5000 + i, now=T0 + 1 + i) for i in range(4)]
    for c in late:
        assert c.syn() == FWD
    expect = {c.cport: SYN_SENT for c in first[4:] + late}
    assert tracked_ports(tcp) == expect
    assert tcp.scan()[0]["evictions"] == 4
    # An established flow is never the victim, however old.
    old = first[4]
    assert old.synack() == FWD and old.ack() == FWD
    newer = [Conv(tcp, cport=6000 + i, now=T0 + 10) for i in range(7)]
    for c in newer:
        assert c.syn() == FWD
    assert tracked_ports(tcp) == {old.cport: ESTABLISHED, **{c.cport: SYN_SENT for c in newer}}
    assert tcp.scan()[0]["evictions"] == 4 + 7


def test_a_flow_stamped_by_a_faster_clock_is_alive() -> None:
    """Workers read the clock once per step: another may be a second ahead."""
    tcp = stage()
    c = Conv(tcp)
    c.open()
    c.now = T0 + 1
    assert c.send(10) == FWD
    c.now = T0  # a worker whose clock lags
    assert c.reply(10) == FWD
    assert states(tcp) == {ESTABLISHED: 1}


def test_busiest_flows_are_reported() -> None:
    tcp = stage()
    flows = [Conv(tcp, cport=3000 + i) for i in range(5)]
    for i, c in enumerate(flows):
        c.open()
        for _ in range(i * 3):
            c.send(10)
    counts, top = tcp.scan(3)
    assert counts["states"][ESTABLISHED] == 5
    assert [f["packets"] for f in top] == sorted((f["packets"] for f in top), reverse=True)
    assert len(top) == 3 and top[0]["packets"] == 3 + 4 * 3


def flow_of(tcp: B.Tcp, cport: int) -> dict:
    """The live flow of client port ``cport``."""
    _, flows = tcp.scan(1000)
    (flow,) = [
        f
        for f in flows
        if int.from_bytes(f["key"]["out_port"].to_bytes(2, "little"), "big") == cport
    ]
    return flow


def spoofed_syn(c: Conv) -> int:
    """A SYN with the flow's tuple and a sequence number of the attacker's."""
    return c.judge(True, c.frame(True, "S", c.cseq + 2**31, opts=c.syn_opts()))[0]


def _syn_sent(c: Conv) -> None:
    assert c.syn() == FWD


def _syn_recv(c: Conv) -> None:
    assert c.syn() == FWD and c.synack() == FWD


def _closing(c: Conv) -> None:
    c.open()
    assert c.send(0, "FA") == FWD


def _learning(c: Conv) -> None:
    assert c.send(100) == FWD  # mid-stream, seen from outside only


def _adopted_from_inside(c: Conv) -> None:
    assert c.reply(100) == FWD  # the origin speaks on a flow it knew before us


@pytest.mark.parametrize(
    ("make", "state"),
    [
        (_syn_sent, SYN_SENT),
        (_syn_recv, SYN_RECV),
        (_closing, CLOSING),
        (_learning, LEARNING),
        (_adopted_from_inside, ESTABLISHED),
    ],
    ids=["syn-sent", "syn-recv", "closing", "one-sided-adopted", "adopted-from-inside"],
)
def test_a_spoofed_syn_does_not_overwrite_a_live_flow(make, state: int) -> None:  # type: ignore[no-untyped-def]
    """conntrack's semantics: a SYN on a live tuple is at most a possible
    reopen, taken only when the origin's SYN-ACK confirms it."""
    tcp = stage(learn_until=T0 + 10)
    c = Conv(tcp)
    make(c)
    before = flow_of(tcp, c.cport)
    assert before["state"] == state
    assert spoofed_syn(c) == FWD  # the origin decides: it answers with a challenge ACK
    after = flow_of(tcp, c.cport)
    for key in ("state", "isn", "end", "acked", "maxwin", "wscale"):
        assert after[key] == before[key], key
    # The flow goes on as if nothing happened.
    if state == SYN_SENT:
        assert c.synack() == FWD and c.ack() == FWD
    elif state == SYN_RECV:
        assert c.ack() == FWD
    elif state == CLOSING:
        assert c.reply(0, "FA") == FWD and c.send(0, "A") == FWD
    else:
        assert c.send(10) == FWD and c.reply(10) == FWD
    assert c.reasons() == {}


def test_a_closed_flow_is_replaced_by_a_new_syn() -> None:
    tcp = stage()
    c = Conv(tcp)
    c.open()
    assert c.judge(True, c.frame(True, "R", c.cseq))[0] == FWD
    assert flow_of(tcp, c.cport)["state"] == CLOSED
    c.cseq = random.getrandbits(32)
    c.oseq = random.getrandbits(32)
    c.open()
    assert c.send(100) == FWD and c.reasons() == {}


def test_a_reopen_confirmed_by_the_origin_replaces_the_flow() -> None:
    tcp = stage()
    c = Conv(tcp)
    _closing(c)
    # The client comes back on the same port with a new ISN, and the origin
    # accepts it (a socket in TIME-WAIT may): the old flow gives way.
    c.cseq = (c.cseq + 2**30) % 2**32
    c.oseq = random.getrandbits(32)
    assert c.syn() == FWD
    assert flow_of(tcp, c.cport)["state"] == CLOSING
    assert c.synack() == FWD
    assert flow_of(tcp, c.cport)["state"] == SYN_RECV
    assert c.ack() == FWD
    assert flow_of(tcp, c.cport)["state"] == ESTABLISHED
    assert c.send(1000) == FWD and c.reply(1000) == FWD
    assert c.reasons() == {}


def test_a_syn_on_a_live_tuple_that_passed_xdp_changes_nothing() -> None:
    """A SYN claiming a live tuple is challenged in XDP like any; one that
    passed (a verified source) is a possible reopen, nothing more."""
    tcp = stage(syn="on", learn_until=T0 + 10)
    c = Conv(tcp)
    _learning(c)
    before = flow_of(tcp, c.cport)
    assert c.judge(True, c.frame(True, "S", c.cseq + 2**31))[0] == FWD
    assert flow_of(tcp, c.cport)["state"] == before["state"]
    assert c.reasons() == {}


def test_an_in_window_rst_elsewhere_changes_nothing() -> None:
    """RFC 5961 (issue 23, 2): a blind sweep of RSTs with the 4-tuple right,
    one every 65,536 sequence numbers, some of them in the window. Those go
    on for the origin to challenge; the flow stays established and its next
    segments pass. Only the exact one ends it."""
    tcp = stage()
    c = Conv(tcp)
    c.open()
    c.send(100)
    c.reply(100)
    passed = 0
    template = bytearray(c.frame(True, "R", 0))
    for seq in range(0, 2**32, 65536):
        if seq == c.cseq % 2**32:
            continue
        v = c.judge(True, tcp4_with_seq(template, seq))[0]
        passed += v == FWD
        if not seq % (1 << 28):
            assert states(tcp) == {ESTABLISHED: 1}, seq
    assert states(tcp) == {ESTABLISHED: 1}
    assert passed > 0  # some fell in the window: passed on, not acted on
    assert c.send(100) == FWD and c.reply(10) == FWD
    assert c.judge(True, c.frame(True, "R", c.cseq))[0] == FWD
    assert states(tcp) == {CLOSED: 1}


def test_a_segment_with_a_bad_checksum_changes_no_state() -> None:
    tcp = stage()
    c = Conv(tcp)
    c.open()
    c.send(100)
    for flags in ("R", "FA"):
        frame = bytearray(c.frame(True, flags, c.cseq, c.oseq))
        frame[14 + 20 + 16] ^= 0xFF  # the TCP checksum
        assert c.judge(True, bytes(frame))[0] == FWD  # the origin drops it
        assert states(tcp) == {ESTABLISHED: 1}, flags
    assert c.judge(True, c.frame(True, "R", c.cseq))[0] == FWD
    assert states(tcp) == {CLOSED: 1}


def test_an_idle_connection_is_never_cut() -> None:
    """Issue 23, 8: an established connection idle for hours keeps its flow."""
    tcp = stage()
    c = Conv(tcp)
    c.open()
    c.now += 6 * 3600
    assert c.send(10) == FWD and c.reply(10) == FWD
    c.now += 4 * 86400
    assert c.send(10) == FWD
    assert c.reasons() == {}


def test_a_full_bucket_takes_the_longest_idle_established_flow_and_it_comes_back() -> None:
    """Under pressure an established flow idle for XG_IDLE_EVICTABLE gives
    way; when its client talks again (a verified source, as XDP says), its
    flow is adopted again, not dropped."""
    tcp = stage(max_flows=1024)  # one bucket per 8 flows: fill one
    idle = Conv(tcp, cport=50000)
    idle.open()
    idle.now += 700
    import socket

    def idle_tracked() -> bool:
        port = socket.htons(50000)
        return any(f["key"]["out_port"] == port for f in tcp.scan(top=2000)[1])

    port = 50001
    while idle_tracked():  # new connections, until one takes the idle flow's slot
        c = Conv(tcp, cport=port, now=idle.now)
        port += 1
        if c.syn() == FWD:  # (a bucket full of busy flows refuses it)
            assert (c.synack(), c.ack()) == (FWD, FWD)
        assert port < 60000
    assert tcp.scan(top=0)[0]["evictions"] >= 1
    idle.now += 700  # the bucket's busy flows have gone quiet meanwhile
    # Without XDP's word that the source is verified: dropped (no flow).
    assert idle.send(10) == DROP
    # With it: adopted, and the connection goes on.
    assert idle.judge(True, idle.frame(True, "PA", idle.cseq, idle.oseq, b"x"), meta=8)[0] == FWD
    idle.cseq += 1
    assert idle.send(10) == FWD
    assert idle.reply(10) == FWD


def test_a_source_over_its_flow_quota_opens_no_more_flows() -> None:
    """Issue 23, 5: an eighth of the table per source by default (a quarter per
    /24); the allowlist is exempt; and a full bucket gives up the flows of a
    source over its quota first."""
    tcp = stage(max_flows=1024)
    hogs = []
    for port in range(20000, 20200):
        c = Conv(tcp, client="198.18.5.5", cport=port)
        if c.syn() == FWD:
            assert (c.synack(), c.ack()) == (FWD, FWD)
            hogs.append(c)
    rep = tcp.quota()
    assert rep["source_quota"] == 128 and rep["prefix_quota"] == 256
    assert rep["sources_over"] == 1 and rep["top_source"] == len(hogs) > 128, rep
    late = Conv(tcp, client="198.18.5.5", cport=30000)
    assert late.syn() == DROP and late.reasons() == {"flow_quota": 1}
    allowed = Conv(tcp, client="198.18.5.5", cport=30001)
    assert allowed.judge(True, allowed.frame(True, "S", allowed.cseq), meta=1)[0] == FWD
    other = Conv(tcp, client="198.19.5.5", cport=30002)
    other.open()
    # The hog's established flows are already there: they go on.
    assert hogs[0].send(10) == FWD
    # A settings value replaces the default; 0 is the default again.
    tcp.configure({**tcp.config(), "source_flow_quota": 1000})
    assert tcp.quota()["sources_over"] == 0
    assert Conv(tcp, client="198.18.5.5", cport=30003).syn() == FWD
