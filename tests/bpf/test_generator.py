"""The tests' and benchmarks' traffic generator (libxdp_shim/xg_gen.c): what
it varies comes out with every checksum right, and it sends what it says."""

from __future__ import annotations

import random
import socket

import pytest
from lab import import_bench, veth_netns
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from xdpguard.netns import Netns

pytestmark = pytest.mark.bpf


def capture(ns: Netns, count: int, send) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Frames arriving on xgv1 while ``send()`` runs (at most ``count``)."""

    def body() -> list[bytes]:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as s:
            s.bind(("xgv1", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
            s.settimeout(2)
            send()
            out = []
            try:
                while len(out) < count:
                    out.append(s.recv(4096))
            except TimeoutError:
                pass
            return out

    return ns.run(body)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_varied_frames_keep_their_checksums(proto: str) -> None:
    xgbench = import_bench()
    seed = random.getrandbits(62) | 1
    print(f"generator seed {seed}")
    with veth_netns("xggen") as name:
        ns = Netns(name)
        if proto == "udp":
            frame = xgbench.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02",
                                       "198.18.0.1", "169.254.0.2", 4000, 53, size=200)  # fmt: skip
        else:
            frame = xgbench.tcp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02",
                                       "198.18.0.1", "169.254.0.2", 4000, 80, "S")  # fmt: skip
        gen = xgbench.Generator(name, "xgv0", frame, random_saddr=True, random_sport=True,
                                seed=seed)  # fmt: skip
        try:
            got = capture(ns, 500, lambda: gen.run(500))
            assert gen.sent() == 500
        finally:
            gen.close()
    frames = [Ether(f) for f in got if f[12:14] == b"\x08\x00"]
    assert len(frames) == 500
    sources = set()
    for f in frames:
        ip = f[IP]
        l4 = ip[UDP] if proto == "udp" else ip[TCP]
        want_ip, want_l4 = ip.chksum, l4.chksum
        del ip.chksum, l4.chksum
        again = Ether(bytes(f))
        assert again[IP].chksum == want_ip
        assert (again[UDP] if proto == "udp" else again[TCP]).chksum == want_l4
        assert ip.src.startswith("198.1")  # 198.18.0.0/15
        sources.add((ip.src, l4.sport))
    assert len(sources) > 450  # varied


def test_mixed_fragments_alternate_and_keep_the_header_checksum() -> None:
    xgbench = import_bench()
    with veth_netns("xggen") as name:
        ns = Netns(name)
        frame = xgbench.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02",
                                   "169.254.0.1", "169.254.0.2", 4000, 53, size=100)  # fmt: skip
        gen = xgbench.Generator(name, "xgv0", frame, mix_fragments=True)
        try:
            got = capture(ns, 100, lambda: gen.run(100))
        finally:
            gen.close()
    ips = [Ether(f)[IP] for f in got if f[12:14] == b"\x08\x00"]
    assert len(ips) == 100
    assert sorted({ip.frag for ip in ips}) == [0, 1480 // 8]
    for ip in ips:
        want = ip.chksum
        del ip.chksum
        assert IP(bytes(ip)).chksum == want
