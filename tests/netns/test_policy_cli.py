"""Every policy input error: non-zero exit, one line, and no change to the policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab import Appliance, lab

pytestmark = pytest.mark.netns

BAD_FILE_LINES = "1.2.3.0/24\n# a comment\n\n2001:db8::/32\n1.2.3.4/24\n"

CASES = [
    (["block", "add", "192.0.2.1/24"], "host bits set (the network is 192.0.2.0/24)"),
    (["block", "add", "300.1.1.1"], "not an IPv4 address"),
    (["block", "add", "10.0.0.0/33"], "prefix length 33 is more than 32"),
    (["block", "add", "2001:db8::/129"], "prefix length 129 is more than 128"),
    (["block", "add", "2001:db8::1/64"], "host bits set"),
    (["block", "add", "10.0.0.0/8x"], "prefix length must be a number"),
    (["block", "add", "1.2.3.4", "5.6.7"], "'5.6.7': not an IPv4 address"),
    (["block", "add"], "Missing argument"),
    (["block", "add", "1.2.3.4", "--ttl", "0"], "--ttl"),
    (["block", "add", "1.2.3.4", "--ttl", "-5"], "--ttl"),
    (["block", "add", "1.2.3.4", "--ttl", "soon"], "--ttl"),
    (["block", "del", "1.2.3.4/8"], "host bits set"),
    (["block", "load", "/nonexistent/list.txt"], "/nonexistent/list.txt"),
    (["block", "load", "{bad}"], "line 5: '1.2.3.4/24': host bits set"),
    (["block", "load", "{bad}", "--replace"], "line 5: '1.2.3.4/24': host bits set"),
    (["allow", "add", "::ffff:1.2.3.4/200"], "prefix length 200 is more than 128"),
    (["allow", "load", "{bad}"], "line 5"),
    # Hardening: files that are not lists, prefixes that never match, a /0.
    (["block", "load", "{latin1}"], "line 2: not UTF-8 text"),
    (["block", "load", "{binary}"], "line 1: a NUL byte"),
    (["block", "load", "/dev/zero"], "line 1: longer than 4096 bytes"),
    (["block", "load", "{formfeed}"], "line 3: '12.0.0.1/8'"),
    (["block", "add", "::ffff:192.0.2.1"], "IPv4-mapped address: write it as IPv4 (192.0.2.1/32)"),
    (["block", "add", "0.0.0.0/0"], "0.0.0.0/0 covers every IPv4 source; add --force"),
    (["allow", "add", "::/0"], "::/0 covers every IPv6 source; add --force"),
    (["block", "load", "{empty}", "--replace"], "--replace would empty the list; add --force"),
    (["ports", "add", "70000"], "70000"),
    (["ports", "add", "dns"], "dns"),
    (["ports", "add"], "give PORT... or --preset"),
    (["ports", "add", "--preset", "everything"], "everything"),
    (["ports", "del", "-1"], "-1"),
    (["frags", "maybe"], "maybe"),
    (["tcp", "mode", "strict"], "strict"),
    (["tcp", "config", "--syn-rate", "0"], "--syn-rate"),
    (["tcp", "config", "--state-mode", "sometimes"], "sometimes"),
    (["tcp", "config", "--verify-ttl", "-1"], "--verify-ttl"),
    (["tcp", "config", "--learn", "100000"], "--learn"),
    (["tcp", "flows", "--top", "5000"], "--top"),
]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def snapshot(app: Appliance) -> list[object]:
    state = [app.call(cmd) for cmd in ("block.list", "allow.list", "ports.list", "frags.get")]
    tcp = app.call("tcp.config")
    tcp.pop("learning_left")
    return [*state, tcp]


def test_input_errors_change_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(BAD_FILE_LINES)
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("block", "add", "198.18.0.0/15", "--comment", "benchmark range")
        app.cli("allow", "add", "169.254.0.1")
        app.cli("ports", "add", "53")
        app.cli("frags", "drop")
        before = snapshot(app)
        files = {
            "{bad}": bad,
            "{latin1}": write(tmp_path / "latin1.txt", "10.0.0.0/8\ncafé\n".encode("latin-1")),
            "{binary}": write(tmp_path / "binary", b"\x7fELF" + bytes(range(256)) * 8),
            "{formfeed}": write(tmp_path / "ff.txt", b"10.0.0.0/8 # \f\n11.0.0.0/8\n12.0.0.1/8\n"),
            "{empty}": write(tmp_path / "empty.txt", b"# nothing yet\n"),
        }
        for args, needle in CASES:
            args = [str(files.get(a, a)) for a in args]
            res = app.cli(*args, check=False)
            assert res.returncode != 0, args
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), (args, res.stderr)
            assert needle in lines[0], (args, lines[0])
            assert res.stdout == "", args
            assert snapshot(app) == before, args
