"""xdpguard between two namespaces, with real traffic (issue: the data path)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from lab import CLIENT_V4, CLIENT_V6, ORIGIN_V4, ORIGIN_V6, Appliance, Lab, lab, sh, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def lab2() -> Lab:
    with lab(queues=2) as the_lab:
        yield the_lab


def test_lab_has_no_path_without_xdpguard(lab2: Lab, tmp_path: Path) -> None:
    with lab2.server():
        assert not lab2.ping(ORIGIN_V4, count=2)
        assert not lab2.ping(ORIGIN_V6, count=2)
        res = lab2.client("many", "--to", ORIGIN_V4, "--conns", "1", "--timeout", "2")
        assert not res["ok"]
        with Appliance(lab2, tmp_path):
            assert lab2.ping(ORIGIN_V4)
        # Stopped again: the path is gone with it.
        assert not lab2.ping(ORIGIN_V4, count=2)


def test_ping_tcp_udp_both_ways(lab2: Lab, tmp_path: Path) -> None:
    with lab2.server(), Appliance(lab2, tmp_path) as app:
        assert lab2.ping(ORIGIN_V4)
        assert lab2.ping(ORIGIN_V6)
        assert lab2.ping(CLIENT_V4, ns=lab2.origin_ns)
        assert lab2.ping(CLIENT_V6, ns=lab2.origin_ns)

        up = lab2.client("send", "--to", ORIGIN_V4, "--bytes", "64M", "--seed", "7")
        assert up["ok"], up
        down = lab2.client("recv", "--to", ORIGIN_V6, "--bytes", "64M", "--seed", "8")
        assert down["ok"], down
        assert up["sha256"] != down["sha256"]

        conns = lab2.client("many", "--to", ORIGIN_V4, "--conns", "200")
        assert conns["ok"] and conns["connections"] == 200, conns

        for addr in (ORIGIN_V4, ORIGIN_V6):
            udp = lab2.client("udp", "--to", addr, "--count", "200")
            assert udp["ok"], udp

        stats = app.call("stats")
        inbound, outbound = stats["directions"]["in"], stats["directions"]["out"]
        # 64 MiB each way went through the appliance (the loop and XDP's fast
        # path together), not around it.
        for d in (inbound, outbound):
            assert d["tx_bytes"] + d["xdp"]["fast_path"]["bytes"] > 64 << 20
        assert stats["reasons"]["redirected"]["packets"] >= inbound["rx_packets"]
        assert stats["frames"]["consistent"]


def test_same_ifindex_both_queues(tmp_path: Path) -> None:
    """The shared-UMEM netns bug's regression case: outer and inner are both ifindex 4242."""
    with (
        lab(queues=2, index=4242) as the_lab,
        the_lab.server(),
        Appliance(the_lab, tmp_path) as app,
    ):
        status = app.call("status")
        outer, inner = status["devices"]["outer"], status["devices"]["inner"]
        assert outer["ifindex"] == inner["ifindex"] == 4242
        assert outer["netns_cookie"] != inner["netns_cookie"]
        socks = {(s["netns_cookie"], s["ifindex"], s["queue"]) for s in status["sockets"]}
        assert len(socks) == 4  # two devices x two queues, all distinct keys
        for s in status["sockets"]:
            assert s["netns_cookie"] == status["devices"][s["device"]]["netns_cookie"]

        assert the_lab.ping(ORIGIN_V4)
        assert the_lab.ping(ORIGIN_V6)
        # Many flows, so the client's TX queue choice spreads them over both queues.
        for _ in range(3):
            res = the_lab.client("many", "--to", ORIGIN_V4, "--conns", "100")
            assert res["ok"], res
        up = the_lab.client("send", "--to", ORIGIN_V4, "--bytes", "8M")
        assert up["ok"], up

        # Both DEVMAP entries point at the device of their own namespace:
        # with one ifindex on both sides, the fast path forwards both ways.
        fast = app.call("status")["fast_path"]["directions"]
        assert fast["in"]["active"] and fast["out"]["active"], fast
        directions = app.call("stats")["directions"]
        for d in ("in", "out"):
            assert directions[d]["xdp"]["fast_path"]["packets"] > 0, (d, directions[d])
        queues = app.call("stats")["queues"]
        assert len(queues) == 2
        for q in queues:
            for direction in ("in", "out"):
                assert q[direction]["rx_packets"] > 0, (q["queue"], direction, queues)
                assert q[direction]["tx_packets"] > 0, (q["queue"], direction, queues)


def test_outer_in_its_own_namespace(tmp_path: Path) -> None:
    """--outer-netns: neither device lives where xdpguard runs (same ifindex, too)."""
    with lab(queues=2, index=4242, edge=True) as the_lab, the_lab.server():
        with Appliance(the_lab, tmp_path) as app:
            status = app.call("status")
            cookies = {s["netns_cookie"] for s in status["sockets"]}
            assert cookies == {d["netns_cookie"] for d in status["devices"].values()}
            assert len(cookies) == 2
            assert status["devices"]["outer"]["netns"] == the_lab.outer_ns
            assert the_lab.ping(ORIGIN_V4)
            assert the_lab.ping(ORIGIN_V6)
            up = the_lab.client("send", "--to", ORIGIN_V4, "--bytes", "16M")
            assert up["ok"], up
            fast = app.call("status")["fast_path"]["directions"]
            assert fast["in"]["active"] and fast["out"]["active"], fast
        assert the_lab.xdp_attached() == {"outer": False, "inner": False}


def test_sigterm_exits_clean(lab2: Lab, tmp_path: Path) -> None:
    app = Appliance(lab2, tmp_path).start()
    assert lab2.xdp_attached() == {"outer": True, "inner": True}
    assert app.control.exists()
    assert app.control.stat().st_mode & 0o777 == 0o600
    rc, _ = app.stop()
    assert rc == 0, app.output()
    assert lab2.xdp_attached() == {"outer": False, "inner": False}
    assert not app.control.exists()


def test_sigint_exits_clean(lab2: Lab, tmp_path: Path) -> None:
    import signal

    app = Appliance(lab2, tmp_path).start()
    rc, _ = app.stop(signal.SIGINT)
    assert rc == 0, app.output()
    assert lab2.xdp_attached() == {"outer": False, "inner": False}
    assert not app.control.exists()


def test_sigkill_leaves_nothing_attached(lab2: Lab, tmp_path: Path) -> None:
    """BPF links die with the process: a crash does not strand the program."""
    import signal

    app = Appliance(lab2, tmp_path).start()
    app.stop(signal.SIGKILL)
    wait_for(lambda: lab2.xdp_attached() == {"outer": False, "inner": False}, what="detach")
    # The stale socket file of a killed daemon does not block the next start.
    with Appliance(lab2, tmp_path):
        assert lab2.ping(ORIGIN_V4)


def test_idle_appliance_uses_almost_no_cpu(lab2: Lab, tmp_path: Path) -> None:
    from lab import import_bench

    with Appliance(lab2, tmp_path) as app:
        assert lab2.ping(ORIGIN_V4, count=1)
        time.sleep(0.5)
        assert app.proc is not None
        busy = import_bench().CpuMeter(app.proc.pid).measure(3.0)
        assert busy < 0.05, f"idle xdpguard used {busy:.1%} of a core"


def test_device_down_idles_and_recovers(lab2: Lab, tmp_path: Path) -> None:
    """A device set down for maintenance: the loop sleeps, not spins, and
    forwarding resumes once it is up again."""
    from lab import import_bench

    with Appliance(lab2, tmp_path) as app:
        assert lab2.ping(ORIGIN_V4, count=1)
        lab2.ns_exec(lab2.inner_ns, "ip", "link", "set", lab2.inner, "down")
        try:
            lab2.ping(ORIGIN_V4, count=3)  # frames now queue for a down device
            assert app.proc is not None
            busy = import_bench().CpuMeter(app.proc.pid).measure(2.0)
            assert busy < 0.05, f"xdpguard used {busy:.1%} of a core with a device down"
        finally:
            lab2.ns_exec(lab2.inner_ns, "ip", "link", "set", lab2.inner, "up")
        wait_for(lambda: lab2.ping(ORIGIN_V4, count=1), what="forwarding after the device came up")
        assert app.call("stats")["frames"]["consistent"]


@pytest.mark.parametrize("device", ["outer", "inner"])
def test_lost_device_shuts_down_clean(lab2: Lab, tmp_path: Path, device: str) -> None:
    """A device deleted under a running appliance is fatal: one line naming
    it, a non-zero exit, nothing left attached, the control socket gone."""
    app = Appliance(lab2, tmp_path).start()
    assert lab2.ping(ORIGIN_V4, count=1)
    if device == "outer":
        gone, ns = lab2.outer, []
        other = ("ip", "-n", lab2.inner_ns, "-d", "link", "show", lab2.inner)
    else:
        gone, ns = lab2.inner, ["-n", lab2.inner_ns]
        other = ("ip", "-d", "link", "show", lab2.outer)
    sh("ip", *ns, "link", "del", gone)
    assert app.proc is not None
    rc = app.proc.wait(timeout=60)  # it notices by itself (within a second, on an idle box)
    assert rc != 0
    last = app.output().strip().splitlines()[-1]
    assert last.startswith("Error: ") and gone in last, app.output()
    assert "prog/xdp" not in sh(*other).stdout
    assert not app.control.exists()


def test_ring_size(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path, "--ring-size", "1024") as app:
        assert lab2.ping(ORIGIN_V4)
        status = app.call("status")
        assert status["umem"]["frames"] == 2 * 4 * 1024  # two queues
        frames = app.call("stats")["frames"]
        assert frames["consistent"] and frames["total"] == 2 * 4 * 1024
        # Each queue's two fill rings hold at most a ring's worth each.
        assert frames["fill"] <= 2 * 2 * 1024


def test_generic_xdp_fallback(lab2: Lab, tmp_path: Path) -> None:
    """--xdp-mode skb: the explicit fallback for drivers without native XDP."""
    with lab2.server(), Appliance(lab2, tmp_path, "--xdp-mode", "skb") as app:
        devices = app.call("status")["devices"]
        assert devices["outer"]["xdp"]["mode"] == devices["inner"]["xdp"]["mode"] == "skb"
        assert lab2.ping(ORIGIN_V4) and lab2.ping(ORIGIN_V6)
        up = lab2.client("send", "--to", ORIGIN_V4, "--bytes", "16M")
        assert up["ok"], up
    assert lab2.xdp_attached() == {"outer": False, "inner": False}


def _tx_dropped(the_lab: Lab, ns: str) -> int:
    out = the_lab.ns_exec(ns, "ip", "-j", "-s", "link", "show", "eth0").stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])


@pytest.mark.parametrize("reverse", [False, True], ids=["up", "down"])
def test_bulk_tcp_is_not_dropped_at_the_hosts(tmp_path: Path, reverse: bool) -> None:
    """Four bulk TCP streams through the fast path. A veth whose peer's ring
    is full drops what it sends unless a qdisc holds it, and netns-setup.sh
    gave the hosts none: hundreds of thousands of segments a second were
    lost at the sender's own eth0, before xdpguard saw them. Now its
    queue stops instead, as a NIC's does."""
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path, "--learn", "0") as app:
        server = subprocess.Popen(
            ["ip", "netns", "exec", the_lab.origin_ns, "iperf3", "-s", "-1", "-p", "5299"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(
                lambda: ":5299 " in the_lab.ns_exec(the_lab.origin_ns, "ss", "-ltnH").stdout,
                what="iperf3 listening",
            )
            res = the_lab.ns_exec(
                the_lab.client_ns, "iperf3", "-c", ORIGIN_V4, "-p", "5299", "-P", "4", "-t", "2",
                "-J", *(["-R"] if reverse else []), timeout=60,
            )  # fmt: skip
        finally:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        end = json.loads(res.stdout)["end"]
        print(f"{end['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s, "
              f"{end['sum_sent'].get('retransmits')} retransmits")  # fmt: skip
        for ns in (the_lab.client_ns, the_lab.origin_ns):
            assert _tx_dropped(the_lab, ns) == 0, ns
        # The transfer took the fast path, not the loop.
        d = app.call("stats")["directions"]["out" if reverse else "in"]
        assert d["xdp"]["fast_path"]["bytes"] > end["sum_received"]["bytes"] // 2
