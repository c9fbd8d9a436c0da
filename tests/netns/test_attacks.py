"""Attacks found and stopped by the appliance itself (xdpguard.detect).

Each test floods a protected host of the lab from spoofed sources, bounded
in count and time, while real traffic runs beside the flood, and checks
through the CLI what an operator sees: the attack, its fingerprint, the
rule under the source 'auto' and what it dropped, the real traffic kept,
and the rule withdrawn once the flood ends.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lab import CLIENT_V4, ORIGIN_V4, Appliance, Lab, import_bench, lab, wait_for
from pcapng_read import read_pcapng

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

HOLD = "3"  # seconds under the threshold before an attack ends (default 60)


def _attacks(app: Appliance) -> dict[str, Any]:
    return json.loads(app.cli("attacks", "--json").stdout)


def _frame(the_lab: Lab, xgbench: Any, sport: int, dport: int, size: int, dst: str = ORIGIN_V4,
           src: str = CLIENT_V4) -> bytes:  # fmt: skip
    client = resolve_device(Netns(the_lab.client_ns), "eth0")
    origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
    return xgbench.udp4_frame(client.mac, origin.mac, src, dst, sport, dport, size=size)


class Flood:
    """The generator in a thread: ``count`` frames at ``pps``, at most 30 s."""

    def __init__(self, gen: Any, count: int, pps: int) -> None:
        self.gen = gen
        self.started = 0.0
        self.thread = threading.Thread(target=self._run, args=(count, pps))

    def _run(self, count: int, pps: int) -> None:
        self.started = time.time()
        self.gen.run(count, pps=pps, max_seconds=30)

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gen.stop()
        self.thread.join()
        self.gen.close()


def _setup(app: Appliance, pps: int = 3000) -> None:
    app.cli("protect", "add", "169.254.0.0/24", "--name", "lab", "--pps", str(pps))
    app.cli("protect", "config", "--hold", HOLD)


def test_a_dns_reflection_flood_gets_a_rule_that_drops_it_and_goes_after(tmp_path: Path) -> None:
    xgbench = import_bench()
    with lab(queues=1) as the_lab, the_lab.server(), Appliance(the_lab, tmp_path) as app:
        _setup(app)
        # 500 to 1400 bytes of DNS answers from port 53, from across 198.18.0.0/15.
        frame = _frame(the_lab, xgbench, 53, 33333, size=1400)
        gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_saddr=True,
                                random_len_min=500)  # fmt: skip
        with the_lab.origin_counters(attack="ip saddr 198.18.0.0/15 udp sport 53") as at_origin:
            with (
                the_lab.probe(CLIENT_V4, ORIGIN_V4, "tcp", 12.0) as probe,
                Flood(gen, 300_000, 30_000),
            ):

                def installed() -> dict[str, Any] | None:
                    active = _attacks(app)["active"]
                    return next((a for a in active if a["rule_installed"]), None)

                wait_for(installed, timeout=20, what="a rule installed")
                a = installed()
                assert a is not None
                reached = at_origin()["attack"]
                xdp_before = _rule(app, a["rule"])["packets"]
                time.sleep(2.0)
                reached_after = at_origin()["attack"] - reached
                matched_after = _rule(app, a["rule"])["packets"] - xdp_before
            attempts = probe.result()
        assert a["destination"] == ORIGIN_V4 and a["class"] == "udp" and a["mode"] == "mitigate"
        rule = a["rule"]
        for term in (f"dst {ORIGIN_V4}/32 ", " src 198.18.0.0/15 ", " proto udp ", " sport 53 ",
                     " length "):  # fmt: skip
            assert term in rule, rule
        assert rule.endswith(" drop")
        # Once the rule is in, at least 99 % of what it matches never reaches the origin.
        assert matched_after > 0
        assert reached_after <= 0.01 * matched_after, (reached_after, matched_after)
        # The real TCP connections beside it: none lost.
        assert attempts and all(x.ok for x in attempts), [x for x in attempts if not x.ok][:3]
        # The flood ends: the rule goes after the hold-down.
        wait_for(lambda: not _attacks(app)["active"], timeout=30, what="the attack to end")
        past = _attacks(app)["past"][0]
        assert past["state"] == "ended" and past["dropped_packets"] > 0
        assert not [r for r in app.call("rule.list", source="auto")["rules"]]
        # Its samples, in a pcapng tcpdump reads.
        packets = read_pcapng(Path(past["pcap"]).read_bytes())
        assert packets and all(p.comment and "attack=" in p.comment for p in packets)


def _rule(app: Appliance, text: str) -> dict[str, Any]:
    rules = app.call("rule.list", source="auto")["rules"]
    return next(r for r in rules if r["rule"] == text)
