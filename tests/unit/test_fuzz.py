"""A short libFuzzer run of the C parser and TCP stage (fuzz/xg_fuzz_tcp.c).

The long run is ``make fuzz``. The seed corpus is framegen's well-formed
frames, each behind a control byte that varies direction, allowlist bit
and modes; libFuzzer mutates from there.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from framegen import seed

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("XDPGUARD_FUZZ_RUNS", "100000"))


def build(out: Path) -> Path:
    clang = shutil.which("clang")
    assert clang, "clang is missing (make deps installs it)"
    binary = out / "xg_fuzz_tcp"
    subprocess.run(
        [
            clang,
            "-g",
            "-O1",
            "-fsanitize=fuzzer,address,undefined",
            "-fno-sanitize-recover=undefined",
            # The parser reads headers in place at whatever alignment the
            # frame gives them, as the kernel does (x86-64 and arm64 allow it).
            "-fno-sanitize=alignment",
            f"-I{ROOT / 'bpf'}",
            f"-I{ROOT / 'libxdp_shim'}",
            str(ROOT / "fuzz" / "xg_fuzz_tcp.c"),
            str(ROOT / "libxdp_shim" / "xg_tcp.c"),
            str(ROOT / "libxdp_shim" / "xg_parse.c"),
            str(ROOT / "libxdp_shim" / "xg_flowtab.c"),
            "-lbpf",
            "-o",
            str(binary),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return binary


def seed_corpus(out: Path, rng: random.Random, n: int = 500) -> Path:
    corpus = out / "corpus"
    corpus.mkdir()
    for i in range(n):
        (corpus / f"seed{i}").write_bytes(bytes([rng.randrange(256)]) + seed(rng))
    return corpus


def test_fuzz_parser_and_tcp_stage(tmp_path: Path) -> None:
    rng = random.Random(random.getrandbits(64))
    binary = build(tmp_path)
    corpus = seed_corpus(tmp_path, rng)
    res = subprocess.run(
        [str(binary), f"-runs={RUNS}", f"-seed={rng.randrange(1, 1 << 31)}", str(corpus)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    tail = "\n".join(res.stderr.splitlines()[-30:])
    assert res.returncode == 0, tail
    assert f"Done {RUNS} runs" in res.stderr, tail
