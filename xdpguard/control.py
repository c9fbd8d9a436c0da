"""The control socket: newline-delimited JSON over AF_UNIX.

One exchange per line. The client opens with a handshake::

    -> {"hello": "xdpguard", "version": 1}
    <- {"ok": true, "hello": "xdpguard", "version": 1, "server": "0.1.0",
        "commands": ["help", "stats", "status", ...]}

then sends requests and gets one reply each, in order::

    -> {"id": 7, "cmd": "stats", "args": {}}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 7, "ok": false, "error": "one line for the operator"}

COMMANDS is the single table of what exists and of each command's
arguments, with their types and ranges: the server refuses anything else
before a handler runs, and the client refuses to send it. A command marked
``fd`` takes an open file instead of its contents: the client passes the
descriptor with the request (SCM_RIGHTS) and the server reads it, so a big
blocklist is never one huge JSON line, and the server never opens a path
for a client.

The server is hard to wedge: at most MAX_CLIENTS at once (the rest are
told "busy"), an idle client is dropped after IDLE_TIMEOUT, a request line
is at most MAX_LINE bytes, and a thread that cannot start costs one
client, never the server. The socket is mode 0600 in a directory that is
root's and not group- or world-writable; the server checks its peers'
credentials, and the client checks the server's before it sends anything.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdpguard import __version__
from xdpguard.errors import XdpguardError
from xdpguard.policy import FRAG_POLICIES, MAX_COMMENT, MAX_TTL, PORT_PRESETS, PROTECT_MAX
from xdpguard.samples import MAX_CAP, MAX_EVERY, TOP_BY, TOP_K
from xdpguard.statefile import check_private_dir
from xdpguard.tcp import LIMITS, MODES

PROTOCOL_VERSION = 1
DEFAULT_CONTROL = "/run/xdpguard/control.sock"
# A request line; bulk data (list files) comes as a file descriptor.
MAX_LINE = 4 << 20
MAX_CLIENTS = 16
IDLE_TIMEOUT = 60.0
# How long close() waits for requests in flight.
DRAIN_TIMEOUT = 30.0
# Prefixes in one add/del request (a bigger change is a list file).
MAX_PREFIXES = 1 << 20
MAX_PROTECT = PROTECT_MAX

log = logging.getLogger("xdpguard.control")


class ArgError(XdpguardError):
    """A request's argument is not of its declared type or range."""


# ---- argument types: each checks a JSON value and returns it, or raises ArgError ----


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int

    def __call__(self, name: str, v: Any) -> int:
        if not _is_int(v) or not self.lo <= v <= self.hi:
            raise ArgError(f"{name} {v!r}: must be a whole number from {self.lo} to {self.hi}")
        return int(v)


@dataclass(frozen=True)
class Num:
    lo: float
    hi: float
    lo_open: bool = False

    def __call__(self, name: str, v: Any) -> float:
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
        if ok:
            ok = (v > self.lo if self.lo_open else v >= self.lo) and v <= self.hi
        if not ok:
            low = f"more than {self.lo:g}" if self.lo_open else f"from {self.lo:g}"
            raise ArgError(f"{name} {v!r}: must be a number {low} to {self.hi:g}")
        return float(v)


@dataclass(frozen=True)
class Str:
    max_len: int
    choices: tuple[str, ...] = ()

    def __call__(self, name: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > self.max_len:
            raise ArgError(f"{name}: must be text of at most {self.max_len} characters")
        if self.choices and v not in self.choices:
            raise ArgError(f"{name} {v!r}: must be one of {', '.join(self.choices)}")
        return v


@dataclass(frozen=True)
class Bool:
    def __call__(self, name: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise ArgError(f"{name} {v!r}: must be true or false")
        return v


@dataclass(frozen=True)
class ListOf:
    item: Callable[[str, Any], Any]
    max_items: int

    def __call__(self, name: str, v: Any) -> list[Any]:
        if not isinstance(v, list) or len(v) > self.max_items:
            raise ArgError(f"{name}: must be a list of at most {self.max_items} items")
        return [self.item(f"{name}[{i}]", x) for i, x in enumerate(v)]


@dataclass(frozen=True)
class DictOf:
    key: Str
    value: Callable[[str, Any], Any]
    max_items: int

    def __call__(self, name: str, v: Any) -> dict[str, Any]:
        if not isinstance(v, dict) or len(v) > self.max_items:
            raise ArgError(f"{name}: must be an object of at most {self.max_items} members")
        return {self.key(f"{name} key", k): self.value(f"{name}[{k}]", x) for k, x in v.items()}


@dataclass(frozen=True)
class Arg:
    check: Callable[[str, Any], Any]
    required: bool = False


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: dict[str, Arg] = field(default_factory=dict)
    fd: bool = False  # takes one open file (SCM_RIGHTS), readable by the handler as args["file"]

    def validate(self, args: Any) -> dict[str, Any]:
        """The checked arguments (absent optional ones as None); ArgError otherwise."""
        if not isinstance(args, dict):
            raise ArgError("args must be a JSON object")
        unknown = sorted(set(args) - set(self.args))
        if unknown:
            raise ArgError(f"{self.name}: unknown argument {unknown[0]!r}")
        out: dict[str, Any] = {}
        for name, arg in self.args.items():
            value = args.get(name)
            if value is None:
                if arg.required:
                    raise ArgError(f"{self.name}: {name} is missing")
                out[name] = None
            else:
                out[name] = arg.check(name, value)
        return out


_PREFIXES = Arg(ListOf(Str(64), MAX_PREFIXES), required=True)
MAX_RULE = 2048
MAX_RULES = 65536
_RULES = Arg(ListOf(Str(MAX_RULE), MAX_RULES), required=True)
_PORTS = ListOf(Int(0, 65535), 65536)
_ETHERTYPES = ListOf(Int(0, 65535), 65536)
_MODE = Str(16, MODES)

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("help", "list the commands this server understands"),
        Command(
            "status",
            "state (starting|ready|stopping), devices, namespaces, netns cookies, sockets "
            "and workers: {wait?: seconds to block until not starting}",
            {"wait": Arg(Num(0, 3600))},
        ),
        Command("stats", "counters per reason, direction and queue; frame account"),
        *(
            c
            for lst in ("block", "allow")
            for c in (
                Command(
                    f"{lst}.add",
                    f"add prefixes to the {lst}list: {{prefixes, ttl?, comment?, force?}}",
                    {
                        "prefixes": _PREFIXES,
                        "ttl": Arg(Num(0, MAX_TTL, lo_open=True)),
                        "comment": Arg(Str(MAX_COMMENT)),
                        "force": Arg(Bool()),
                    },
                ),
                Command(
                    f"{lst}.del",
                    f"delete prefixes from the {lst}list: {{prefixes}}",
                    {"prefixes": _PREFIXES},
                ),
                Command(f"{lst}.list", f"the {lst}list's entries"),
                Command(
                    f"{lst}.load",
                    f"load a list file into the {lst}list: an open file (fd) or {{text}}, "
                    "{replace?, force?}",
                    {"text": Arg(Str(MAX_LINE)), "replace": Arg(Bool()), "force": Arg(Bool())},
                    fd=True,
                ),
                Command(f"{lst}.clear", f"empty the {lst}list"),
            )
        ),
        Command(
            "ports.add",
            "add UDP source ports to drop: {ports, preset?}",
            {"ports": Arg(_PORTS), "preset": Arg(Str(16, tuple(PORT_PRESETS)))},
        ),
        Command(
            "ports.del", "stop dropping UDP source ports: {ports}", {"ports": Arg(_PORTS, True)}
        ),
        Command("ports.list", "the UDP source ports dropped"),
        Command(
            "l2.allow",
            "let frames of these ethertypes through (not IP, not ARP): {ethertypes}",
            {"ethertypes": Arg(_ETHERTYPES, True)},
        ),
        Command(
            "l2.del",
            "drop frames of these ethertypes again: {ethertypes}",
            {"ethertypes": Arg(_ETHERTYPES, True)},
        ),
        Command("l2.list", "the ethertypes let through beside IP and ARP"),
        Command(
            "frags.set",
            "fragment policy: {policy: drop|pass}",
            {"policy": Arg(Str(8, FRAG_POLICIES), True)},
        ),
        Command("frags.get", "the fragment policy"),
        Command(
            "tcp.mode",
            "set SYN challenges and out-of-state drops: {mode}",
            {"mode": Arg(_MODE, True)},
        ),
        Command(
            "tcp.config",
            "TCP settings: {syn_mode?, state_mode?, syn_rate?, syn_burst?, state_rate?, "
            "state_burst?, verify_ttl?, challenge_rate?, challenge_prefix_rate?, "
            "verified_syn_rate?, verified_dest_syn_rate?, verified_total_syn_rate?, "
            "source_flow_quota?, prefix_flow_quota?, learn?}; none: show",
            {
                "syn_mode": Arg(_MODE),
                "state_mode": Arg(_MODE),
                **{k: Arg(Int(*LIMITS[k])) for k in LIMITS},
                "learn": Arg(Num(0, 86400)),
            },
        ),
        Command(
            "tcp.flows",
            "flow table occupancy by state and the busiest flows: {top?}",
            {"top": Arg(Int(0, 1000))},
        ),
        Command(
            "fastpath.set",
            "forward what needs no loop in XDP itself, or not: {mode: on|off}",
            {"mode": Arg(Str(4, ("on", "off")), True)},
        ),
        Command("fastpath.get", "the fast path, per direction: active or why not"),
        Command("tcp.verified.list", "sources that answered a SYN challenge"),
        Command("tcp.verified.clear", "forget every verified source"),
        Command(
            "rule.add",
            "add local n-tuple rules (FlowSpec components, then an action): {rules, comment?, "
            "force?}",
            {"rules": _RULES, "comment": Arg(Str(MAX_COMMENT)), "force": Arg(Bool())},
        ),
        Command(
            "rule.del",
            "delete rules by their match: {rules, source?}",
            {"rules": _RULES, "source": Arg(Str(64))},
        ),
        Command(
            "rule.list",
            "the rules in the order they apply, with their counters: {source?}",
            {"source": Arg(Str(64))},
        ),
        Command(
            "rule.load",
            "load a rule file (one rule per line) as the local rules: an open file (fd) "
            "or {text}, {replace?, force?}",
            {"text": Arg(Str(MAX_LINE)), "replace": Arg(Bool()), "force": Arg(Bool())},
            fd=True,
        ),
        Command("rule.clear", "delete every rule of a source: {source?}", {"source": Arg(Str(64))}),
        Command(
            "rule.update",
            "a BGP source's announcements and withdrawals, at once, under its session's "
            "lease (one up for hold seconds if it has none): {source, announce?, withdraw?, "
            "hold: seconds, partial?: hold what fits, list the rest as refused}",
            {
                "source": Arg(Str(64), True),
                "announce": Arg(ListOf(Str(MAX_RULE), MAX_RULES)),
                "withdraw": Arg(ListOf(Str(MAX_RULE), MAX_RULES)),
                "hold": Arg(Num(0, 3600, lo_open=True), True),
                "partial": Arg(Bool()),
            },
        ),
        Command(
            "rule.session",
            "a BGP source's session: {source, state: up|down|eor, hold: seconds}",
            {
                "source": Arg(Str(64), True),
                "state": Arg(Str(8, ("up", "down", "eor")), True),
                "hold": Arg(Num(0, 3600, lo_open=True), True),
            },
        ),
        Command(
            "ratelimit.add",
            "per-source rate limits by source prefix: {prefixes, pps?, bps?, per_source?, "
            "comment?, force?}",
            {
                "prefixes": _PREFIXES,
                "pps": Arg(Num(0, 1e12, lo_open=True)),
                "bps": Arg(Num(0, 1e13, lo_open=True)),
                "per_source": Arg(Bool()),
                "comment": Arg(Str(MAX_COMMENT)),
                "force": Arg(Bool()),
            },
        ),
        Command("ratelimit.del", "delete rate limits: {prefixes}", {"prefixes": _PREFIXES}),
        Command("ratelimit.list", "the rate limits, with their counters"),
        Command(
            "protect.add",
            "protect networks: count frames to each of their addresses, find attacks on "
            "them: {prefixes, name?, mode?: mitigate|monitor, pps?, bps?: {class|*: floor}}",
            {
                "prefixes": Arg(ListOf(Str(64), MAX_PROTECT), True),
                "name": Arg(Str(64)),
                "mode": Arg(Str(8, ("mitigate", "monitor"))),
                "pps": Arg(DictOf(Str(16), Num(0, 1e13, lo_open=True), 8)),
                "bps": Arg(DictOf(Str(16), Num(0, 1e13, lo_open=True), 8)),
            },
        ),
        Command(
            "protect.config",
            "attack detection: {k?: times the baseline, window?: its seconds, hold?: seconds "
            "under the threshold before a rule goes, floor_pps?: the default floor}; none: show",
            {
                "k": Arg(Num(1.5, 1000)),
                "window": Arg(Num(60, 30 * 86400)),
                "hold": Arg(Num(1, 86400)),
                "floor_pps": Arg(Int(1, 1 << 40)),
            },
        ),
        Command("attacks", "attacks in progress and past: destination, class, fingerprint, rule"),
        Command(
            "protect.del",
            "stop protecting networks: {prefixes}",
            {"prefixes": Arg(ListOf(Str(64), MAX_PROTECT), True)},
        ),
        Command("protect.list", "the protected networks, their counters and rates"),
        Command(
            "sample.set",
            "sampling rates, 1 in N (0: never): {every?: {reason: N}, drops?: N, "
            "forwarded?: N, cap?: samples per second}",
            {
                "every": Arg(DictOf(Str(64), Int(0, MAX_EVERY), 64)),
                "drops": Arg(Int(0, MAX_EVERY)),
                "forwarded": Arg(Int(0, MAX_EVERY)),
                "cap": Arg(Int(1, MAX_CAP)),
            },
        ),
        Command("sample.get", "the sampling rates in force, the cap and what it refused"),
        Command(
            "capture.start",
            "start a capture: {reasons?, direction?: in|out, before?: the samples held}",
            {
                "reasons": Arg(ListOf(Str(64), 64)),
                "direction": Arg(Str(3, ("in", "out"))),
                "before": Arg(Bool()),
            },
        ),
        Command(
            "capture.read",
            "the samples a capture got since the last read: {id, max?, wait?: seconds}",
            {
                "id": Arg(Int(1, 1 << 62), True),
                "max": Arg(Int(1, 10000)),
                "wait": Arg(Num(0, 10)),
            },
        ),
        Command("capture.stop", "stop a capture: {id}", {"id": Arg(Int(1, 1 << 62), True)}),
        Command(
            "top",
            "heavy hitters: {by?: src|dst|sport|dport|proto|src/24, reason?, n?}",
            {"by": Arg(Str(8, TOP_BY)), "reason": Arg(Str(64)), "n": Arg(Int(1, TOP_K))},
        ),
    )
}

Handler = Callable[[dict[str, Any]], Any]


class ControlError(XdpguardError):
    """The server answered a request with an error."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message; ValueError (one line) for anything but a JSON object."""
    try:
        msg = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


class LineReader:
    """Lines from a stream socket, and the descriptors that came with them."""

    MAX_FDS = 1

    def __init__(self, sock: socket.socket, max_line: int) -> None:
        self.sock = sock
        self.max_line = max_line
        self.buf = bytearray()
        self.fds: list[int] = []

    def readline(self) -> bytes | None:
        """The next line (without its newline), or None at end of stream."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line
            if len(self.buf) > self.max_line:
                raise ValueError(f"request longer than {self.max_line} bytes")
            data, anc, flags, _ = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(4 * (self.MAX_FDS + 1))
            )
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                    self.fds += fds.tolist()
            if flags & socket.MSG_CTRUNC or len(self.fds) > self.MAX_FDS:
                self.close_fds()
                raise ValueError("too many file descriptors")
            if not data:
                return None
            self.buf += data

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_socket_dir(parent: Path) -> None:
    """Refuse a directory someone else could swap the socket in."""
    check_private_dir(parent, "control socket directory")


class ControlServer:
    """Serves COMMANDS from ``handlers`` on a Unix socket, one thread per client."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handlers: dict[str, Handler],
        max_clients: int = MAX_CLIENTS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        unknown = set(handlers) - set(COMMANDS)
        if unknown:
            raise ValueError(f"handlers for unknown commands: {sorted(unknown)}")
        self.path = Path(path)
        self.handlers = {"help": self._help, **handlers}
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._made_dir = False
        self._closing = False
        # Clients connected and requests in flight, under one condition.
        self._state = threading.Condition()
        self._clients: set[socket.socket] = set()
        self._busy = 0
        self._refused_logged = False

    def _help(self, _args: dict[str, Any]) -> Any:
        return {name: COMMANDS[name].help for name in sorted(self.handlers)}

    def start(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
            self._made_dir = True
        check_socket_dir(parent)
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
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="xg-control", daemon=True)
        self._thread.start()

    def close(self, drain: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, let requests in flight finish (up to ``drain`` seconds),
        then hang up on every client. Handlers are not running once this returns
        (unless one outlived ``drain``, which is logged)."""
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._state:
            if not self._state.wait_for(lambda: self._busy == 0, drain):
                log.error("control: %d request(s) still running at shutdown", self._busy)
            for conn in self._clients:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        """Say ``why`` and hang up. The client's hello is read first (briefly:
        this runs in the accept thread), since closing a Unix socket with
        unread data makes the peer's read fail before it sees the reason."""
        with contextlib.suppress(OSError):
            conn.settimeout(0.2)
            conn.recv(4096)
        with contextlib.suppress(OSError):
            conn.sendall(encode({"ok": False, "error": why}))
            conn.shutdown(socket.SHUT_WR)
        conn.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                assert self._sock is not None
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.05)  # EMFILE and the like: this client, not the server
                continue
            with self._state:
                full = len(self._clients) >= self.max_clients
                if not full:
                    self._clients.add(conn)
            if full:
                self._refuse(conn, f"busy: {self.max_clients} clients connected; try again")
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(conn,), name="xg-control-client", daemon=True
                ).start()
            except RuntimeError as exc:  # "can't start new thread": out of tasks
                with self._state:
                    self._clients.discard(conn)
                if not self._refused_logged:
                    log.error("control: cannot start a client thread (%s); refusing clients", exc)
                    self._refused_logged = True
                self._refuse(conn, "busy: the server cannot take another client now; try again")

    def _serve(self, conn: socket.socket) -> None:
        reader = LineReader(conn, MAX_LINE)
        try:
            conn.settimeout(self.idle_timeout)
            if _peer_uid(conn) not in (0, os.geteuid()):
                conn.sendall(encode({"ok": False, "error": "permission denied"}))
                return
            line = reader.readline()
            if line is None:
                return
            hello = decode(line)
            version = hello.get("version")
            if hello.get("hello") != "xdpguard" or not _is_int(version) or version != 1:
                conn.sendall(
                    encode(
                        {
                            "ok": False,
                            "error": f"unsupported protocol {hello!r:.200}: this server speaks "
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
            while not self._closing:
                line = reader.readline()
                if line is None:
                    return
                fds = reader.take_fds()
                try:
                    reply = self._dispatch(decode(line), fds)
                except ValueError as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                conn.sendall(encode(reply))
        except TimeoutError:
            with contextlib.suppress(OSError):
                conn.sendall(encode({"ok": False, "error": "idle too long: disconnected"}))
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                conn.sendall(encode({"ok": False, "error": f"bad request: {exc}"}))
        finally:
            reader.close_fds()
            with self._state:
                self._clients.discard(conn)
            conn.close()

    def _dispatch(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        rid = req.get("id")
        if rid is not None and not (_is_int(rid) or isinstance(rid, str)):
            rid = None
        cmd = req.get("cmd")
        command = COMMANDS.get(cmd) if isinstance(cmd, str) else None
        handler = self.handlers.get(cmd) if command else None
        if handler is None or command is None:
            return {"id": rid, "ok": False, "error": f"unknown command {cmd!r:.100}"}
        try:
            args = command.validate(req.get("args") or {})
            if fds and not command.fd:
                raise ArgError(f"{cmd} takes no file")
            if command.fd:
                args["file"] = os.fdopen(os.dup(fds[0]), "rb") if fds else None
        except XdpguardError as exc:
            return {"id": rid, "ok": False, "error": str(exc)}
        with self._state:
            self._busy += 1
        try:
            if self._closing:
                raise XdpguardError("xdpguard is stopping")
            return {"id": rid, "ok": True, "result": handler(args)}
        except XdpguardError as exc:
            return {"id": rid, "ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the control thread
            log.exception("control command %s failed", cmd)
            return {"id": rid, "ok": False, "error": f"internal error in {cmd}: {exc}"}
        finally:
            if args.get("file") is not None:
                args["file"].close()
            with self._state:
                self._busy -= 1
                self._state.notify_all()


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
        except OSError as exc:
            sock.close()
            raise XdpguardError(f"control socket {self.path}: {exc.strerror}") from None
        # Say nothing to a server that is not root's (or our own).
        uid = _peer_uid(sock)
        if uid not in (0, os.geteuid()):
            sock.close()
            raise XdpguardError(
                f"control socket {self.path} is served by uid {uid}, not root: not talking to it"
            )
        self._sock = sock
        self._reader = LineReader(sock, 1 << 30)
        hello = self._exchange({"hello": "xdpguard", "version": PROTOCOL_VERSION})
        if not hello.get("ok"):
            self.close()
            raise ControlError(hello.get("error", "handshake refused"))
        self.server_version: str = hello.get("server", "?")
        self.commands: list[str] = hello.get("commands", [])

    def _exchange(self, msg: dict[str, Any], fd: int | None = None) -> dict[str, Any]:
        try:
            data = encode(msg)
            if fd is None:
                self._sock.sendall(data)
            else:
                sent = socket.send_fds(self._sock, [data], [fd])
                if sent < len(data):
                    self._sock.sendall(data[sent:])
            line = self._reader.readline()
            reply = None if line is None else decode(line)
        except (OSError, ValueError) as exc:
            raise XdpguardError(f"control socket {self.path}: {exc}") from exc
        if reply is None:
            raise XdpguardError(f"control socket {self.path}: server closed the connection")
        return reply

    def call(self, cmd: str, fd: int | None = None, **args: Any) -> Any:
        """Run ``cmd`` with ``args`` (``fd``: an open file for a command that takes one)."""
        command = COMMANDS.get(cmd)
        if command is None:
            raise ValueError(f"unknown command {cmd!r}")
        if cmd not in self.commands:
            raise ControlError(f"the running xdpguard ({self.server_version}) has no {cmd!r}")
        if fd is not None and not command.fd:
            raise ValueError(f"{cmd} takes no file")
        command.validate({k: v for k, v in args.items() if v is not None})
        self._next_id += 1
        reply = self._exchange({"id": self._next_id, "cmd": cmd, "args": args}, fd)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return reply.get("result")

    def close(self) -> None:
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
