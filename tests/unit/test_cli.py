"""The CLI's surface: help, version, argument validation, client errors."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from xdpguard import __version__
from xdpguard.cli import main

pytestmark = pytest.mark.unit


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args))


def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0 and __version__ in res.output


@pytest.mark.parametrize("cmd", ["run", "status", "stats"])
def test_help_teaches(cmd: str) -> None:
    res = invoke(cmd, "--help")
    assert res.exit_code == 0
    assert "--control" in res.output and "XDPGUARD_CONTROL" in res.output


def test_run_help_lists_its_options() -> None:
    out = invoke("run", "--help").output
    for opt in ("--outer", "--outer-netns", "--inner", "--inner-netns", "--queues", "--xdp-mode"):
        assert opt in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--outer", "a/b", "--inner", "i", "--inner-netns", "n"], "not a valid device name"),
        (["--outer", "o", "--inner", "x" * 16, "--inner-netns", "n"], "not a valid device name"),
        (["--outer", "o", "--inner", "i", "--inner-netns", "../x"], "not a valid namespace"),
        (["--outer", "o", "--inner", "i", "--inner-netns", "n", "--queues", "0"], "--queues"),
        (["--outer", "o", "--inner", "i", "--inner-netns", "n", "--xdp-mode", "hw"], "xdp-mode"),
        (["--outer", "o", "--inner", "i"], "--inner-netns"),
    ],
)
def test_run_rejects_bad_arguments(args: list[str], needle: str) -> None:
    res = invoke("run", *args)
    assert res.exit_code == 2
    assert needle in res.output


def test_status_without_daemon_is_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    res = invoke("status", "--control", str(sock))
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: xdpguard is not running (no control socket at {sock})"


def test_control_from_environment(tmp_path: Path) -> None:
    sock = tmp_path / "env.sock"
    res = CliRunner(env={"XDPGUARD_CONTROL": str(sock)}).invoke(main, ["stats"])
    assert str(sock) in res.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_trace_counts_every_event_it_wrote(monkeypatch: pytest.MonkeyPatch, signum: int) -> None:
    """A signal that lands right after an event is written (the window CI once
    hit: 7416 lines, 'xdpguard trace: 7415 event(s)') stops the trace with
    that event counted."""
    import xdpguard.trace

    def endless(*_: object, **__: object) -> Iterator[dict[str, object]]:
        while True:
            yield {"event": "redirect_err"}

    written = 0
    echo = click.echo

    def echo_then_signal(message: str, err: bool = False, **kw: object) -> None:
        nonlocal written
        echo(message, err=err, **kw)  # type: ignore[arg-type]
        if not err:
            written += 1
            if written == 3:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(xdpguard.trace, "follow", endless)
    monkeypatch.setattr(click, "echo", echo_then_signal)
    before = signal.getsignal(signum)
    result = CliRunner().invoke(main, ["trace", "--json"])
    assert result.exit_code == 0, result.output
    assert written == 3
    assert result.stderr.strip() == "xdpguard trace: 3 event(s)"
    assert signal.getsignal(signum) is before


def test_the_rule_examples_in_help_are_valid_rules() -> None:
    """Every rule 'xdpguard rule --help' and 'rule add --help' show parses."""
    import shlex

    from xdpguard import flowspec

    examples = []
    for cmd in (["rule", "--help"], ["rule", "add", "--help"]):
        for line in invoke(*cmd).output.splitlines():
            line = line.strip().removeprefix("xdpguard rule add ")
            if line.startswith(("dst ", "src ", "ipv4 ", "ipv6 ")) and "  " not in line:
                examples.append(" ".join(shlex.split(line)))
    assert len(examples) >= 5, examples
    for text in examples:
        flowspec.parse(text)


def test_a_worker_that_does_not_stop_keeps_back_only_what_it_uses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 21, 3: when a worker does not stop, its memory must not be freed
    under it; everything else is still undone, the verified sources saved
    and the state directory let go. The old filter kept only 'detach'
    steps, which had run already: it kept nothing."""
    from xdpguard.engine import Engine

    engine = Engine.__new__(Engine)  # only its undo list: no devices here
    engine._undo = []
    done: list[str] = []

    def step(what: str, fails: bool = False):  # type: ignore[no-untyped-def]
        def fn() -> None:
            if fails:
                raise RuntimeError("worker 0 did not stop")
            done.append(what)

        return fn

    for what, loop_uses in (
        ("let go of the state directory", False),
        ("close the flow table", True),
        ("unload outer program", False),
        ("free the TCP stage", True),
        ("save verified sources", False),
        ("free UMEM", True),
        ("close socket outer/0", True),
        ("free worker 0", True),
    ):
        engine._push_undo(what, step(what), loop_uses)
    engine._push_undo("stop workers", step("stop workers", fails=True))
    engine._push_undo("detach XDP from outer", step("detach XDP from outer"))
    engine.stop()
    assert done == [
        "detach XDP from outer",
        "save verified sources",
        "unload outer program",
        "let go of the state directory",
    ]
    assert any("kept back" in r.getMessage() for r in caplog.records)
