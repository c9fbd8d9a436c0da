"""The BPF object and cffi agree on every shared struct (cilium's alignchecker idea).

Sizes and member offsets come from the object's BTF (bpftool's JSON dump)
on one side and from ffi.sizeof/ffi.offsetof, i.e. the host C compiler, on
the other. Every struct of bpf/xdpguard.h's shared region must be in the
BTF of one of the objects (the appliance's, or xdpguard trace's): a struct
that does not cross into BPF belongs in xg_shim.h.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xdpguard import _bindings as B

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "xdpguard.h"
OBJECTS = (ROOT / "bpf" / "xdpguard.bpf.o", ROOT / "bpf" / "xg_trace.bpf.o")


def bpftool() -> str:
    found = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
    assert found, "bpftool is missing (make deps installs it)"
    return found


def shared_structs() -> list[str]:
    region = HEADER.read_text().split("/* cffi:begin */")[1].split("/* cffi:end */")[0]
    return re.findall(r"^struct (\w+) \{", region, re.M)


def btf_structs() -> dict[str, dict]:
    found = {}
    for obj in OBJECTS:
        out = subprocess.run(
            [bpftool(), "-j", "btf", "dump", "file", str(obj)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        found |= {t["name"]: t for t in json.loads(out)["types"] if t["kind"] == "STRUCT"}
    return found


def test_header_has_shared_structs() -> None:
    assert "xg_counter" in shared_structs()


@pytest.mark.parametrize("name", shared_structs())
def test_struct_layout_matches_btf(name: str) -> None:
    btf = btf_structs()
    assert name in btf, f"struct {name} is in no object's BTF; does a program use it?"
    size, offsets = B.struct_layout(f"struct {name}")
    assert btf[name]["size"] == size
    btf_offsets = {m["name"]: m["bits_offset"] // 8 for m in btf[name]["members"]}
    assert btf_offsets == offsets
