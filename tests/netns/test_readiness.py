"""Readiness: ``status --wait`` and sd_notify say when a frame sent now is forwarded."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from lab import ORIGIN_V4, XDPGUARD, Appliance, Lab, lab, sh

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
