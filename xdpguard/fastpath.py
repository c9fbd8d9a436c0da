"""The XDP fast path: frames that need no loop are forwarded by XDP itself.

Each program instance may redirect straight to the other device through its
DEVMAP (xg_peer): the outer program to inner (direction "in"), the inner
program to outer ("out"). What it may forward is in its xg_fastcfg: non-TCP
traffic that passed the policy, and, when TCP state is enforced, the
segments of flows the loop verified (bpf/xdpguard.bpf.c fast_path()).

A DEVMAP entry's ifindex is resolved in the namespace of the thread that
writes it, so each peer is written from a thread inside the peer's own
namespace; that is what makes two devices of one ifindex (INDEX=4242)
work. Redirecting into a veth works only if its peer has NAPI (GRO on, or
an XDP program); otherwise every frame would vanish. So each direction is
probed at start and watched while running (redirected frames that the
target never sent): a direction that cannot take redirected frames falls
back to the AF_XDP path, and status and stats say why.

The probe sends real frames (a broadcast of the IEEE local experimental
ethertype, which nobody listens to) through a veth pair in a namespace of
its own (xdpguard.features.ProbeLab), whose XDP program redirects them to
the target through a DEVMAP written from the target's namespace, and counts
them with the target's own counters. It needs neither the devices' other
ends nor BPF_PROG_RUN's live frames, which locked-down kernels refuse.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

from xdpguard import _bindings as B
from xdpguard.defs import Direction, Reason, Role
from xdpguard.features import probe_lab, redirect_reaches
from xdpguard.netns import Device, Netns
from xdpguard.xdp import XdpProgram

log = logging.getLogger("xdpguard")

_PROBE_FRAMES = 4
# The watch: this many frames redirected since the target last sent one is
# a black hole. Counted across seconds: the first thing lost is often ARP,
# one request a second, and a second's worth would never be enough.
_BLACK_HOLE = 3


@dataclass
class _Path:
    """One direction: its program, where its frames come from and go to."""

    prog: XdpProgram
    src: Device
    src_ns: Netns
    dst: Device
    dst_ns: Netns
    usable: bool = False
    why: str = "not probed yet"
    # (fast_path frames, frames the target sent) when it last sent one
    last: tuple[int, int] | None = None


class FastPath:
    def __init__(
        self,
        progs: dict[Role, XdpProgram],
        devs: dict[Role, tuple[Device, Netns]],
        unavailable: str | None = None,
    ):
        """``unavailable``: why the kernel's XDP redirect is not to be used at
        all (xdpguard.features: devmap_redirect), or None."""
        (outer, outer_ns), (inner, inner_ns) = devs[Role.OUTER], devs[Role.INNER]
        self.paths = {
            Direction.IN: _Path(progs[Role.OUTER], outer, outer_ns, inner, inner_ns),
            Direction.OUT: _Path(progs[Role.INNER], inner, inner_ns, outer, outer_ns),
        }
        self.wanted = False
        self.tcp = False
        self.unavailable = unavailable

    # -- what each program may do --

    def _write(self, d: Direction, flags: int | None = None) -> None:
        p = self.paths[d]
        if flags is None:
            flags = 0
            if self.wanted and p.usable:
                flags = B.FAST_ON | (B.FAST_TCP if self.tcp else 0)
        value = B.struct_bytes("struct xg_fast_cfg", flags=flags)
        B.map_update(p.prog.map_fd("xg_fastcfg"), struct.pack("=I", 0), value)

    def _write_all(self) -> None:
        for d in self.paths:
            self._write(d)

    def start(self, wanted: bool, tcp: bool) -> None:
        """Point each program at its peer (from the peer's namespace) and probe."""
        for p in self.paths.values():
            fd = p.prog.map_fd("xg_peer")
            p.dst_ns.run(B.map_update, fd, struct.pack("=I", 0), struct.pack("=I", p.dst.ifindex))
        self.tcp = tcp
        self.set(wanted)

    def set(self, wanted: bool) -> dict[str, Any]:
        """Turn the fast path on (probing each direction again) or off."""
        self.wanted = wanted
        if wanted:
            for d in self.paths:
                self._probe(d)
        self._write_all()
        return self.status()

    def set_tcp(self, allowed: bool) -> None:
        if allowed != self.tcp:
            self.tcp = allowed
            self._write_all()

    # -- is anyone there --

    def _target_counts(self, p: _Path) -> tuple[int, int] | None:
        return p.dst_ns.run(B.dev_xdp_xmit, p.dst.name)

    def _probe(self, d: Direction) -> None:
        p = self.paths[d]
        if self.unavailable is not None:
            p.usable, p.why = False, self.unavailable
        else:
            try:
                with probe_lab() as lab:
                    got = redirect_reaches(lab, p.dst_ns, p.dst.name, p.dst.ifindex, _PROBE_FRAMES)
            except OSError as exc:
                p.usable, p.why = False, f"the probe could not run ({exc.strerror})"
            else:
                if got is None:
                    p.usable = True
                    p.why = f"unverified: {p.dst.name} does not count XDP transmits"
                elif got[0]:
                    p.usable, p.why = True, "on"
                else:
                    p.usable, p.why = False, self._no_napi(p)
        self._write(d)
        p.last = None
        log.log(
            logging.INFO if p.usable else logging.WARNING,
            "fast path %s (%s -> %s): %s",
            d.label,
            p.src.name,
            p.dst.name,
            p.why if p.usable else f"{p.why}; that direction takes the AF_XDP path",
        )

    @staticmethod
    def _no_napi(p: _Path) -> str:
        return (
            f"{p.dst.name} (netns {p.dst_ns.label}) takes no redirected frames (a veth needs "
            "NAPI on its peer: GRO on, or an XDP program there)"
        )

    def watch(self) -> None:
        """Once a second: a direction whose target sent none of the last
        _BLACK_HOLE frames redirected to it is a black hole; it goes back to
        the AF_XDP path, said once."""
        for d, p in self.paths.items():
            if not (self.wanted and p.usable):
                p.last = None
                continue
            counts = self._target_counts(p)
            if counts is None:
                continue
            fast = int(p.prog.reason_counters()[Reason.fast_path, 0])
            if p.last is None or counts[0] != p.last[1]:
                p.last = (fast, counts[0])  # the target sends: fine so far
                continue
            if fast - p.last[0] >= _BLACK_HOLE:
                p.usable, p.why = False, self._no_napi(p)
                self._write(d)
                log.error(
                    "fast path %s: %d frames redirected to %s and none sent: %s; that "
                    "direction takes the AF_XDP path now ('xdpguard fast-path on' tries again)",
                    d.label,
                    fast - p.last[0],
                    p.dst.name,
                    p.why,
                )
                p.last = None

    def status(self) -> dict[str, Any]:
        return {
            "wanted": self.wanted,
            "tcp": self.tcp,
            "directions": {
                d.label: {
                    "active": self.wanted and p.usable,
                    "from": p.src.name,
                    "to": p.dst.name,
                    # The peer as its DEVMAP entry holds it: resolved in its own netns.
                    "to_netns_cookie": p.dst.netns_cookie,
                    "to_ifindex": p.dst.ifindex,
                    "why": p.why if self.wanted else "off",
                }
                for d, p in self.paths.items()
            },
        }
