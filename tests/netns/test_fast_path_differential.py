"""The same crafted conversation with the fast path on and off: the origin
receives the same frames either way (the fast path takes nothing the loop
would not have passed, and XDP keeps the flow as the loop would)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from lab import ORIGIN_V4, WITHOUT, Appliance, Lab, Ledger, lab, wait_for, without_args
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

GHOST = "169.254.0.50"  # a client no kernel owns: only our frames speak for it
PORT = 5201


def conversation(the_lab: Lab, app: Appliance) -> tuple[set[int], dict]:
    """Crafted segments of one flow, each with its own IP id; the ids that
    reached the origin, and the appliance's verdicts."""
    client = resolve_device(Netns(the_lab.client_ns), "eth0")
    origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
    the_lab.ns_exec(
        the_lab.origin_ns, "ip", "neigh", "replace", GHOST, "lladdr", client.mac, "dev", "eth0"
    )
    eth = Ether(src=client.mac, dst=origin.mac)
    cport, cisn = 41000, 1_000_000

    def seg(ident: int, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
        return bytes(
            eth / IP(src=GHOST, dst=ORIGIN_V4, id=ident)
            / TCP(sport=cport, dport=PORT, flags=flags, seq=seq % 2**32, ack=ack % 2**32)
            / data
        )  # fmt: skip

    def handshake() -> int:
        """SYN out, the origin's SYN-ACK caught on the wire, its ISN."""
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)) as raw:
            raw.bind(("eth0", 0))
            raw.settimeout(10)
            raw.send(seg(100, "S", cisn, 0))
            while True:
                frame = raw.recv(2048)
                ip = frame[14:]
                if ip[9] == 6 and socket.inet_ntoa(ip[16:20]) == GHOST:
                    tcp = ip[(ip[0] & 15) * 4 :]
                    if tcp[13] & 0x12 == 0x12:
                        return struct.unpack("!I", tcp[4:8])[0]

    oisn = Netns(the_lab.client_ns).run(handshake)
    c, o = cisn + 1, oisn + 1
    frames = [
        seg(1, "A", c, o),  # the handshake's ACK: established
        seg(2, "PA", c, o, b"ECHO\n"),
        seg(3, "PA", c + 5, o, b"one\n"),
        seg(4, "PA", c + 2**30, o, b"far\n"),  # far outside the window
        seg(5, "A", c + 9, o + 10**6),  # acks what the origin never sent
        bytes(eth / IP(src=GHOST, dst=ORIGIN_V4, id=6) / UDP(sport=4000, dport=9) / b"u"),
        seg(7, "R", c + 2**31, 0),  # a RST far outside the window
        seg(8, "PA", c + 9, o, b"two\n"),
        seg(9, "S", c + 12345, 0),  # a SYN claiming the live tuple
        seg(10, "PA", c + 13, o, b"three\n"),
        seg(11, "FA", c + 19, o),
    ]

    def inject(these: list[bytes]) -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("eth0", 0))
            for frame in these:
                raw.send(frame)

    def established() -> bool:
        flows = app.call("tcp.flows", top=5)
        return any(f["outside"] == f"{GHOST}:{cport}" and f["state"] == "established"
                   for f in flows["busiest"])  # fmt: skip

    matches = {f"id{i}": f"ip saddr {GHOST} ip id {i}" for i in range(1, 12)}
    with the_lab.origin_counters(**matches) as counts:
        with Ledger(the_lab, app) as ledger:
            # The loop marks the flow verified as it takes the ACK; then the rest.
            Netns(the_lab.client_ns).run(inject, frames[:1])
            wait_for(established, what="the flow established")
            Netns(the_lab.client_ns).run(inject, frames[1:])
        acct = ledger.account()
        seen = counts()
    acct.check()
    return {int(k[2:]) for k, n in seen.items() if n}, {**acct.xdp, **acct.loop}


@pytest.mark.parametrize("mode", ["on", "off", *WITHOUT])
def test_same_frames_reach_the_origin(tmp_path: Path, mode: str) -> None:
    """The same frames reach the origin with the fast path, without it, and
    with each kernel feature's fallback forced (devmap_redirect's: no fast
    path, said so in status)."""
    fast = "off" if mode == "off" else "on"
    with (
        lab(queues=1) as the_lab,
        the_lab.server(PORT),
        Appliance(
            the_lab, tmp_path, "--fast-path", fast, "--learn", "0", *without_args(mode)
        ) as app,
    ):
        if mode == "without-devmap_redirect":
            directions = app.call("status")["fast_path"]["directions"]
            assert all(not d["active"] and "--without" in d["why"] for d in directions.values())
            assert app.call("status")["fallbacks"] == {"devmap_redirect": "af_xdp_path"}
            fast = "off"
        app.cli("tcp", "config", "--syn-mode", "off", "--state-mode", "on")
        arrived, verdicts = conversation(the_lab, app)
    # What the loop alone lets through (fast path off, and on: the same).
    assert arrived == {1, 2, 3, 6, 8, 9, 10, 11}, (arrived, verdicts)
    assert verdicts.get("tcp_out_of_window", 0) >= 3, verdicts
    if fast == "on":
        # Segments 2 and 3 (at least) went through XDP alone, the UDP too.
        assert verdicts.get("fast_path", 0) >= 3, verdicts
    else:
        assert "fast_path" not in verdicts, verdicts
