"""SipHash as xdpguard computes it (bpf/xg_flow.h xg_siphash(): the flow
table's bucket, SipHash-1-3, and the challenges' cookies, SipHash-2-4),
held to the reference: cookies made and checked with one wrong function
would pass every other test."""

from __future__ import annotations

import random

import pytest

from xdpguard import _bindings as B

pytestmark = pytest.mark.unit

KEY = bytes(range(16))
_M = (1 << 64) - 1


def reference(key: bytes, msg: bytes, c: int = 2, d: int = 4) -> int:
    """SipHash-c-d as the paper (Aumasson and Bernstein, 2012) gives it, on bytes."""

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & _M

    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    v = [0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1, 0x6C7967656E657261 ^ k0,
         0x7465646279746573 ^ k1]  # fmt: skip

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & _M
            v[1] = rotl(v[1], 13) ^ v[0]
            v[0] = rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & _M
            v[3] = rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & _M
            v[3] = rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & _M
            v[1] = rotl(v[1], 17) ^ v[2]
            v[2] = rotl(v[2], 32)

    full = len(msg) // 8 * 8
    blocks = [int.from_bytes(msg[i : i + 8], "little") for i in range(0, full, 8)]
    blocks.append((len(msg) & 0xFF) << 56 | int.from_bytes(msg[full:], "little"))
    for m in blocks:
        v[3] ^= m
        rounds(c)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(d)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def shim(words: list[int], key: bytes, c: int, d: int) -> int:
    buf = B.ffi.new("uint64_t[]", words or [0])
    return int(B.lib.xg_siphash_words(buf, len(words), key, c, d))


def test_the_reference_is_the_papers() -> None:
    """Its test vector (appendix A: key 00..0f, message 00..0e) and the first
    whole-word vectors of the reference implementation's vectors.h."""
    assert reference(KEY, bytes(range(15))) == 0xA129CA6149BE45E5
    assert reference(KEY, b"") == 0x726FDB47DD0E0E31
    assert reference(KEY, bytes(range(8))) == 0x93F5F5799A932462
    assert reference(KEY, bytes(range(16))) == 0x3F2ACC7F57C29BDB


@pytest.mark.parametrize("words", [0, 1, 2, 5])
def test_xdpguards_siphash_24_gives_the_reference_vectors(words: int) -> None:
    msg = bytes(range(8 * words))
    as_words = [int.from_bytes(msg[i : i + 8], "little") for i in range(0, len(msg), 8)]
    assert shim(as_words, KEY, 2, 4) == reference(KEY, msg)


def test_siphash_13_and_24_on_random_keys_and_words() -> None:
    rng = random.Random(random.getrandbits(64))  # the test's seed, see conftest
    for _ in range(500):
        key = rng.randbytes(16)
        n = rng.choice([2, 5])  # what the cookies (IPv4, IPv6) and the flow keys hash
        words = [rng.getrandbits(64) for _ in range(n)]
        msg = b"".join(w.to_bytes(8, "little") for w in words)
        for c, d in ((1, 3), (2, 4)):
            assert shim(words, key, c, d) == reference(key, msg, c, d), (key.hex(), words, c)
