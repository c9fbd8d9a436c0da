"""How xdpguard writes its log: one event per line on stderr, as text for a
person or as JSON for a collector (``run --log-format``). Events come from
the control plane and the housekeeping; nothing is logged per packet.

    xdpguard: INFO: ready; control socket /run/xdpguard/control.sock
    {"time": "2026-12-02T17:30:01.123Z", "level": "info", "message": "ready; ...",
     "logger": "xdpguard"}

A record's ``fields`` (``log.info(..., extra={"fields": {...}})``) become
keys of its JSON object, so a collector need not parse the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "logger": record.name,
        }
        out |= getattr(record, "fields", {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(fmt: str, prefix: str = "xdpguard", verbose: bool = False) -> None:
    """Log INFO and above (DEBUG too if ``verbose``) to stderr in ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"{prefix}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Our own debug events only: the libraries' (pyroute2's netlink) are noise.
    logging.getLogger("xdpguard").setLevel(logging.DEBUG if verbose else logging.INFO)
