"""BGP FlowSpec from a fleet controller to XDP: GoBGP (an independent
implementation) announces, ExaBGP beside xdpguard runs the feed, xdpguard
drops. Live UDP traffic from the client, counted at the origin's device."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lab import CLIENT_V4, CLIENT_V6, ORIGIN_V4, ORIGIN_V6, SCRIPTS, Appliance, Lab, lab

sys.path.insert(0, str(SCRIPTS))
from bgplab import CONTROLLER, BgpLab

pytestmark = pytest.mark.netns

SOURCE = f"bgp:{CONTROLLER}"
EFFECT_WITHIN = 1.0  # the bound, announcement or withdrawal to effect


@contextmanager
def fleet(tmp_path: Path, hold: float, queues: int = 1) -> Iterator[tuple[Lab, Appliance, BgpLab]]:
    """A lab and xdpguard, with GoBGP (the controller) peered with ExaBGP beside
    it, the session up."""
    with (
        lab(queues=queues) as the_lab,
        Appliance(the_lab, tmp_path) as app,
        BgpLab(tmp_path, app.control, hold=hold) as bgp,
    ):
        bgp.wait_up(lambda: app.call("rule.list"))
        yield the_lab, app, bgp


def session_up(app: Appliance) -> bool:
    return app.call("rule.list")["sessions"][SOURCE]["up"]


def bgp_rules(app: Appliance) -> dict[str, dict]:
    return {r["rule"]: r for r in app.call("rule.list", source=SOURCE)["rules"]}


def wait_until(pred, timeout: float = 30, what: str = "") -> float:  # type: ignore[no-untyped-def]
    """Poll ``pred`` every 5 ms; the time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_gobgp_announcements_take_effect_on_live_traffic_and_go(
    tmp_path: Path, family: str
) -> None:
    v6 = family == "ipv6"
    dst, src = (ORIGIN_V6, CLIENT_V6) if v6 else (ORIGIN_V4, CLIENT_V4)
    plen = 128 if v6 else 32
    ip = "ip6" if v6 else "ip"
    with (
        fleet(tmp_path, hold=30, queues=2) as (the_lab, app, bgp),
        the_lab.origin_counters(hit=f"{ip} daddr {dst} udp dport 9") as origin,
        # UDP to the discard port, a datagram a millisecond (nothing echoes)
        the_lab.probe(src, dst, "udp", 60, 0.001, 0.001, "--port", "9"),
    ):
        wait_until(lambda: origin()["hit"] > 0, what="traffic at the origin")
        local = "ipv4 proto udp sport 19 drop"
        app.cli("rule", "add", *local.split())

        # discard: on within the bound, and then nothing reaches the origin
        match = ["destination", f"{dst}/{plen}", "protocol", "udp", "destination-port", "==9"]
        rule = f"dst {dst}/{plen} proto udp dport 9 drop"
        t0 = time.monotonic()
        bgp.announce(family, *match, "then", "discard")
        t1 = wait_until(
            lambda: bgp_rules(app).get(rule, {}).get("dropped_packets", 0) > 0,
            what=f"{rule} dropping\n{bgp.logs()}",
        )
        print(f"{family} discard in effect after {t1 - t0:.3f} s")
        assert t1 - t0 < EFFECT_WITHIN
        seen = origin()["hit"]
        wait_until(lambda: bgp_rules(app)[rule]["dropped_packets"] > 200, what="more drops")
        assert origin()["hit"] == seen  # not one frame got through while it held

        # withdrawal: off within the bound, traffic back
        t0 = time.monotonic()
        bgp.withdraw(family, *match)
        t1 = wait_until(lambda: rule not in bgp_rules(app), what="the withdrawal")
        assert t1 - t0 < EFFECT_WITHIN
        wait_until(lambda: origin()["hit"] > seen, what="traffic back at the origin")

        # rate-limit (bytes/s): what passes is bounded by the rate
        rate = 4000
        t0 = time.monotonic()
        bgp.announce(family, *match, "then", "rate-limit", str(rate))
        limited = f"dst {dst}/{plen} proto udp dport 9 rate-limit {rate}"
        t1 = wait_until(
            lambda: bgp_rules(app).get(limited, {}).get("dropped_packets", 0) > 0,
            what=f"{limited}\n{bgp.logs()}",
        )
        assert t1 - t0 < EFFECT_WITHIN
        bgp.withdraw(family, *match)
        wait_until(lambda: limited not in bgp_rules(app), what="the rate limit's withdrawal")

        # Local rules were never touched by any of it.
        assert [r["rule"] for r in app.call("rule.list", source="local")["rules"]] == [local]


def test_a_route_the_engine_cannot_do_is_rejected_whole(tmp_path: Path) -> None:
    with fleet(tmp_path, hold=30) as (_, app, bgp):
        good = ["destination", f"{ORIGIN_V4}/32", "protocol", "udp", "source-port", "==123"]
        bgp.announce("ipv4", *good, "then", "discard")
        wait_until(lambda: len(bgp_rules(app)) == 1, what="the good route")
        # The same route, now with a redirect: the rule goes (never half-applied).
        bgp.announce("ipv4", *good, "then", "redirect", "65000:100")
        wait_until(lambda: not bgp_rules(app), what="the replaced route withdrawn")
        assert "rejected" in bgp.logs() and "redirect" in bgp.logs()


def test_a_session_reset_flushes_after_the_hold_time_and_replays(tmp_path: Path) -> None:
    """Session down: the rules stay for the hold time, then go. Back: GoBGP
    replays, the rules return. Down and back within the hold time: the
    routes announced again stay, one withdrawn meanwhile goes."""
    hold = 3.0
    with fleet(tmp_path, hold=hold) as (_, app, bgp):
        a = ["destination", f"{ORIGIN_V4}/32", "protocol", "udp", "source-port", "==123"]
        b = ["destination", f"{ORIGIN_V4}/32", "protocol", "udp", "source-port", "==53"]
        bgp.announce("ipv4", *a, "then", "discard")
        bgp.announce("ipv4", *b, "then", "discard")
        wait_until(lambda: len(bgp_rules(app)) == 2, what="both routes")

        t_disable = time.monotonic()  # the session goes down after this, never before
        bgp.peer("disable")
        wait_until(lambda: not session_up(app), what="the session down")
        kept = len(bgp_rules(app))
        if time.monotonic() - t_disable < hold:  # read within the hold time: must be there
            assert kept == 2
        t_gone = wait_until(lambda: not bgp_rules(app), what="the flush")
        assert t_gone - t_disable >= hold

        bgp.peer("enable")
        wait_until(lambda: len(bgp_rules(app)) == 2, what="the replay", timeout=60)

        # Down and back within the hold time, b withdrawn while down.
        bgp.peer("disable")
        wait_until(lambda: not session_up(app), what="the session down")
        bgp.withdraw("ipv4", *b)
        bgp.peer("enable")
        wait_until(
            lambda: list(bgp_rules(app)) == [f"dst {ORIGIN_V4}/32 proto udp sport 123 drop"],
            what="only a, after the replay",
            timeout=60,
        )
        assert not any(r["stale"] for r in bgp_rules(app).values())


def test_the_feed_gone_its_rules_go_after_the_hold_time(tmp_path: Path) -> None:
    """ExaBGP and its feed gone: the rules stay until the lease the feed last
    renewed runs out, never less (read just before the kill: a renewal
    after it only lengthens it), then go."""
    hold = 4.0
    with fleet(tmp_path, hold=hold) as (_, app, bgp):
        bgp.announce("ipv4", "destination", f"{ORIGIN_V4}/32", "then", "discard")
        wait_until(lambda: len(bgp_rules(app)) == 1, what="the route")
        t_read = time.monotonic()
        left = app.call("rule.list")["sessions"][SOURCE]["expires_in"]  # rounded to 0.1 s
        assert left > 0
        bgp.stop_exabgp()
        t_gone = wait_until(lambda: not bgp_rules(app), what="the lease running out", timeout=30)
        assert t_gone >= t_read + left - 0.05
