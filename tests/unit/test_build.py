"""The build: a shim that does not compile fails make, and leaves no stale module."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_a_failed_shim_build_fails_make(tmp_path: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in files:
        if name.startswith(("Makefile", "setup.py", "pyproject.toml", "libxdp_shim/", "bpf/")):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, tmp_path / name)
    stale = tmp_path / "xdpguard" / "_shim.abi3.so"
    stale.parent.mkdir()
    stale.write_bytes(b"an old build")
    broken = tmp_path / "libxdp_shim" / "xg_maps.c"
    broken.write_text(broken.read_text() + "\nint this_does_not_compile = ;\n")
    res = subprocess.run(
        # This venv's Python; make must neither install packages nor a venv.
        [
            "make",
            "-o",
            "apt",
            "-o",
            ".stamp/venv",
            f"PY={sys.executable}",
            "xdpguard/_shim.abi3.so",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0, res.stdout + res.stderr
    assert "this_does_not_compile" in res.stderr
    assert not stale.exists()  # nothing can import the old module by mistake
