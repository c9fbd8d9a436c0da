"""verified.json is input: a crafted one restores nothing and says so in one
line. (The file brings verified sources back across a reboot, into the
outer program's xg_verified map: a real one here.)"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdpguard import _bindings as B
from xdpguard.challenges import Challenges
from xdpguard.defs import Role
from xdpguard.tcp import TcpStage
from xdpguard.xdp import XdpProgram

pytestmark = pytest.mark.bpf


@pytest.fixture
def stage() -> Iterator[TcpStage]:
    prog = XdpProgram(Role.OUTER)
    s = TcpStage(4096, 10, Challenges(prog, restored=False))
    try:
        yield s
    finally:
        s.close()
        prog.close()


def test_round_trip(stage: TcpStage, tmp_path: Path) -> None:
    path = tmp_path / "verified.json"
    path.write_text(
        json.dumps({"saved_at": time.time(), "entries": [{"source": "192.0.2.1", "ttl": 300}]})
    )
    assert stage.load_verified(path) == 1
    (entry,) = stage.verified()["entries"]
    assert entry["source"] == "192.0.2.1" and 298 <= entry["ttl"] <= 300
    saved = tmp_path / "again.json"
    assert stage.save_verified(saved) == 1
    assert json.loads(saved.read_text())["entries"] == [entry]
    assert stage.verified_clear() == {"cleared": 1}
    assert stage.verified()["count"] == 0 and B.tcp_now() > 0


@pytest.mark.parametrize(
    "content",
    [
        b"[1, 2]",
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not json",
        json.dumps({"saved_at": "yesterday", "entries": []}).encode(),
        json.dumps({"saved_at": float("nan"), "entries": []}).encode(),
        json.dumps({"saved_at": 1.0, "entries": {"source": "192.0.2.1"}}).encode(),
        json.dumps({"saved_at": 1.0, "entries": [{"source": 5, "ttl": 1}]}).encode(),
        json.dumps({"saved_at": 1.0, "entries": [{"source": "192.0.2.1", "ttl": "1"}]}).encode(),
        json.dumps({"saved_at": 1.0, "entries": [{"source": "192.0.2.1", "ttl": 1e12}]}).encode(),
        json.dumps({"saved_at": 1.0, "entries": [{"source": "192.0.2.999", "ttl": 1}]}).encode(),
    ],
)
def test_crafted_files_restore_nothing(
    stage: TcpStage, tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "verified.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="xdpguard"):
        assert stage.load_verified(path) == 0
    (record,) = caplog.records
    assert "is corrupt" in record.getMessage() and "\n" not in record.getMessage()
    assert stage.verified()["count"] == 0
