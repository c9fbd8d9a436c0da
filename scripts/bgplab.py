"""The BGP lab: a fleet controller (GoBGP, gobgpd) and ExaBGP running
``xdpguard flowspec-feed``, each in a network namespace of its own, peering
over a veth on 169.254.200.0/30. For the interop test and the FlowSpec
benchmark; torn down on exit, failure included, killing only the PIDs it
started.

    with BgpLab(workdir, control="/run/xdpguard/x.sock", hold=5) as bgp:
        bgp.wait_up(rules_call)
        bgp.gobgp("global", "rib", "-a", "ipv4-flowspec", "add", "match", ...)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONTROLLER, SPEAKER = "169.254.200.1", "169.254.200.2"
CONTROLLER_AS, SPEAKER_AS = 65001, 65002

GOBGPD_TOML = """\
[global.config]
  as = {controller_as}
  router-id = "{controller}"
  local-address-list = ["{controller}"]
  port = 179
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{speaker}"
    peer-as = {speaker_as}
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-flowspec"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-flowspec"
"""

EXABGP_CONF = """\
process xdpguard {{
    run {feed} flowspec-feed --control {control} --hold {hold};
    encoder json;
}}
neighbor {controller} {{
    router-id {speaker};
    local-address {speaker};
    local-as {speaker_as};
    peer-as {controller_as};
    family {{
        ipv4 flow;
        ipv6 flow;
    }}
    api {{
        processes [ xdpguard ];
        neighbor-changes;
        receive {{
            packets;
            update;
        }}
    }}
}}
"""


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class BgpLab:
    def __init__(self, workdir: Path, control: str | Path, hold: float, tag: str = "") -> None:
        self.dir = Path(workdir)
        self.control = str(control)
        self.hold = hold
        tag = tag or str(os.getpid())
        self.ctl_ns, self.exa_ns = f"xgbgpc{tag}", f"xgbgpe{tag}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exa_log = self.dir / "exabgp.log"
        self.gobgpd_log = self.dir / "gobgpd.log"

    # -- the lab --

    def __enter__(self) -> BgpLab:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _up(self) -> None:
        for ns in (self.ctl_ns, self.exa_ns):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh(
            "ip",
            "link",
            "add",
            "xgbgp0",
            "netns",
            self.ctl_ns,
            "type",
            "veth",
            "peer",
            "name",
            "xgbgp1",
            "netns",
            self.exa_ns,
        )
        for ns, dev, addr in (
            (self.ctl_ns, "xgbgp0", CONTROLLER),
            (self.exa_ns, "xgbgp1", SPEAKER),
        ):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        names = {
            "controller": CONTROLLER, "speaker": SPEAKER, "controller_as": CONTROLLER_AS,
            "speaker_as": SPEAKER_AS, "control": self.control, "hold": self.hold,
            "feed": str(Path(sys.executable).parent / "xdpguard"),
        }  # fmt: skip
        (self.dir / "gobgpd.toml").write_text(GOBGPD_TOML.format(**names))
        (self.dir / "exabgp.conf").write_text(EXABGP_CONF.format(**names))
        self._start(
            self.ctl_ns,
            self.gobgpd_log,
            [],
            "gobgpd",
            "-f",
            str(self.dir / "gobgpd.toml"),
            "-t",
            "toml",
        )
        env = {
            "exabgp.daemon.user": "root",
            "exabgp.daemon.daemonize": "false",
            "exabgp.log.destination": "stdout",
            "exabgp.api.cli": "false",
        }
        self._start(
            self.exa_ns,
            self.exa_log,
            [f"{k}={v}" for k, v in env.items()],
            "exabgp",
            str(self.dir / "exabgp.conf"),
        )

    def _start(self, ns: str, log: Path, env: list[str], *cmd: str) -> None:
        with open(log, "ab") as out:
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, "env", *env, *cmd],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def stop_exabgp(self) -> None:
        """ExaBGP (and with it the feed) gone: SIGKILL, as a crash would."""
        proc = self.procs[1]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for ns in (self.ctl_ns, self.exa_ns):
            _sh("ip", "netns", "del", ns, check=False)

    # -- driving it --

    def gobgp(self, *args: str) -> str:
        """The GoBGP CLI against the controller."""
        return _sh("ip", "netns", "exec", self.ctl_ns, "gobgp", *args).stdout

    def announce(self, family: str, *match_then: str) -> None:
        self.gobgp("global", "rib", "-a", f"{family}-flowspec", "add", "match", *match_then)

    def withdraw(self, family: str, *match: str) -> None:
        self.gobgp("global", "rib", "-a", f"{family}-flowspec", "del", "match", *match)

    def peer(self, what: str) -> None:
        """enable, disable or reset the controller's side of the session."""
        self.gobgp("neighbor", SPEAKER, what)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-4000:]}"
            for p in (self.exa_log, self.gobgpd_log)
            if p.exists()
        )

    def wait_up(self, rules_call: Any, timeout: float = 60) -> None:
        """Until xdpguard says the session is up (the feed told it)."""
        deadline = time.monotonic() + timeout
        source = f"bgp:{CONTROLLER}"
        while True:
            s = rules_call()["sessions"].get(source)
            if s and s["up"]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the BGP session did not come up:\n{self.logs()}")
            time.sleep(0.05)
