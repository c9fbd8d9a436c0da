"""verified.json is input: a crafted one restores nothing and says so in one line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from xdpguard.tcp import TcpStage

pytestmark = pytest.mark.unit


@pytest.fixture
def stage() -> TcpStage:
    s = TcpStage(4096, 10)
    yield s
    s.close()


def test_round_trip(stage: TcpStage, tmp_path: Path) -> None:
    path = tmp_path / "verified.json"
    path.write_text(
        json.dumps({"saved_at": time.time(), "entries": [{"source": "192.0.2.1", "ttl": 300}]})
    )
    assert stage.load_verified(path) == 1
    assert [e["source"] for e in stage.verified()["entries"]] == ["192.0.2.1"]


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
