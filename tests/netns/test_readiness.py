"""Readiness: ``status --wait`` and sd_notify say when a frame sent now is forwarded."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from lab import ORIGIN_V4, XDPGUARD, Appliance, Lab, lab, sh, wait_for

pytestmark = pytest.mark.netns

STARTS = 20


@pytest.fixture
def lab2() -> Lab:
    with lab(queues=2) as the_lab:
        yield the_lab


def test_one_ping_right_after_status_wait(lab2: Lab, tmp_path: Path) -> None:
    """20 starts in a row: once ``status --wait`` returns, a single ping with a
    one-second timeout gets through, its ARP exchange included."""
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify))
        sd.settimeout(60)
        app = Appliance(lab2, tmp_path)
        for i in range(STARTS):
            for ns in (lab2.client_ns, lab2.origin_ns):  # a cold start for ARP too
                sh("ip", "-n", ns, "neigh", "flush", "all")
            with open(app.log, "ab") as log:
                proc = subprocess.Popen(
                    app.args, stdout=log, stderr=log, env={"NOTIFY_SOCKET": str(notify)}
                )
            try:
                res = sh(
                    str(XDPGUARD), "status", "--wait", "30", "--json", "--control", str(app.control)
                )
                assert json.loads(res.stdout)["state"] == "ready", res.stdout
                ping = lab2.ns_exec(
                    lab2.client_ns, "ping", "-c", "1", "-W", "1", ORIGIN_V4, check=False
                )
                assert ping.returncode == 0, (i, ping.stdout, app.output())
                assert sd.recv(4096).split(b"\n")[0] == b"READY=1"
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=60)
            assert rc == 0, app.output()
            assert sd.recv(4096) == b"STOPPING=1"


def test_status_reports_the_state(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        st = app.call("status")
        assert st["state"] == "ready" and st["pid"] == app.proc.pid  # type: ignore[union-attr]
        assert "ready" in app.cli("status").stdout


def test_the_watchdog_is_pinged_only_while_the_workers_make_progress(
    lab2: Lab, tmp_path: Path
) -> None:
    """WATCHDOG=1 twice per WATCHDOG_USEC; a worker frozen in its loop (a
    ptrace stop of its thread alone) stops the pings, and they come back
    with it."""
    import ctypes
    import os
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    seize, interrupt, detach = 0x4206, 0x4207, 17
    notify = tmp_path / "notify.sock"
    period = 0.4  # WATCHDOG_USEC: a ping every 0.2 s
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify))
        sd.settimeout(30)
        app = Appliance(lab2, tmp_path)
        env = {"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": str(int(period * 1e6))}
        with open(app.log, "ab") as log:
            proc = subprocess.Popen(app.args, stdout=log, stderr=log, env=env)
        try:
            messages = []

            def next_message(timeout: float = 30) -> bytes:
                sd.settimeout(timeout)
                messages.append(sd.recv(4096))
                return messages[-1]

            while b"READY=1" not in next_message():
                pass
            while next_message() != b"WATCHDOG=1":
                pass
            assert next_message() == b"WATCHDOG=1"
            tid = app.call("status")["workers"][0]["tid"]
            assert libc.ptrace(seize, tid, None, None) == 0, os.strerror(ctypes.get_errno())
            try:
                assert libc.ptrace(interrupt, tid, None, None) == 0
                os.waitpid(tid, 0x40000000)  # __WALL: its stop
                deadline = time.monotonic() + 30
                while "made no progress: no watchdog ping" not in app.output():
                    assert time.monotonic() < deadline, app.output()
                    time.sleep(0.05)
                sd.setblocking(False)
                while True:  # pings sent before the check that saw the stall
                    try:
                        sd.recv(4096)
                    except BlockingIOError:
                        break
                # Three more checks' worth: not one ping.
                sd.settimeout(3 * period / 2)
                with pytest.raises(TimeoutError):
                    sd.recv(4096)
            finally:
                libc.ptrace(detach, tid, None, None)
            assert next_message() == b"WATCHDOG=1"  # progress again, pings again
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, app.output()


def test_a_json_log_is_one_object_per_line(lab2: Lab, tmp_path: Path) -> None:
    """--log-format json: every line of stderr a JSON object, the rate summary
    with its numbers as fields."""
    app = Appliance(lab2, tmp_path, "--log-format", "json", "--summary-interval", "0.5")
    with app:
        assert lab2.ping(ORIGIN_V4)
        wait_for(lambda: '"rates"' in app.output(), what="a rate summary")
    lines = app.output().strip().splitlines()
    events = [json.loads(line) for line in lines]  # each a whole JSON object
    assert all({"time", "level", "message"} <= e.keys() for e in events)
    assert any(e["message"].startswith("ready; control socket") for e in events)
    rates = next(e["rates"] for e in events if "rates" in e)
    assert set(rates) == {"in", "out"}
