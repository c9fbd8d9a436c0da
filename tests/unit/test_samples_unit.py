"""The samples' parts that need no kernel: heavy hitters, pcapng, keys, rates."""

from __future__ import annotations

import io
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pcapng_read import read_pcapng
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from xdpguard import _bindings as B
from xdpguard import pcapng
from xdpguard.defs import Reason
from xdpguard.samples import SAMPLE_DTYPE, TOP_BY, _keys_of, default_rates, validate_rates
from xdpguard.topk import TopK

pytestmark = pytest.mark.unit


def test_space_saving_holds_the_heavy_key_among_a_million_light_ones() -> None:
    rng = random.Random(random.getrandbits(64))
    t = TopK(64, tau=5.0, now=0.0)
    now = 0.0
    for step in range(100):  # 10 s, 10 batches a second
        now = step / 10
        items = [(f"light{rng.getrandbits(40)}", 1.0) for _ in range(10_000)]
        items.append(("heavy", 2000.0))  # 20,000 a second
        t.add(items, now)
    assert len(t) == 64  # bounded, whatever the distinct keys
    first = t.top(1, now)[0]
    assert first["key"] == "heavy"
    # Its rate: 20,000/s, less what the decay of the last batch leaves out,
    # plus at most its error bound (Space-Saving overestimates).
    assert 0.9 * 20_000 <= first["rate"] - first["error"] <= 1.1 * 20_000


def test_a_stopped_attack_fades_out() -> None:
    t = TopK(8, tau=1.0, now=0.0)
    t.add([("old", 1000.0)], 0.0)
    t.add([("new", 10.0)], 30.0)
    assert t.top(1, 30.0)[0]["key"] == "new"


def _sample(frame: bytes, reason: int = 5, direction: int = 0, every: int = 1) -> np.ndarray:
    s = np.zeros(1, dtype=SAMPLE_DTYPE)
    n = min(len(frame), B.SAMPLE_BYTES)
    s["ts_ns"], s["len"], s["reason"], s["dir"], s["caplen"] = 1, len(frame), reason, direction, n
    s["every"] = every
    s[0]["data"][:n] = np.frombuffer(frame[:n], dtype=np.uint8)
    return s


def test_keys_of_a_truncated_sample_by_the_one_parser() -> None:
    big = bytes(Ether() / IP(src="198.18.3.4", dst="169.254.0.2") / UDP(sport=53, dport=999)
                / bytes(1400))  # fmt: skip
    v6 = bytes(Ether() / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=7, dport=80))
    arp = bytes(Ether() / ARP())
    keys = B.sample_keys(np.concatenate([_sample(big), _sample(v6), _sample(arp)]))
    assert [_keys_of(keys[0], by) for by in TOP_BY] == [
        "198.18.3.4", "169.254.0.2", "udp/53", "udp/999", "udp", "198.18.3.0/24"]  # fmt: skip
    assert [_keys_of(keys[1], by) for by in TOP_BY] == [
        "2001:db8::1", "2001:db8::2", "tcp/7", "tcp/80", "tcp", "2001:db8::/48"]  # fmt: skip
    assert [_keys_of(keys[2], by) for by in TOP_BY] == [None] * 4 + ["l2/0x0806", None]


def test_pcapng_is_read_by_tcpdump_with_comments(tmp_path: Path) -> None:
    frames = [bytes(Ether() / IP(src="198.18.0.1", dst="169.254.0.2") / UDP(sport=53) / bytes(n))
              for n in (10, 200, 1400)]  # fmt: skip
    buf = io.BytesIO()
    w = pcapng.Writer(buf, B.SAMPLE_BYTES, [("outer", "in"), ("inner", "out")])
    for i, f in enumerate(frames):
        w.packet(i % 2, 1_700_000_000_123_456_789 + i, f[: B.SAMPLE_BYTES], len(f),
                 f"reason=udp_src_port direction={'in' if i % 2 == 0 else 'out'}")  # fmt: skip
    path = tmp_path / "x.pcapng"
    path.write_bytes(buf.getvalue())
    got = read_pcapng(path.read_bytes())
    assert [(p.interface, p.orig_len, len(p.data)) for p in got] == [
        (0, len(frames[0]), len(frames[0])),
        (1, len(frames[1]), 128),
        (0, len(frames[2]), 128),
    ]
    assert got[1].comment == "reason=udp_src_port direction=out" and got[1].flags == 1
    out = subprocess.run(["tcpdump", "-nn", "-tt", "-r", str(path)], capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    assert len(out) == 3
    assert out[0].startswith("1700000000.123456 ")  # nanoseconds, read as such
    assert all("198.18.0.1.53 > 169.254.0.2" in line for line in out)


def test_rates_are_checked_whole() -> None:
    d = default_rates()
    assert d["every"]["udp_src_port"] == 1000 and d["every"]["fast_path"] == 10000
    assert validate_rates({"every": {"drdos_port": 5}})["every"]["udp_src_port"] == 5
    assert set(validate_rates({})["every"]) == {r.name for r in Reason}
    bad_ones = [
        {"every": {"nothing": 1}},
        {"every": {"blocklist": -1}},
        {"every": {"blocklist": True}},
        {"cap": 0},
        {"cap": 10**9},
        {"more": 1},
        [],
    ]
    for bad in bad_ones:
        with pytest.raises(ValueError):
            validate_rates(bad)
