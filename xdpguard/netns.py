"""Network namespaces and the devices in them.

Everything namespace-scoped (netlink queries, XDP attachment, AF_XDP socket
creation) runs through Netns.run(): a short-lived thread enters the namespace
with setns(2) and does the work there, so the daemon's other threads never
change namespace.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError

T = TypeVar("T")

NETNS_DIR = "/run/netns"
_IFNAME = re.compile(r"^[^/\s:]{1,15}$")


def valid_ifname(name: str) -> bool:
    return bool(_IFNAME.match(name)) and name not in (".", "..")


class Netns:
    """A named namespace (``ip netns`` convention) or, with ``name=None``, our own.

    The namespace is opened once, here, and entered through that descriptor
    from then on: deleting its name (``ip netns del``) while the appliance
    runs does not lose it."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self._fd: int | None = None
        self._label = name
        if name is not None:
            if "/" in name or name in ("", ".", ".."):
                raise XdpguardError(f"invalid network namespace name {name!r}")
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise XdpguardError(
                    f"network namespace '{name}' not found (no {self.path}; see 'ip netns list')"
                ) from None
            except OSError as exc:
                raise XdpguardError(f"cannot open network namespace '{name}': {exc}") from None
            weakref.finalize(self, os.close, self._fd)

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name) if self.name else "/proc/self/ns/net"

    @classmethod
    def private(cls, label: str) -> Netns:
        """A new, empty namespace of this process' own, with no name: it and
        every device in it go when close() (or the process' exit, however it
        ends) lets go of the last reference. For probes."""
        fds: list[int] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                fds.append(B.netns_new())
            except BaseException as exc:  # re-raised in the caller
                error.append(exc)

        thread = threading.Thread(target=body, name="netns:new")
        thread.start()
        thread.join()
        if error:
            raise error[0]
        ns = cls(None)
        ns._fd, ns._label = fds[0], label
        return ns

    def close(self) -> None:
        """Let go of a private namespace (named ones close when collected)."""
        if self.name is None and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def label(self) -> str:
        return self._label if self._label is not None else "(own)"

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` from a thread inside this namespace and return its result."""
        if self._fd is None:
            return fn(*args)
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                assert self._fd is not None
                B.netns_enter(self._fd)
                result.append(fn(*args))
            except BaseException as exc:  # re-raised in the caller
                error.append(exc)

        thread = threading.Thread(target=body, name=f"netns:{self.label}")
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def cookie(self) -> int:
        return self.run(B.netns_cookie)


@dataclass(frozen=True)
class Device:
    name: str
    netns: str | None
    netns_cookie: int
    ifindex: int
    kind: str
    rx_queues: int
    tx_queues: int
    mtu: int
    mac: str
    up: bool
    xdp_prog_id: int
    xdp_mode: str

    @property
    def queues(self) -> int:
        """Queues an AF_XDP socket can bind to: it needs both an RX and a TX queue."""
        return min(self.rx_queues, self.tx_queues)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lookup(ifname: str, netns: str | None) -> Device | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
    linkinfo = link.get("IFLA_LINKINFO")
    kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo else None
    prog_id, mode = B.xdp_query(link["index"])
    # Netlink reports the queues a device was created with; ethtool reports
    # the ones in use (ethtool -L may have lowered them).
    real = B.dev_queues(ifname)
    rx_queues = link.get("IFLA_NUM_RX_QUEUES") or 1
    tx_queues = link.get("IFLA_NUM_TX_QUEUES") or 1
    if real is not None and all(real):
        rx_queues, tx_queues = real
    return Device(
        name=ifname,
        netns=netns,
        netns_cookie=B.netns_cookie(),
        ifindex=link["index"],
        kind=kind or "unknown",
        rx_queues=rx_queues,
        tx_queues=tx_queues,
        mtu=link.get("IFLA_MTU") or 0,
        mac=link.get("IFLA_ADDRESS") or "",
        up=bool(link["flags"] & 1),
        xdp_prog_id=prog_id,
        xdp_mode=mode if prog_id else "none",
    )


def resolve_device(ns: Netns, ifname: str) -> Device:
    """Look ``ifname`` up inside ``ns``; XdpguardError if it is not there."""
    if not valid_ifname(ifname):
        raise XdpguardError(f"invalid device name {ifname!r}")
    dev = ns.run(_lookup, ifname, ns.name)
    if dev is None:
        raise XdpguardError(f"device '{ifname}' not found in network namespace {ns.label}")
    return dev
