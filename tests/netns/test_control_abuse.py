"""The control socket of a running appliance, abused: it answers "busy", never wedges."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import XDPGUARD, Appliance, Lab, lab, sh, wait_for

from xdpguard.control import MAX_CLIENTS, PROTOCOL_VERSION, ControlError

pytestmark = pytest.mark.netns

PIDS = Path("/sys/fs/cgroup/pids")
HELLO = json.dumps({"hello": "xdpguard", "version": PROTOCOL_VERSION}).encode() + b"\n"


@contextlib.contextmanager
def pids_limit(pid: int, spare: int) -> Iterator[None]:
    """Put ``pid`` (every thread) in a pids cgroup with room for ``spare`` more tasks."""
    group = PIDS / f"xgtest{os.getpid()}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        tasks = len((group / "tasks").read_text().split())
        (group / "pids.max").write_text(str(tasks + spare))
        yield
    finally:
        (group / "pids.max").write_text("max")
        for task in (group / "tasks").read_text().split():
            with contextlib.suppress(OSError):
                (PIDS / "cgroup.procs").write_text(task)
        group.rmdir()


def idle_clients(path: Path, n: int) -> list[socket.socket]:
    """``n`` connections that said hello (or were told busy) and then say nothing."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.sendall(HELLO)
        out.append(s)
    return out


def first_replies(clients: list[socket.socket], seconds: float = 60) -> list[dict]:
    """Each client's first reply; a client still waiting when ``seconds`` are
    up gets {"timeout": true} (a wedged server fails the test, never hangs it)."""
    deadline = time.monotonic() + seconds
    out = []
    for s in clients:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            out.append(json.loads(s.makefile("rb").readline()))
        except (TimeoutError, ValueError):
            out.append({"timeout": True})
    return out


def answers(app: Appliance) -> bool:
    """Whether ``status`` is answered; False while every slot is taken. The
    server frees a closed client's slot when its handler reads the EOF: a
    moment after the close, not at it."""
    try:
        return app.call("status")["state"] == "ready"
    except ControlError as exc:
        if str(exc).startswith("busy"):
            return False
        raise


def cap_holds(app: Appliance) -> bool:
    """MAX_CLIENTS + 5 idle clients: never more than MAX_CLIENTS served, the rest
    told busy (asserted); True once all MAX_CLIENTS are served (the slots of
    clients closed before are free by then)."""
    clients = idle_clients(app.control, MAX_CLIENTS + 5)
    try:
        replies = first_replies(clients)
        ok = sum(1 for r in replies if r.get("ok"))
        busy = [r for r in replies if not r.get("ok")]
        assert ok <= MAX_CLIENTS and all(r["error"].startswith("busy") for r in busy), replies
        return ok == MAX_CLIENTS
    finally:
        for s in clients:
            s.close()


@pytest.fixture
def lab1() -> Iterator[Lab]:
    with lab(queues=1) as the_lab:
        yield the_lab


def test_out_of_threads_and_out_of_slots(lab1: Lab, tmp_path: Path) -> None:
    with Appliance(lab1, tmp_path) as app:
        assert app.proc is not None
        with pids_limit(app.proc.pid, spare=4):
            clients = idle_clients(app.control, 60)
            try:
                replies = first_replies(clients)
                ok = [r for r in replies if r.get("ok")]
                busy = [r for r in replies if not r.get("ok")]
                assert len(ok) <= 4 and len(busy) >= 56, replies
                assert all(r["error"].startswith("busy") for r in busy), busy
                # The CLI says so in one line, no traceback.
                res = sh(str(XDPGUARD), "status", "--control", str(app.control), check=False)
                assert res.returncode == 1
                assert res.stderr.strip().splitlines() == [res.stderr.strip()]
                assert res.stderr.startswith("Error: ") and "busy" in res.stderr
            finally:
                for s in clients:
                    s.close()
        # Threads to spare again: the same socket answers.
        wait_for(lambda: answers(app), what="a free slot")
        res = sh(str(XDPGUARD), "status", "--control", str(app.control))
        assert "ready" in res.stdout
        # And with threads to spare, the slot cap is what holds.
        # Each try's own clients hold slots for a moment after it: back off.
        pause, deadline = 0.02, time.monotonic() + 60
        while not cap_holds(app):
            assert time.monotonic() < deadline, "waited 60 s for every slot to be served"
            time.sleep(pause)
            pause = min(2 * pause, 2.0)
        wait_for(lambda: answers(app), what="a free slot")
