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
    WITHOUT,
    Appliance,
    Lab,
    Ledger,
    import_bench,
    lab,
    without_args,
)

from xdpguard.defs import Reason
from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

# The second client: the one that gets blocked.
OTHER_V4, OTHER_V6 = "169.254.0.3", "2001:db8::3"


@pytest.fixture(params=["default"])
def lab2(request: pytest.FixtureRequest) -> Lab:
    """The core tests run with each kernel feature's fallback forced too (ALL_PATHS)."""
    with lab(queues=2) as the_lab:
        the_lab.run_args = without_args(request.param)
        the_lab.add_client_address(OTHER_V4, OTHER_V6)
        with the_lab.server():
            yield the_lab


ALL_PATHS = pytest.mark.parametrize("lab2", ["default", *WITHOUT], indirect=True)


def test_block_unblock_and_ttl_with_live_traffic(lab2: Lab, tmp_path: Path) -> None:
    """A block bites as soon as the command returns, an unblock or an expired
    TTL lets traffic back in, and the other client never notices.

    No timing is assumed: an attempt that starts after a block returned must
    fail, and one that succeeds after a TTL entry was added must have ended
    after its deadline (its request reached XDP after the entry went)."""
    with Appliance(lab2, tmp_path) as app:
        steady = {p: lab2.probe(CLIENT_V4, ORIGIN_V4, p, 600, 0.05, 2.0) for p in ("udp", "tcp")}
        try:
            for proto in ("udp", "tcp"):
                assert lab2.attempts(OTHER_V4, ORIGIN_V4, proto, "--until-ok")[-1].ok, proto

                app.cli("block", "add", OTHER_V4, "--comment", "test")
                t_block = time.time()
                tries = lab2.attempts(OTHER_V4, ORIGIN_V4, proto, "--count", "10", timeout=0.25)
                assert not any(a.ok for a in tries if a.start >= t_block), (proto, tries)

                app.cli("block", "del", OTHER_V4)
                assert lab2.attempts(OTHER_V4, ORIGIN_V4, proto, "--until-ok")[-1].ok, proto

                t_ttl = time.time()
                app.cli("block", "add", OTHER_V4, "--ttl", "2")
                t_added = time.time()
                tries = lab2.attempts(OTHER_V4, ORIGIN_V4, proto, "--until-ok", timeout=0.25)
                assert tries[-1].ok, (proto, tries)  # it expired by itself
                assert all(a.end >= t_ttl + 2 for a in tries if a.ok), (proto, tries)
                assert all(a.start >= t_added for a in tries)
        finally:
            events = {p: probe.stop() for p, probe in steady.items()}
        for proto, attempts in events.items():
            assert attempts and all(a.ok for a in attempts), (proto, attempts)

        stats = app.call("stats")
        assert stats["reasons"]["blocklist"]["packets"] > 0
        # The TTL entry is gone from the list by itself.
        assert json.loads(app.cli("block", "list", "--json").stdout)["count"] == 0


def test_block_ipv6_prefix(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        # Neighbour discovery from a blocked source is dropped like the rest,
        # and the client's kernel may solicit the origin from whichever of its
        # addresses sent first: resolve it from the one that stays allowed.
        ping = ("ping", "-c", "1", "-W", "5", "-I", CLIENT_V6, ORIGIN_V6)
        assert lab2.ns_exec(lab2.client_ns, *ping, check=False).returncode == 0
        app.cli("block", "add", f"{OTHER_V6}/128")
        other = lab2.probe(OTHER_V6, ORIGIN_V6, "udp", 1.5)
        mine = lab2.probe(CLIENT_V6, ORIGIN_V6, "tcp", 1.5)
        assert not any(a.ok for a in other.result())
        assert all(a.ok for a in mine.result())
        # The covering /32 blocks both (link-local neighbour discovery still flows).
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
        assert not any(a.ok for a in other.result())
        assert all(a.ok for a in mine.result())


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


@ALL_PATHS
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
        gen = xgbench.Generator(lab2.client_ns, "eth0", frame)
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                gen.run(10_000, pps=100_000)

        flooder = threading.Thread(target=flood)
        with Ledger(lab2, app) as ledger:
            flooder.start()
            try:
                for path in lists[1:]:
                    app.cli("block", "load", str(path), "--replace")
            finally:
                stop.set()
                flooder.join()
                sent = gen.sent()
                gen.close()

        acct = ledger.account()
        acct.check(sent)
        # Every flood frame XDP saw was blocked, through every swap.
        assert acct.xdp.get("blocklist", 0) >= acct.reached(sent) > 0, acct
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
        assert all(a.ok for a in mine.result())
        assert not any(a.ok for a in other.result())
        reasons = app.call("stats")["reasons"]
        assert reasons["allowlist"]["packets"] > 0 and reasons["blocklist"]["packets"] > 0
        app.cli("allow", "del", CLIENT_V4)
        assert not any(a.ok for a in lab2.probe(CLIENT_V4, ORIGIN_V4, "udp", 0.5).result())


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
        # ... and every reason of the header's enum is there, under its derived name.
        assert set(stats["reasons"]) == {r.name for r in Reason}
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
