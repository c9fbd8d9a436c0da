"""The xdpguard command line.

``xdpguard run`` is the appliance in the foreground; every other command is
a client of its control socket (``--control``, or $XDPGUARD_CONTROL).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import click

from xdpguard import __version__
from xdpguard.control import DEFAULT_CONTROL, ControlClient, ControlServer
from xdpguard.defs import MAX_QUEUES
from xdpguard.errors import XdpguardError
from xdpguard.netns import valid_ifname

log = logging.getLogger("xdpguard")


class Interface(click.ParamType):
    """A network device name, checked for shape here and for existence by the engine."""

    name = "DEV"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not isinstance(value, str) or not valid_ifname(value):
            self.fail(f"{value!r} is not a valid device name (1-15 chars, no '/', ':' or spaces)")
        return value


class NetnsName(click.ParamType):
    """A name of the ``ip netns`` kind (/run/netns/NAME); whether it exists is checked at use."""

    name = "NS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
            self.fail(f"{value!r} is not a valid namespace name")
        return value


class Group(click.Group):
    """Turns the operator's errors into one line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XdpguardError as exc:
            raise click.ClickException(str(exc)) from None


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


@main.command()
@click.option("--outer", required=True, type=Interface(), help="Untrusted device (clients).")
@click.option(
    "--outer-netns",
    type=NetnsName(),
    help="Namespace of --outer (default: the one xdpguard runs in).",
)
@click.option("--inner", required=True, type=Interface(), help="Device towards the origin.")
@click.option("--inner-netns", required=True, type=NetnsName(), help="Namespace of --inner.")
@click.option(
    "--queues",
    type=click.IntRange(1, MAX_QUEUES),
    help="Queues to serve, one worker each (default: all of the devices' queues).",
)
@click.option(
    "--xdp-mode",
    type=click.Choice(["native", "skb"]),
    default="native",
    show_default=True,
    help="XDP attach mode; skb (generic) is the fallback for drivers without native XDP.",
)
@click.option(
    "--summary-interval",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds between the rate lines printed to stderr.",
)
@click.option(
    "--no-policy",
    is_flag=True,
    hidden=True,
    help="Forward without per-frame logic (the benchmarks' bare forwarder).",
)
@control_option
def run(
    outer: str,
    outer_netns: str | None,
    inner: str,
    inner_netns: str,
    queues: int | None,
    xdp_mode: str,
    summary_interval: float,
    no_policy: bool,
    control: str,
) -> None:
    """Run the appliance in the foreground until SIGINT or SIGTERM.

    Frames arriving on --outer that pass the policy leave unchanged on
    --inner, and the origin's frames from --inner leave on --outer. On exit
    every XDP program and file xdpguard created is removed.
    """
    from xdpguard.engine import Engine, EngineConfig, missing_capabilities
    from xdpguard.stats import summary_line

    missing = missing_capabilities()
    if missing:
        raise XdpguardError(f"xdpguard run needs root (missing {', '.join(missing)})")

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="xdpguard: %(levelname)s: %(message)s"
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    engine = Engine(
        EngineConfig(
            outer=outer,
            outer_netns=outer_netns,
            inner=inner,
            inner_netns=inner_netns,
            queues=queues,
            xdp_mode=xdp_mode,
            no_policy=no_policy,
        )
    )
    ready = threading.Event()

    def when_ready(fn: Any) -> Any:
        def handler(args: dict[str, Any]) -> Any:
            if not ready.is_set():
                raise XdpguardError("xdpguard is starting")
            return fn(args)

        return handler

    server = ControlServer(
        control,
        {
            "status": when_ready(lambda _a: engine.status()),
            "stats": when_ready(lambda _a: engine.stats()),
        },
    )
    # The socket first: a second instance on the same path fails before
    # touching any device.
    server.start()
    try:
        engine.start()
        ready.set()
        log.info("control socket %s", control)
        prev = engine.stats(account=False)
        next_line = time.monotonic() + summary_interval
        while not stop.is_set():
            stop.wait(0.1)
            if engine.fatal.is_set():
                raise XdpguardError("a worker failed (see above); shutting down")
            if time.monotonic() >= next_line:
                cur = engine.stats(account=False)
                print(f"xdpguard: {summary_line(prev, cur)}", file=sys.stderr, flush=True)
                prev, next_line = cur, next_line + summary_interval
    finally:
        server.close()
        engine.stop()
    log.info("stopped")


def _client(control: str) -> ControlClient:
    return ControlClient(control)


@main.command()
@json_option
@control_option
def status(as_json: bool, control: str) -> None:
    """Devices, namespaces, netns cookies, ifindexes, queues, XDP mode, sockets."""
    from xdpguard.stats import format_status

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


if __name__ == "__main__":
    main()
