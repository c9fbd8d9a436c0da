"""N-tuple rules and per-source rate limits through the CLI, with real
traffic: what reaches the origin is counted at its device (nftables,
before its IP stack), what XDP judged in its counters."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from lab import CLIENT_V4, ORIGIN_V4, Appliance, import_bench, lab

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

# Echo exchanges from a chosen source port (labtraffic's server echoes UDP on 5201).
ECHO = """
import socket, sys
sport, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[3], sport))
s.settimeout(0.2)
ok = 0
for i in range(n):
    s.sendto(b"x%d" % i, (sys.argv[4], 5201))
    try:
        s.recvfrom(2048)
        ok += 1
    except TimeoutError:
        pass
print(ok)
"""


def echoes(the_lab, sport: int, n: int) -> int:  # type: ignore[no-untyped-def]
    out = the_lab.ns_exec(
        the_lab.client_ns, sys.executable, "-c", ECHO, str(sport), str(n), CLIENT_V4, ORIGIN_V4
    )
    return int(out.stdout.strip())


def rules(app: Appliance) -> list[dict]:
    return json.loads(app.cli("rule", "list", "--json").stdout)["rules"]


def test_a_rule_drops_what_it_matches_and_nothing_else(tmp_path: Path) -> None:
    with lab(queues=2) as the_lab, the_lab.server(), Appliance(the_lab, tmp_path) as app:
        assert echoes(the_lab, 40123, 3) == 3
        with the_lab.origin_counters(ntp="udp sport 123", other="udp sport 124") as origin:
            out = app.cli("rule", "add", "dst", f"{ORIGIN_V4}/32", "proto", "udp", "sport",
                          "123", "drop", "--comment", "ntp reflection")  # fmt: skip
            assert "1 added" in out.stdout
            before = app.call("stats")["reasons"]["rule_drop"]["packets"]
            assert echoes(the_lab, 123, 20) == 0
            assert echoes(the_lab, 124, 5) >= 1  # the rule does not reach it
            counts = origin()
        assert counts["ntp"] == 0  # exactly: not one frame reached the origin
        assert counts["other"] >= 1
        (r,) = rules(app)
        assert r["rule"] == f"dst {ORIGIN_V4}/32 proto udp sport 123 drop"
        assert r["comment"] == "ntp reflection" and r["source"] == "local"
        dropped = app.call("stats")["reasons"]["rule_drop"]["packets"] - before
        # Conservation: the rule counted every frame XDP dropped for it.
        assert r["packets"] == r["dropped_packets"] == dropped >= 1

        # Deleted by its match: the frames come through again.
        app.cli("rule", "del", "dst", f"{ORIGIN_V4}/32", "proto", "udp", "sport", "123")
        assert rules(app) == []
        assert echoes(the_lab, 123, 5) >= 1


def test_rules_survive_a_restart_and_a_sigkill(tmp_path: Path) -> None:
    with lab(queues=1) as the_lab, the_lab.server():
        app = Appliance(the_lab, tmp_path)
        with app:
            app.cli("rule", "add", "dst", f"{ORIGIN_V4}/32", "proto", "udp", "sport", "123",
                    "drop")  # fmt: skip
            app.cli("ratelimit", "add", "198.18.0.0/15", "--pps", "1000", "--per-source")
            app.stop(signal.SIGKILL)
        app.start()
        try:
            (r,) = rules(app)
            assert r["rule"] == f"dst {ORIGIN_V4}/32 proto udp sport 123 drop"
            lim = json.loads(app.cli("ratelimit", "list", "--json").stdout)["limits"]
            assert [(x["prefix"], x["pps"], x["per_source"]) for x in lim] == [
                ("198.18.0.0/15", 1000, True)
            ]
            assert echoes(the_lab, 123, 5) == 0
            assert echoes(the_lab, 124, 5) >= 1
        finally:
            app.stop()


def test_a_bad_rule_changes_nothing_and_says_why_in_one_line(tmp_path: Path) -> None:
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        app.cli("rule", "add", "ipv4", "proto", "udp", "sport", "19", "drop")
        for words, why in (
            (("dst", "192.0.2.0/24", "sport", "70000", "drop"), "more than the field holds"),
            (("dst", "192.0.2.1/24", "drop"), "host bits set"),
            (("proto", "udp", "drop"), "needs its family"),
            (("dst", "192.0.2.0/24", "flow-label", "5", "drop"), "flow labels"),
            (("dst", "192.0.2.0/24", "proto", "udp"), "no action"),
            (("dst", "::/0", "drop"), "matches every IPv6 frame; add --force"),
        ):
            res = app.cli("rule", "add", *words, check=False)
            assert res.returncode != 0
            line = res.stderr.strip()
            assert "\n" not in line and why in line, line
        bad = tmp_path / "rules.txt"
        bad.write_text("dst 192.0.2.0/24 proto udp drop\ndst 192.0.2.0/24 proto bogus drop\n")
        res = app.cli("rule", "load", str(bad), check=False)
        assert res.returncode != 0 and "line 2" in res.stderr
        empty = tmp_path / "empty.txt"
        empty.write_text("# nothing\n")
        res = app.cli("rule", "load", str(empty), "--replace", check=False)
        assert res.returncode != 0 and "add --force, or use clear" in res.stderr
        res = app.cli("ratelimit", "add", "0.0.0.0/0", "--pps", "10", check=False)
        assert res.returncode != 0 and "every IPv4 source together" in res.stderr
        assert [r["rule"] for r in rules(app)] == ["ipv4 proto udp sport 19 drop"]
        assert app.call("ratelimit.list")["limits"] == []


def test_rate_limits_hold_their_rate_under_a_flood(tmp_path: Path) -> None:
    """A rule's rate-limit-pps and a per-source limit, each against a bounded
    flood: what reaches the origin never exceeds rate x time + the burst of
    every CPU's bucket (safety, exact); the counters add up."""
    xgbench = import_bench()
    with lab(queues=2) as the_lab, Appliance(the_lab, tmp_path) as app:
        client = resolve_device(Netns(the_lab.client_ns), "eth0")
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        ncpus = os.cpu_count() or 1  # the daemon splits rates over as many
        rate = 2000
        burst = ncpus * (1 + rate / ncpus * 0.1)
        for name, setup, frame, reason in (
            (
                "rule",
                (
                    "rule",
                    "add",
                    "dst",
                    f"{ORIGIN_V4}/32",
                    "proto",
                    "udp",
                    "dport",
                    "9",
                    "rate-limit-pps",
                    str(rate),
                ),
                xgbench.udp4_frame(client.mac, origin.mac, CLIENT_V4, ORIGIN_V4, 4000, 9),
                "rule_rate_limited",
            ),
            (
                "ratelimit",
                ("ratelimit", "add", "198.18.0.0/15", "--pps", str(rate), "--per-source"),
                xgbench.udp4_frame(client.mac, origin.mac, "198.18.7.7", ORIGIN_V4, 4000, 10),
                "source_rate_limited",
            ),
        ):
            app.cli(*setup)
            dport = 9 if name == "rule" else 10
            with the_lab.origin_counters(got=f"udp dport {dport}") as counted:
                r0 = app.call("stats")["reasons"]

                def judged(reason: str = reason) -> int:
                    r = app.call("stats")["reasons"]
                    return r[reason]["packets"] + r["fast_path"]["packets"]

                gen = xgbench.Generator(the_lab.client_ns, "eth0", frame)
                try:
                    t0 = time.monotonic()
                    gen.run(300_000)
                finally:
                    gen.close()
                # XDP judges what the veth queued after the generator is
                # done, later on a busy machine: the window the buckets
                # refilled in ends when XDP's counters stopped, not when
                # the generator did.
                _, t_end = xgbench.settled(judged)
                elapsed = t_end - t0
                got = xgbench.wait_quiet(lambda: counted()["got"])
            r1 = app.call("stats")["reasons"]
            limited = r1[reason]["packets"] - r0[reason]["packets"]
            passed = r1["fast_path"]["packets"] - r0["fast_path"]["packets"]
            print(f"{name}: {got} at the origin in {elapsed:.3f} s, {limited} limited")
            assert got <= rate * elapsed + burst + 1, (name, got, elapsed)
            assert limited > 0, name
            # The origin saw no more than XDP passed (the fast path forwards it).
            assert 0 < got <= passed, (name, got, passed)
