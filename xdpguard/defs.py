"""Python mirrors of the shared header's enums and counter layouts."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from xdpguard import _bindings as B


def _snake(prefix: str, name: str) -> str:
    return name.removeprefix(prefix).lower()


# Stable, script-facing names: XG_REASON_NO_SOCKET -> "no_socket".
Reason = IntEnum(  # type: ignore[misc]
    "Reason",
    {_snake("XG_REASON_", name): value for name, value in B.enum_members("enum xg_reason").items()},
)


class Role(IntEnum):
    OUTER = B.ROLE_OUTER
    INNER = B.ROLE_INNER


class Direction(IntEnum):
    IN = B.DIR_IN  # outer -> inner: client to origin
    OUT = B.DIR_OUT  # inner -> outer: origin to client

    @property
    def label(self) -> str:
        return self.name.lower()


# Which program instance counts which direction.
ROLE_DIRECTION = {Role.OUTER: Direction.IN, Role.INNER: Direction.OUT}

# struct xg_counter, one per CPU in a per-CPU array slot.
COUNTER_DTYPE = np.dtype([("packets", "<u8"), ("bytes", "<u8")])

MAX_QUEUES = B.MAX_QUEUES
REASON_CAP = B.REASON_CAP
