"""The sd_notify protocol, for systemd's Type=notify and WatchdogSec=.

One datagram per message to the AF_UNIX socket in $NOTIFY_SOCKET (a path,
or @name in the abstract namespace). The watchdog is on when
$WATCHDOG_USEC is set and $WATCHDOG_PID, if set, is this process.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("xdpguard")


def sd_notify(message: str) -> bool:
    """Send ``message`` to $NOTIFY_SOCKET; False if unset. Never raises."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # the abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], exc.strerror)
        return False
    return True


def watchdog_seconds() -> float | None:
    """The watchdog's timeout, if systemd set one for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
