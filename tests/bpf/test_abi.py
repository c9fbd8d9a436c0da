"""xdpguard refuses a BPF object or a compiled shim of another ABI, in one line."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from xdpguard import _bindings as B
from xdpguard.defs import Role
from xdpguard.errors import XdpguardError
from xdpguard.xdp import XdpProgram, bpf_object_path

pytestmark = pytest.mark.bpf


def with_abi(obj: Path, out: Path, abi: int) -> Path:
    """A copy of ``obj`` whose xg_abi says ``abi`` (patched in its .rodata)."""
    nm = subprocess.run(
        ["llvm-nm", "--format=posix", str(obj)], check=True, capture_output=True, text=True
    ).stdout
    (offset,) = [int(line.split()[2], 16) for line in nm.splitlines() if line.startswith("xg_abi ")]
    rodata = out.with_suffix(".rodata")
    subprocess.run(["llvm-objcopy", f"--dump-section=.rodata={rodata}", str(obj)], check=True)
    data = bytearray(rodata.read_bytes())
    data[offset : offset + 4] = struct.pack("=I", abi)
    rodata.write_bytes(bytes(data))
    shutil.copy(obj, out)
    subprocess.run(["llvm-objcopy", f"--update-section=.rodata={rodata}", str(out)], check=True)
    return out


def test_an_object_of_another_abi_is_refused(tmp_path: Path) -> None:
    same = with_abi(bpf_object_path(), tmp_path / "same.bpf.o", B.ABI_VERSION)
    XdpProgram(Role.OUTER, same).close()  # the patching itself is harmless
    old = with_abi(bpf_object_path(), tmp_path / "old.bpf.o", B.ABI_VERSION - 1)
    with pytest.raises(XdpguardError) as err:
        XdpProgram(Role.OUTER, old)
    assert str(err.value) == (
        f"{old} was built for ABI {B.ABI_VERSION - 1}, this xdpguard is ABI "
        f"{B.ABI_VERSION}; run 'make build'"
    )


def test_a_shim_of_another_abi_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert B.abi_problem() is None
    monkeypatch.setattr(B, "ABI_VERSION", B.ABI_VERSION + 1)
    problem = B.abi_problem()
    assert problem is not None and "run 'make build'" in problem
    from xdpguard.engine import Engine, EngineConfig

    with pytest.raises(XdpguardError, match=r"the compiled shim .* was built for ABI"):
        Engine(EngineConfig(outer="lo", inner="lo", inner_netns=None)).start()  # type: ignore[arg-type]
