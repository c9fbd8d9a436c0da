"""What operators and accidents change under a running appliance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lab import ORIGIN_V4, ORIGIN_V6, Appliance, Lab, lab, sh, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def lab2() -> Lab:
    with lab(queues=2) as the_lab:
        yield the_lab


def test_an_mtu_change_is_noticed_and_said(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        status = app.call("status")
        room = status["devices"]["outer"]["mtu_max"]
        sh("ip", "link", "set", "dev", lab2.outer, "mtu", str(room + 1000))
        wait_for(lambda: app.call("status")["devices"]["outer"]["mtu"] == room + 1000, what="MTU")
        wait_for(lambda: f"MTU changed 1500 -> {room + 1000}" in app.output(), what="the log line")
        assert "frames longer than" in app.output()
        sh("ip", "link", "set", "dev", lab2.outer, "mtu", "1500")
        wait_for(lambda: app.call("status")["devices"]["outer"]["mtu"] == 1500, what="MTU back")
        assert lab2.ping(ORIGIN_V4)


def test_deleting_a_namespace_name_loses_nothing(lab2: Lab, tmp_path: Path) -> None:
    """The namespace lives on while the appliance holds it; only its name goes."""
    with Appliance(lab2, tmp_path) as app:
        sh("ip", "netns", "del", lab2.inner_ns)
        for _ in range(3):
            st = app.call("status")
            assert st["state"] == "ready" and st["devices"]["inner"]["name"] == lab2.inner
        assert lab2.ping(ORIGIN_V4)
        assert app.cli("stats", "--json").returncode == 0


def test_housekeeping_outlives_a_broken_state_directory(lab2: Lab, tmp_path: Path) -> None:
    """Saving fails: the change still applies and says it was not saved; TTL
    expiry goes on; the policy is saved once the directory is back."""
    with Appliance(lab2, tmp_path) as app:
        state = app.state_dir
        shutil.rmtree(state, ignore_errors=True)
        state.write_text("a file where the directory was")  # every save now fails
        res = app.cli("block", "add", "192.0.2.0/24", "--ttl", "1", "--json")
        r = json.loads(res.stdout)
        assert r["added"] == 1 and r["saved"] is False, r
        assert "applied, but not saved" in res.stderr
        # Expiry still runs (before, the first failure killed the thread).
        wait_for(lambda: app.call("block.list")["count"] == 0, what="TTL expiry")
        app.cli("block", "add", "198.51.100.0/24")
        state.unlink()
        state.mkdir(mode=0o700)
        wait_for(lambda: (state / "policy.npz").exists(), what="the save retried")
    with Appliance(lab2, tmp_path) as app:
        entries = app.call("block.list")["entries"]
        assert [e["prefix"] for e in entries] == ["198.51.100.0/24"]


def gro(the_lab: Lab, ns: str, on: bool) -> None:
    the_lab.ns_exec(ns, "ethtool", "-K", "eth0", "gro", "on" if on else "off")


def test_a_target_without_napi_keeps_the_af_xdp_path(lab2: Lab, tmp_path: Path) -> None:
    """Redirected into a veth whose peer has no NAPI, frames vanish: the start
    probe finds it, that direction keeps the AF_XDP path and says why."""
    gro(lab2, lab2.origin_ns, False)
    with Appliance(lab2, tmp_path) as app:
        fast = app.call("status")["fast_path"]["directions"]
        assert not fast["in"]["active"] and "takes no redirected frames" in fast["in"]["why"]
        assert fast["out"]["active"], fast
        assert "fast path in" in app.output() and "takes the AF_XDP path" in app.output()
        assert lab2.ping(ORIGIN_V4) and lab2.ping(ORIGIN_V6)
        # Fixed, and asked again: it probes and goes fast.
        gro(lab2, lab2.origin_ns, True)
        app.cli("fast-path", "on")
        assert app.call("status")["fast_path"]["directions"]["in"]["active"]


def test_a_black_hole_at_runtime_is_noticed(lab2: Lab, tmp_path: Path) -> None:
    from lab import import_bench

    from xdpguard.netns import Netns, resolve_device

    xgbench = import_bench()
    with Appliance(lab2, tmp_path) as app:
        assert app.call("status")["fast_path"]["directions"]["in"]["active"]
        gro(lab2, lab2.origin_ns, False)  # the origin's end loses its NAPI
        client = resolve_device(Netns(lab2.client_ns), "eth0")
        origin = resolve_device(Netns(lab2.origin_ns), "eth0")
        frame = xgbench.udp4_frame(client.mac, origin.mac, "169.254.0.1", ORIGIN_V4, 4000, 9)
        gen = xgbench.Generator(lab2.client_ns, "eth0", frame)

        def fell_back() -> bool:
            gen.run(1000, pps=5000)  # a trickle of UDP, bounded, until the watch sees it
            return not app.call("status")["fast_path"]["directions"]["in"]["active"]

        try:
            wait_for(fell_back, what="the black hole noticed")
        finally:
            gen.close()
        assert "none sent" in app.output()
        assert lab2.ping(ORIGIN_V4)  # through the loop now


def test_a_black_hole_of_arp_alone_is_noticed(lab2: Lab, tmp_path: Path) -> None:
    """The first thing a host loses to a black hole is its neighbour's address:
    one ARP request a second, and no frame after. That is enough to notice."""
    with Appliance(lab2, tmp_path) as app:
        assert app.call("status")["fast_path"]["directions"]["in"]["active"]
        gro(lab2, lab2.origin_ns, False)
        for ns in (lab2.client_ns, lab2.origin_ns):
            lab2.ns_exec(ns, "ip", "neigh", "flush", "all")

        def fell_back() -> bool:
            lab2.ping(ORIGIN_V4, count=1)  # an ARP request or three, nothing else
            return not app.call("status")["fast_path"]["directions"]["in"]["active"]

        wait_for(fell_back, what="the black hole noticed")
        assert "none sent" in app.output()
        assert lab2.ping(ORIGIN_V4)  # through the loop now
