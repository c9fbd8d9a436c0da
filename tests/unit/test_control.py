"""The control protocol: handshake, schemas, bounds, errors, socket hygiene."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xdpguard import control as ctl
from xdpguard.control import (
    COMMANDS,
    PROTOCOL_VERSION,
    ControlClient,
    ControlError,
    ControlServer,
)
from xdpguard.errors import XdpguardError

pytestmark = pytest.mark.unit

HELLO = json.dumps({"hello": "xdpguard", "version": PROTOCOL_VERSION}).encode() + b"\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    """A server whose handlers echo what reached them (args as validated)."""
    seen: list[dict] = []

    def stats(args: dict) -> dict:
        return {"answer": 42}

    def status(args: dict) -> dict:
        if args["wait"] == 1:
            raise XdpguardError("not now")
        raise RuntimeError("boom")

    def ports_add(args: dict) -> Any:
        seen.append(args)
        return args

    def block_load(args: dict) -> Any:
        f = args["file"]
        return {"read": f.read().decode() if f else None, "text": args["text"]}

    srv = ControlServer(
        tmp_path / "run" / "c.sock",
        {"stats": stats, "status": status, "ports.add": ports_add, "block.load": block_load},
        max_clients=4,
        idle_timeout=1.0,
    )
    srv.start()
    srv.seen = seen  # type: ignore[attr-defined]
    yield srv
    srv.close()


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


def request(cmd: str, **args: Any) -> bytes:
    return json.dumps({"id": 1, "cmd": cmd, "args": args}).encode() + b"\n"


def test_handshake_and_call(server: ControlServer) -> None:
    with ControlClient(server.path) as c:
        assert set(c.commands) == {"help", "stats", "status", "ports.add", "block.load"}
        assert c.call("stats") == {"answer": 42}
        assert set(c.call("help")) == set(c.commands)


def test_socket_is_private(server: ControlServer) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o600
    assert server.path.parent.stat().st_mode & 0o777 == 0o700


def test_handler_errors_are_replies(server: ControlServer) -> None:
    with ControlClient(server.path) as c:
        with pytest.raises(ControlError, match=r"^not now$"):
            c.call("status", wait=1)
        with pytest.raises(ControlError, match="internal error in status: boom"):
            c.call("status")
        assert c.call("stats") == {"answer": 42}  # the connection survives both


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"ports": "53"}, "ports: must be a list"),
        ({"ports": [53, "5"]}, "ports[1] '5': must be a whole number"),
        ({"ports": [True]}, "ports[0] True: must be a whole number"),
        ({"ports": [65536]}, "ports[0] 65536: must be a whole number from 0 to 65535"),
        ({"preset": 7}, "preset: must be text"),
        ({"preset": "everything"}, "preset 'everything': must be one of drdos"),
        ({"colour": "red"}, "ports.add: unknown argument 'colour'"),
    ],
)
def test_arguments_are_checked_against_the_schema(
    server: ControlServer, args: dict, error: str
) -> None:
    _, reply = raw_exchange(server.path, HELLO, request("ports.add", **args))
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert server.seen == []  # type: ignore[attr-defined]  # the handler never ran


def test_required_and_bool_arguments() -> None:
    with pytest.raises(ctl.ArgError, match=r"frags\.set: policy is missing"):
        COMMANDS["frags.set"].validate({})
    with pytest.raises(ctl.ArgError, match="replace 'false': must be true or false"):
        COMMANDS["block.load"].validate({"replace": "false"})
    with pytest.raises(ctl.ArgError, match="top 100000000: must be a whole number from 0 to 1000"):
        COMMANDS["tcp.flows"].validate({"top": 100_000_000})
    with pytest.raises(ctl.ArgError, match="ttl nan"):
        COMMANDS["block.add"].validate({"prefixes": ["10.0.0.0/8"], "ttl": float("nan")})
    assert COMMANDS["block.add"].validate({"prefixes": ["10.0.0.0/8"]}) == {
        "prefixes": ["10.0.0.0/8"],
        "ttl": None,
        "comment": None,
        "force": None,
    }


@pytest.mark.parametrize("version", [1.0, True, "1", [1], None, PROTOCOL_VERSION + 1])
def test_only_version_1_is_spoken(server: ControlServer, version: object) -> None:
    hello = json.dumps({"hello": "xdpguard", "version": version}).encode() + b"\n"
    (reply,) = raw_exchange(server.path, hello)
    assert not reply["ok"] and "unsupported protocol" in reply["error"]


def test_unknown_command_bad_json_and_deep_nesting(server: ControlServer) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    replies = raw_exchange(
        server.path, HELLO, b'{"id": 1, "cmd": "reboot"}\n', b"not json\n", deep, request("stats")
    )
    assert replies[1] == {"id": 1, "ok": False, "error": "unknown command 'reboot'"}
    assert not replies[2]["ok"] and "bad request: not JSON" in replies[2]["error"]
    assert replies[3] == {"ok": False, "error": "bad request: nested too deeply"}
    assert replies[4]["result"] == {"answer": 42}  # the client thread lives on


def test_a_request_is_bounded(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        f = s.makefile("rb")
        s.sendall(HELLO)
        assert json.loads(f.readline())["ok"]
        chunk = b"x" * (1 << 20)
        with pytest.raises(OSError):  # the server hangs up before 5 MiB of one line
            for _ in range(64):
                s.sendall(chunk)
        reply = json.loads(f.readline())
        assert "request longer than" in reply["error"]


def test_too_many_clients_are_told_busy(server: ControlServer) -> None:
    held = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(server.path))
            s.sendall(HELLO)
            assert json.loads(s.makefile("rb").readline())["ok"]
            held.append(s)
        (reply,) = raw_exchange(server.path, HELLO)
        assert reply == {"ok": False, "error": "busy: 4 clients connected; try again"}
    finally:
        for s in held:
            s.close()
    # Once they leave, a client gets in again.
    deadline = time.monotonic() + 30
    while True:
        try:
            with ControlClient(server.path) as c:
                assert c.call("stats") == {"answer": 42}
                break
        except ControlError as exc:  # busy until the server saw them go
            assert time.monotonic() < deadline, exc
            time.sleep(0.05)


def test_an_idle_client_is_dropped(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        s.settimeout(30)
        f = s.makefile("rb")
        s.sendall(HELLO)
        assert json.loads(f.readline())["ok"]
        assert json.loads(f.readline()) == {"ok": False, "error": "idle too long: disconnected"}
        assert f.readline() == b""


def test_a_thread_that_cannot_start_costs_one_client(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = threading.Thread.start
    fail = {"n": 2}

    def start(self: threading.Thread) -> None:
        if self.name == "xg-control-client" and fail["n"]:
            fail["n"] -= 1
            raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    for _ in range(2):
        (reply,) = raw_exchange(server.path, HELLO)
        assert reply["ok"] is False and reply["error"].startswith("busy"), reply
    with ControlClient(server.path) as c:  # the accept thread lived through it
        assert c.call("stats") == {"answer": 42}


def test_a_file_is_passed_open(server: ControlServer, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("10.0.0.0/8\n")
    with ControlClient(server.path) as c, open(listing, "rb") as f:
        assert c.call("block.load", f.fileno()) == {"read": "10.0.0.0/8\n", "text": None}
        # A command that takes no file refuses one (the client already does).
        with pytest.raises(ValueError, match="takes no file"):
            c.call("stats", f.fileno())
    with socket.socket(socket.AF_UNIX) as s, open(listing, "rb") as f:
        s.connect(str(server.path))
        r = s.makefile("rb")
        s.sendall(HELLO)
        r.readline()
        socket.send_fds(s, [request("stats")], [f.fileno()])
        assert json.loads(r.readline())["error"] == "stats takes no file"


def test_shutdown_waits_for_requests_in_flight(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def stats(args: dict) -> dict:
        started.set()
        release.wait(30)
        finished.append(True)
        return {}

    srv = ControlServer(tmp_path / "c.sock", {"stats": stats})
    srv.start()
    caller = threading.Thread(target=lambda: raw_exchange(srv.path, HELLO, request("stats")))
    caller.start()
    assert started.wait(30)
    closer = threading.Thread(target=srv.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting for the request, not tearing down under it
    release.set()
    closer.join(30)
    caller.join(30)
    assert finished == [True] and not closer.is_alive()


def test_socket_directory_must_be_private(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(XdpguardError, match="group- or world-writable"):
        ControlServer(open_dir / "c.sock", {}).start()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(XdpguardError, match="belongs to uid 65534"):
        ControlServer(theirs / "c.sock", {}).start()


def test_client_will_not_talk_to_a_server_of_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    # Somewhere nobody can reach: pytest's own directories are root's only.
    top = Path(tempfile.mkdtemp(prefix="xg-nobody-", dir="/tmp"))
    top.chmod(0o755)
    home = top / "nobody"
    home.mkdir()
    os.chown(home, 65534, 65534)
    path = home / "fake.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that drops to nobody and serves the socket
        try:
            os.setgid(65534)
            os.setuid(65534)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            listener.listen(1)
            os.write(ready_w, b"x")
            conn, _ = listener.accept()
            conn.settimeout(10)
            got = conn.recv(100)
            os._exit(1 if got else 0)  # the client must have said nothing
        except BaseException:
            os._exit(2)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(XdpguardError, match="served by uid 65534, not root"):
            ControlClient(path)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(ready_r)
        shutil.rmtree(top, ignore_errors=True)
    assert os.WEXITSTATUS(status) == 0  # not a byte was sent to it


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
