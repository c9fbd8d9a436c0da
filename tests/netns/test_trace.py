"""``xdpguard trace``: the kernel's XDP errors as they happen, devices named
in their own namespaces, and the AF_XDP sockets' drops, from real faults."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lab import ORIGIN_V4, XDPGUARD, Appliance, import_bench, lab, wait_for

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns


@contextmanager
def tracing(app: Appliance) -> Iterator[list[dict]]:
    """``xdpguard trace --json`` running (bounded: 120 s at most), its events
    collected as they come; stopped with a SIGINT (Ctrl-C) when the block ends."""
    proc = subprocess.Popen(
        [str(XDPGUARD), "trace", "--json", "--interval", "0.2", "--seconds", "120",
         "--control", str(app.control)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    events: list[dict] = []
    reader = threading.Thread(
        target=lambda: events.extend(json.loads(line) for line in proc.stdout)  # type: ignore[union-attr]
    )
    try:
        assert "attached to" in proc.stderr.readline()
        reader.start()
        yield events
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, err
        if reader.is_alive() or reader.ident is not None:
            reader.join(30)
        assert f"{len(events)} event(s)" in err, err


def test_a_redirect_into_a_veth_without_napi_is_traced(tmp_path: Path) -> None:
    """The origin's end loses its NAPI: the fast path's redirects into inner
    fail in the kernel, which trace shows, devices and namespaces named."""
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        assert app.call("status")["fast_path"]["directions"]["in"]["active"]
        with tracing(app) as events:
            the_lab.ns_exec(the_lab.origin_ns, "ethtool", "-K", "eth0", "gro", "off")
            the_lab.ping(ORIGIN_V4, count=2)
            wait_for(
                lambda: "none sent" in app.output() or the_lab.ping(ORIGIN_V4, count=1),
                what="the black hole noticed",
            )
    errs = [e for e in events if e["event"] == "redirect_err"]
    assert errs, events
    e = errs[0]
    assert e["dev"]["device"] == the_lab.outer and e["dev"]["netns"] == "(own)"
    assert e["map"]["type"] == "devmap" and e["error"] < 0 and e["error_text"]


def test_a_full_socket_ring_is_traced(tmp_path: Path) -> None:
    """Everything to the loop (fast path off), a burst faster than it drains:
    the kernel drops at the outer socket's full RX ring, seen twice: as the
    redirect errors into the XSKMAP, and as the socket's rx_ring_full."""
    xgbench = import_bench()
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path, "--fast-path", "off") as app:
        client = resolve_device(Netns(the_lab.client_ns), "eth0")
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        frame = xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", ORIGIN_V4, 4000, 9)
        with tracing(app) as events:
            gen = xgbench.Generator(the_lab.client_ns, "eth0", frame)
            try:

                def dropped() -> bool:
                    gen.run(500_000)  # bounded bursts, until the kernel drops some
                    st = app.call("stats")
                    return any(q["xsk"]["outer"]["rx_ring_full"] for q in st["queues"])

                wait_for(dropped, what="a full RX ring")
            finally:
                gen.close()

            def ring_full_traced() -> bool:
                return any(
                    e["event"] == "xsk" and e["socket"] == "outer" and e["grew"].get("rx_ring_full")
                    for e in list(events)
                )

            wait_for(ring_full_traced, what="trace to read the sockets' statistics")
    redirect = [e for e in events if e["event"] == "redirect_err" and e["map"]]
    assert any(e["map"]["type"] == "xskmap" for e in redirect), redirect[:3]
