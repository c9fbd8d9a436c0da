"""The control protocol: handshake, dispatch, errors, socket hygiene."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from xdpguard.control import (
    COMMANDS,
    PROTOCOL_VERSION,
    ControlClient,
    ControlError,
    ControlServer,
)
from xdpguard.errors import XdpguardError

pytestmark = pytest.mark.unit


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    def stats(args: dict) -> dict:
        if args.get("fail"):
            raise XdpguardError("stats are not available")
        return {"answer": 42}

    def status(args: dict) -> dict:
        raise RuntimeError("boom")

    srv = ControlServer(tmp_path / "run" / "c.sock", {"stats": stats, "status": status})
    srv.start()
    yield srv
    srv.close()


def test_handshake_and_call(server: ControlServer) -> None:
    with ControlClient(server.path) as c:
        assert set(c.commands) == {"help", "stats", "status"}
        assert c.call("stats") == {"answer": 42}
        assert set(c.call("help")) == {"help", "stats", "status"}


def test_socket_is_private(server: ControlServer) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o600
    assert server.path.parent.stat().st_mode & 0o777 == 0o700


def test_handler_errors_are_replies(server: ControlServer) -> None:
    with ControlClient(server.path) as c:
        with pytest.raises(ControlError, match="stats are not available"):
            c.call("stats", fail=True)
        with pytest.raises(ControlError, match="internal error in status: boom"):
            c.call("status")
        # The connection survives both.
        assert c.call("stats") == {"answer": 42}


def raw_exchange(path: Path, *lines: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        f = s.makefile("rb")
        out = []
        for line in lines:
            s.sendall(line)
            reply = f.readline()
            if not reply:
                break
            out.append(json.loads(reply))
        return out


def test_wrong_version_is_refused(server: ControlServer) -> None:
    hello = json.dumps({"hello": "xdpguard", "version": PROTOCOL_VERSION + 1}).encode() + b"\n"
    (reply,) = raw_exchange(server.path, hello)
    assert not reply["ok"] and "unsupported protocol" in reply["error"]


def test_unknown_command_and_bad_json(server: ControlServer) -> None:
    hello = json.dumps({"hello": "xdpguard", "version": PROTOCOL_VERSION}).encode() + b"\n"
    replies = raw_exchange(server.path, hello, b'{"id": 1, "cmd": "reboot"}\n', b"not json\n")
    assert replies[0]["ok"]
    assert replies[1] == {"id": 1, "ok": False, "error": "unknown command 'reboot'"}
    assert not replies[2]["ok"] and "bad request" in replies[2]["error"]


def test_second_server_refused_and_stale_socket_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    first = ControlServer(path, {})
    first.start()
    try:
        with pytest.raises(XdpguardError, match="another xdpguard is running"):
            ControlServer(path, {}).start()
    finally:
        first.close()
    assert not path.exists()
    # A socket file nobody listens on (a killed daemon's) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    second = ControlServer(path, {})
    second.start()
    second.close()


def test_client_errors(tmp_path: Path) -> None:
    with pytest.raises(XdpguardError, match="not running"):
        ControlClient(tmp_path / "missing.sock")


def test_command_table_is_closed() -> None:
    with pytest.raises(ValueError):
        ControlServer("/nonexistent/x.sock", {"reboot": lambda a: None})
    assert "help" in COMMANDS
