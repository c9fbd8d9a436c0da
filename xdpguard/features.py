"""What the running kernel can do, found by trying it, and what xdpguard does without it.

Every kernel feature xdpguard uses is in FEATURES, with how it is probed
and its fallback (or "required"). A probe loads a small program
(bpf/xg_probe.bpf.o), makes a map, or makes sockets, links and real
traffic in a network namespace of its own that nothing outlives
(ProbeLab): never ``bpftool feature probe``, which has listed helpers the
verifier then refused, and never the kernel's version, which distributions
backport to.

A feature with a fallback can also be turned off on a kernel that has it
(``xdpguard run --without NAME``, the settings file's ``without``), so that
every fallback runs in the tests on every kernel.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError
from xdpguard.netns import Netns

log = logging.getLogger("xdpguard")

_PKG_DIR = Path(__file__).resolve().parent
_PROBE_OBJECTS = (_PKG_DIR / "xg_probe.bpf.o", _PKG_DIR.parent / "bpf" / "xg_probe.bpf.o")

# enum bpf_map_type, and the map flags the product uses
_MAP = {
    "array": 2,
    "percpu_array": 6,
    "lpm_trie": 11,
    "array_of_maps": 12,
    "devmap": 14,
    "xskmap": 17,
    "lru_hash": 9,
    "lru_percpu_hash": 10,
    "bloom_filter": 30,
}
_BPF_F_NO_PREALLOC, _BPF_F_MMAPABLE = 1, 1 << 10

# A frame nobody listens to (IEEE local experimental ethertype), broadcast.
PROBE_FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"xdpguard probe".ljust(46)


def probe_object() -> Path:
    for path in _PROBE_OBJECTS:
        if path.is_file():
            return path
    raise XdpguardError(
        f"probe object not found (looked for {_PROBE_OBJECTS[-1]}); run 'make build'"
    )


def why_refused(exc: OSError) -> str:
    """The verifier's or libbpf's own words for the load that just failed."""
    return why_refused_text(B.libbpf_log(), exc)


def why_refused_text(said: str, exc: OSError) -> str:
    """The line of libbpf's text ``said`` that says why a load failed: the
    verifier's last words, else libbpf's, else the errno."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    verifier = [
        line
        for line in lines
        if not line.startswith(("libbpf:", ";", "-- BEGIN", "-- END", "processed", "R"))
        and not line[:1].isdigit()
    ]
    if verifier:
        return verifier[-1]
    for line in reversed(lines):
        if line.startswith("libbpf:") and "failed to load" not in line:
            return line.removeprefix("libbpf: ")
    return exc.strerror or str(exc)


class ProbeLab:
    """A namespace of the probe's own with veth pairs in it, for probes that
    need devices, sockets and real frames. Everything in it goes with it."""

    def __init__(self) -> None:
        self.ns = Netns.private("probe")
        self._progs: list[B.Prog] = []

    def veth(self, a: str, b: str) -> None:
        def body() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname=a, kind="veth", peer=b)
                for name in (a, b):
                    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")

        self.ns.run(body)

    def ifindex(self, name: str) -> int:
        def body() -> int:
            with IPRoute() as ipr:
                return int(ipr.link_lookup(ifname=name)[0])

        return self.ns.run(body)

    def attach(self, program: str, dev: str) -> B.Prog:
        """Load ``program`` of the probe object and attach it (native, a BPF link) to ``dev``."""
        prog = B.Prog(str(probe_object()), program)
        self._progs.append(prog)
        self.ns.run(prog.attach, self.ifindex(dev), B.XDP_FLAGS_DRV_MODE)
        return prog

    def send(self, dev: str, frame: bytes, count: int) -> None:
        """``count`` copies of ``frame`` sent out of ``dev`` through a packet socket."""

        def body() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
                s.bind((dev, 0))
                for _ in range(count):
                    s.send(frame)

        self.ns.run(body)

    def close(self) -> None:
        for prog in self._progs:
            prog.close()
        self._progs.clear()
        self.ns.close()


@contextmanager
def probe_lab() -> Iterator[ProbeLab]:
    lab = ProbeLab()
    try:
        yield lab
    finally:
        lab.close()


def redirect_reaches(
    lab: ProbeLab, target_ns: Netns, target: str, target_ifindex: int, frames: int = 4
) -> tuple[int, int] | None:
    """Send ``frames`` real frames through a veth pair of ``lab`` whose XDP
    program redirects them (a DEVMAP written from the target's namespace)
    to ``target``: (frames the target took, frames it refused), by its
    own counters; None if its driver does not count them."""
    lab.veth("xgp0", "xgp1")
    prog = lab.attach("xg_probe_fwd", "xgp1")
    target_ns.run(
        B.map_update,
        prog.map_fd("xg_probe_to"),
        (0).to_bytes(4, "little"),
        target_ifindex.to_bytes(4, "little"),
    )
    before = target_ns.run(B.dev_xdp_xmit, target)
    if before is None:
        return None
    lab.send("xgp0", PROBE_FRAME, frames)
    # NAPI runs the redirect a moment after the send returns.
    deadline = time.monotonic() + 1.0
    while True:
        after = target_ns.run(B.dev_xdp_xmit, target)
        assert after is not None
        took, refused = after[0] - before[0], after[1] - before[1]
        if took + refused >= frames or time.monotonic() > deadline:
            return took, refused
        time.sleep(0.01)


# ---- the probes: (has it, how that was found) ----

Probe = Callable[["Probing"], tuple[bool, str]]


class Probing:
    """One run of the probes: the probe lab is made once, when a probe needs it."""

    def __init__(self) -> None:
        self._lab: ProbeLab | None = None
        self.cache: dict[str, Any] = {}

    @property
    def lab(self) -> ProbeLab:
        if self._lab is None:
            self._lab = ProbeLab()
        return self._lab

    def close(self) -> None:
        if self._lab is not None:
            self._lab.close()
            self._lab = None


def _program(name: str, uses: str) -> Probe:
    def probe(_: Probing) -> tuple[bool, str]:
        B.libbpf_log()  # what came before is not this probe's
        try:
            B.Prog(str(probe_object()), name).close()
        except OSError as exc:
            return False, f"a program using {uses} was refused: {why_refused(exc)}"
        return True, f"a program using {uses} loaded"

    return probe


def _map(kind: str, key: int, value: int, flags: int = 0, extra: int = 0) -> Probe:
    def probe(_: Probing) -> tuple[bool, str]:
        what = f"a BPF_MAP_TYPE_{kind.upper()} map" + (
            " (BPF_F_MMAPABLE)" if flags == _BPF_F_MMAPABLE else ""
        )
        try:
            B.map_probe(_MAP[kind], key, value, 1 if kind != "bloom_filter" else 64, flags, extra)
        except OSError as exc:
            return False, f"{what} was refused ({exc.strerror})"
        return True, f"{what} was made"

    return probe


def _map_of_maps(p: Probing) -> tuple[bool, str]:
    import os

    try:
        inner = B.lpm_create(False)
    except OSError as exc:
        return False, f"its inner map, an LPM trie, was refused ({exc.strerror})"
    try:
        B.map_probe(_MAP["array_of_maps"], 4, 4, 2, 0, 0, inner)
    except OSError as exc:
        return False, f"a BPF_MAP_TYPE_ARRAY_OF_MAPS of LPM tries was refused ({exc.strerror})"
    finally:
        os.close(inner)
    return True, "a BPF_MAP_TYPE_ARRAY_OF_MAPS of LPM tries was made"


def _xdp_link(p: Probing) -> tuple[bool, str]:
    try:
        p.lab.veth("xgl0", "xgl1")
        p.lab.attach("xg_probe_pass", "xgl1")
    except OSError as exc:
        return (
            False,
            f"attaching a program natively to a veth with a BPF link failed ({exc.strerror})",
        )
    return True, "a program attached natively to a veth with a BPF link"


def _af_xdp(p: Probing, need_wakeup: bool) -> tuple[bool, str]:
    key = f"af_xdp:{need_wakeup}"
    if key in p.cache:
        return p.cache[key]
    flags = B.XDP_COPY | (B.XDP_USE_NEED_WAKEUP if need_wakeup else 0)
    umem = None
    socks: list[Any] = []
    try:
        a, b = ("xgw0", "xgw1") if need_wakeup else ("xgs0", "xgs1")
        p.lab.veth(a, b)
        umem = B.Umem(4096, 2048, 1024)
        socks.append(p.lab.ns.run(B.Sock, umem, a, 0, 1024, flags, int(B.ROLE_OUTER)))
        socks.append(p.lab.ns.run(B.Sock, umem, b, 0, 1024, 0, int(B.ROLE_INNER)))
        out = (
            True,
            (
                f"AF_XDP sockets in copy mode{' with need_wakeup' if need_wakeup else ''} "
                "on two veths shared one UMEM"
            ),
        )
    except OSError as exc:
        out = False, f"binding AF_XDP sockets sharing a UMEM failed ({exc.strerror})"
    finally:
        for s in socks:
            s.close()
        if umem is not None:
            umem.close()
    p.cache[key] = out
    return out


def _devmap_redirect(p: Probing) -> tuple[bool, str]:
    try:
        p.lab.veth("xgt0", "xgt1")
        p.lab.attach("xg_probe_pass", "xgt1")  # NAPI at the target's peer
        got = redirect_reaches(p.lab, p.lab.ns, "xgt0", p.lab.ifindex("xgt0"))
    except OSError as exc:
        return False, f"the probe could not run ({exc.strerror})"
    if got is None:
        return False, "the probe's veth counts no XDP transmits"
    took, refused = got
    if took:
        return True, f"{took} real frames redirected by XDP through a DEVMAP reached a veth"
    return False, f"real frames redirected by XDP through a DEVMAP: none taken ({refused} refused)"


def _netns_cookie(_: Probing) -> tuple[bool, str]:
    try:
        B.netns_cookie()
    except OSError as exc:
        return False, f"getsockopt(SO_NETNS_COOKIE) failed ({exc.strerror})"
    return True, "getsockopt(SO_NETNS_COOKIE) answered"


def _tp_btf(_: Probing) -> tuple[bool, str]:
    from xdpguard.trace import object_path

    B.libbpf_log()
    try:
        B.Trace(str(object_path())).close()
    except (OSError, XdpguardError) as exc:
        text = why_refused(exc) if isinstance(exc, OSError) else str(exc)
        return False, f"the tp_btf programs of xdpguard trace were refused: {text}"
    return True, "the tp_btf programs of xdpguard trace loaded and attached"


@dataclass(frozen=True)
class Feature:
    name: str
    uses: str  # what xdpguard uses it for
    since: str  # the upstream kernel that brought it, as a hint
    fallback: str | None  # what xdpguard does without it; None: required
    probe: Probe


FEATURES: tuple[Feature, ...] = (
    Feature("xdp_bpf_calls", "BPF-to-BPF calls to global functions", "5.6", None,
            _program("probe_calls", "a global function")),
    Feature("xdp_bounded_loops", "bounded loops (the parser, the rules)", "5.3", None,
            _program("probe_loops", "a bounded loop")),
    Feature("xdp_adjust_head", "the word in front of frames for the loop", "4.10", None,
            _program("probe_adjust_head", "bpf_xdp_adjust_head")),
    Feature("xdp_adjust_tail", "trimming a SYN into its challenge", "4.18", None,
            _program("probe_adjust_tail", "bpf_xdp_adjust_tail")),
    Feature("xdp_load_bytes", "the n-tuple rules' reads", "5.18", None,
            _program("probe_load_bytes", "bpf_xdp_load_bytes")),
    Feature("atomic_cmpxchg", "the flow table's bucket locks", "5.12", None,
            _program("probe_cmpxchg", "an atomic compare-and-exchange")),
    Feature("ktime_coarse", "the cheap clock of flows and challenges", "5.11",
            "precise_clock", _program("probe_ktime_coarse", "bpf_ktime_get_coarse_ns")),
    Feature("xskmap", "handing frames to AF_XDP sockets", "4.18", None,
            _program("probe_xskmap", "bpf_redirect_map into an XSKMAP")),
    Feature("map_mmapable", "the flow table, shared with the loop", "5.5", None,
            _map("array", 4, 64, _BPF_F_MMAPABLE)),
    Feature("map_lpm_trie", "the allow- and blocklists, the rules' index", "4.11", None,
            _map("lpm_trie", 8, 4, _BPF_F_NO_PREALLOC)),
    Feature("map_in_map", "swapping a whole list at once", "4.12", None, _map_of_maps),
    Feature("map_lru_hash", "verified sources, per-source rate limits", "4.10", None,
            _map("lru_hash", 16, 16)),
    Feature("map_lru_percpu_hash", "per-destination rates", "4.10", None,
            _map("lru_percpu_hash", 16, 16)),
    Feature("map_bloom_filter", "skipping the verified sources' lookup for strangers", "5.16",
            None, _map("bloom_filter", 0, 16, 0, 1)),
    Feature("xdp_link", "attaching XDP so that it goes when xdpguard goes", "5.9", None,
            _xdp_link),
    Feature("af_xdp_shared_umem", "one UMEM for the sockets of both devices", "5.10", None,
            lambda p: _af_xdp(p, False)),
    Feature("af_xdp_need_wakeup", "waking the kernel only when a ring asks", "5.4",
            "kick_always", lambda p: _af_xdp(p, True)),
    Feature("devmap_redirect", "the fast path: XDP forwarding to the other device", "5.13",
            "af_xdp_path", _devmap_redirect),
    Feature("netns_cookie", "naming devices by (namespace, ifindex)", "5.14", None,
            _netns_cookie),
    Feature("tp_btf", "xdpguard trace", "5.5", "no_trace", _tp_btf),
)  # fmt: skip

BY_NAME = {f.name: f for f in FEATURES}
# What ``run --without`` can turn off: the features whose fallback is run's
# (tp_btf is xdpguard trace's alone).
OPTIONAL = ("ktime_coarse", "af_xdp_need_wakeup", "devmap_redirect")


@dataclass(frozen=True)
class Found:
    name: str
    available: bool  # the kernel has it
    how: str  # how that was found
    without: str  # the fallback's name, or "required"
    uses: str
    since: str
    forced_off: bool = False  # --without

    @property
    def used(self) -> bool:
        return self.available and not self.forced_off

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"used": self.used}


def check_without(names: Iterable[str]) -> tuple[str, ...]:
    """``--without`` names, checked: each must be a feature with a fallback."""
    out = []
    for name in names:
        f = BY_NAME.get(name)
        if f is None:
            raise XdpguardError(
                f"{name!r}: no such feature (with a fallback: {', '.join(OPTIONAL)})"
            )
        if f.fallback is None:
            raise XdpguardError(f"{name}: xdpguard cannot run without it (required)")
        if name not in OPTIONAL:
            raise XdpguardError(
                f"{name}: not a feature xdpguard run can do without (those are: "
                f"{', '.join(OPTIONAL)})"
            )
        out.append(name)
    return tuple(sorted(set(out)))


def detect(without: Iterable[str] = (), only: Iterable[str] | None = None) -> dict[str, Found]:
    """Probe every feature (or ``only`` those); ``without``: turned off even if there."""
    off = set(without)
    wanted = set(only) if only is not None else None
    probing = Probing()
    out: dict[str, Found] = {}
    try:
        for f in FEATURES:
            if wanted is not None and f.name not in wanted:
                continue
            try:
                available, how = f.probe(probing)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES):
                    raise XdpguardError(
                        f"cannot probe the kernel's features: {exc.strerror} (run as root)"
                    ) from None
                available, how = False, f"the probe failed ({exc.strerror})"
            out[f.name] = Found(
                f.name, available, how, f.fallback or "required", f.uses, f.since, f.name in off
            )
    finally:
        probing.close()
    return out


# What the probes found, kept for the rest of the boot: a kernel does not
# change under a running system, and every start of run would otherwise
# probe again (a quarter of a second). Keyed by the boot and by the probe
# object, so a new build or a reboot probes afresh; 'xdpguard features'
# always probes.
CACHE = Path("/run/xdpguard/features.json")


def _cache_key() -> str:
    import hashlib

    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    digest = hashlib.sha256(probe_object().read_bytes()).hexdigest()[:16]
    return f"{boot}/{digest}"


def detect_cached(without: Iterable[str] = ()) -> dict[str, Found]:
    """detect(), from this boot's earlier probes where there are some."""
    import json
    import os

    off = set(without)
    try:
        key = _cache_key()
    except OSError:
        return detect(off)
    try:
        data = json.loads(CACHE.read_text())
        if data.get("key") == key and set(data["found"]) == {f.name for f in FEATURES}:
            return {n: Found(**{**v, "forced_off": n in off}) for n, v in data["found"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = detect(off)
    try:
        CACHE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = CACHE.with_name(f".{CACHE.name}.{os.getpid()}")
        body = {
            n: {k: v for k, v in asdict(f).items() if k != "forced_off"} for n, f in found.items()
        }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as out:
            json.dump({"key": key, "found": body}, out)
        os.replace(tmp, CACHE)
    except OSError:
        pass  # only a cache
    return found


def require(found: dict[str, Found], log_missing: bool = True) -> None:
    """Refuse, in one line, a kernel without a required feature; say once
    which fallback each missing (or turned off) optional one takes."""
    for f in found.values():
        if f.without == "required" and not f.available:
            raise XdpguardError(
                f"this kernel lacks {f.name} ({f.uses}; upstream since {f.since}): {f.how}; "
                "xdpguard cannot run without it (see 'xdpguard features')"
            )
    if log_missing:
        for f in found.values():
            if not f.used:
                why = "turned off (--without)" if f.forced_off else f"missing: {f.how}"
                log.warning("kernel feature %s %s; using %s", f.name, why, f.without)
