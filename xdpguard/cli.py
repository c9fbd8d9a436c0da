"""The xdpguard command line.

``xdpguard run`` is the appliance in the foreground; every other command is
a client of its control socket (``--control``, or $XDPGUARD_CONTROL).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from xdpguard import __version__
from xdpguard.control import DEFAULT_CONTROL, ControlClient, wait_ready
from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard")


class Cidr(click.ParamType):
    """An IPv4/IPv6 address or prefix; host bits set are an error, not masked."""

    name = "CIDR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from xdpguard.policy import format_prefix, parse_prefix

        try:
            return format_prefix(*parse_prefix(str(value).strip()))
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


class Group(click.Group):
    """Every error the operator can cause ends as one line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XdpguardError as exc:
            raise click.ClickException(str(exc)) from None

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


control_option = click.option(
    "--control",
    type=click.Path(dir_okay=False),
    envvar="XDPGUARD_CONTROL",
    default=DEFAULT_CONTROL,
    show_default=True,
    show_envvar=True,
    help="Control socket of the running xdpguard.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xdpguard")
def main() -> None:
    """Inline DDoS filter between an outer and an inner network device.

    Start the appliance with 'xdpguard run'; the other commands talk to the
    running appliance through its control socket.

    \b
    Example (the lab of scripts/netns-setup.sh):
      xdpguard run --outer outer --inner inner --inner-netns inner-ns
      xdpguard status
      xdpguard stats --json
    """


class SettingType(click.ParamType):
    """A setting of xdpguard.settings on the command line: the same check as in the file."""

    def __init__(self, setting: Any) -> None:
        self.setting = setting
        self.name = setting.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            text = isinstance(value, str)
            return self.setting.check(self.setting.parse(value) if text else value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def run_options(fn: Any) -> Any:
    """``run``'s options, one per setting of xdpguard.settings.RUN."""
    from xdpguard.settings import RUN

    for s in reversed(RUN):
        default = "" if s.default in (None, ()) else f" [default: {s.default}]"
        fn = click.option(
            s.flag,
            s.key,
            type=SettingType(s),
            multiple=s.multiple,
            metavar=s.metavar,
            envvar="XDPGUARD_CONTROL" if s.key == "control" else None,
            show_envvar=s.key == "control",
            help=f"{s.help}{' Required, here or in the file.' if s.required else ''}{default}",
        )(fn)
    return fn


@main.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Settings file (TOML: each option below by its name with underscores, and the "
    "initial TCP settings in [tcp]); the options given here override it. "
    "[default: /etc/xdpguard/xdpguard.toml if it exists]",
)
@run_options
@click.option(
    "--no-policy",
    is_flag=True,
    hidden=True,
    help="Forward without per-frame logic (the benchmarks' bare forwarder).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log debug events too, and after a failed start the whole text behind its one-line "
    "reason (a verifier's log).",
)
@click.pass_context
def run(
    ctx: click.Context, config: Path | None, no_policy: bool, verbose: bool, **options: Any
) -> None:
    """Run the appliance in the foreground until SIGINT or SIGTERM.

    Frames arriving on --outer that pass the policy leave unchanged on
    --inner, and the origin's frames from --inner leave on --outer.

    On SIGINT/SIGTERM (exit 0) or a fatal error such as a device deleted
    under it (exit 1, one line saying why), the XDP programs and the control
    socket go; the state directory stays for the next start, and so does the
    flow table (pinned in /sys/fs/bpf/xdpguard/): a restart, even after a
    SIGKILL, cuts no connection. 'xdpguard flows forget' drops it.
    """
    from xdpguard.daemon import run_daemon
    from xdpguard.engine import EngineConfig, require_capabilities
    from xdpguard.settings import MissingSetting, check_required, config_path, merge

    given = {
        k: v
        for k, v in options.items()
        if v is not None and ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT
    }
    if "without" in given:  # repeated: one tuple per use
        given["without"] = tuple(name for names in given["without"] for name in names)
    path = config_path(config)
    try:
        check_required(given, path)
        require_capabilities()
        settings, tcp_initial = merge(given, path)
    except MissingSetting as exc:
        raise click.UsageError(str(exc)) from None

    from xdpguard import logs

    log_format = settings.pop("log_format")
    logs.setup(log_format, verbose=verbose)
    summary_interval = settings.pop("summary_interval")
    control = str(settings.pop("control"))
    settings["fast_path"] = settings["fast_path"] == "on"
    try:
        run_daemon(
            EngineConfig(**settings, no_policy=no_policy, tcp_initial=tcp_initial),
            control,
            summary_interval,
        )
    except XdpguardError as exc:
        # The one line first; the long text behind it only on request (-v)
        # or as one field of the JSON log.
        if exc.detail and log_format == "json":
            log.error(str(exc), extra={"fields": {"detail": exc.detail}})
            sys.exit(1)
        if exc.detail and verbose:
            click.echo(f"Error: {exc}", err=True)
            click.echo(exc.detail.rstrip(), err=True)
            sys.exit(1)
        raise


@main.command()
@json_option
def features(as_json: bool) -> None:
    """The kernel features xdpguard uses, whether this kernel has them, and what
    xdpguard does without each.

    Every feature is probed by trying it: loading a small program, making a
    map, or binding sockets and sending real frames in a network namespace
    of the probe's own, which goes with it. A required feature the kernel
    lacks stops 'xdpguard run' with one line naming it; an optional one
    takes its fallback ('run --without FEATURE' takes it on any kernel).
    Needs root.
    """
    from xdpguard.engine import require_capabilities
    from xdpguard.features import detect

    require_capabilities()
    found = detect()
    if as_json:
        click.echo(json.dumps({"features": [f.as_dict() for f in found.values()]}, indent=2))
        return
    width = max(len(n) for n in found)
    for f in found.values():
        have = "yes" if f.available else "NO "
        click.echo(f"{f.name:<{width}}  {have}  without: {f.without:<13}  {f.how}")
    missing = [f.name for f in found.values() if not f.available and f.without == "required"]
    if missing:
        raise XdpguardError(f"xdpguard cannot run on this kernel: it lacks {', '.join(missing)}")


@main.command()
@json_option
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    help="Seconds between readings of the AF_XDP sockets' statistics.",
)
@click.option("--count", type=click.IntRange(1), help="Stop after COUNT events.")
@click.option("--seconds", type=click.FloatRange(0), help="Stop after SECONDS.")
@control_option
def trace(
    as_json: bool, interval: float, count: int | None, seconds: float | None, control: str
) -> None:
    """Show the kernel's XDP and AF_XDP errors as they happen, until Ctrl-C.

    \b
    From the kernel's own tracepoints, on every device (not only xdpguard's):
      exception     an XDP action the driver could not carry out
      redirect_err  a redirect that failed (no target, a full AF_XDP ring)
      devmap_xmit   a DEVMAP's transmit that dropped frames or failed
                    (e.g. into a veth whose peer has no NAPI)
    Devices are named in their own network namespaces. With xdpguard
    running (--control), its AF_XDP sockets' kernel drops that grew
    (rx_dropped, rx_ring_full, tx_invalid_descs) are events too.
    One line per event; --json: one JSON object per line. Needs root.
    """
    import signal
    import threading

    from xdpguard.trace import follow, text

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="xdpguard trace: %(message)s")
    n, until = 0, None if seconds is None else time.monotonic() + seconds
    # Ctrl-C (or a SIGTERM) only asks the loop to stop: raised as
    # KeyboardInterrupt between writing an event and counting it, it made the
    # closing count one short of the lines written.
    stopping = threading.Event()
    previous = {
        s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for event in follow(control, interval, until, stopping.is_set):
            click.echo(json.dumps(event) if as_json else text(event))
            n += 1
            if stopping.is_set() or (count is not None and n >= count):
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    click.echo(f"xdpguard trace: {n} event(s)", err=True)


@main.group(cls=Group)
def config() -> None:
    """The settings file of 'xdpguard run' (TOML; see 'xdpguard run --help')."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Check FILE as 'xdpguard run --config FILE' would, without running:
    unknown keys, wrong types and values are errors naming the key."""
    from xdpguard.settings import check_file, read_file

    run_settings, tcp_settings = check_file(file, read_file(file))
    n = len(run_settings) + len(tcp_settings)
    click.echo(f"{file}: ok ({n} setting{'s' * (n != 1)})")


def _client(control: str) -> ControlClient:
    return ControlClient(control)


@main.command()
@click.option(
    "--wait",
    type=click.FloatRange(0, 3600),
    is_flag=False,
    flag_value=30.0,
    default=None,
    metavar="[SECONDS]",
    help="Block until the appliance is ready (forwarding), at most SECONDS (default 30); "
    "fail if it exits first or the time runs out.",
)
@json_option
@control_option
def status(wait: float | None, as_json: bool, control: str) -> None:
    """State, devices, namespaces, netns cookies, ifindexes, queues, XDP mode, sockets.

    The state is starting (the data path is being built), ready (frames are
    forwarded) or stopping. Scripts start the appliance, then wait for it:

    \b
      xdpguard run ... &
      xdpguard status --wait 30 >/dev/null && ping ...
    """
    from xdpguard.stats import format_status

    if wait is not None:
        st = wait_ready(control, wait)
    else:
        with _client(control) as c:
            st = c.call("status")
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


@main.command()
@json_option
@click.option("--watch", is_flag=True, help="Repeat every --interval seconds, with rates.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between two samples for --watch.",
)
@control_option
def stats(as_json: bool, watch: bool, interval: float, control: str) -> None:
    """Packets and bytes per reason and per direction, per queue, and the frame account.

    With --json, one JSON object ({"reasons": {NAME: {"packets", "bytes"}},
    "directions": ..., "queues": ..., "frames": ...}) per sample; with
    --watch each sample also carries "rates".
    """
    from xdpguard.stats import format_stats, rates

    with _client(control) as c:
        prev = None
        while True:
            cur = c.call("stats")
            if as_json:
                if prev is not None:
                    cur["rates"] = rates(prev, cur)
                click.echo(json.dumps(cur, indent=None if watch else 2))
            else:
                if watch:
                    click.clear()
                click.echo(format_stats(cur, prev))
            if not watch:
                return
            prev = cur
            try:
                time.sleep(interval)
            except KeyboardInterrupt:
                return


def _call(control: str, cmd: str, fd: int | None = None, **args: Any) -> Any:
    with _client(control) as c:
        result = c.call(cmd, fd, **args)
    if isinstance(result, dict) and result.get("warning"):
        click.echo(f"warning: {result['warning']}", err=True)
    return result


force_option = click.option(
    "--force", is_flag=True, help="Allow a /0 (every source of a family), or emptying a list."
)


def _emit(result: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else text)


def _list_group(lst: str, what: str) -> click.Group:
    """`xdpguard block ...` and `xdpguard allow ...`: the same verbs on two lists."""

    @click.group(name=lst, cls=Group, help=what)
    def group() -> None:
        pass

    @group.command("add")
    @click.argument("prefixes", nargs=-1, required=True, type=Cidr())
    @click.option(
        "--ttl",
        type=click.FloatRange(min=0, min_open=True, max=10 * 365 * 86400),
        help="Remove the entries again after this many seconds.",
    )
    @click.option("--comment", help="A note kept with the entries (why, ticket, ...).")
    @force_option
    @json_option
    @control_option
    def add(
        prefixes: tuple[str, ...],
        ttl: float | None,
        comment: str | None,
        force: bool,
        as_json: bool,
        control: str,
    ) -> None:
        """Add addresses or CIDR prefixes; an existing entry gets the new TTL and comment."""
        r = _call(
            control, f"{lst}.add", prefixes=list(prefixes), ttl=ttl, comment=comment, force=force
        )
        _emit(r, as_json, f"{lst}list: {r['added']} added, {r['updated']} updated")

    @group.command("del")
    @click.argument("prefixes", nargs=-1, required=True, type=Cidr())
    @json_option
    @control_option
    def delete(prefixes: tuple[str, ...], as_json: bool, control: str) -> None:
        """Delete entries; ones that are not there are reported, not an error."""
        r = _call(control, f"{lst}.del", prefixes=list(prefixes))
        missing = f" (not there: {', '.join(r['missing'])})" if r["missing"] else ""
        _emit(r, as_json, f"{lst}list: {r['deleted']} deleted{missing}")

    @group.command("list")
    @json_option
    @control_option
    def list_(as_json: bool, control: str) -> None:
        """The entries, with the seconds left of their TTL and their comment."""
        r = _call(control, f"{lst}.list")
        if as_json:
            _emit(r, True, "")
            return
        for e in r["entries"]:
            ttl = f"ttl {e['ttl']:.0f}s" if e["ttl"] is not None else ""
            comment = f"# {e['comment']}" if e["comment"] else ""
            click.echo(f"{e['prefix']:<44} {ttl:<14} {comment}".rstrip())
        click.echo(f"{r['count']} entries", err=True)

    @group.command("load")
    @click.argument("file", type=click.File("rb"))
    @click.option(
        "--replace",
        is_flag=True,
        help="Swap the whole list for the file's (atomically) instead of adding to it.",
    )
    @force_option
    @json_option
    @control_option
    def load(file: Any, replace: bool, force: bool, as_json: bool, control: str) -> None:
        """Load FILE (or - for stdin): one address or CIDR per line, '#' comments.

        The whole file is checked first: one bad line changes nothing. The
        file is handed to xdpguard open, so it may be of any size and a
        pipe; lines are numbered as grep -n numbers them.
        """
        try:
            r = _call(control, f"{lst}.load", file.fileno(), replace=replace, force=force)
        except XdpguardError as exc:
            raise XdpguardError(f"{file.name}: {exc}") from None
        how = "replaced the list with" if r["replaced"] else "loaded"
        _emit(r, as_json, f"{lst}list: {how} {r['loaded']} prefixes ({r['added']} new)")

    @group.command("clear")
    @json_option
    @control_option
    def clear(as_json: bool, control: str) -> None:
        """Remove every entry."""
        r = _call(control, f"{lst}.clear")
        _emit(r, as_json, f"{lst}list: {r['deleted']} deleted")

    return group


main.add_command(
    _list_group("block", "Drop everything from these sources (IPv4 and IPv6 prefixes).")
)
main.add_command(
    _list_group("allow", "Always pass these sources: an allowlist match skips every later check.")
)


@main.group(cls=Group)
def ports() -> None:
    """UDP source ports to drop (reflection and amplification floods).

    The set is empty by default: dropping source port 53 also drops the
    origin's own DNS answers, so it is the operator's call.
    """


@ports.command("add")
@click.argument("numbers", nargs=-1, type=click.IntRange(0, 65535))
@click.option(
    "--preset",
    type=click.Choice(["drdos"]),
    help="drdos: 19, 53, 123, 161, 389, 1900, 3702, 11211.",
)
@json_option
@control_option
def ports_add(numbers: tuple[int, ...], preset: str | None, as_json: bool, control: str) -> None:
    """Drop UDP from these source ports."""
    if not numbers and not preset:
        raise click.UsageError("give PORT... or --preset")
    r = _call(control, "ports.add", ports=list(numbers), preset=preset)
    _emit(r, as_json, f"ports: {r['added']} added; dropping {_ports_text(r['ports'])}")


@ports.command("del")
@click.argument("numbers", nargs=-1, required=True, type=click.IntRange(0, 65535))
@json_option
@control_option
def ports_del(numbers: tuple[int, ...], as_json: bool, control: str) -> None:
    """Stop dropping UDP from these source ports."""
    r = _call(control, "ports.del", ports=list(numbers))
    missing = f" (not there: {', '.join(map(str, r['missing']))})" if r["missing"] else ""
    _emit(r, as_json, f"ports: {r['deleted']} deleted{missing}; dropping {_ports_text(r['ports'])}")


@ports.command("list")
@json_option
@control_option
def ports_list(as_json: bool, control: str) -> None:
    """The UDP source ports dropped."""
    r = _call(control, "ports.list")
    _emit(r, as_json, _ports_text(r["ports"]))


def _ports_text(ports: list[int]) -> str:
    return ", ".join(map(str, ports)) if ports else "no ports"


class Ethertype(click.ParamType):
    """0x88b5, 35093, or a name (lldp, lacp, eapol, ptp)."""

    name = "ETHERTYPE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from xdpguard.policy import L2_NAMES

        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in L2_NAMES:
            return L2_NAMES[text]
        try:
            return int(text, 0)
        except ValueError:
            self.fail(f"{value!r}: not a number (0x88b5, 35093) or a name ({', '.join(L2_NAMES)})")


@main.group(cls=Group)
def l2() -> None:
    """Frames that are neither IP nor ARP: dropped unless allowed here.

    IP (VLAN and QinQ tags included) is judged by the policy, and ARP by its
    sender's address, like an IP source. Everything else is dropped as
    l2_other: no list can vouch for what it carries. MPLS, PPPoE sessions
    and 802.3 LLC/SNAP frames carry IP the policy cannot see, and cannot be
    allowed.

    \b
    Example: the origin's switch speaks LLDP across the appliance
      xdpguard l2 allow lldp
    """


@l2.command("allow")
@click.argument("ethertypes", nargs=-1, required=True, type=Ethertype())
@json_option
@control_option
def l2_allow(ethertypes: tuple[int, ...], as_json: bool, control: str) -> None:
    """Let frames of these ethertypes through."""
    r = _call(control, "l2.allow", ethertypes=list(ethertypes))
    _emit(r, as_json, f"l2: {r['added']} allowed; letting through {_l2_text(r['ethertypes'])}")


@l2.command("del")
@click.argument("ethertypes", nargs=-1, required=True, type=Ethertype())
@json_option
@control_option
def l2_del(ethertypes: tuple[int, ...], as_json: bool, control: str) -> None:
    """Drop frames of these ethertypes again."""
    r = _call(control, "l2.del", ethertypes=list(ethertypes))
    missing = f" (not there: {_l2_text(r['missing'])})" if r["missing"] else ""
    _emit(r, as_json, f"l2: {r['deleted']} deleted{missing}; letting through "
          f"{_l2_text(r['ethertypes'])}")  # fmt: skip


@l2.command("list")
@json_option
@control_option
def l2_list(as_json: bool, control: str) -> None:
    """The ethertypes let through beside IP and ARP."""
    r = _call(control, "l2.list")
    _emit(r, as_json, _l2_text(r["ethertypes"]))


def _l2_text(types: list[int]) -> str:
    return ", ".join(f"{t:#06x}" for t in types) if types else "nothing beside IP and ARP"


class ReasonName(click.ParamType):
    """A verdict reason, by its name in the counters (or a known alias)."""

    name = "REASON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from xdpguard.samples import parse_reason

        try:
            return str(parse_reason(str(value).strip()).name)
        except XdpguardError as exc:
            self.fail(str(exc), param, ctx)


class ReasonRate(click.ParamType):
    """REASON=N: sample 1 in N frames of that reason (0: none)."""

    name = "REASON=N"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        name, eq, n = str(value).partition("=")
        if not eq or not n.strip().isdigit():
            self.fail(f"{value!r}: must be REASON=N, e.g. udp_src_port=10", param, ctx)
        return ReasonName().convert(name, param, ctx), int(n)


@main.group(cls=Group)
def protect() -> None:
    """The networks behind the appliance, and how hard each address is hit.

    XDP counts every frame from outside to a protected address (whatever its
    verdict) per protocol class: TCP SYN, other TCP, UDP, ICMP, fragments,
    other; per prefix (in the metrics) and per address (an LRU of
    --max-dests addresses: beyond it the quietest are evicted, and counted).
    'xdpguard top --by dst' lists the busiest addresses.

    \b
    Example:
      xdpguard protect add 169.254.0.0/24 2001:db8::/48 --name web
    """


class ClassRate(click.ParamType):
    """[CLASS=]N: a rate for one protocol class, or for all."""

    name = "[CLASS=]N"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, float]:
        from xdpguard.protect import CLASSES

        cls, eq, n = str(value).rpartition("=")
        cls = cls if eq else "*"
        if cls != "*" and cls not in CLASSES:
            self.fail(f"{value!r}: unknown class {cls!r} (known: {', '.join(CLASSES)})")
        try:
            rate = float(n)
        except ValueError:
            self.fail(f"{value!r}: not a rate")
        if not 0 < rate < 1e13:
            self.fail(f"{value!r}: not a rate")
        return cls, rate


@protect.command("add")
@click.argument("prefixes", nargs=-1, required=True, type=Cidr())
@click.option("--name", help="A name for these networks (in the metrics).")
@click.option("--mode", type=click.Choice(["mitigate", "monitor"]),
              help="mitigate (the default): an attack's rule is installed; monitor: it is only "
              "logged and listed.")  # fmt: skip
@click.option("--pps", multiple=True, type=ClassRate(),
              help="[CLASS=]N: the least packet rate that is an attack (default 10000 for "
              "every class; 'protect config --floor-pps'). Repeatable.")  # fmt: skip
@click.option("--bps", multiple=True, type=ClassRate(),
              help="[CLASS=]N: the least bit rate that is an attack (default: none).")  # fmt: skip
@json_option
@control_option
def protect_add(prefixes: tuple[str, ...], name: str | None, mode: str | None,
                pps: tuple[tuple[str, float], ...], bps: tuple[tuple[str, float], ...],
                as_json: bool, control: str) -> None:  # fmt: skip
    """Protect these networks; given again, they take the options given."""
    r = _call(control, "protect.add", prefixes=list(prefixes), name=name, mode=mode,
              pps=dict(pps) or None, bps=dict(bps) or None)  # fmt: skip
    _emit(r, as_json, f"protect: {r['added']} added; {len(r['protected'])} network(s) protected")


@protect.command("config")
@click.option("--k", type=click.FloatRange(1.5, 1000),
              help="An attack is k times the learned baseline (and above the floor).")  # fmt: skip
@click.option("--window", type=click.FloatRange(60, 30 * 86400),
              help="Seconds: the baseline's time constant.")  # fmt: skip
@click.option(
    "--hold",
    type=click.FloatRange(1, 86400),
    help="Seconds under the threshold before an attack ends and its rule goes.",
)
@click.option("--floor-pps", type=click.IntRange(1, 1 << 40),
              help="The floor of a class whose prefix sets none.")  # fmt: skip
@json_option
@control_option
def protect_config(k: float | None, window: float | None, hold: float | None,
                   floor_pps: int | None, as_json: bool, control: str) -> None:  # fmt: skip
    """How attacks are found (saved); no option: show."""
    r = _call(control, "protect.config", k=k, window=window, hold=hold, floor_pps=floor_pps)
    _emit(r, as_json, ", ".join(f"{key} {v:g}" for key, v in r.items() if key != "saved"))


@main.command()
@json_option
@control_option
def attacks(as_json: bool, control: str) -> None:
    """Attacks found on the protected networks: in progress, then past.

    Each: the destination and protocol class, when, the peak rate, the
    fingerprint and the rule (source 'auto' in 'xdpguard rule list'), what
    it dropped, and a pcapng of its samples in the state directory.
    """
    r = _call(control, "attacks")
    lines = []
    for title, rows in (("in progress", r["active"]), ("past", r["past"])):
        if not rows:
            continue
        lines.append(f"{title}:")
        for a in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["start"]))
            lines.append(f"  #{a['id']} {a['destination']} {a['class']} since {when}, peak "
                         f"{a['peak_pps']:.0f} pps, {a['state']}")  # fmt: skip
            if a.get("rule"):
                lines.append(f"      rule: {a['rule']}" + (" (installed)" if a["rule_installed"]
                                                            else ""))  # fmt: skip
            if a.get("why"):
                lines.append(f"      {a['why']}")
            if a.get("dropped_packets"):
                lines.append(f"      dropped {a['dropped_packets']} packets")
    _emit(r, as_json, "\n".join(lines) or "no attacks")


@protect.command("del")
@click.argument("prefixes", nargs=-1, required=True, type=Cidr())
@json_option
@control_option
def protect_del(prefixes: tuple[str, ...], as_json: bool, control: str) -> None:
    """Stop protecting these networks."""
    r = _call(control, "protect.del", prefixes=list(prefixes))
    missing = f" (not protected: {', '.join(r['missing'])})" if r["missing"] else ""
    _emit(r, as_json, f"protect: {r['deleted']} deleted{missing}; "
          f"{len(r['protected'])} network(s) protected")  # fmt: skip


@protect.command("list")
@json_option
@control_option
def protect_list(as_json: bool, control: str) -> None:
    """The protected networks, with their rates per class over the last second."""
    r = _call(control, "protect.list")
    lines = []
    for p in r["protected"]:
        name = f" ({p['name']})" if p.get("name") else ""
        rates = p.get("pps")
        text = ", ".join(f"{c} {v:.0f}" for c, v in rates.items() if v) if rates else ""
        lines.append(f"{p['prefix']}{name}: {text or 'quiet'}" + (" pps" if text else ""))
    occ = r.get("addresses")
    if occ:
        lines.append(f"addresses counted: {occ['tracked']} of {occ['capacity']}, "
                     f"{occ['evicted']} evicted")  # fmt: skip
    _emit(r, as_json, "\n".join(lines) or "nothing is protected")


@main.group(cls=Group)
def sample() -> None:
    """How often XDP samples the frames it judges (for capture and top).

    Each verdict reason is sampled 1 in N frames (by default 1 in 1000 of
    what is dropped or answered, 1 in 10000 of what goes on), and one cap
    in samples per second bounds it all. Sampling never changes a verdict.
    """


@sample.command("set")
@click.option("--reason", "rates", multiple=True, type=ReasonRate(),
              help="REASON=N: 1 in N frames of that reason; 0: none. Repeatable.")  # fmt: skip
@click.option("--drops", type=click.IntRange(0, 1 << 24), help="1 in N for every dropping reason.")
@click.option("--forwarded", type=click.IntRange(0, 1 << 24),
              help="1 in N for redirected, allowlist and fast_path.")  # fmt: skip
@click.option("--cap", type=click.IntRange(1, 100_000), help="Samples per second, at most.")
@json_option
@control_option
def sample_set(rates: tuple[tuple[str, int], ...], drops: int | None, forwarded: int | None,
               cap: int | None, as_json: bool, control: str) -> None:  # fmt: skip
    """Change the sampling rates (saved)."""
    if not rates and drops is None and forwarded is None and cap is None:
        raise click.UsageError("nothing to set: give --reason, --drops, --forwarded or --cap")
    r = _call(control, "sample.set", every=dict(rates) or None, drops=drops, forwarded=forwarded,
              cap=cap)  # fmt: skip
    _emit(r, as_json, _sample_text(r))


@sample.command("show")
@json_option
@control_option
def sample_show(as_json: bool, control: str) -> None:
    """The sampling rates in force, the cap, and what the cap refused."""
    r = _call(control, "sample.get")
    _emit(r, as_json, _sample_text(r))


def _sample_text(r: dict[str, Any]) -> str:
    groups: dict[int, list[str]] = {}
    for name, n in r["every"].items():
        groups.setdefault(n, []).append(name)
    lines = [f"cap: {r['cap']} samples/s"]
    for n, names in sorted(groups.items()):
        lines.append(f"  {'never' if n == 0 else f'1 in {n}'}: {', '.join(names)}")
    if "taken" in r:
        lines.append(f"taken {r['taken']}, refused by the cap {r['capped']}, "
                     f"ring full {r['ring_full']}; captures running: {r['captures']}")  # fmt: skip
    return "\n".join(lines)


@main.command()
@click.option("--reason", "reasons", multiple=True, type=ReasonName(),
              help="Only frames of this verdict (repeatable; default: every reason).")  # fmt: skip
@click.option("--direction", type=click.Choice(["in", "out"]),
              help="in: arriving on outer; out: arriving on inner (default: both).")  # fmt: skip
@click.option("--count", type=click.IntRange(1), help="Stop after N packets.")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), help="Stop after S seconds.")
@click.option("--before", is_flag=True,
              help="Begin with the samples held from before (the last few thousand).")  # fmt: skip
@click.option(
    "-w",
    "--write",
    "path",
    required=True,
    help="The pcapng file to write; '-' for standard output (| tcpdump -r -).",
)
@control_option
def capture(reasons: tuple[str, ...], direction: str | None, count: int | None,
            seconds: float | None, before: bool, path: str, control: str) -> None:  # fmt: skip
    """Write the frames XDP judges to a pcapng file, with their verdicts.

    While it runs, the reasons asked for are sampled at every frame (within
    the cap); their rates come back when it stops. Each packet's comment
    says its reason, direction and the rule that matched, if one did; tshark
    shows them (frame.comment). Without --count or --seconds, it runs until
    Ctrl-C.

    \b
    Example: what the reflection ports filter drops
      xdpguard capture --reason udp_src_port --count 100 -w drdos.pcapng
      xdpguard capture --reason blocklist -w - | tcpdump -nr -
    """
    import base64
    import contextlib
    import os

    from xdpguard import pcapng
    from xdpguard._bindings import SAMPLE_BYTES

    if path == "-":
        out = sys.stdout.buffer
    else:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise XdpguardError(f"cannot write {path}: {exc.strerror}") from None
        out = os.fdopen(fd, "wb")
    got = lost = 0
    interfaces = [("outer", "frames arriving from outside"),
                  ("inner", "frames arriving from the origin")]  # fmt: skip
    deadline = time.monotonic() + seconds if seconds else None
    with _client(control) as c:
        start = c.call("capture.start", reasons=list(reasons) or None, direction=direction,
                       before=before)  # fmt: skip
        try:
            w = pcapng.Writer(out, SAMPLE_BYTES, interfaces)
            out.flush()
            while count is None or got < count:
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                r = c.call("capture.read", id=start["id"], wait=wait,
                           max=min(1000, count - got) if count else 1000)  # fmt: skip
                lost += r["lost"]
                for smp in r["samples"]:
                    comment = f"reason={smp['reason']} direction={smp['direction']}"
                    if smp.get("rule"):
                        comment += f" rule={smp['rule']}"
                    w.packet(0 if smp["direction"] == "in" else 1, smp["time_ns"],
                             base64.b64decode(smp["data"]), smp["len"], comment)  # fmt: skip
                    got += 1
                out.flush()
        except (KeyboardInterrupt, BrokenPipeError):
            pass
        finally:
            with contextlib.suppress(Exception):
                c.call("capture.stop", id=start["id"])
            with contextlib.suppress(BrokenPipeError):
                if out is not sys.stdout.buffer:
                    out.close()
    what = ", ".join(start["reasons"]) if start["reasons"] else "every reason"
    behind = f"; {lost} lost (the capture fell behind)" if lost else ""
    click.echo(f"captured {got} packet(s) of {what}{behind}", err=True)


@main.command()
@click.option("--by", type=click.Choice(["src", "dst", "sport", "dport", "proto", "src/24"]),
              default="src", show_default=True, help="What to rank.")  # fmt: skip
@click.option("--reason", type=ReasonName(), help="Only frames of this verdict.")
@click.option("-n", "count", type=click.IntRange(1, 256), default=10, show_default=True)
@json_option
@control_option
def top(by: str, reason: str | None, count: int, as_json: bool, control: str) -> None:
    """The heaviest senders, receivers, ports and protocols arriving on outer.

    Estimated from the samples (each stands for the frames it was sampled
    from), over the last few seconds, in bounded memory: a flood from a
    million sources costs no more than one. src/24 is a source's /24 (an
    IPv6 source's /48). --by dst without --reason reads XDP's own counts of
    the protected addresses ('xdpguard protect'), when there are some.
    """
    r = _call(control, "top", by=by, reason=reason, n=count)
    rows = r["rows"]
    head = f"top {by}" + (f" ({r['reason']})" if r.get("reason") else "") + f", {r['source']}:"
    lines = [head] + [f"  {i:>3}. {x['key']:<42} {x['pps']:>12.1f} pps"
                      for i, x in enumerate(rows, 1)]  # fmt: skip
    _emit(r, as_json, "\n".join(lines) if rows else f"{head} nothing seen yet")


@main.command()
@click.argument("policy", required=False, type=click.Choice(["drop", "pass"]))
@json_option
@control_option
def frags(policy: str | None, as_json: bool, control: str) -> None:
    """Drop or pass IPv4 fragments and IPv6 fragment headers; no argument: show."""
    r = _call(control, "frags.set", policy=policy) if policy else _call(control, "frags.get")
    _emit(r, as_json, f"fragments: {r['frags']}")


def _fast_text(r: dict[str, Any]) -> str:
    lines = [f"fast path: {'on' if r['wanted'] else 'off'} (TCP {'too' if r['tcp'] else 'not'})"]
    for d, p in r["directions"].items():
        state = "active" if p["active"] else "not active"
        lines.append(f"  {d:<4} {p['from']} -> {p['to']}: {state} ({p['why']})")
    return "\n".join(lines)


@main.command("fast-path")
@click.argument("mode", required=False, type=click.Choice(["on", "off", "status"]))
@json_option
@control_option
def fast_path(mode: str | None, as_json: bool, control: str) -> None:
    """Forward in XDP what needs no loop (on), or everything through the loop (off).

    XDP then forwards traffic that is not TCP and passed the policy, and the
    segments of TCP flows the loop verified (not while TCP protection is in
    monitor mode or learning). 'on' probes each direction again: a device
    that cannot take redirected frames keeps the AF_XDP path, and status
    says why. No argument or 'status': show.
    """
    if mode in (None, "status"):
        r = _call(control, "fastpath.get")
    else:
        r = _call(control, "fastpath.set", mode=mode)
    _emit(r, as_json, _fast_text(r))


def _rule_help() -> str:
    from xdpguard.flowspec import RULE_SYNTAX

    # Click rewraps paragraphs; \b keeps each of these as written.
    return "\n\n".join("\b\n" + para for para in RULE_SYNTAX.split("\n\n"))


@main.group(
    cls=Group,
    help=f"""N-tuple rules, FlowSpec's components, applied in XDP.

\b
{_rule_help()}

Local rules (these commands) are saved in the state directory; rules
from BGP FlowSpec (xdpguard flowspec-feed) are not: the session is the
authority. 'list' shows both.""",
)
def rule() -> None:
    pass


def _rule_counts(r: dict[str, Any]) -> str:
    dropped = f", dropped {r['dropped_packets']}" if r["dropped_packets"] else ""
    return f"{r['packets']} pkts {r['bytes']} B{dropped}"


rule_force_option = click.option(
    "--force", is_flag=True, help="Allow a rule that matches every frame of a family."
)


@rule.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, required=True)
@click.option("--comment", help="A note kept with the rule (why, ticket, ...).")
@rule_force_option
@json_option
@control_option
def rule_add(
    words: tuple[str, ...], comment: str | None, force: bool, as_json: bool, control: str
) -> None:
    """Add a rule: its components, then its action (see 'xdpguard rule --help').

    \b
      xdpguard rule add dst 192.0.2.0/24 proto udp sport 53,123 drop
      xdpguard rule add dst 2001:db8::/32 proto udp length '>1200' rate-limit 10M

    The same match again changes the action. Quote terms with < > ! for the shell.
    A rule that matches every frame of a family ('ipv6 drop', 'dst 0.0.0.0/0
    accept') needs --force.
    """
    r = _call(control, "rule.add", rules=[" ".join(words)], comment=comment, force=force)
    _emit(r, as_json, f"rules: {r['added']} added, {r['updated']} updated")


@rule.command("del", context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, required=True)
@json_option
@control_option
def rule_del(words: tuple[str, ...], as_json: bool, control: str) -> None:
    """Delete the local rule with this match (the action may be left out)."""
    r = _call(control, "rule.del", rules=[" ".join(words)])
    missing = f" (not there: {'; '.join(r['missing'])})" if r["missing"] else ""
    _emit(r, as_json, f"rules: {r['deleted']} deleted{missing}")


@rule.command("list")
@click.option("--source", help="Only this source's rules: local, or bgp:PEER.")
@json_option
@control_option
def rule_list(source: str | None, as_json: bool, control: str) -> None:
    """The rules in the order they apply, with what each matched."""
    r = _call(control, "rule.list", source=source)
    if as_json:
        _emit(r, True, "")
        return
    for e in r["rules"]:
        stale = " (stale)" if e["stale"] else ""
        comment = f"  # {e['comment']}" if e["comment"] else ""
        click.echo(f"[{e['source']}] {e['rule']}{stale}  : {_rule_counts(e)}{comment}")
    for src, s in r["sessions"].items():
        state = "up" if s["up"] else "down"
        click.echo(f"session {src}: {state}, rules kept {s['expires_in']:.0f}s without news")
    click.echo(f"{r['count']} rule{'s' * (r['count'] != 1)}", err=True)


@rule.command("load")
@click.argument("file", type=click.File("rb"))
@click.option("--replace", is_flag=True, help="The file's rules become all the local rules.")
@click.option(
    "--force",
    is_flag=True,
    help="Allow a rule that matches every frame of a family, or emptying the rules by --replace.",
)
@json_option
@control_option
def rule_load(file: Any, replace: bool, force: bool, as_json: bool, control: str) -> None:
    """Load FILE (or - for stdin): one rule per line, '#' starts a comment
    (kept with the rule). The whole file is checked first: one bad line
    changes nothing."""
    try:
        r = _call(control, "rule.load", file.fileno(), replace=replace, force=force)
    except XdpguardError as exc:
        raise XdpguardError(f"{file.name}: {exc}") from None
    _emit(
        r,
        as_json,
        f"rules: loaded {r['loaded']} ({r['added']} added, {r['updated']} updated, "
        f"{r['deleted']} deleted)",
    )


@rule.command("clear")
@click.option("--source", default="local", show_default=True, help="local, or bgp:PEER.")
@json_option
@control_option
def rule_clear(source: str, as_json: bool, control: str) -> None:
    """Delete every rule of a source.

    A BGP source's rules come back when its peer announces them again, or
    when the feed replays them (after xdpguard or the session restarts)."""
    r = _call(control, "rule.clear", source=source)
    _emit(r, as_json, f"rules: {r['deleted']} deleted")


@main.command("flowspec-feed")
@click.option(
    "--hold",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds a peer's rules outlive its session (or this feed).",
)
@control_option
def flowspec_feed(hold: float, control: str) -> None:
    """BGP FlowSpec from ExaBGP into the rules: run by ExaBGP, not by hand.

    \b
    In exabgp.conf (contrib/exabgp/exabgp.conf has a whole one):
      process xdpguard {
          run /usr/bin/xdpguard flowspec-feed --hold 30;
          encoder json;
      }
      neighbor ... { family { ipv4 flow; ipv6 flow; }
          api { processes [ xdpguard ]; neighbor-changes;
                receive { packets; update; } } }

    Each peer's routes are rules of source bgp:PEER ('xdpguard rule list'),
    never saved: a session down, or this feed gone, and they go after
    --hold seconds; a session back in time keeps what it announces again.
    Routes whose action xdpguard cannot carry out (redirect, marking,
    sample) are rejected and logged. Logs to stderr.
    """
    from xdpguard.flowspec_feed import run

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="xdpguard flowspec-feed: %(message)s"
    )
    sys.exit(run(control, hold))


@main.group(cls=Group)
def ratelimit() -> None:
    """Rate limits by source prefix, in XDP, after the rules.

    Without --per-source the prefix's sources share the limit; with it,
    each source address has the limit to itself. Frames above are dropped
    and counted as source_rate_limited. Rates are split evenly over the
    CPUs (each has its own bucket), so a skewed spread passes less, never
    more; a burst of 100 ms at the rate is let through.
    """


@ratelimit.command("add")
@click.argument("prefixes", nargs=-1, required=True, type=Cidr())
@click.option("--pps", type=click.FloatRange(0, min_open=True), help="Packets per second.")
@click.option("--bps", type=click.FloatRange(0, min_open=True), help="Bytes per second.")
@click.option("--per-source", is_flag=True, help="A limit for each source address.")
@click.option("--comment", help="A note kept with the limit.")
@click.option(
    "--force", is_flag=True, help="Allow a /0 without --per-source (every source together)."
)
@json_option
@control_option
def ratelimit_add(
    prefixes: tuple[str, ...],
    pps: float | None,
    bps: float | None,
    per_source: bool,
    comment: str | None,
    force: bool,
    as_json: bool,
    control: str,
) -> None:
    """Limit sources in PREFIXES; an existing limit gets the new rates.

    \b
      xdpguard ratelimit add 198.18.0.0/15 --pps 1000 --per-source
      xdpguard ratelimit add 2001:db8::/32 --pps 50000 --bps 10000000

    A /0 without --per-source (a family's sources sharing one limit) needs
    --force.
    """
    if pps is None and bps is None:
        raise click.UsageError("give --pps, --bps or both")
    r = _call(
        control,
        "ratelimit.add",
        prefixes=list(prefixes),
        pps=pps,
        bps=bps,
        per_source=per_source,
        comment=comment,
        force=force,
    )
    _emit(r, as_json, f"rate limits: {r['added']} added, {r['updated']} updated")


@ratelimit.command("del")
@click.argument("prefixes", nargs=-1, required=True, type=Cidr())
@json_option
@control_option
def ratelimit_del(prefixes: tuple[str, ...], as_json: bool, control: str) -> None:
    """Remove the limits of these prefixes."""
    r = _call(control, "ratelimit.del", prefixes=list(prefixes))
    missing = f" (not there: {', '.join(r['missing'])})" if r["missing"] else ""
    _emit(r, as_json, f"rate limits: {r['deleted']} deleted{missing}")


@ratelimit.command("list")
@json_option
@control_option
def ratelimit_list(as_json: bool, control: str) -> None:
    """The limits, with what each saw and dropped."""
    r = _call(control, "ratelimit.list")
    if as_json:
        _emit(r, True, "")
        return
    for e in r["limits"]:
        rates = ", ".join(f"{e[k]:g} {k}" for k in ("pps", "bps") if e[k] is not None)
        each = " per source" if e["per_source"] else ""
        comment = f"  # {e['comment']}" if e["comment"] else ""
        click.echo(f"{e['prefix']:<44} {rates}{each}  : {_rule_counts(e)}{comment}")
    click.echo(f"{r['count']} rate limit{'s' * (r['count'] != 1)}", err=True)


@main.group(cls=Group)
def flows() -> None:
    """The pinned flow table (offline: no running appliance needed)."""


@flows.command("forget")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="/var/lib/xdpguard",
    show_default=True,
    help="The state directory of the appliance whose table to drop.",
)
def flows_forget(state_dir: Path) -> None:
    """Drop the flow table pinned for STATE_DIR, and the challenges' secret and
    verified sources pinned with it: the next start is a cold one (with its
    learning window; verified.json, if any, brings the verified sources
    back). Refused while an appliance runs with STATE_DIR."""
    from xdpguard.flowtable import forget, pin_dir_for

    if forget(state_dir):
        click.echo(f"flow table {pin_dir_for(state_dir)} removed")
    else:
        click.echo(f"no flow table pinned for {state_dir}")


TCP_MODES = ["off", "monitor", "on", "auto"]


@main.group(cls=Group)
def tcp() -> None:
    """TCP flow protection: flow tracking, SYN challenges, out-of-state drops.

    \b
    Modes, for SYN challenges and for out-of-state drops alike:
      off      no check
      monitor  count what would be dropped or challenged, pass everything
      on       always
      auto     only for a destination whose rate exceeds its threshold
               (--syn-rate/--syn-burst, --state-rate/--state-burst)
    Challenges are answered in XDP: a SYN from a source that has not proved
    it is real gets a SYN-ACK with a cookie, which a real stack answers with
    a RST. The allowlist skips challenges, and so does a verified source, up
    to --verified-syn-rate SYNs/s (beyond: verified_syn_rate_limited), while
    the SYNs of verified sources to one destination stay under
    --verified-dest-syn-rate, and to all under --verified-total-syn-rate
    (beyond: challenged). A challenge proves that an address receives and
    answers a SYN-ACK, not that it sent the SYNs that come in its name: a
    spoofer can get a real host verified, and these rates bound what it
    can send in that name.
    Challenges never go out faster than --challenge-rate/s in all, or
    --challenge-prefix-rate/s to one source /24 or /48 (beyond:
    challenge_rate_limited): xdpguard is no reflector. Out-of-state frames
    are those of no tracked flow (tcp_no_flow, tcp_synack_reflection,
    challenge_failed), outside their flow's window (tcp_out_of_window), and
    fragments of TCP segments (tcp_fragment: no flow can vouch for them).
    During the learning window after start, frames of no tracked flow pass.
    """


def _tcp_text(r: dict[str, Any]) -> str:
    def threshold(mode: str, rate: int, burst: int, what: str) -> str:
        # The thresholds matter only in auto mode; say so rather than
        # print them as if they applied to "on".
        return f"above {rate} {what}/s per destination, burst {burst}" + (
            "" if mode == "auto" else " (when auto)"
        )

    return (
        f"SYN challenges: {r['syn_mode']}, "
        f"{threshold(r['syn_mode'], r['syn_rate'], r['syn_burst'], 'SYN')}; "
        f"verified sources kept {r['verify_ttl']}s, at most {r['verified_syn_rate']} SYN/s "
        f"each, {r['verified_dest_syn_rate']}/s to one destination and "
        f"{r['verified_total_syn_rate']}/s in all unchallenged; at most {r['challenge_rate']} "
        "challenges/s, "
        f"{r['challenge_prefix_rate']}/s per source /24 or /48\n"
        f"out-of-state drops: {r['state_mode']}, "
        f"{threshold(r['state_mode'], r['state_rate'], r['state_burst'], 'frame')}\n"
        f"learning: {r['learning_left']}s left"
    )


@tcp.command("mode")
@click.argument("mode", type=click.Choice(TCP_MODES))
@json_option
@control_option
def tcp_mode(mode: str, as_json: bool, control: str) -> None:
    """Set SYN challenges and out-of-state drops to MODE at once."""
    _emit(r := _call(control, "tcp.mode", mode=mode), as_json, _tcp_text(r))


@tcp.command("config")
@click.option("--syn-mode", type=click.Choice(TCP_MODES), help="SYN challenges.")
@click.option("--state-mode", type=click.Choice(TCP_MODES), help="Out-of-state drops.")
@click.option("--syn-rate", type=click.IntRange(1), help="auto: SYNs/s per destination.")
@click.option("--syn-burst", type=click.IntRange(1), help="auto: SYNs tolerated above it.")
@click.option("--state-rate", type=click.IntRange(1), help="auto: out-of-state frames/s.")
@click.option("--state-burst", type=click.IntRange(1), help="auto: ... tolerated above it.")
@click.option("--verify-ttl", type=click.IntRange(1), help="Seconds a verified source is kept.")
@click.option(
    "--challenge-rate", type=click.IntRange(1), help="Challenges/s at most, to all sources."
)
@click.option(
    "--challenge-prefix-rate",
    type=click.IntRange(1),
    help="Challenges/s at most to one source /24 (IPv4) or /48 (IPv6).",
)
@click.option(
    "--verified-syn-rate",
    type=click.IntRange(1),
    help="SYNs/s a verified source may send while challenges are on.",
)
@click.option(
    "--verified-dest-syn-rate",
    type=click.IntRange(1),
    help="SYNs/s of verified sources to one destination that skip the challenge (beyond: "
    "challenged).",
)
@click.option(
    "--verified-total-syn-rate",
    type=click.IntRange(1),
    help="... and to all destinations together.",
)
@click.option(
    "--source-flow-quota",
    type=click.IntRange(0),
    help="Live flows one source may hold (beyond: flow_quota); 0: an eighth of the table.",
)
@click.option(
    "--prefix-flow-quota",
    type=click.IntRange(0),
    help="... one source /24 or /48; 0: a quarter of the table. Allowlisted sources are exempt.",
)
@click.option(
    "--learn", type=click.FloatRange(0, 86400), help="Adopt open flows for SECONDS from now."
)
@json_option
@control_option
def tcp_config(as_json: bool, control: str, learn: float | None, **changes: Any) -> None:
    """Change TCP settings (kept across restarts); without options, show them."""
    settings = {k: v for k, v in changes.items() if v is not None}
    r = _call(control, "tcp.config", **settings, **({"learn": learn} if learn is not None else {}))
    _emit(r, as_json, _tcp_text(r))


@tcp.command("flows")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True)
@json_option
@control_option
def tcp_flows(top: int, as_json: bool, control: str) -> None:
    """Tracked flows per state, and the busiest ones."""
    r = _call(control, "tcp.flows", top=top)
    if as_json:
        _emit(r, True, "")
        return
    states = ", ".join(f"{n} {s}" for s, n in r["states"].items() if n)
    click.echo(
        f"{r['tracked']} of {r['capacity']} flows tracked ({states or 'none'}), "
        f"{r['fast_path']} in the fast path; {r['evictions']} evicted; "
        f"{r['verified']} verified sources; "
        f"learning {r['learning_left']}s left"
    )
    for f in r["busiest"]:
        click.echo(
            f"  {f['outside']:<46} -> {f['inside']:<46} {f['state']:<12} "
            f"{f['packets']:>10} pkts {f['bytes']:>14} B  idle {f['idle']}s"
            f"{'  (adopted)' if f['adopted'] else ''}"
        )


@tcp.group("verified", cls=Group)
def tcp_verified() -> None:
    """Sources that answered a SYN challenge (they skip challenges for --verify-ttl)."""


@tcp_verified.command("list")
@json_option
@control_option
def tcp_verified_list(as_json: bool, control: str) -> None:
    """The verified sources and the seconds they have left."""
    r = _call(control, "tcp.verified.list")
    if as_json:
        _emit(r, True, "")
        return
    for e in r["entries"]:
        click.echo(f"{e['source']:<40} ttl {e['ttl']}s")
    click.echo(f"{r['count']} verified sources", err=True)


@tcp_verified.command("clear")
@json_option
@control_option
def tcp_verified_clear(as_json: bool, control: str) -> None:
    """Forget every verified source: each must answer a challenge again."""
    r = _call(control, "tcp.verified.clear")
    _emit(r, as_json, f"{r['cleared']} verified sources forgotten")


if __name__ == "__main__":
    main()
