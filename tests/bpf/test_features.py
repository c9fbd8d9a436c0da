"""The kernel's features, found by trying them (xdpguard.features)."""

from __future__ import annotations

import json
import subprocess

import pytest
from lab import XDPGUARD

from xdpguard import _bindings as B
from xdpguard import features
from xdpguard.defs import Role
from xdpguard.xdp import XdpProgram

pytestmark = pytest.mark.bpf


def test_features_lists_every_feature_with_how_it_was_found() -> None:
    out = subprocess.run(
        [str(XDPGUARD), "features", "--json"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    got = {f["name"]: f for f in json.loads(out.stdout)["features"]}
    assert list(got) == [f.name for f in features.FEATURES]
    for f in features.FEATURES:
        row = got[f.name]
        assert row["without"] == (f.fallback or "required")
        assert row["how"] and row["uses"] and row["since"]
        # This machine's kernel has everything xdpguard uses (the issue that
        # brought the probes saw bpf_xdp_adjust_meta refused: not used).
        assert row["available"] and row["used"], row
    text = subprocess.run([str(XDPGUARD), "features"], capture_output=True, text=True)
    assert text.returncode == 0 and "devmap_redirect" in text.stdout


def test_a_refused_probe_says_what_the_verifier_said(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A helper the kernel refuses is named in the verifier's own words (the
    probe of a program that calls one this kernel does not have for XDP)."""
    src = tmp_path / "p.bpf.c"
    # bpf_skb_load_bytes is for skbs: every kernel refuses it in XDP.
    src.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        'SEC("xdp") int p(struct xdp_md *ctx) { char b[4];\n'
        "  return bpf_skb_load_bytes(ctx, 0, b, 4) ? XDP_DROP : XDP_PASS; }\n"
        'char _license[] SEC("license") = "GPL";\n'
    )
    arch = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    obj = tmp_path / "p.bpf.o"
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}-linux-gnu", "-c",
         str(src), "-o", str(obj)],
        check=True,
    )  # fmt: skip
    B.libbpf_log()
    with pytest.raises(OSError) as exc:
        B.Prog(str(obj), "p")
    said = features.why_refused(exc.value)
    assert "bpf_skb_load_bytes" in said, said


def xlated(prog: XdpProgram) -> str:
    """The instructions the kernel holds (after the verifier removed dead code)."""
    return subprocess.run(
        ["bpftool", "prog", "dump", "xlated", "id", str(prog_id(prog))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def prog_id(prog: XdpProgram) -> int:
    with open(f"/proc/self/fdinfo/{prog.fd}") as f:
        fdinfo = f.read()
    return int(next(line.split()[1] for line in fdinfo.splitlines() if line.startswith("prog_id")))


@pytest.mark.parametrize("coarse", [True, False], ids=["coarse", "without-ktime_coarse"])
def test_the_clock_fallback_leaves_no_call_to_the_coarse_clock(coarse: bool) -> None:
    """Without ktime_coarse the program the kernel holds never calls it: a
    kernel without the helper would refuse any call, dead or not."""
    prog = XdpProgram(Role.OUTER, flags=0 if coarse else B.CFG_NO_COARSE)
    try:
        code = xlated(prog)
    finally:
        prog.close()
    assert ("call bpf_ktime_get_coarse_ns" in code) == coarse
    assert "call bpf_ktime_get_ns" in code
