"""The stateless policy with real traffic: block, unblock, TTL, restart, replace."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from lab import (
    CLIENT_V4,
    CLIENT_V6,
    ORIGIN_V4,
    ORIGIN_V6,
    Appliance,
    Lab,
    import_bench,
    lab,
    successes,
)

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

# The second client: the one that gets blocked.
OTHER_V4, OTHER_V6 = "169.254.0.3", "2001:db8::3"


@pytest.fixture
def lab2() -> Lab:
    with lab(queues=2) as the_lab:
        the_lab.add_client_address(OTHER_V4, OTHER_V6)
        with the_lab.server():
            yield the_lab


def test_block_unblock_and_ttl_with_live_traffic(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        seconds = 9.0
        probes = {
            (src, proto): lab2.probe(src, ORIGIN_V4, proto, seconds)
            for src in (CLIENT_V4, OTHER_V4)
            for proto in ("udp", "tcp")
        }
        start = time.time()
        time.sleep(1.5)
        t_block = time.time()
        app.cli("block", "add", OTHER_V4, "--comment", "test")
        time.sleep(2.0)
        t_unblock = time.time()
        app.cli("block", "del", OTHER_V4)
        time.sleep(1.5)
        t_ttl = time.time()
        app.cli("block", "add", OTHER_V4, "--ttl", "2")
        events = {key: p.result() for key, p in probes.items()}
        end = time.time()

        for proto in ("udp", "tcp"):
            blocked = events[(OTHER_V4, proto)]
            assert successes(blocked, start, t_block) > 0, proto
            # Stops within 1 s of the command, resumes after del, and after the TTL.
            assert successes(blocked, t_block + 1.0, t_unblock) == 0, proto
            assert successes(blocked, t_unblock + 1.0, t_ttl) > 0, proto
            assert successes(blocked, t_ttl + 1.0, t_ttl + 2.0) == 0, proto
            assert successes(blocked, t_ttl + 3.2, end) > 0, proto
            # The other client never notices.
            steady = events[(CLIENT_V4, proto)]
            for second in range(int(start) + 1, int(end) - 1):
                assert successes(steady, second, second + 1) > 0, (proto, second - start)

        stats = app.call("stats")
        assert stats["reasons"]["blocklist"]["packets"] > 0
        # The TTL entry is gone from the list by itself.
        assert json.loads(app.cli("block", "list", "--json").stdout)["count"] == 0


def test_block_ipv6_prefix(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        app.cli("block", "add", f"{OTHER_V6}/128")
        other = lab2.probe(OTHER_V6, ORIGIN_V6, "udp", 1.5)
        mine = lab2.probe(CLIENT_V6, ORIGIN_V6, "tcp", 1.5)
        assert not any(ok for _, ok in other.result())
        assert all(ok for _, ok in mine.result())
        # The covering /32 blocks both; neighbour discovery still flows.
        app.cli("block", "add", "2001:db8::/32")
        assert not lab2.ping(ORIGIN_V6, count=2)
        assert lab2.ping(ORIGIN_V4)


def test_block_survives_restart(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        app.cli("block", "add", OTHER_V4, "--comment", "kept across restarts")
        app.cli("ports", "add", "--preset", "drdos")
        app.cli("frags", "drop")
    with Appliance(lab2, tmp_path) as app:
        entries = json.loads(app.cli("block", "list", "--json").stdout)["entries"]
        assert [(e["prefix"], e["comment"]) for e in entries] == [
            (f"{OTHER_V4}/32", "kept across restarts")
        ]
        assert 53 in json.loads(app.cli("ports", "list", "--json").stdout)["ports"]
        assert json.loads(app.cli("frags", "--json").stdout) == {"frags": "drop"}
        other = lab2.probe(OTHER_V4, ORIGIN_V4, "udp", 1.0)
        mine = lab2.probe(CLIENT_V4, ORIGIN_V4, "tcp", 1.0)
        assert not any(ok for _, ok in other.result())
        assert all(ok for _, ok in mine.result())


def test_corrupt_state_stops_startup(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        app.cli("block", "add", OTHER_V4)
    state = Appliance(lab2, tmp_path).state_dir / "policy.npz"
    data = bytearray(state.read_bytes())
    for i in range(100, len(data), 64):  # damage every member's contents
        data[i] ^= 0xFF
    state.write_bytes(bytes(data))
    app = Appliance(lab2, tmp_path)
    with pytest.raises(AssertionError, match="is corrupt"):
        app.start()
    assert app.proc is not None and app.proc.returncode == 1
    assert lab2.xdp_attached() == {"outer": False, "inner": False}


def random_prefixes(rng: random.Random, n: int) -> list[str]:
    """IPv4 /24s and /32s in 10/8 and IPv6 /48s in 2001:db8:8000::/33: never a lab host."""
    out = []
    for _ in range(n):
        if rng.random() < 0.9:
            a = rng.randrange(1 << 24)
            out.append(
                f"10.{a >> 16}.{(a >> 8) & 255}.0/24"
                if a & 1
                else f"10.{a >> 16}.{(a >> 8) & 255}.{a & 255}"
            )
        else:
            out.append(
                f"2001:db8:{0x8000 | rng.randrange(0x8000):x}:{rng.randrange(1 << 16):x}::/64"
            )
    return out


def test_replace_under_live_traffic_never_leaks(lab2: Lab, tmp_path: Path) -> None:
    """A prefix in both the old and the new list stays blocked through every swap."""
    xgbench = import_bench()
    rng = random.Random(7)
    lists = []
    for i in range(12):
        path = tmp_path / f"list{i}.txt"
        path.write_text(
            "\n".join(
                [
                    f"# generation {i}",
                    *random_prefixes(rng, 3000),
                    f"{OTHER_V4}/32",
                    f"{OTHER_V6}/128",
                ]
            )
            + "\n"
        )
        lists.append(path)

    with Appliance(lab2, tmp_path) as app, lab2.origin_counters(OTHER_V4, CLIENT_V4) as counts:
        app.cli("block", "load", str(lists[0]), "--replace")
        client = resolve_device(Netns(lab2.client_ns), "eth0")
        origin = resolve_device(Netns(lab2.origin_ns), "eth0")
        frame = xgbench.udp4_frame(client.mac, origin.mac, OTHER_V4, ORIGIN_V4, 40000, 9)
        gen = xgbench.LiveGenerator(lab2.client_ns, "eth0", frame, ratio=0.02)
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                gen.run(100_000)

        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            for path in lists[1:]:
                app.cli("block", "load", str(path), "--replace")
        finally:
            stop.set()
            flooder.join()
            sent = gen.sent()
            gen.close()

        blocked = app.call("stats")["reasons"]["blocklist"]["packets"]
        assert sent > 50_000 and blocked >= sent, (sent, blocked)
        assert lab2.ping(ORIGIN_V4)  # the other client passes throughout
        seen = counts()
        assert seen[OTHER_V4] == 0, seen
        assert seen[CLIENT_V4] > 0, seen
        listed = json.loads(app.cli("block", "list", "--json").stdout)
        assert listed["count"] == len(set(lists[-1].read_text().split("\n")[1:-1]))


def test_load_with_a_bad_line_changes_nothing(lab2: Lab, tmp_path: Path) -> None:
    rng = random.Random(3)
    good = tmp_path / "good.txt"
    good.write_text("\n".join(random_prefixes(rng, 500)) + "\n")
    lines = random_prefixes(rng, 100_000)
    lines[99_990] = "10.1.2.3/16"  # host bits set, near the end
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")

    with Appliance(lab2, tmp_path) as app:
        app.cli("block", "load", str(good))
        before = app.cli("block", "list", "--json").stdout
        for extra in ([], ["--replace"]):
            res = app.cli("block", "load", str(bad), *extra, check=False)
            assert res.returncode == 1
            assert res.stderr.strip().splitlines() == [
                f"Error: {bad}: line 99991: '10.1.2.3/16': "
                "host bits set (the network is 10.1.0.0/16)"
            ]
            assert app.cli("block", "list", "--json").stdout == before


def test_allow_inside_block_with_traffic(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        app.cli("block", "add", "169.254.0.0/16")
        app.cli("allow", "add", CLIENT_V4, "--comment", "the one client we trust")
        mine = lab2.probe(CLIENT_V4, ORIGIN_V4, "tcp", 1.0)
        other = lab2.probe(OTHER_V4, ORIGIN_V4, "udp", 1.0)
        assert all(ok for _, ok in mine.result())
        assert not any(ok for _, ok in other.result())
        reasons = app.call("stats")["reasons"]
        assert reasons["allowlist"]["packets"] > 0 and reasons["blocklist"]["packets"] > 0
        app.cli("allow", "del", CLIENT_V4)
        assert not any(ok for _, ok in lab2.probe(CLIENT_V4, ORIGIN_V4, "udp", 0.5).result())


def test_stats_json_names_and_watch(lab2: Lab, tmp_path: Path) -> None:
    import subprocess

    from lab import XDPGUARD

    with Appliance(lab2, tmp_path) as app:
        stats = json.loads(app.cli("stats", "--json").stdout)
        # Scripts depend on these names.
        for name in (
            "allowlist",
            "blocklist",
            "udp_src_port",
            "fragment",
            "malformed",
            "redirected",
        ):
            assert set(stats["reasons"][name]) == {"packets", "bytes"}, name
        for direction in ("in", "out"):
            assert "reasons" in stats["directions"][direction]
        watch = subprocess.Popen(
            [
                str(XDPGUARD),
                "stats",
                "--json",
                "--watch",
                "--interval",
                "0.2",
                "--control",
                str(app.control),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            lab2.ping(ORIGIN_V4, count=3)
            lines = [json.loads(watch.stdout.readline()) for _ in range(3)]
        finally:
            watch.terminate()
            watch.wait(5)
        assert "rates" not in lines[0]
        assert all("rates" in line for line in lines[1:])
        assert set(lines[2]["rates"]["directions"]) == {"in", "out"}
