"""What XDP drops, seen: samples, capture to pcapng, heavy hitters, per-destination rates.

Each test goes through the CLI an operator types, with real frames from the
lab's client, and checks the files with tcpdump.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from lab import CLIENT_V4, ORIGIN_V4, XDPGUARD, Appliance, import_bench, lab, sh, wait_for
from pcapng_read import read_pcapng

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

FLOOD_NET = "198.18.7.0"  # the flood's /24, within the spoofed-source range


def _frame(the_lab, xgbench, src: str = CLIENT_V4, dst: str = ORIGIN_V4, sport: int = 53):  # type: ignore[no-untyped-def]
    client = resolve_device(Netns(the_lab.client_ns), "eth0")
    origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
    return xgbench.udp4_frame(client.mac, origin.mac, src, dst, sport, 40000, size=200)


def _capture(app: Appliance, path: Path, *args: str) -> subprocess.Popen[str]:
    """``xdpguard capture`` in the background, once the daemon has it running."""
    before = app.call("sample.get")["captures"]
    proc = subprocess.Popen(
        [str(XDPGUARD), "capture", *args, "-w", str(path), "--control", str(app.control)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: app.call("sample.get")["captures"] > before or proc.poll() is not None,
             what="the capture to start")  # fmt: skip
    return proc


def _tcpdump_count(path: Path) -> int:
    out = sh("tcpdump", "-n", "-r", str(path)).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_a_reflection_flood_is_captured_with_its_reason(tmp_path: Path) -> None:
    xgbench = import_bench()
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("ports", "add", "--preset", "drdos")
        gen = xgbench.Generator(the_lab.client_ns, "eth0", _frame(the_lab, xgbench),
                                random_saddr=True)  # fmt: skip
        path = tmp_path / "drdos.pcapng"
        proc = _capture(app, path, "--reason", "drdos_port", "--count", "200")
        try:
            gen.run(20_000, pps=50_000)
        finally:
            gen.close()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "captured 200 packet(s) of udp_src_port" in err
        # tcpdump reads the file and counts every packet; each is a DNS answer
        # from a spoofed source, and its comment says why it was dropped.
        assert _tcpdump_count(path) == 200
        out = sh("tcpdump", "-n", "-r", str(path)).stdout
        assert all(".53 > " in line and line.split()[2].startswith("198.1")
                   for line in out.splitlines())  # fmt: skip
        packets = read_pcapng(path.read_bytes())
        assert len(packets) == 200
        assert {p.comment for p in packets} == {"reason=udp_src_port direction=in"}
        assert all(p.orig_len == len(_frame(the_lab, xgbench)) for p in packets)
        # The rate the capture raised is back to the operator's.
        wait_for(lambda: app.call("sample.get")["every"]["udp_src_port"] == 1000,
                 what="the sampling rate to come back")  # fmt: skip


def test_a_capture_stays_within_its_cap_under_a_million_frames(tmp_path: Path) -> None:
    """The cap is a GCRA of a second's burst: in any interval of T seconds at
    most cap x (1 + T) + 1 samples, whatever the flood; the capture has no more."""
    xgbench = import_bench()
    cap = 300
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("ports", "add", "53")
        app.cli("sample", "set", "--cap", str(cap))
        gen = xgbench.Generator(the_lab.client_ns, "eth0", _frame(the_lab, xgbench),
                                random_saddr=True)  # fmt: skip
        path = tmp_path / "all.pcapng"
        proc = _capture(app, path)  # every reason, each raised to every frame
        try:
            gen.run(1_000_000, max_seconds=60)
        finally:
            gen.close()
        proc.send_signal(2)  # Ctrl-C
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        packets = read_pcapng(path.read_bytes())
        taken = app.call("sample.get")
        assert 0 < len(packets) <= taken["taken"]
        assert taken["capped"] > 0  # the flood was far above the cap
        ts = sorted(p.ts for p in packets)
        j = 0
        for i, t in enumerate(ts):  # every window [t, t + 1 s)
            while j < len(ts) and ts[j] < t + 1_000_000_000:
                j += 1
            assert j - i <= 2 * cap + 1, f"{j - i} samples in a second from {t}"
        assert _tcpdump_count(path) == len(packets)


def test_top_names_the_floods_source_24_first(tmp_path: Path) -> None:
    xgbench = import_bench()
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("ports", "add", "53")
        app.cli("sample", "set", "--drops", "50")
        # One /24 floods; everyone else in 198.18.0.0/15 sends a little each.
        frame = _frame(the_lab, xgbench, src=FLOOD_NET)
        flood = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_host_bits=8)
        try:
            flood.run(100_000, pps=100_000)
        finally:
            flood.close()
        noise = xgbench.Generator(the_lab.client_ns, "eth0", _frame(the_lab, xgbench),
                                  random_saddr=True)  # fmt: skip
        try:
            noise.run(50_000, pps=100_000)
        finally:
            noise.close()

        def first() -> str | None:
            rows = json.loads(app.cli("top", "--by", "src/24", "--json").stdout)["rows"]
            return rows[0]["key"] if rows else None

        wait_for(lambda: first() is not None, what="samples")
        assert first() == f"{FLOOD_NET}/24"
        by_reason = json.loads(app.cli("top", "--by", "src/24", "--reason", "udp_src_port",
                                       "--json").stdout)  # fmt: skip
        assert by_reason["rows"][0]["key"] == f"{FLOOD_NET}/24"
        text = app.cli("top", "--by", "src/24").stdout
        assert f"1. {FLOOD_NET}/24" in text


def test_top_dst_names_the_attacked_address_at_the_rate_xdp_counted(tmp_path: Path) -> None:
    xgbench = import_bench()
    victim, other = ORIGIN_V4, "169.254.0.77"
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("ports", "add", "53")
        app.cli("protect", "add", "169.254.0.0/24", "--name", "lab")
        # A little to another address first (one generator per queue at a time).
        light = xgbench.Generator(the_lab.client_ns, "eth0", _frame(the_lab, xgbench, dst=other),
                                  random_saddr=True)  # fmt: skip
        try:
            light.run(2_000, pps=1_000)
        finally:
            light.close()
        stop = threading.Event()
        rows: list[dict[str, object]] = []
        counted: list[tuple[float, int]] = []

        def dropped() -> int:
            return int(app.call("stats")["directions"]["in"]["xdp"]["udp_src_port"]["packets"])

        def watch() -> None:
            # Read while the flood runs: XDP's count before and after each top.
            while not stop.is_set():
                t0, c0 = time.monotonic(), dropped()
                time.sleep(2.0)
                t1, c1 = time.monotonic(), dropped()
                top = json.loads(app.cli("top", "--by", "dst", "--json").stdout)
                if top["rows"] and not stop.is_set():
                    rows.append(top)
                    counted.append((t1 - t0, c1 - c0))

        flood = xgbench.Generator(the_lab.client_ns, "eth0", _frame(the_lab, xgbench, dst=victim),
                                  random_saddr=True)  # fmt: skip
        try:
            w = threading.Thread(target=watch)
            w.start()
            try:
                flood.run(400_000, pps=40_000, max_seconds=30)
            finally:
                stop.set()
                w.join()
        finally:
            flood.close()
        assert rows, "top never had a row while the flood ran"
        # A window from the middle of the flood: none of its start or end in it.
        mid = len(rows) // 2
        top, (dt, n) = rows[mid], counted[mid]
        assert top["source"] == "counted"
        assert top["rows"][0]["key"] == victim
        xdp_rate = n / dt
        assert abs(top["rows"][0]["pps"] - xdp_rate) <= 0.2 * xdp_rate, (top, xdp_rate)
        # The prefix's own counters, per class, in the metrics' source too.
        listed = json.loads(app.cli("protect", "list", "--json").stdout)
        (p,) = listed["protected"]
        assert p["prefix"] == "169.254.0.0/24" and p["name"] == "lab"
        assert listed["addresses"]["tracked"] >= 2

        # Every frame counted, whatever its verdict (read once a second).
        def udp_counted() -> bool:
            (p,) = json.loads(app.cli("protect", "list", "--json").stdout)["protected"]
            return p["packets"]["udp"] == dropped()

        wait_for(udp_counted, what="the prefix's counters to catch up")


def test_capture_before_holds_what_came_before_it_was_asked(tmp_path: Path) -> None:
    xgbench = import_bench()
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("block", "add", "198.18.0.0/15")
        app.cli("sample", "set", "--reason", "blocklist=1")
        gen = xgbench.Generator(the_lab.client_ns, "eth0", _frame(the_lab, xgbench, sport=4444),
                                random_saddr=True)  # fmt: skip
        try:
            gen.run(50, pps=1000)
        finally:
            gen.close()
        wait_for(lambda: app.call("sample.get")["received"] >= 50, what="50 samples")
        typed = time.time_ns()
        path = tmp_path / "before.pcapng"
        res = app.cli("capture", "--before", "--reason", "blocklist", "--count", "50", "-w",
                      str(path))  # fmt: skip
        assert "captured 50 packet(s) of blocklist" in res.stderr
        packets = read_pcapng(path.read_bytes())
        assert len(packets) == 50
        assert all(p.ts < typed for p in packets)
        assert {p.comment for p in packets} == {"reason=blocklist direction=in"}
        assert _tcpdump_count(path) == 50


def test_protected_networks_and_rates_survive_a_restart(tmp_path: Path) -> None:
    with lab(queues=1) as the_lab:
        app = Appliance(the_lab, tmp_path).start()
        try:
            app.cli("protect", "add", "169.254.0.0/24", "2001:db8::/48", "--name", "web")
            app.cli("sample", "set", "--cap", "123", "--reason", "blocklist=7")
            before = app.call("sample.get")
        finally:
            app.stop(9)  # SIGKILL: every change was saved when it was made
        with Appliance(the_lab, tmp_path) as again:
            listed = json.loads(again.cli("protect", "list", "--json").stdout)["protected"]
            assert [(p["prefix"], p["name"]) for p in listed] == [
                ("169.254.0.0/24", "web"), ("2001:db8::/48", "web")]  # fmt: skip
            after = again.call("sample.get")
            assert after["cap"] == 123 and after["every"]["blocklist"] == 7
            assert after["every"] == before["every"]


def test_bad_requests_change_nothing(tmp_path: Path) -> None:
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("protect", "add", "169.254.0.0/24")

        def state() -> object:
            nets = [(p["prefix"], p["name"]) for p in app.call("protect.list")["protected"]]
            return nets, app.call("sample.get")["every"]

        before = state()
        for args, says in (
            (["protect", "add", "169.254.0.1/24"], "host bits set"),
            (["protect", "add", "0.0.0.0/0"], "a /0 is not a network to protect"),
            (["sample", "set", "--reason", "nothing=5"], "unknown reason 'nothing'"),
            (["sample", "set", "--reason", "blocklist=x"], "REASON=N"),
            (["sample", "set", "--cap", "0"], "--cap"),
            (["sample", "set"], "nothing to set"),
            (
                ["capture", "--reason", "tcp_no_flow", "--count", "1", "-w", str(tmp_path / "x")],
                "tcp_no_flow is the AF_XDP loop's verdict",
            ),
            (["top", "--by", "mac"], "--by"),
        ):
            res = app.cli(*args, check=False)
            assert res.returncode != 0, args
            assert says in res.stderr, (args, res.stderr)
            assert len([x for x in res.stderr.splitlines() if x.strip()]) <= 3, res.stderr
        assert state() == before
        assert app.call("sample.get")["captures"] == 0
