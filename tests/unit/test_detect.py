"""The detector's parts that need no kernel: fingerprints and baselines."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from xdpguard import _bindings as B
from xdpguard import detect
from xdpguard.detect import Baselines, fingerprint
from xdpguard.protect import CLASSES

pytestmark = pytest.mark.unit

KEYS = B.struct_dtype("struct xg_sample_keys")


def keys(rows: list[dict[str, object]]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=KEYS)
    for i, r in enumerate(rows):
        src = r.get("src", "198.18.0.1")
        dst = r.get("dst", "169.254.0.2")
        out[i]["src"] = np.frombuffer(bytes(10) + b"\xff\xff" + bytes(map(int, src.split("."))),
                                      dtype=np.uint8)  # fmt: skip
        out[i]["dst"] = np.frombuffer(bytes(10) + b"\xff\xff" + bytes(map(int, dst.split("."))),
                                      dtype=np.uint8)  # fmt: skip
        out[i]["proto"] = r.get("proto", 17)
        out[i]["flags"] = B.KEYS_IP | (B.KEYS_PORTS if r.get("ports", True) else 0)
        out[i]["sport"] = r.get("sport", 53)
        out[i]["dport"] = r.get("dport", 40000)
        out[i]["ip_len"] = r.get("len", 600)
        out[i]["frag"] = r.get("frag", 0)
        out[i]["tcp_flags"] = r.get("tcp_flags", 0)
    return out


def test_a_reflection_flood_is_fingerprinted_by_port_length_and_source() -> None:
    rng = random.Random(random.getrandbits(64))
    attack = keys([
        {"src": f"198.{18 + rng.getrandbits(1)}.{rng.getrandbits(8)}.{rng.getrandbits(8)}",
         "sport": 53, "dport": rng.randrange(1024, 65536), "len": rng.randrange(528, 1429)}
        for _ in range(300)
    ])  # fmt: skip
    before = keys([
        {"src": "169.254.0.1", "sport": rng.randrange(1024, 65536), "dport": 53, "len": 60}
        for _ in range(50)
    ])  # fmt: skip
    fp = fingerprint(attack, before, "169.254.0.2/32")
    m = fp["match"]
    assert m.startswith("dst 169.254.0.2/32 proto udp sport 53 length ")
    assert m.endswith(" src 198.18.0.0/15")
    assert fp["specific"] and fp["coverage"] >= 0.95 and fp["before_match"] == 0.0


def test_a_few_stray_samples_do_not_widen_it() -> None:
    attack = keys([{"sport": 123, "len": 468} for _ in range(97)]
                  + [{"sport": 5000 + i, "len": 100 + i} for i in range(3)])  # fmt: skip
    fp = fingerprint(attack, keys([]), "169.254.0.2/32")
    assert fp["match"] == (
        "dst 169.254.0.2/32 proto udp sport 123 dport 40000 length 468 src 198.18.0.1/32"
    )
    assert fp["coverage"] == 0.97


def test_random_ports_and_sources_leave_the_length() -> None:
    rng = random.Random(random.getrandbits(64))
    attack = keys([
        {"src": f"{rng.randrange(1, 224)}.{rng.getrandbits(8)}.{rng.getrandbits(8)}.1",
         "sport": rng.randrange(65536), "dport": rng.randrange(65536), "len": 92}
        for _ in range(200)
    ])  # fmt: skip
    fp = fingerprint(attack, keys([]), "169.254.0.0/24")
    assert fp["match"] == "dst 169.254.0.0/24 proto udp length 92" and fp["specific"]


def test_nothing_specific_is_no_drop() -> None:
    rng = random.Random(random.getrandbits(64))
    attack = keys([
        {"src": f"{rng.randrange(1, 224)}.{rng.getrandbits(8)}.1.1", "sport": rng.randrange(65536),
         "dport": rng.randrange(65536), "len": rng.randrange(60, 1500)}
        for _ in range(200)
    ])  # fmt: skip
    fp = fingerprint(attack, keys([]), "169.254.0.2/32")
    assert fp["match"] == "dst 169.254.0.2/32 proto udp" and not fp["specific"]


def test_what_came_before_vetoes_a_rule_that_would_hit_it() -> None:
    attack = keys([{"sport": 53, "len": 600} for _ in range(100)])
    before = keys(
        [{"sport": 53, "len": 600} for _ in range(10)] + [{"sport": 9} for _ in range(90)]
    )
    fp = fingerprint(attack, before, "169.254.0.2/32")
    assert fp["before_match"] == 0.1  # the detector then limits the class instead


def test_baselines_learn_quietly_and_survive_a_restart(tmp_path: Path) -> None:
    b = Baselines(4)
    i = b.row("169.254.0.2", 0.0)
    quiet = np.ones(len(CLASSES), dtype=bool)
    for _ in range(600):  # ten time constants of a steady 100/s
        b.learn(i, np.full((len(CLASSES), 2), 100.0), 1.0, 60.0, quiet)
    level = b.level(i)
    assert np.allclose(level[:, 0], 100.0, rtol=0.05)
    # An attack is not learned.
    b.learn(i, np.full((len(CLASSES), 2), 1e6), 1.0, 60.0, ~quiet)
    assert np.allclose(b.level(i), level)
    path = tmp_path / "baselines.npz"
    assert b.save(path) is None
    again = Baselines(4)
    assert again.load(path) == 1
    assert np.allclose(again.level(again.rows["169.254.0.2"]), level)
    # Bounded: a fifth destination takes the least recently seen row.
    for n, key in enumerate(("a", "b", "c", "d")):
        b.row(key, 10.0 + n)
    assert len(b.rows) == 4 and "169.254.0.2" not in b.rows


def test_the_class_names_are_the_headers() -> None:
    from xdpguard import policy

    assert policy._CLASSES == CLASSES
    assert set(detect.RULED) <= set(CLASSES)
