"""``xdpguard trace``: the kernel's XDP and AF_XDP errors, live.

The kernel's own tracepoints (xdp_exception, xdp_redirect_err, and
xdp_devmap_xmit when it dropped or failed) come through BTF-typed programs
(bpf/xg_trace.bpf.c) and a ring buffer; each event names its devices as
their own namespaces know them, found by the namespace's cookie among the
current one and those of ``ip netns``. With an appliance reachable on its
control socket, the per-socket XDP_STATISTICS that grew are events too.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError
from xdpguard.netns import Netns

KINDS = {B.lib.XG_TRACE_EXCEPTION: "exception", B.lib.XG_TRACE_REDIRECT_ERR: "redirect_err",
         B.lib.XG_TRACE_DEVMAP_XMIT: "devmap_xmit"}  # fmt: skip
XDP_ACTIONS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
MAP_TYPES = {14: "devmap", 17: "xskmap", 16: "cpumap", 25: "devmap_hash"}
XSK_FIELDS = ("rx_dropped", "rx_ring_full", "tx_invalid_descs")
log = logging.getLogger("xdpguard")

_PKG_DIR = Path(__file__).resolve().parent
_OBJECTS = (_PKG_DIR / "xg_trace.bpf.o", _PKG_DIR.parent / "bpf" / "xg_trace.bpf.o")


def object_path() -> Path:
    for path in _OBJECTS:
        if path.is_file():
            return path
    raise XdpguardError(f"trace object not found (looked for {_OBJECTS[-1]}); run 'make build'")


class Names:
    """(netns cookie, ifindex) -> 'dev (netns NAME)', resolved in that namespace."""

    def __init__(self) -> None:
        self.netns: dict[int, str | None] = {}  # cookie -> ip netns name (None: ours)
        self.devs: dict[tuple[int, int], str] = {}
        self._scan()

    def _scan(self) -> None:
        self.netns = {B.netns_cookie(): None}
        run = Path("/run/netns")
        for entry in sorted(run.iterdir()) if run.is_dir() else []:
            try:
                self.netns.setdefault(Netns(entry.name).cookie(), entry.name)
            except (OSError, XdpguardError):
                continue  # gone meanwhile, or not ours to enter

    def device(self, cookie: int, ifindex: int) -> dict[str, Any]:
        key = (cookie, ifindex)
        if key not in self.devs:
            if cookie not in self.netns:
                self._scan()
            name = None
            if cookie in self.netns:
                try:
                    name = Netns(self.netns[cookie]).run(socket.if_indextoname, ifindex)
                except OSError:
                    name = None
            self.devs[key] = name or f"ifindex {ifindex}"
        netns = Netns(self.netns[cookie]).label if cookie in self.netns else f"cookie {cookie}"
        return {"device": self.devs[key], "ifindex": ifindex, "netns": netns,
                "netns_cookie": cookie}  # fmt: skip


def _where(d: dict[str, Any]) -> str:
    return f"{d['device']} (netns {d['netns']})"


def describe(ev: dict[str, Any], names: Names) -> dict[str, Any]:
    """A kernel event as trace prints it (JSON), devices named."""
    mono, wall = time.clock_gettime(time.CLOCK_MONOTONIC), time.time()
    out: dict[str, Any] = {
        "time": wall - (mono - ev["ts_ns"] / 1e9),
        "event": KINDS.get(ev["kind"], str(ev["kind"])),
        "dev": names.device(ev["netns_cookie"], ev["ifindex"]),
    }
    if ev["err"]:
        out["error"] = ev["err"]
        out["error_text"] = os.strerror(-ev["err"]) if ev["err"] < 0 else str(ev["err"])
    if out["event"] == "exception":
        out["action"] = XDP_ACTIONS.get(ev["act"], str(ev["act"]))
        out["prog_id"] = ev["prog_id"]
    elif out["event"] == "redirect_err":
        out["prog_id"] = ev["prog_id"]
        out["map"] = {"id": ev["map_id"], "type": MAP_TYPES.get(ev["map_type"], ev["map_type"]),
                      "key": ev["index"]} if ev["map_id"] else None  # fmt: skip
    else:
        out["to"] = names.device(ev["to_netns_cookie"], ev["to_ifindex"])
        out["sent"], out["dropped"] = ev["sent"], ev["drops"]
    return out


def text(e: dict[str, Any]) -> str:
    """One line for a person."""
    when = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] % 1 * 1e6):06d}"
    err = f": error {e['error']} ({e['error_text']})" if "error" in e else ""
    if e["event"] == "xsk":
        grew = ", ".join(f"{k} +{v}" for k, v in e["grew"].items())
        return f"{when} xsk {e['socket']} queue {e['queue']}: {grew}"
    if e["event"] == "exception":
        return f"{when} exception {_where(e['dev'])}: {e['action']} failed (prog {e['prog_id']})"
    if e["event"] == "redirect_err":
        m = e["map"]
        target = f" to {m['type']} {m['id']} key {m['key']}" if m else ""
        return f"{when} redirect_err {_where(e['dev'])}{target}{err}"
    return (f"{when} devmap_xmit {_where(e['dev'])} -> {_where(e['to'])}: sent {e['sent']}, "
            f"dropped {e['dropped']}{err}")  # fmt: skip


def xsk_deltas(prev: dict | None, stats: dict[str, Any]) -> tuple[dict, list[dict[str, Any]]]:
    """The per-socket XDP_STATISTICS that grew since ``prev`` (None: the first reading)."""
    cur = {(q["queue"], dev): q["xsk"][dev] for q in stats["queues"] for dev in ("outer", "inner")}
    events = []
    if prev is not None:
        for (queue, dev), now in cur.items():
            before = prev.get((queue, dev))
            if before is None:
                continue
            grew = {k: now[k] - before[k] for k in XSK_FIELDS if now[k] > before[k]}
            if grew:
                events.append({"time": time.time(), "event": "xsk", "socket": dev,
                               "queue": queue, "grew": grew})  # fmt: skip
    return cur, events


def read_xsk(control: str, prev: dict | None) -> tuple[dict | None, list[dict[str, Any]]]:
    """xsk_deltas() against the running appliance; (None, []) if there is none
    (yet, or any more)."""
    from xdpguard.control import ControlClient

    try:
        with ControlClient(control) as c:
            return xsk_deltas(prev, c.call("stats"))
    except XdpguardError:
        return None, []


def follow(
    control: str | None,
    interval: float,
    until: float | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> Iterator[dict[str, Any]]:
    """Events as they come, until the caller stops iterating, the monotonic
    clock passes ``until`` or ``stopped()`` is true (checked at least every
    ``interval``: a signal cuts the wait for events short)."""
    try:
        tracer = B.Trace(str(object_path()))
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise XdpguardError("xdpguard trace needs root (CAP_BPF and CAP_PERFMON)") from None
        raise XdpguardError(f"cannot attach to the XDP tracepoints: {exc.strerror}") from None
    names = Names()

    try:
        # The sockets' baseline is read before trace says it is attached: a
        # drop from then on is an event, even one before the first interval.
        prev = read_xsk(control, None)[0] if control is not None else None
        next_xsk = time.monotonic() + interval
        log.info(
            "attached to xdp_exception, xdp_redirect_err and xdp_devmap_xmit%s",
            f"; reading {control} every {interval:g} s" if control else "",
        )
        while not stopped() and (until is None or time.monotonic() < until):
            wait = interval if until is None else max(0.0, min(interval, until - time.monotonic()))
            for ev in tracer.poll(int(wait * 1000)):
                yield describe(ev, names)
            if control is not None and time.monotonic() >= next_xsk:
                next_xsk = time.monotonic() + interval
                prev, events = read_xsk(control, prev)
                yield from events
    finally:
        tracer.close()
