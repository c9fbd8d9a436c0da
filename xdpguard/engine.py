"""The appliance: devices, XDP programs, the shared UMEM, sockets and workers.

Engine.start() builds everything in an order that lets traffic flow only
once the whole path exists (sockets and workers first, XDP attachment last,
inner before outer), and registers an undo step for each thing it builds, so
that a failure half-way and Engine.stop() both take down exactly what was
built, in reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xdpguard import __version__, features
from xdpguard import _bindings as B
from xdpguard.challenges import (
    INNER_MAX_ENTRIES,
    PINNED,
    Challenges,
    open_pinned,
    pin_maps,
    verified_capacity,
)
from xdpguard.challenges import max_entries as verified_max_entries
from xdpguard.defs import LOOP_REASONS, ROLE_DIRECTION, XDP_REASONS, Direction, Reason, Role
from xdpguard.detect import Detector
from xdpguard.errors import XdpguardError
from xdpguard.fastpath import FastPath
from xdpguard.flowtable import forget, open_table, pin_dir_for, unlock
from xdpguard.flowtable import lock as lock_state
from xdpguard.netns import Device, Netns, resolve_device
from xdpguard.policy import Policy, Prefixes, parse_lines, parse_text, read_lines
from xdpguard.protect import ProtectMaps
from xdpguard.rules import RuleTable
from xdpguard.samples import INNER_SAMPLE_ENTRIES, SampleMaps, Sampler
from xdpguard.sdnotify import sd_notify, watchdog_seconds
from xdpguard.settings import DEFAULTS
from xdpguard.statefile import check_private_dir
from xdpguard.tcp import TcpStage
from xdpguard.xdp import XDP_MODES, PolicyMaps, RuleMaps, XdpProgram, occupied

log = logging.getLogger("xdpguard")

# What a frame of the UMEM can carry in copy mode: the kernel puts the data
# XDP_PACKET_HEADROOM (256) bytes into the frame.
_XDP_PACKET_HEADROOM = 256
_MAX_L2_OVERHEAD = 14 + 2 * 4  # Ethernet and two VLAN tags
_WORD = B.struct_layout("struct xg_meta")[0]  # XDP's word for the loop, in front

# Capabilities xdpguard run needs (linux/capability.h bit numbers): XDP
# and BPF maps, AF_XDP sockets, entering namespaces and the BPF filesystem,
# and the UMEM's locked pages (without CAP_IPC_LOCK they count against
# RLIMIT_MEMLOCK, and a socket fails with ENOBUFS). The systemd unit
# (contrib/systemd/xdpguard.service) grants these and no more.
_CAPS = {
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_SYS_ADMIN": 21,
    "CAP_BPF": 39,
}


@dataclass
class EngineConfig:
    """What the engine runs with; the operator's settings and their defaults
    are xdpguard.settings' (one table for the command line, the file and this)."""

    outer: str
    inner: str
    inner_netns: str
    outer_netns: str | None = None
    queues: int | None = None
    xdp_mode: str = DEFAULTS["xdp_mode"]
    # Entries of each fill, RX, TX and completion ring: what absorbs the
    # worker being off its core (2048 frames are 2 ms at 1 Mpps).
    ring_size: int = DEFAULTS["ring_size"]
    # Frames of the UMEM per queue (default 4 x ring_size: both fill rings
    # full and as much again on the RX and TX rings).
    frames_per_queue: int = 0
    frame_size: int = 2048
    no_policy: bool = False
    # XDP forwards what needs no loop itself (xdpguard.fastpath).
    fast_path: bool = DEFAULTS["fast_path"] == "on"
    bpf_object: Path | None = None
    state_dir: Path | None = Path(DEFAULTS["state_dir"])
    max_flows: int = DEFAULTS["max_flows"]
    max_dests: int = DEFAULTS["max_dests"]
    learn: float = DEFAULTS["learn"]
    # Prometheus metrics served on (address, port); None: off.
    metrics: tuple[str, int] | None = None
    # The settings file's [tcp]: the TCP settings of a first start.
    tcp_initial: dict[str, Any] = field(default_factory=dict)
    # How often TTL expiry runs: entries leave within this of their deadline.
    expiry_interval: float = 0.2
    # Kernel features to do without even if there (xdpguard.features.OPTIONAL).
    without: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.frames_per_queue:
            self.frames_per_queue = 4 * self.ring_size


def require_capabilities() -> None:
    """One line naming what is missing, if anything is."""
    missing = missing_capabilities()
    if missing:
        raise XdpguardError(
            f"xdpguard run needs root, or at least {', '.join(_CAPS)} "
            f"(missing {', '.join(missing)})"
        )


def missing_capabilities() -> list[str]:
    """Capabilities from _CAPS that this process lacks (from /proc, never the user name)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return [name for name, bit in _CAPS.items() if not eff & (1 << bit)]
    except OSError:
        pass
    return [] if os.geteuid() == 0 else list(_CAPS)


class _QueuePath:
    """One queue index: its two sockets, its worker and the worker's thread."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.outer: B.Sock | None = None
        self.inner: B.Sock | None = None
        self.worker: B.Worker | None = None
        self.thread: threading.Thread | None = None
        self.exit_code: int | None = None
        self.tid: int | None = None  # the worker thread's, for its CPU time
        self.first_frame = 0
        self.nframes = 0


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.started_at = 0.0
        self.outer_ns = Netns(cfg.outer_netns)
        self.inner_ns = Netns(cfg.inner_netns)
        self.outer_dev: Device | None = None
        self.inner_dev: Device | None = None
        self.progs: dict[Role, XdpProgram] = {}
        self.umem: B.Umem | None = None
        self.paths: list[_QueuePath] = []
        self._undo: list[tuple[str, Callable[[], None], bool]] = []
        self._stats_lock = threading.Lock()
        self.fatal = threading.Event()
        self.fatal_reason = ""
        self.policy: Policy | None = None
        self.rules: RuleTable | None = None
        self.tcp: TcpStage | None = None
        self.fast: FastPath | None = None
        self.protect: ProtectMaps | None = None
        self.sampler: Sampler | None = None
        self.detector: Detector | None = None
        self.flowtab: B.FlowTab | None = None
        self.flows_restored = False
        self.challenge_tx = "XDP_TX"  # how challenges leave outer
        self.features: dict[str, features.Found] = {}
        self._loops_seen: list[int] | None = None  # the workers' loops at the last check
        self._stalled = False
        self._stopping = threading.Event()
        self._pins_are_new = False  # this start pins the first table of its state directory

    # ---- lifecycle ----

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            if self._pins_are_new and self.cfg.state_dir is not None:
                # A first start that failed leaves no pins: they hold nothing.
                with contextlib.suppress(OSError, XdpguardError):
                    forget(self.cfg.state_dir)
            raise
        self.started_at = time.time()

    def _push_undo(self, what: str, fn: Callable[[], None], loop_uses: bool = False) -> None:
        """``fn`` undoes ``what`` at stop(); ``loop_uses``: it frees memory a
        worker's loop reads (kept back if a worker did not stop)."""
        self._undo.append((what, fn, loop_uses))

    def _start(self) -> None:
        cfg = self.cfg
        require_capabilities()
        problem = B.abi_problem()
        if problem:
            raise XdpguardError(problem)
        if cfg.xdp_mode not in XDP_MODES:
            raise XdpguardError(f"unknown XDP mode {cfg.xdp_mode!r} (native or skb)")
        # What the kernel can do, found by trying: a missing required
        # feature refuses the start in one line; a missing optional one
        # takes its fallback, said once.
        self.features = features.detect_cached(features.check_without(cfg.without))
        features.require(self.features)
        load_flags = 0 if self.features["ktime_coarse"].used else B.CFG_NO_COARSE

        # One appliance per state directory, checked first: a second would
        # share the pinned flow table, the secret and the policy file.
        if cfg.state_dir is not None:
            check_private_dir(cfg.state_dir, "state directory")
            hold, state_dir = lock_state(cfg.state_dir), cfg.state_dir
            self._push_undo("let go of the state directory", lambda: unlock(state_dir, hold))
            self._pins_are_new = not any(pin_dir_for(state_dir).iterdir())

        self.outer_dev = resolve_device(self.outer_ns, cfg.outer)
        self.inner_dev = resolve_device(self.inner_ns, cfg.inner)
        if self.outer_dev.netns_cookie == self.inner_dev.netns_cookie and (
            self.outer_dev.ifindex == self.inner_dev.ifindex
        ):
            raise XdpguardError("--outer and --inner name the same device")
        nq = self._queue_count(self.outer_dev, self.inner_dev)
        for dev, ns in ((self.outer_dev, self.outer_ns), (self.inner_dev, self.inner_ns)):
            self._check_device(dev, ns)

        # The flow table first: both programs and the loop share it, and a
        # pinned one brings back every flow a restart would have cut. The
        # challenges' secret and verified sources are pinned beside it.
        self.flowtab, self.flows_restored = open_table(cfg.max_flows, cfg.state_dir)
        self._push_undo("close the flow table", self.flowtab.close, loop_uses=True)
        pin = pin_dir_for(cfg.state_dir) if cfg.state_dir is not None else None
        max_verified = verified_capacity(cfg.max_flows)
        pinned = open_pinned(pin, max_verified)
        try:
            outer = XdpProgram(
                Role.OUTER,
                cfg.bpf_object,
                flags=load_flags,
                shared=self.flowtab.fds() | pinned.fds,
                max_entries=verified_max_entries(max_verified) | {"xg_dests": cfg.max_dests},
            )
        finally:
            for fd in pinned.fds.values():
                os.close(fd)
        self.progs[Role.OUTER] = outer
        self._push_undo("unload outer program", outer.close)
        challenge_maps = {name: outer.map_fd(name) for name in PINNED}
        sample_maps = SampleMaps(outer)
        if pin is not None and not pinned.whole():
            pin_maps(pin, challenge_maps)
        # The inner program answers no challenge: its own tables of them stay small.
        inner = XdpProgram(
            Role.INNER,
            cfg.bpf_object,
            flags=load_flags,
            shared=self.flowtab.fds() | challenge_maps | sample_maps.shared(),
            max_entries=INNER_MAX_ENTRIES | INNER_SAMPLE_ENTRIES,
        )
        self.progs[Role.INNER] = inner
        self._push_undo("unload inner program", inner.close)

        # A restored table holds the flows already: nothing to adopt.
        learn = 0.0 if self.flows_restored else cfg.learn
        challenges = Challenges(outer, "xg_secret" in pinned.fds)
        self.tcp = TcpStage(cfg.max_flows, learn, challenges, self.flowtab)
        self._push_undo("free the TCP stage", self.tcp.close, loop_uses=True)
        if self.flows_restored:
            n = self.tcp.flows(0)["tracked"]
            log.info("flow table restored: %d flow(s), no learning window", n)
        if pinned.carried:
            challenges.verified_carry(pinned.carried)
        if pinned.fds:
            n = self.tcp.verified()["count"]
            log.info("challenges: secret and %d verified source(s) restored from %s", n, pin)
        if cfg.state_dir is not None:
            # Sources that answered a challenge before a reboot need not again.
            verified_file = cfg.state_dir / "verified.json"
            if not pinned.fds:
                n = self.tcp.load_verified(verified_file)
                if n:
                    log.info("tcp: %d verified source(s) restored from %s", n, verified_file)
            self._push_undo("save verified sources", lambda: self._save_verified(verified_file))

        # The policy is in the maps before the program sees a packet.
        maps = PolicyMaps(self.progs[Role.OUTER])
        self._push_undo("close policy maps", maps.close)
        self.protect = ProtectMaps(outer, maps.set_protect_bits, cfg.max_dests)
        self.sampler = Sampler(sample_maps, self.protect, self._rule_text)
        self.policy = Policy(
            maps,
            cfg.state_dir,
            tcp=self.tcp,
            tcp_initial=cfg.tcp_initial,
            protect=self.protect,
            sampler=self.sampler,
        )
        restored = self.policy.restore()
        log.info(
            "policy: blocklist %d+%d, allowlist %d+%d prefixes (v4+v6), %d UDP source ports, "
            "fragments %s%s",
            restored["block"]["v4"],
            restored["block"]["v6"],
            restored["allow"]["v4"],
            restored["allow"]["v6"],
            len(restored["ports"]),
            restored["frags"],
            f", state {restored['state_file']}" if restored["state_file"] else "",
        )

        rule_maps = RuleMaps(self.progs[Role.OUTER], maps)
        self._push_undo("close rule maps", rule_maps.close)
        self.rules = RuleTable(rule_maps, cfg.state_dir)
        had = self.rules.restore()
        log.info("rules: %d local rule(s), %d rate limit(s)", had["rules"], had["ratelimits"])

        self.detector = Detector(self.protect, self.sampler, self.rules, cfg.state_dir)
        self.detector.configure(self.policy.detect_settings)
        self.policy.detector = self.detector
        self.sampler.detector = self.detector
        self._push_undo("save what the detector learned", self.detector.stop)
        self.sampler.start()
        self._push_undo("stop the sampler", self.sampler.stop)

        self.umem = B.Umem(nq * cfg.frames_per_queue, cfg.frame_size, cfg.ring_size)
        self._push_undo("free UMEM", self.umem.close, loop_uses=True)

        for q in range(nq):
            self._build_queue(q)

        for q in self.paths:
            thread = threading.Thread(
                target=self._run_worker, args=(q,), name=f"xg-worker-{q.queue}", daemon=True
            )
            q.thread = thread
            thread.start()
        self._push_undo("stop workers", self._stop_workers)

        # The origin's side first, so replies have a path before requests.
        for role, dev, ns in (
            (Role.INNER, self.inner_dev, self.inner_ns),
            (Role.OUTER, self.outer_dev, self.outer_ns),
        ):
            prog = self.progs[role]
            prog.attach(ns, dev, cfg.xdp_mode)
            self._push_undo(f"detach XDP from {dev.name}", prog.detach)
        # A veth flushes what XDP_TX queued to its peer only if the peer runs
        # an XDP program: challenges to a plain host behind one would wait
        # for its next frame. They leave by a redirect to outer itself then.
        if self.outer_dev.kind == "veth":
            self.outer_ns.run(
                B.map_update,
                outer.map_fd("xg_self"),
                struct.pack("=I", 0),
                struct.pack("=I", self.outer_dev.ifindex),
            )
            self.challenge_tx = "redirect to itself"
        redirect = self.features["devmap_redirect"]
        self.fast = FastPath(
            self.progs,
            {
                Role.OUTER: (self.outer_dev, self.outer_ns),
                Role.INNER: (self.inner_dev, self.inner_ns),
            },
            None
            if redirect.used
            else (
                "turned off (--without devmap_redirect)"
                if redirect.forced_off
                else f"the kernel cannot redirect between devices in XDP ({redirect.how})"
            ),
        )
        self.fast.start(cfg.fast_path and not cfg.no_policy, self.tcp.fast_tcp_allowed())
        chores = threading.Thread(target=self._chores, name="xg-chores", daemon=True)
        chores.start()
        self._push_undo("stop housekeeping", lambda: (self._stopping.set(), chores.join(2)))
        log.info(
            "forwarding %s (netns %s) <-> %s (netns %s): %d queue(s), XDP %s",
            self.outer_dev.name,
            self.outer_ns.label,
            self.inner_dev.name,
            self.inner_ns.label,
            nq,
            cfg.xdp_mode,
        )

    def _queue_count(self, outer: Device, inner: Device) -> int:
        if outer.queues != inner.queues:
            raise XdpguardError(
                f"queue count mismatch: {outer.name} has {outer.queues} queue(s), "
                f"{inner.name} has {inner.queues}; create both with the same "
                "numrxqueues/numtxqueues"
            )
        want = self.cfg.queues
        if want is None:
            want = outer.queues
        if not 1 <= want <= outer.queues:
            raise XdpguardError(
                f"queue count mismatch: --queues {want}, but {outer.name} and {inner.name} "
                f"have {outer.queues} queue(s)"
            )
        if want > B.MAX_QUEUES:
            raise XdpguardError(f"at most {B.MAX_QUEUES} queues are supported, not {want}")
        if want < outer.queues:
            log.warning(
                "queues %d..%d have no worker: frames arriving there are dropped "
                "(counted as no_socket)",
                want,
                outer.queues - 1,
            )
        return want

    def _check_device(self, dev: Device, ns: Netns) -> None:
        if dev.xdp_prog_id:
            raise XdpguardError(occupied(ns, dev, dev.xdp_prog_id, dev.xdp_mode))
        room = self.cfg.frame_size - _XDP_PACKET_HEADROOM - _MAX_L2_OVERHEAD - _WORD
        if dev.mtu > room:
            raise XdpguardError(
                f"{dev.name} has MTU {dev.mtu}, more than an AF_XDP frame carries ({room})"
            )
        if not dev.up:
            log.warning("%s (netns %s) is down: nothing will arrive on it", dev.name, ns.label)

    def _build_queue(self, q: int) -> None:
        cfg = self.cfg
        assert self.umem is not None
        path = _QueuePath(q)
        self.paths.append(path)
        path.first_frame = q * cfg.frames_per_queue
        path.nframes = cfg.frames_per_queue
        # need_wakeup is a property of the UMEM's first socket; later ones
        # inherit it. Without it, the loop kicks whenever a TX ring holds frames.
        wakeup = self.features["af_xdp_need_wakeup"].used
        flags = B.XDP_USE_NEED_WAKEUP if q == 0 and wakeup else 0
        for role, ns, dev in (
            (Role.OUTER, self.outer_ns, self.outer_dev),
            (Role.INNER, self.inner_ns, self.inner_dev),
        ):
            assert dev is not None
            try:
                sock = ns.run(B.Sock, self.umem, dev.name, q, cfg.ring_size, flags, int(role))
            except OSError as exc:
                raise XdpguardError(
                    f"cannot create AF_XDP socket on {dev.name} queue {q}: {exc.strerror}"
                ) from exc
            flags = 0
            setattr(path, role.name.lower(), sock)
            self._push_undo(f"close socket {dev.name}/{q}", sock.close, loop_uses=True)
            self.progs[role].set_socket(q, sock.info()["fd"])
        assert path.outer is not None and path.inner is not None
        path.worker = B.Worker(
            self.umem,
            path.outer,
            path.inner,
            path.first_frame,
            path.nframes,
            B.WORKER_NO_POLICY if cfg.no_policy else 0,
        )
        self._push_undo(f"free worker {q}", path.worker.close, loop_uses=True)
        path.worker.set_tcp(self.tcp.tcp if self.tcp else None)

    def _rule_text(self, reason: int, rule: int) -> str | None:
        """A sample's rule (struct xg_sample.rule, 1 + slot or id) as text."""
        if self.rules is None or not rule:
            return None
        return self.rules.hit_text(reason == Reason.source_rate_limited, rule - 1)

    def _save_verified(self, path: Path) -> None:
        # Only once the appliance ran: a failed start saves nothing.
        if self.tcp is not None and self.started_at:
            self.tcp.save_verified(path)

    def fail(self, reason: str) -> None:
        """The appliance cannot go on: the first reason is the one reported."""
        if not self.fatal.is_set():
            self.fatal_reason = reason
            self.fatal.set()

    def _chores(self) -> None:
        """Housekeeping, one step after another, each on its own period: TTL
        expiry, the TCP stage's clock, saving a state that could not be saved,
        and watching the devices. A step that fails is logged (once per
        distinct error) and tried again next time; it never stops the others."""
        assert self.policy is not None
        policy = self.policy
        steps: list[tuple[str, float, Callable[[], object]]] = [
            ("TTL expiry", self.cfg.expiry_interval, self._expire),
            ("TCP clock", self.cfg.expiry_interval, self.tcp.tick if self.tcp else lambda: None),
            ("flow quotas", 1.0, self.tcp.enforce_quotas if self.tcp else lambda: None),
            ("saving the policy", 5.0, policy.save_if_behind),
            ("rule leases", self.cfg.expiry_interval, self._expire_rules),
            ("saving the rules", 5.0, self._save_rules),
            ("device watch", 1.0, self._watch_devices),
            ("fast path watch", 1.0, self._watch_fast_path),
        ]
        watchdog = watchdog_seconds()
        if watchdog:
            # Twice per timeout, as systemd asks; a stuck worker stops the pings.
            steps.append(("watchdog", watchdog / 2, self._watchdog))
        due = [0.0] * len(steps)
        failing: dict[str, str] = {}
        while not self._stopping.wait(self.cfg.expiry_interval):
            for i, (name, period, step) in enumerate(steps):
                now = time.monotonic()
                if now < due[i]:
                    continue
                due[i] = now + period
                try:
                    step()
                except Exception as exc:  # keep house: the next step, the next round
                    why = str(exc) or type(exc).__name__
                    if failing.get(name) != why:
                        log.error("housekeeping: %s failed: %s (will retry)", name, why)
                        failing[name] = why
                else:
                    if failing.pop(name, None) is not None:
                        log.info("housekeeping: %s works again", name)

    def workers_progressing(self) -> bool:
        """Has every worker gone round its loop since the last call? (An idle
        worker goes round too: it wakes from poll() every XG_IDLE_POLL_MS.)"""
        loops = [p.worker.stats()["loops"] if p.worker else 0 for p in self.paths]
        seen, self._loops_seen = self._loops_seen, loops
        stuck = [
            p.queue for p, a, b in zip(self.paths, loops, seen or loops, strict=True) if a <= b
        ]
        if seen is not None and stuck:
            if not self._stalled:
                log.error("worker(s) of queue(s) %s made no progress: no watchdog ping", stuck)
            self._stalled = True
            return False
        if self._stalled:
            log.info("every worker makes progress again")
        self._stalled = False
        return True

    def _watchdog(self) -> None:
        if self.workers_progressing():
            sd_notify("WATCHDOG=1")

    def _watch_fast_path(self) -> None:
        if self.fast is not None and self.tcp is not None:
            # The learning window closes by itself: TCP may go fast then.
            self.fast.set_tcp(self.tcp.fast_tcp_allowed())
            self.fast.watch()

    def _expire_rules(self) -> None:
        if self.rules is not None:
            self.rules.expire()

    def _save_rules(self) -> None:
        if self.rules is not None:
            self.rules.save_if_behind()

    def _expire(self) -> None:
        assert self.policy is not None
        n = self.policy.expire()
        if n:
            log.info("TTL expiry: %d prefix(es) removed", n)

    def _watch_devices(self) -> None:
        """The links still hold (else fatal), and the MTUs: a device's MTU raised
        past what a UMEM frame carries makes its big frames vanish at the
        socket, so that is said once, and status shows the MTU of now."""
        self._check_links()
        room = self.cfg.frame_size - _XDP_PACKET_HEADROOM - _MAX_L2_OVERHEAD
        for attr, ns in (("outer_dev", self.outer_ns), ("inner_dev", self.inner_ns)):
            dev: Device | None = getattr(self, attr)
            if dev is None:
                continue
            now = resolve_device(ns, dev.name)
            if now.mtu == dev.mtu:
                continue
            setattr(self, attr, dataclasses.replace(dev, mtu=now.mtu))
            if now.mtu > room:
                log.error(
                    "%s (netns %s): MTU changed %d -> %d; frames longer than %d bytes are "
                    "dropped (counted in the sockets' rx_dropped); lower the MTU or restart "
                    "with a bigger frame",
                    dev.name,
                    ns.label,
                    dev.mtu,
                    now.mtu,
                    room + _MAX_L2_OVERHEAD,
                )
            else:
                log.info(
                    "%s (netns %s): MTU changed %d -> %d", dev.name, ns.label, dev.mtu, now.mtu
                )

    def _check_links(self) -> None:
        # Without its program a device forwards nothing through xdpguard;
        # carrying on would look healthy while the service is down.
        for role, ns in ((Role.OUTER, self.outer_ns), (Role.INNER, self.inner_ns)):
            prog = self.progs.get(role)
            if prog is None or prog.device is None:
                continue
            try:
                attached = prog.still_attached()
            except OSError as exc:
                attached, why = False, exc.strerror
            else:
                why = "device deleted or moved to another namespace, or link detached"
            if not attached:
                self.fail(
                    f"the XDP program on {prog.device.name} (netns {ns.label}) is gone ({why})"
                )

    def _run_worker(self, path: _QueuePath) -> None:
        assert path.worker is not None
        path.tid = threading.get_native_id()
        rc = path.worker.run()
        path.exit_code = rc
        if rc < 0:
            role = Role(path.worker.stats()["error_role"])
            dev = self.outer_dev if role == Role.OUTER else self.inner_dev
            ns = self.outer_ns if role == Role.OUTER else self.inner_ns
            name = dev.name if dev else role.name.lower()
            self.fail(
                f"worker {path.queue} stopped: the AF_XDP socket on {name} (netns {ns.label}) "
                f"queue {path.queue} failed: {os.strerror(-rc)}"
            )

    def _stop_workers(self) -> None:
        for path in self.paths:
            if path.worker is not None:
                path.worker.stop()
        for path in self.paths:
            if path.thread is not None:
                path.thread.join(timeout=5)
                if path.thread.is_alive():
                    raise RuntimeError(f"worker {path.queue} did not stop")
                path.thread = None

    def stop(self) -> None:
        """Undo everything start() did, newest first; safe to call twice."""
        while self._undo:
            what, fn, _ = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # keep tearing down: each step is independent
                log.error("teardown: %s failed: %s", what, exc)
                if what == "stop workers":
                    # Freeing memory a running loop still uses would be worse
                    # than leaking it: those steps are kept back (the
                    # process' exit frees it); every other one still runs:
                    # the verified sources are saved, the state directory
                    # let go.
                    kept = [w for w, _, loop_uses in self._undo if loop_uses]
                    log.error("teardown: kept back, a worker may still use it: %s",
                              ", ".join(kept))  # fmt: skip
                    self._undo = [u for u in self._undo if not u[2]]

    # ---- control ----

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The control socket's commands (control.COMMANDS) served by this engine.

        Arguments arrive checked against the command's declared types and
        ranges (absent ones as None); the policy checks their meaning."""

        def policy() -> Policy:
            if self.policy is None:
                raise XdpguardError("xdpguard is starting")
            return self.policy

        def rules() -> RuleTable:
            if self.rules is None:
                raise XdpguardError("xdpguard is starting")
            return self.rules

        def tcp() -> TcpStage:
            if self.tcp is None:
                raise XdpguardError("xdpguard is starting")
            return self.tcp

        def fast() -> FastPath:
            if self.fast is None:
                raise XdpguardError("xdpguard is starting")
            return self.fast

        def sampler() -> Sampler:
            if self.sampler is None:
                raise XdpguardError("xdpguard is starting")
            return self.sampler

        def detector() -> Detector:
            if self.detector is None:
                raise XdpguardError("xdpguard is starting")
            return self.detector

        def protect_list() -> dict[str, Any]:
            out = policy().protect_list()
            if self.protect is not None:
                out["addresses"] = self.protect.occupancy()
            return out

        def tcp_changed(result: Any) -> Any:
            # Monitor mode and learning keep TCP off the fast path, at once.
            if self.fast is not None and self.tcp is not None:
                self.fast.set_tcp(self.tcp.fast_tcp_allowed())
            return result

        def given(a: dict[str, Any], *skip: str) -> dict[str, Any]:
            return {k: v for k, v in a.items() if v is not None and k not in skip}

        h: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": lambda a: self.status(),
            "stats": lambda a: self.stats(),
            "ports.add": lambda a: policy().ports_add(a["ports"] or [], a["preset"]),
            "ports.del": lambda a: policy().ports_del(a["ports"]),
            "ports.list": lambda a: policy().ports_list(),
            "l2.allow": lambda a: policy().l2_allow(a["ethertypes"]),
            "l2.del": lambda a: policy().l2_del(a["ethertypes"]),
            "l2.list": lambda a: policy().l2_list(),
            "protect.add": lambda a: policy().protect_add(
                a["prefixes"], a["name"], a["mode"], a["pps"], a["bps"]
            ),
            "protect.config": lambda a: policy().detect_config(a),
            "attacks": lambda a: detector().attacks(),
            "protect.del": lambda a: policy().protect_del(a["prefixes"]),
            "protect.list": lambda a: protect_list(),
            "sample.set": lambda a: policy().sample_set(
                a["every"], a["cap"], a["drops"], a["forwarded"]
            ),
            "sample.get": lambda a: policy().sample_get(),
            "capture.start": lambda a: sampler().capture_start(
                a["reasons"], a["direction"], bool(a["before"])
            ),
            "capture.read": lambda a: sampler().capture_read(
                a["id"], a["max"] or 1000, 1.0 if a["wait"] is None else a["wait"]
            ),
            "capture.stop": lambda a: sampler().capture_stop(a["id"]),
            "top": lambda a: sampler().top(a["by"] or "src", a["reason"], a["n"] or 10),
            "frags.set": lambda a: policy().frags_set(a["policy"]),
            "frags.get": lambda a: policy().frags_get(),
            "tcp.mode": lambda a: tcp_changed(
                policy().tcp_set({"syn_mode": a["mode"], "state_mode": a["mode"]})
            ),
            "tcp.config": lambda a: tcp_changed(policy().tcp_set(given(a, "learn"), a["learn"])),
            "fastpath.set": lambda a: fast().set(a["mode"] == "on"),
            "fastpath.get": lambda a: fast().status(),
            "tcp.flows": lambda a: tcp().flows(10 if a["top"] is None else a["top"]),
            "tcp.verified.list": lambda a: tcp().verified(),
            "tcp.verified.clear": lambda a: tcp().verified_clear(),
            "rule.add": lambda a: rules().add(a["rules"], a["comment"], bool(a["force"])),
            "rule.del": lambda a: rules().delete(a["rules"], a["source"]),
            "rule.list": lambda a: rules().entries_of(a["source"]),
            "rule.load": lambda a: rules().load(
                _rule_file(a), bool(a["replace"]), bool(a["force"])
            ),
            "rule.clear": lambda a: rules().clear(a["source"]),
            "rule.update": lambda a: rules().update(
                a["source"],
                a["announce"] or [],
                a["withdraw"] or [],
                a["hold"],
                bool(a["partial"]),
            ),
            "rule.session": lambda a: rules().session(a["source"], a["state"], a["hold"]),
            "ratelimit.add": lambda a: rules().limit_add(
                a["prefixes"],
                a["pps"],
                a["bps"],
                bool(a["per_source"]),
                a["comment"],
                bool(a["force"]),
            ),
            "ratelimit.del": lambda a: rules().limit_del(a["prefixes"]),
            "ratelimit.list": lambda a: rules().limit_entries(),
        }
        for lst in ("block", "allow"):
            h[f"{lst}.add"] = lambda a, lst=lst: policy().list_add(
                lst, a["prefixes"], a["ttl"], a["comment"], bool(a["force"])
            )
            h[f"{lst}.del"] = lambda a, lst=lst: policy().list_del(lst, a["prefixes"])
            h[f"{lst}.list"] = lambda a, lst=lst: policy().list_entries(lst)
            h[f"{lst}.load"] = lambda a, lst=lst: policy().list_load(
                lst, _list_file(a), bool(a["replace"]), bool(a["force"])
            )
            h[f"{lst}.clear"] = lambda a, lst=lst: policy().list_clear(lst)
        return h

    # ---- reading ----

    def status(self) -> dict[str, Any]:
        assert self.outer_dev and self.inner_dev and self.umem
        devices = {}
        for role, dev, ns in (
            (Role.OUTER, self.outer_dev, self.outer_ns),
            (Role.INNER, self.inner_dev, self.inner_ns),
        ):
            prog_id, mode = ns.run(B.xdp_query, dev.ifindex)
            devices[role.name.lower()] = {
                "name": dev.name,
                "netns": ns.label,
                "netns_cookie": dev.netns_cookie,
                "ifindex": dev.ifindex,
                "kind": dev.kind,
                "mac": dev.mac,
                "mtu": dev.mtu,
                "mtu_max": self.cfg.frame_size - _XDP_PACKET_HEADROOM - _MAX_L2_OVERHEAD - _WORD,
                "queues": dev.queues,
                "xdp": {"prog_id": prog_id, "mode": mode, "requested": self.cfg.xdp_mode},
            }
        sockets = []
        for path in self.paths:
            for role in ("outer", "inner"):
                sock: B.Sock = getattr(path, role)
                info = sock.info()
                sockets.append(
                    {
                        "device": role,
                        "ifname": info["ifname"],
                        "queue": info["queue"],
                        "ifindex": info["ifindex"],
                        "netns_cookie": info["netns_cookie"],
                        "fd": info["fd"],
                        "mode": "zerocopy" if info["zerocopy"] else "copy",
                        "need_wakeup": bool(info["need_wakeup"]),
                    }
                )
        return {
            "version": __version__,
            "pid": os.getpid(),
            "challenges_leave_by": self.challenge_tx,
            "policy": self.policy.summary() if self.policy else None,
            "rules": self.rules.summary() if self.rules else None,
            "uptime": round(time.time() - self.started_at, 3),
            "devices": devices,
            "queues": len(self.paths),
            "umem": {
                "frames": self.umem.nframes,
                "frame_size": self.umem.frame_size,
                "bytes": self.umem.nframes * self.umem.frame_size,
                "sockets": len(sockets),
            },
            "sockets": sockets,
            "fast_path": self.fast.status() if self.fast else None,
            # The kernel features done without, and the fallback each takes.
            "fallbacks": {f.name: f.without for f in self.features.values() if not f.used},
            "flow_table": {
                "buckets": self.flowtab.nbuckets if self.flowtab else 0,
                "pinned": str(pin_dir_for(self.cfg.state_dir)) if self.cfg.state_dir else None,
                "restored": self.flows_restored,
            },
            "workers": [
                {
                    "queue": p.queue,
                    "running": p.thread is not None and p.thread.is_alive(),
                    "tid": p.tid,  # for taskset, perf, top -H
                    "frames": [p.first_frame, p.first_frame + p.nframes],
                }
                for p in self.paths
            ],
        }

    def stats(self, account: bool = True) -> dict[str, Any]:
        """Counters per reason, per direction and per queue (cumulative)."""
        with self._stats_lock:
            return self._stats(account)

    def _stats(self, account: bool) -> dict[str, Any]:
        shape = (max(Reason) + 1, 2)
        xdp = {d: np.zeros(shape, dtype=np.uint64) for d in Direction}
        loop = {d: np.zeros(shape, dtype=np.uint64) for d in Direction}
        for role, prog in self.progs.items():
            xdp[ROLE_DIRECTION[role]] += prog.reason_counters()

        queues = []
        totals = {d: dict.fromkeys(_DIR_FIELDS, 0) for d in Direction}
        monitor = (
            self.tcp.challenges.monitor_counters()
            if self.tcp is not None
            else np.zeros((max(Reason) + 1, 2), dtype=np.uint64)
        )
        accounts: list[dict[str, Any]] = []
        for path in self.paths:
            assert path.worker and path.outer and path.inner
            ws = path.worker.stats()
            entry: dict[str, Any] = {"queue": path.queue}
            for d in Direction:
                dstats = ws["dir"][d]
                entry[d.label] = dstats
                for k in _DIR_FIELDS:
                    totals[d][k] += dstats[k]
            # The loop judges frames from outside only: its verdicts are the
            # "in" direction's, after XDP's.
            for r in Reason:
                for into, counts in (
                    (loop[Direction.IN], ws["reasons"]),
                    (monitor, ws["monitor"]),
                ):
                    into[r] += np.array((counts[r]["packets"], counts[r]["bytes"]), dtype=np.uint64)
            entry["loops"] = ws["loops"]
            entry["polls"] = ws["polls"]
            entry["tx_down"] = ws["tx_down"]
            entry["xsk"] = {
                "outer": path.outer.kernel_stats(),
                "inner": path.inner.kernel_stats(),
            }
            if account:
                acct = path.worker.account()
                acct.pop("pad", None)
                acct["consistent"] = bool(acct["consistent"])
                entry["frames"] = acct
                accounts.append(acct)
            queues.append(entry)

        def named(arr: np.ndarray, which: Any = Reason) -> dict[str, dict[str, int]]:
            return {
                r.name: {"packets": int(arr[r, 0]), "bytes": int(arr[r, 1])}
                for r in Reason
                if r in which
            }

        reasons = {d: xdp[d] + loop[d] for d in Direction}
        total = reasons[Direction.IN] + reasons[Direction.OUT]
        out: dict[str, Any] = {
            "time": time.time(),
            "uptime": round(time.time() - self.started_at, 3),
            "reasons": named(total),
            # Per direction: both stages' verdicts together, and each stage's
            # own (XDP judges every frame once; the loop some of them again).
            "directions": {
                d.label: {
                    "reasons": named(reasons[d]),
                    "xdp": named(xdp[d], XDP_REASONS),
                    "loop": named(loop[d], LOOP_REASONS),
                    **totals[d],
                }
                for d in Direction
            },
            # What monitor mode (or auto below its threshold) let through but
            # would have dropped or challenged.
            "monitor": {name: v for name, v in named(monitor).items() if v["packets"]},
            # Answered by XDP itself (XDP_TX), never in the UMEM.
            "challenges": {"sent": int(xdp[Direction.IN][Reason.syn_challenged, 0])},
            "queues": queues,
        }
        if account:
            frames: dict[str, Any] = {
                k: sum(a[k] for a in accounts) for k in accounts[0] if k != "consistent"
            }
            frames["consistent"] = all(a["consistent"] for a in accounts)
            out["frames"] = frames
        return out


# A rule file: XG_RULES_MAX rules of a few hundred bytes each, with room.
MAX_RULE_FILE = 16 << 20


def _rule_file(args: dict[str, Any]) -> str:
    """The text of a rule load: the client's open file, or its text."""
    if args["file"] is not None:
        if args["text"] is not None:
            raise XdpguardError("give a file or its text, not both")
        try:
            data = args["file"].read(MAX_RULE_FILE + 1)
        except OSError as exc:
            raise XdpguardError(f"cannot read the file: {exc.strerror}") from None
        if len(data) > MAX_RULE_FILE:
            raise XdpguardError(f"more than {MAX_RULE_FILE >> 20} MiB: not a rule file")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise XdpguardError("the file is not UTF-8 text") from None
    if args["text"] is None:
        raise XdpguardError("no file and no text given")
    return str(args["text"])


def _list_file(args: dict[str, Any]) -> Prefixes:
    """The prefixes of a list load: read from the client's open file, or its text.
    Parsed before any lock is taken: a slow or huge file holds up nothing."""
    if args["file"] is not None:
        if args["text"] is not None:
            raise XdpguardError("give a file or its text, not both")
        try:
            return parse_lines(read_lines(args["file"]))
        except OSError as exc:
            raise XdpguardError(f"cannot read the file: {exc.strerror}") from None
    if args["text"] is None:
        raise XdpguardError("no file and no text given")
    return parse_text(args["text"])


_DIR_FIELDS = (
    "rx_packets",
    "rx_bytes",
    "tx_packets",
    "tx_bytes",
    "tx_ring_full",
    "dropped",
    "tx_wakeups",
    "fill_wakeups",
    "fill_short",
    "completions",
)
