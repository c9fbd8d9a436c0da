"""A start that fails says why in one line, exits within seconds, and leaves
nothing behind: no XDP program, no control socket, no metrics port, no pins,
no process. With --metrics too: the metrics server was made before the
start failed (it once waited for ever on a server that never ran)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from lab import ROOT, XDPGUARD, Lab, lab, sh

from xdpguard.flowtable import pin_dir_for

pytestmark = pytest.mark.netns

# The real object (its maps, its ABI), but the program xdpguard loads is one
# every verifier refuses: a packet read without a bounds check.
REFUSED = r"""
#define xdpguard_prog xdpguard_prog_real
#include "xdpguard.bpf.c"
#undef xdpguard_prog
SEC("xdp") int xdpguard_prog(struct xdp_md *ctx)
{
	return *(__u8 *)(long)ctx->data;
}
"""


@pytest.fixture(scope="module")
def refused_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("obj")
    src = out / "refused.bpf.c"
    src.write_text(REFUSED)
    arch = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    obj = out / "refused.bpf.o"
    sh("clang", "-O2", "-g", "-target", "bpf", "-mcpu=v3", f"-I/usr/include/{arch}-linux-gnu",
       f"-I{ROOT / 'bpf'}", "-c", str(src), "-o", str(obj))  # fmt: skip
    return obj


@pytest.fixture(scope="module")
def lab1() -> Lab:
    with lab(queues=1) as the_lab:
        yield the_lab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


CAUSES = ["no-device", "xdp-taken", "verifier-refuses", "mtu-too-big", "state-dir-writable"]


@pytest.mark.parametrize("metrics", [False, True], ids=["", "metrics"])
@pytest.mark.parametrize("cause", CAUSES)
def test_a_failed_start_exits_and_leaves_nothing(
    lab1: Lab, tmp_path: Path, refused_object: Path, cause: str, metrics: bool
) -> None:
    control, state = tmp_path / "c.sock", tmp_path / "state"
    args = [str(XDPGUARD), "run", "--outer", lab1.outer, "--inner", lab1.inner,
            "--inner-netns", lab1.inner_ns, "--control", str(control),
            "--state-dir", str(state)]  # fmt: skip
    port = free_port()
    if metrics:
        args += ["--metrics", str(port)]
    env = None
    undo = None
    if cause == "no-device":
        args[args.index(lab1.outer)] = "xg-nosuchdev"
        needle = "device 'xg-nosuchdev' not found"
    elif cause == "xdp-taken":
        obj = ROOT / "bpf" / "xg_probe.bpf.o"
        lab1.ns_exec(lab1.inner_ns, "ip", "link", "set", "dev", lab1.inner, "xdp", "obj",
                     str(obj), "sec", "xdp")  # fmt: skip
        undo = ("ip", "link", "set", "dev", lab1.inner, "xdp", "off")
        needle = "already has an XDP program"
    elif cause == "verifier-refuses":
        env = {"XDPGUARD_BPF_OBJECT": str(refused_object), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        needle = "cannot load"
    elif cause == "state-dir-writable":
        # Anyone could plant files root then reads and replaces (issue 23, 9).
        state.mkdir()
        state.chmod(0o777)
        needle = "group- or world-writable"
    else:
        lab1.ns_exec(lab1.inner_ns, "ip", "link", "set", "dev", lab1.inner, "mtu", "9000")
        undo = ("ip", "link", "set", "dev", lab1.inner, "mtu", "1500")
        needle = "MTU 9000"
    try:
        t0 = time.monotonic()
        res = sh(*args, check=False, timeout=60, env=env)
        took = time.monotonic() - t0
    finally:
        if undo:
            lab1.ns_exec(lab1.inner_ns, *undo)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert lines[-1] == errors[0], res.stderr  # the cause comes last, after nothing long
    assert "libbpf" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert took < 30, took
    assert lab1.xdp_attached() == {"outer": False, "inner": False}  # (undone above)
    assert not control.exists()
    assert port_free(port)
    assert not pin_dir_for(state).exists(), list(pin_dir_for(state).iterdir())
    if cause == "state-dir-writable":
        assert list(state.iterdir()) == []  # nothing read, nothing written


def test_a_refused_program_says_why_first_and_the_log_on_request(
    lab1: Lab, tmp_path: Path, refused_object: Path
) -> None:
    """The verifier's words in the one line; its whole log only with -v, or
    as one field of the JSON log."""
    base = [str(XDPGUARD), "run", "--outer", lab1.outer, "--inner", lab1.inner,
            "--inner-netns", lab1.inner_ns, "--control", str(tmp_path / "c.sock"),
            "--state-dir", str(tmp_path / "state")]  # fmt: skip
    env = {"XDPGUARD_BPF_OBJECT": str(refused_object), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    quiet = sh(*base, check=False, env=env)
    (line,) = [x for x in quiet.stderr.splitlines() if x.startswith("Error: ")]
    assert "invalid access to packet" in line, line
    assert "processed" not in quiet.stderr  # the verifier's log stays behind -v

    loud = sh(*base, "-v", check=False, env=env)
    assert loud.returncode == 1
    after = loud.stderr.split(line, 1)
    assert len(after) == 2 and "processed" in after[1], loud.stderr  # the cause, then the log

    as_json = sh(*base, "--log-format", "json", check=False, env=env)
    assert as_json.returncode == 1
    events = [json.loads(x) for x in as_json.stderr.splitlines() if x.startswith("{")]
    assert all(x.startswith("{") for x in as_json.stderr.splitlines()), as_json.stderr
    (err,) = [e for e in events if e["level"] == "error"]
    assert err["message"].startswith("cannot load") and "processed" in err["detail"]
