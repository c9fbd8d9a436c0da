"""The shipped ExaBGP configuration is one ExaBGP accepts (exabgp --test)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CONF = Path(__file__).resolve().parents[2] / "contrib" / "exabgp" / "exabgp.conf"


@pytest.mark.skipif(shutil.which("exabgp") is None, reason="exabgp is not installed (make deps)")
def test_the_example_exabgp_conf_parses(tmp_path: Path) -> None:
    text = CONF.read_text()
    assert "flowspec-feed" in text and "packets;" in text and "neighbor-changes;" in text
    # ExaBGP checks that the program exists: point it at this checkout's.
    xdpguard = Path(sys.executable).parent / "xdpguard"
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text.replace("/usr/bin/xdpguard", str(xdpguard)))
    env = {**os.environ, "exabgp.daemon.user": getpass.getuser()}
    res = subprocess.run(
        ["exabgp", "--test", str(conf)], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
