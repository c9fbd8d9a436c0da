"""``status --wait`` and sd_notify against servers that do what a daemon can do."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdpguard.control import PROTOCOL_VERSION, ControlServer, wait_ready
from xdpguard.daemon import READY, STOPPING, Lifecycle
from xdpguard.errors import XdpguardError
from xdpguard.sdnotify import sd_notify

pytestmark = pytest.mark.unit


def serve(path: Path, life: Lifecycle) -> ControlServer:
    def status(args: dict) -> dict:
        if args.get("wait") is not None:
            life.wait(args["wait"])
        return {"state": life.state, "pid": os.getpid()}

    srv = ControlServer(path, {"status": status})
    srv.start()
    return srv


def later(fn: object, *args: object) -> threading.Timer:
    t = threading.Timer(0.2, fn, args)  # type: ignore[arg-type]
    t.start()
    return t


def test_waits_for_ready(tmp_path: Path) -> None:
    life = Lifecycle()
    srv = serve(tmp_path / "c.sock", life)
    try:
        later(life.set, READY)
        assert wait_ready(srv.path, 30)["state"] == READY
    finally:
        srv.close()


def test_waits_for_the_socket_to_appear(tmp_path: Path) -> None:
    life = Lifecycle()
    life.set(READY)
    path = tmp_path / "late.sock"
    box: list[ControlServer] = []
    later(lambda: box.append(serve(path, life)))
    try:
        assert wait_ready(path, 30)["state"] == READY
    finally:
        for srv in box:
            srv.close()


def test_fails_when_it_stops_before_ready(tmp_path: Path) -> None:
    life = Lifecycle()
    srv = serve(tmp_path / "c.sock", life)
    try:
        later(life.set, STOPPING)
        with pytest.raises(XdpguardError, match="never became ready"):
            wait_ready(srv.path, 30)
    finally:
        srv.close()


def test_fails_on_timeout(tmp_path: Path) -> None:
    srv = serve(tmp_path / "c.sock", Lifecycle())
    try:
        with pytest.raises(XdpguardError, match=r"not ready after 0.3 s \(still starting\)"):
            wait_ready(srv.path, 0.3)
    finally:
        srv.close()
    with pytest.raises(XdpguardError, match=r"not running.*waited 0.2 s"):
        wait_ready(tmp_path / "nobody.sock", 0.2)


@pytest.fixture
def dying_server(tmp_path: Path) -> Iterator[Path]:
    """Answers the handshake, then goes away mid-request, as an exiting daemon does."""
    path = tmp_path / "dying.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)

    def run() -> None:
        conn, _ = lsock.accept()
        with conn, conn.makefile("rb") as f:
            f.readline()
            hello = {"ok": True, "version": PROTOCOL_VERSION, "commands": ["status"]}
            conn.sendall(json.dumps(hello).encode() + b"\n")
            f.readline()  # the status request: no answer
        lsock.close()
        path.unlink()

    t = threading.Thread(target=run)
    t.start()
    yield path
    t.join(timeout=10)


def test_fails_when_the_daemon_exits(dying_server: Path) -> None:
    with pytest.raises(XdpguardError, match="exited before it was ready"):
        wait_ready(dying_server, 30)


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool) -> None:
    name = f"xg-notify-{os.getpid()}" if abstract else str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name if abstract else name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name if abstract else name)
        assert sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_sd_notify_to_nowhere_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    assert not sd_notify("READY=1")
