"""The control socket: newline-delimited JSON over AF_UNIX.

One exchange per line. The client opens with a handshake::

    -> {"hello": "xdpguard", "version": 1}
    <- {"ok": true, "hello": "xdpguard", "version": 1, "server": "0.1.0",
        "commands": ["help", "stats", "status", ...]}

then sends requests and gets one reply each, in order::

    -> {"id": 7, "cmd": "stats", "args": {}}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 7, "ok": false, "error": "one line for the operator"}

COMMANDS is the single table of what exists; the server refuses anything
else and the client refuses to send it. The socket is mode 0600 in a 0700
directory, and the server also checks the peer's credentials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdpguard import __version__
from xdpguard.errors import XdpguardError

PROTOCOL_VERSION = 1
DEFAULT_CONTROL = "/run/xdpguard/control.sock"
# Long enough for a blocklist of a million prefixes in one request.
MAX_LINE = 256 * 1024 * 1024

log = logging.getLogger("xdpguard.control")


@dataclass(frozen=True)
class Command:
    name: str
    help: str


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("help", "list the commands this server understands"),
        Command(
            "status",
            "state (starting|ready|stopping), devices, namespaces, netns cookies, sockets "
            "and workers: {wait?: seconds to block until not starting}",
        ),
        Command("stats", "counters per reason, direction and queue; frame account"),
        *(
            Command(f"{lst}.{verb}", text.format(lst=lst))
            for lst in ("block", "allow")
            for verb, text in (
                ("add", "add prefixes to the {lst}list: {{prefixes, ttl?, comment?}}"),
                ("del", "delete prefixes from the {lst}list: {{prefixes}}"),
                ("list", "the {lst}list's entries"),
                ("load", "load a list file into the {lst}list: {{text, replace?}}"),
                ("clear", "empty the {lst}list"),
            )
        ),
        Command("ports.add", "add UDP source ports to drop: {ports, preset?}"),
        Command("ports.del", "stop dropping UDP source ports: {ports}"),
        Command("ports.list", "the UDP source ports dropped"),
        Command("frags.set", "fragment policy: {policy: drop|pass}"),
        Command("frags.get", "the fragment policy"),
        Command("tcp.mode", "set SYN challenges and out-of-state drops: {mode}"),
        Command(
            "tcp.config",
            "TCP settings: {syn_mode?, state_mode?, syn_rate?, syn_burst?, state_rate?, "
            "state_burst?, verify_ttl?, learn?}; none: show",
        ),
        Command("tcp.flows", "flow table occupancy by state and the busiest flows: {top?}"),
        Command("tcp.verified.list", "sources that answered a SYN challenge"),
        Command("tcp.verified.clear", "forget every verified source"),
    )
}

Handler = Callable[[dict[str, Any]], Any]


class ControlError(XdpguardError):
    """The server answered a request with an error."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _readline(f: Any) -> dict[str, Any] | None:
    line = f.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise ValueError("request too long")
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


class ControlServer:
    """Serves COMMANDS from ``handlers`` on a Unix socket, one thread per client."""

    def __init__(self, path: str | os.PathLike[str], handlers: dict[str, Handler]) -> None:
        unknown = set(handlers) - set(COMMANDS)
        if unknown:
            raise ValueError(f"handlers for unknown commands: {sorted(unknown)}")
        self.path = Path(path)
        self.handlers = {"help": self._help, **handlers}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._made_dir = False
        self._closing = False

    def _help(self, _args: dict[str, Any]) -> Any:
        return {name: COMMANDS[name].help for name in sorted(self.handlers)}

    def start(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
            self._made_dir = True
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise XdpguardError(f"{self.path} exists and is not a socket; remove it first")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale: its server is gone
            else:
                raise XdpguardError(
                    f"another xdpguard is running (control socket {self.path} answers); "
                    "use --control to run a second one"
                )
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise XdpguardError(
                f"cannot create control socket {self.path}: {exc.strerror}"
            ) from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="xg-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="xg-control-client", daemon=True
            ).start()

    @staticmethod
    def _peer_allowed(conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.geteuid())

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rf:
            try:
                if not self._peer_allowed(conn):
                    conn.sendall(encode({"ok": False, "error": "permission denied"}))
                    return
                hello = _readline(rf)
                if hello is None:
                    return
                if hello.get("hello") != "xdpguard" or hello.get("version") != PROTOCOL_VERSION:
                    conn.sendall(
                        encode(
                            {
                                "ok": False,
                                "error": f"unsupported protocol {hello!r}: this server speaks "
                                f"xdpguard version {PROTOCOL_VERSION}",
                            }
                        )
                    )
                    return
                conn.sendall(
                    encode(
                        {
                            "ok": True,
                            "hello": "xdpguard",
                            "version": PROTOCOL_VERSION,
                            "server": __version__,
                            "commands": sorted(self.handlers),
                        }
                    )
                )
                while True:
                    req = _readline(rf)
                    if req is None:
                        return
                    conn.sendall(encode(self._dispatch(req)))
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(encode({"ok": False, "error": f"bad request: {exc}"}))

    def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        rid = req.get("id")
        cmd = req.get("cmd")
        args = req.get("args") or {}
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"id": rid, "ok": False, "error": f"unknown command {cmd!r}"}
        if not isinstance(args, dict):
            return {"id": rid, "ok": False, "error": "args must be a JSON object"}
        try:
            return {"id": rid, "ok": True, "result": handler(args)}
        except XdpguardError as exc:
            return {"id": rid, "ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the control thread
            log.exception("control command %s failed", cmd)
            return {"id": rid, "ok": False, "error": f"internal error in {cmd}: {exc}"}


class ControlClient:
    """A connection to a running xdpguard; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._next_id = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise XdpguardError(
                f"xdpguard is not running (no control socket at {self.path})"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise XdpguardError(
                f"xdpguard is not running (stale control socket at {self.path})"
            ) from None
        except PermissionError:
            sock.close()
            raise XdpguardError(
                f"permission denied on {self.path}: the control socket is root only"
            ) from None
        self._sock = sock
        self._rf = sock.makefile("rb")
        hello = self._exchange({"hello": "xdpguard", "version": PROTOCOL_VERSION})
        if not hello.get("ok"):
            self.close()
            raise ControlError(hello.get("error", "handshake refused"))
        self.server_version: str = hello.get("server", "?")
        self.commands: list[str] = hello.get("commands", [])

    def _exchange(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            self._sock.sendall(encode(msg))
            reply = _readline(self._rf)
        except (OSError, ValueError) as exc:
            raise XdpguardError(f"control socket {self.path}: {exc}") from exc
        if reply is None:
            raise XdpguardError(f"control socket {self.path}: server closed the connection")
        return reply

    def call(self, cmd: str, **args: Any) -> Any:
        if cmd not in COMMANDS:
            raise ValueError(f"unknown command {cmd!r}")
        if cmd not in self.commands:
            raise ControlError(f"the running xdpguard ({self.server_version}) has no {cmd!r}")
        self._next_id += 1
        reply = self._exchange({"id": self._next_id, "cmd": cmd, "args": args})
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return reply.get("result")

    def close(self) -> None:
        self._rf.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(control: str | os.PathLike[str], seconds: float) -> dict[str, Any]:
    """The status of the appliance at ``control`` once it is ready (see daemon.py).

    Waits for the socket to appear, then for the server to leave "starting";
    XdpguardError if it exits or stops first, or ``seconds`` run out.
    """
    deadline = time.monotonic() + seconds
    seen = False
    while True:
        left = deadline - time.monotonic()
        try:
            with ControlClient(control, timeout=max(left, 0) + 10) as c:
                seen = True
                st = c.call("status", wait=max(left, 0))
        except XdpguardError as exc:
            if seen:
                raise XdpguardError(f"xdpguard exited before it was ready ({exc})") from None
            if time.monotonic() >= deadline:
                raise XdpguardError(f"{exc}; waited {seconds:g} s") from None
            time.sleep(0.05)  # not started yet: its socket appears first
            continue
        if st["state"] == "ready":
            return st
        if st["state"] == "stopping":
            raise XdpguardError("xdpguard is stopping; it never became ready")
        if time.monotonic() >= deadline:
            raise XdpguardError(f"xdpguard not ready after {seconds:g} s (still {st['state']})")
