"""contrib/systemd/xdpguard.service: a unit systemd accepts, granting the
capabilities xdpguard run checks for and no others. (PID 1 here is not
systemd: that the daemon works with exactly these capabilities is
tests/netns/test_cli_errors.py's, the notify protocol test_readiness.py's.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from lab import ROOT, XDPGUARD

from xdpguard.engine import _CAPS

pytestmark = pytest.mark.unit

UNIT = ROOT / "contrib" / "systemd" / "xdpguard.service"


def unit_setting(key: str) -> str:
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    # As installed, ExecStart is /usr/bin/xdpguard; here it is this checkout's.
    unit = tmp_path / "xdpguard.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/xdpguard", str(XDPGUARD)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_the_unit_grants_what_run_needs_and_no_more() -> None:
    assert set(unit_setting("CapabilityBoundingSet").split()) == set(_CAPS)
    assert set(unit_setting("AmbientCapabilities").split()) == set(_CAPS)
    for key, value in (
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("StateDirectory", "xdpguard"),
        ("RuntimeDirectory", "xdpguard"),
    ):
        assert unit_setting(key) == value, key
    assert unit_setting("WatchdogSec")
    assert "--config" in unit_setting("ExecStart")
