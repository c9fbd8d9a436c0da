"""Every setting of ``xdpguard run``, once: its name, default, check and help.

The command line, the configuration file and the engine all read this
table. A setting ``max_flows`` is ``--max-flows`` on the command line and
``max_flows`` in the file; the initial TCP settings are the file's ``[tcp]``
table (keys and defaults: xdpguard.tcp.DEFAULTS). The command line overrides
the file, which overrides the defaults:

    # /etc/xdpguard/xdpguard.toml
    outer = "eth0"
    inner = "veth-origin"
    inner_netns = "origin"
    max_flows = 2000000
    metrics = "9464"

    [tcp]
    syn_mode = "on"
    verify_ttl = 900

The ``[tcp]`` table applies while the state directory holds no TCP settings
of a previous run (a first start); after that the saved ones, which
``xdpguard tcp config`` changes, win, and ``run`` says which of the file's
keys they override.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdpguard import tcp as tcpmod
from xdpguard.control import DEFAULT_CONTROL
from xdpguard.defs import MAX_QUEUES
from xdpguard.errors import XdpguardError
from xdpguard.netns import valid_ifname

DEFAULT_CONFIG = Path("/etc/xdpguard/xdpguard.toml")


class SettingError(XdpguardError):
    """A setting is missing, unknown or invalid; nothing was started."""


class MissingSetting(SettingError):
    """A required setting is neither on the command line nor in the file."""


def config_path(path: Path | None) -> Path | None:
    """The settings file in play: ``path``, else the default one if it exists."""
    if path is None and DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return path


def check_required(given: dict[str, Any], path: Path | None) -> None:
    """Without a file, what the command line lacks is missing for good."""
    if path is None:
        for s in RUN:
            if s.required and s.key not in given:
                raise MissingSetting(f"no {s.flag} given")


def _device(v: Any) -> str:
    if not isinstance(v, str) or not valid_ifname(v):
        raise ValueError(f"{v!r} is not a valid device name (1-15 chars, no '/', ':' or spaces)")
    return v


def _netns(v: Any) -> str:
    if not isinstance(v, str) or not v or "/" in v or v in (".", ".."):
        raise ValueError(f"{v!r} is not a valid namespace name")
    return v


def _path(v: Any) -> Path:
    if not isinstance(v, str | Path) or not str(v):
        raise ValueError(f"{v!r} is not a path")
    return Path(v)


def _listen(v: Any) -> tuple[str, int]:
    """[ADDR:]PORT; an address alone is not enough, a port alone listens on loopback.
    (An (address, port) pair, as this makes, is checked again as is.)"""
    if isinstance(v, tuple) and len(v) == 2:
        v = f"[{v[0]}]:{v[1]}"
    text = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(text, str) or not text:
        raise ValueError(f"{v!r} is not [ADDR:]PORT")
    addr, _, port = text.rpartition(":")
    addr = addr.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{v!r}: the port must be a number from 1 to 65535")
    import ipaddress

    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{v!r}: {addr!r} is not an IP address") from None
    return addr, int(port)


def _number(kind: type, lo: float | None, hi: float | None) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        ok = isinstance(v, int | float) if kind is float else isinstance(v, int)
        if isinstance(v, bool) or not ok:
            raise ValueError(f"{v!r} is not {'a number' if kind is float else 'a whole number'}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{v!r} is not within {lo if lo is not None else ''}..{hi or ''}")
        return kind(v)

    return check


def _features(v: Any) -> tuple[str, ...]:
    """Kernel features to do without: a name, or a list of them."""
    from xdpguard.features import check_without

    names = (v,) if isinstance(v, str) else v
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{v!r} is not a feature name or a list of them")
    try:
        return check_without(names)
    except XdpguardError as exc:
        raise ValueError(str(exc)) from None


def _choice(*choices: Any) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        for c in choices:
            if v == c and type(v) is type(c):
                return v
        raise ValueError(f"{v!r} is not one of {', '.join(str(c) for c in choices)}")

    return check


@dataclass(frozen=True)
class Setting:
    key: str  # the file's key; the option is --key-with-dashes
    default: Any  # None: none (the setting is optional, or required)
    check: Callable[[Any], Any]  # the value as the engine takes it, or ValueError
    metavar: str
    help: str
    required: bool = False
    parse: Callable[[str], Any] = str  # the command line's text as the file would type it
    multiple: bool = False  # the option may be given again; the file's value is a list

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


RING_SIZES = tuple(1 << n for n in range(9, 15))

RUN: tuple[Setting, ...] = (
    Setting("outer", None, _device, "DEV", "Untrusted device (clients).", required=True),
    Setting(
        "outer_netns",
        None,
        _netns,
        "NS",
        "Namespace of --outer (default: the one xdpguard runs in).",
    ),
    Setting("inner", None, _device, "DEV", "Device towards the origin.", required=True),
    Setting("inner_netns", None, _netns, "NS", "Namespace of --inner.", required=True),
    Setting(
        "queues",
        None,
        _number(int, 1, MAX_QUEUES),
        "N",
        "Queues to serve, one worker each (default: all of the devices' queues).",
        parse=int,
    ),
    Setting(
        "xdp_mode",
        "native",
        _choice("native", "skb"),
        "native|skb",
        "XDP attach mode; skb (generic) is the fallback for drivers without native XDP.",
    ),
    Setting(
        "summary_interval",
        5.0,
        _number(float, 0.5, None),
        "SECONDS",
        "Seconds between the rate lines printed to stderr.",
        parse=float,
    ),
    Setting(
        "state_dir",
        "/var/lib/xdpguard",
        _path,
        "DIR",
        "Where the policy is saved after every change and restored from at start.",
    ),
    Setting(
        "max_flows",
        1_000_000,
        _number(int, 1024, 1 << 30),
        "N",
        "Capacity of the TCP flow table (memory: about 100 bytes per flow).",
        parse=int,
    ),
    Setting(
        "max_dests",
        65536,
        _number(int, 1024, 1 << 24),
        "N",
        "Protected destination addresses counted one by one ('xdpguard protect'; an LRU: "
        "beyond it the quietest are evicted, and counted). Memory: 112 bytes per address "
        "per CPU.",
        parse=int,
    ),
    Setting(
        "learn",
        10.0,
        _number(float, 0, 86400),
        "SECONDS",
        "Seconds after start during which TCP flows already open are adopted, so a restart "
        "cuts no connection; out-of-state drops begin after.",
        parse=float,
    ),
    Setting(
        "ring_size",
        2048,
        _choice(*RING_SIZES),
        "|".join(str(n) for n in RING_SIZES),
        "Entries of every AF_XDP ring; each queue gets 4x as many UMEM frames of 2 KiB. A "
        "bigger ring rides out longer stalls of a worker (one not on a core of its own).",
        parse=int,
    ),
    Setting(
        "fast_path",
        "on",
        _choice("on", "off"),
        "on|off",
        "Forward in XDP itself what needs no loop: traffic that is not TCP and passed the "
        "policy, and segments of verified TCP flows. 'xdpguard fast-path' changes it at runtime.",
    ),
    Setting(
        "without",
        (),
        _features,
        "FEATURE",
        "Do without this kernel feature even if the kernel has it, and take its fallback: "
        "ktime_coarse (the precise clock), af_xdp_need_wakeup (kick on every send), "
        "devmap_redirect (no fast path: everything through the AF_XDP loop). Repeatable; "
        "'xdpguard features' lists what the kernel has.",
        multiple=True,
    ),
    Setting(
        "metrics",
        None,
        _listen,
        "[ADDR:]PORT",
        "Serve Prometheus metrics over HTTP there (a port alone: on 127.0.0.1). Off by default.",
    ),
    Setting(
        "log_format",
        "text",
        _choice("text", "json"),
        "text|json",
        "The log on stderr: one event per line, as text or as a JSON object.",
    ),
    Setting(
        "control",
        DEFAULT_CONTROL,
        _path,
        "FILE",
        "The control socket other xdpguard commands talk to.",
    ),
)
BY_KEY = {s.key: s for s in RUN}
DEFAULTS = {s.key: s.default for s in RUN}


def read_file(path: Path) -> dict[str, Any]:
    """The TOML file at ``path``, parsed (not yet checked)."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError as exc:
        raise SettingError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except FileNotFoundError:
        raise SettingError(f"{path}: no such file") from None
    except OSError as exc:
        raise SettingError(f"{path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"{path}: not valid TOML ({exc})") from None


def check_file(path: Path, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's run settings and [tcp] settings, each checked; an unknown key
    or a wrong value is an error that names both the key and the file."""
    run: dict[str, Any] = {}
    tcp: dict[str, Any] = {}
    for key, value in data.items():
        if key == "tcp":
            if not isinstance(value, dict):
                raise SettingError(f"{path}: tcp: must be a table ([tcp])")
            for k, v in value.items():
                try:
                    tcp |= tcpmod.validate({k: v})
                except XdpguardError as exc:
                    raise SettingError(f"{path}: tcp.{k}: {exc}") from None
            continue
        setting = BY_KEY.get(key)
        if setting is None:
            known = ", ".join(sorted([*BY_KEY, "tcp"]))
            raise SettingError(f"{path}: {key}: unknown setting (known: {known})")
        try:
            run[key] = setting.check(value)
        except ValueError as exc:
            raise SettingError(f"{path}: {key}: {exc}") from None
        if isinstance(run[key], Path) and not run[key].is_absolute():
            # Relative to what? The daemon's directory is not the file's.
            raise SettingError(f"{path}: {key}: {str(value)!r} is not an absolute path")
    return run, tcp


def merge(given: dict[str, Any], path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run settings (``given`` on the command line, then the file at
    ``path`` if any, then the defaults) and the file's [tcp] settings."""
    file_run: dict[str, Any] = {}
    file_tcp: dict[str, Any] = {}
    if path is not None:
        file_run, file_tcp = check_file(path, read_file(path))
    out = {}
    for s in RUN:
        if s.key in given:
            out[s.key] = s.check(given[s.key])
        elif s.key in file_run:
            out[s.key] = file_run[s.key]
        else:
            out[s.key] = s.check(s.default) if s.default is not None else None
        if s.required and out[s.key] is None:
            where = f" (nor '{s.key}' in {path})" if path is not None else ""
            raise MissingSetting(f"no {s.flag} given{where}")
    return out, file_tcp
