"""Python mirrors of the shared header's enums and counter layouts."""

from __future__ import annotations

from enum import IntEnum

from xdpguard import _bindings as B


def _snake(prefix: str, name: str) -> str:
    return name.removeprefix(prefix).lower()


# Stable, script-facing names: XG_REASON_NO_SOCKET -> "no_socket".
Reason = IntEnum(  # type: ignore[misc]
    "Reason",
    {_snake("XG_REASON_", name): value for name, value in B.enum_members("enum xg_reason").items()},
)

# Which stage counts a reason (enum xg_reason_stage): the XDP program sees
# every frame once; the loop judges some of XDP's "redirected" frames again.
XDP_REASONS = frozenset(r for r in Reason if B.STAGE_XDP >> r & 1)
LOOP_REASONS = frozenset(r for r in Reason if B.STAGE_LOOP >> r & 1)


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

# numpy views of the shared structs, laid out by the C compiler via cffi.
COUNTER_DTYPE = B.struct_dtype("struct xg_counter")  # one per CPU per reason
LPM_DTYPE = {"v4": B.struct_dtype("struct xg_lpm_v4"), "v6": B.struct_dtype("struct xg_lpm_v6")}
POLICY_DTYPE = B.struct_dtype("struct xg_policy")
RULE_STATS_DTYPE = B.struct_dtype("struct xg_rule_stats")  # per rule slot, per CPU

MAX_QUEUES = B.MAX_QUEUES
REASON_CAP = B.REASON_CAP
