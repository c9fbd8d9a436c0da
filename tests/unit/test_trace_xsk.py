"""``xdpguard trace``'s reading of the AF_XDP sockets, without the kernel's
tracepoints (a stand-in for the ring buffer; the netns tier traces real faults)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

import xdpguard.control
import xdpguard.trace
from xdpguard.trace import XSK_FIELDS, follow

pytestmark = pytest.mark.unit


class Sockets:
    """One queue's two sockets, their counters moved by the test."""

    def __init__(self) -> None:
        self.counts = {dev: dict.fromkeys(XSK_FIELDS, 0) for dev in ("outer", "inner")}

    def stats(self) -> dict[str, Any]:
        return {"queues": [{"queue": 0, "xsk": {d: dict(c) for d, c in self.counts.items()}}]}


def test_a_drop_right_after_attach_is_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket drop between 'attached' and trace's first periodic reading
    was taken into the baseline and never shown: CI's full-ring test waited
    for it in vain."""
    sockets = Sockets()

    class Client:
        def __init__(self, path: str) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def call(self, cmd: str) -> dict[str, Any]:
            assert cmd == "stats"
            return sockets.stats()

    class Tracer:
        def __init__(self, path: str) -> None:
            pass

        def poll(self, timeout_ms: int) -> list[dict[str, Any]]:
            return []

        def close(self) -> None:
            pass

    class OnAttach(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "attached" in record.getMessage():
                sockets.counts["outer"]["rx_ring_full"] += 7

    monkeypatch.setattr(xdpguard.control, "ControlClient", Client)
    monkeypatch.setattr(xdpguard.trace.B, "Trace", Tracer)
    logger = logging.getLogger("xdpguard")
    handler, level = OnAttach(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # Bounded: a few readings of the sockets, then it ends by itself.
        events = list(follow("ctl", 0.05, until=time.monotonic() + 0.5))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [(e["event"], e["socket"], e["grew"]) for e in events] == [
        ("xsk", "outer", {"rx_ring_full": 7})
    ]
