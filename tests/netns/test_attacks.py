"""Attacks found and stopped by the appliance itself (xdpguard.detect).

Each test floods a protected host of the lab from spoofed sources, bounded
in count and time, while real traffic runs beside the flood, and checks
through the CLI what an operator sees: the attack, its fingerprint, the
rule under the source 'auto' and what it dropped, the real traffic kept,
and the rule withdrawn once the flood ends.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def dns_server(the_lab: Lab) -> Iterator[None]:
    """dnsmasq at the origin: lab.test is 169.254.0.9."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", the_lab.origin_ns, "dnsmasq", "--no-daemon", "--no-resolv",
         "--no-hosts", f"--listen-address={ORIGIN_V4}", "--bind-interfaces",
         "--address=/lab.test/169.254.0.9", "--user=root", "--pid-file=", "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _dig(the_lab, 1, 0.5) == (1, 1), timeout=20, what="dnsmasq to answer")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _dig(the_lab: Lab, n: int, timeout: float = 1.0) -> tuple[int, int]:
    """``n`` real DNS queries from the client (dig in batch): (answered, asked)."""
    with tempfile.NamedTemporaryFile("w", suffix=".dig") as batch:
        batch.write("lab.test A\n" * n)
        batch.flush()
        out = the_lab.ns_exec(the_lab.client_ns, "dig", f"@{ORIGIN_V4}", "+tries=1",
                              f"+time={max(1, round(timeout))}", "-f", batch.name,
                              check=False, timeout=30 + 2 * n).stdout  # fmt: skip
    return out.count("status: NOERROR"), n


def _installed(app: Appliance) -> dict[str, Any] | None:
    return next((a for a in _attacks(app)["active"] if a["rule_installed"]), None)


def _over(app: Appliance) -> None:
    wait_for(lambda: not _attacks(app)["active"], timeout=30, what="the attack to end")
    assert not app.call("rule.list", source="auto")["rules"]


def test_reflection_floods_get_a_rule_that_drops_them_and_goes_after(tmp_path: Path) -> None:
    """Cases 1, 2 and 8: DNS reflection (random sizes, sources across the
    /15) with real DNS and TCP beside it; then NTP and memcached at once."""
    xgbench = import_bench()
    with (
        lab(queues=2) as the_lab,
        the_lab.server(),
        Appliance(the_lab, tmp_path) as app,
        dns_server(the_lab),
    ):
        _setup(app)
        frame = _frame(the_lab, xgbench, 53, 33333, size=1400)
        gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_saddr=True,
                                random_len_min=500)  # fmt: skip
        dig: list[tuple[int, int]] = []
        with the_lab.origin_counters(attack="ip saddr 198.18.0.0/15 udp sport 53") as at_origin:
            probe_cm = the_lab.probe(CLIENT_V4, ORIGIN_V4, "tcp", 12.0)
            with probe_cm as probe, Flood(gen, 300_000, 30_000):
                wait_for(lambda: _installed(app), timeout=20, what="a rule installed")
                a = _installed(app)
                assert a is not None
                reached = at_origin()["attack"]
                matched = _rule(app, a["rule"])["packets"]
                dig.append(_dig(the_lab, 100, 1.0))  # real queries, during the flood
                reached_after = at_origin()["attack"] - reached
                matched_after = _rule(app, a["rule"])["packets"] - matched
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
        # Real DNS to the same host: at least 99 % answered; real TCP: none lost.
        ((answered, asked),) = dig
        assert answered >= 0.99 * asked, dig
        assert attempts and all(x.ok for x in attempts), [x for x in attempts if not x.ok][:3]
        # The flood ends: the rule goes after the hold-down.
        _over(app)
        past = _attacks(app)["past"][0]
        assert past["state"] == "ended" and past["dropped_packets"] > 0
        # Its samples, in a pcapng tcpdump reads.
        packets = read_pcapng(Path(past["pcap"]).read_bytes())
        assert packets and all(p.comment and "attack=" in p.comment for p in packets)

        # NTP and memcached reflection at once, from both queues.
        gens = [
            xgbench.Generator(
                the_lab.client_ns,
                "eth0",
                _frame(the_lab, xgbench, port, 40000, 468),
                random_saddr=True,
                queue=q,
            )
            for q, port in ((0, 123), (1, 11211))
        ]
        with Flood(gens[0], 200_000, 20_000), Flood(gens[1], 200_000, 20_000):
            wait_for(lambda: _installed(app), timeout=20, what="a rule installed")
            a = _installed(app)
        assert a is not None and " sport 123,11211 " in a["rule"], a["rule"]
        _over(app)


def _rule(app: Appliance, text: str) -> dict[str, Any]:
    rules = app.call("rule.list", source="auto")["rules"]
    return next(r for r in rules if r["rule"] == text)


def test_udp_floods_by_length_and_spread_over_a_prefix(tmp_path: Path) -> None:
    """Cases 3 and 6: random source ports with a fixed payload; then
    carpet bombing, the flood spread over every address of the /24."""
    xgbench = import_bench()
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        _setup(app)
        frame = _frame(the_lab, xgbench, 40000, 7777, size=120)
        gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_saddr=True,
                                random_sport=True)  # fmt: skip
        with Flood(gen, 300_000, 30_000):
            wait_for(lambda: _installed(app), timeout=20, what="a rule installed")
            a = _installed(app)
        assert a is not None and a["destination"] == ORIGIN_V4
        assert " length 106 " in a["rule"] and " sport " not in a["rule"], a["rule"]
        _over(app)

        # Every address of the /24, none of them above the floor alone.
        frame = _frame(the_lab, xgbench, 53, 40000, size=600, dst="169.254.0.0")
        gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_saddr=True,
                                random_dst_bits=8)  # fmt: skip
        with Flood(gen, 300_000, 30_000):
            wait_for(lambda: _installed(app), timeout=20, what="a rule installed")
            a = _installed(app)
            listed = json.loads(app.cli("protect", "list", "--json").stdout)
        assert a is not None and a["level"] == "prefix", a
        assert a["rule"].startswith("dst 169.254.0.0/24 ") and " sport 53 " in a["rule"]
        assert listed["addresses"]["tracked"] > 100  # the carpet, address by address
        _over(app)


def test_tcp_attacks_are_recorded_and_left_to_the_tcp_protection(tmp_path: Path) -> None:
    """Cases 4, 5 and 7: a SYN flood on one port, an ACK flood, and a flash
    crowd of real connections: attacks, each recorded, and no rule."""
    xgbench = import_bench()
    with lab(queues=1) as the_lab, the_lab.server(), Appliance(the_lab, tmp_path) as app:
        app.cli("protect", "add", "169.254.0.0/24", "--pps", "syn=500", "--pps", "tcp=500")
        app.cli("protect", "config", "--hold", HOLD)
        client = resolve_device(Netns(the_lab.client_ns), "eth0")
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        for flags, cls in (("S", "syn"), ("A", "tcp")):
            frame = xgbench.tcp4_frame(client.mac, origin.mac, CLIENT_V4, ORIGIN_V4, 1234, 5201,
                                       flags)  # fmt: skip
            gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_saddr=True,
                                    random_sport=True)  # fmt: skip
            with Flood(gen, 100_000, 20_000):
                wait_for(lambda cls=cls: any(a["class"] == cls for a in _attacks(app)["active"]),
                         timeout=20, what=f"a {cls} attack")  # fmt: skip
                (a,) = [a for a in _attacks(app)["active"] if a["class"] == cls]
            assert a["state"] == "recorded" and a["rule"] is None
            assert "TCP protection" in a["why"]
            _over(app)
        # A flash crowd: 300 real connections at once, many times the baseline.
        before = len(_attacks(app)["past"])
        res = the_lab.client("many", "--to", ORIGIN_V4, "--conns", "300")
        assert res["ok"], res
        wait_for(lambda: not _attacks(app)["active"], timeout=30, what="the crowd to pass")
        crowd = _attacks(app)["past"][: len(_attacks(app)["past"]) - before]
        assert all(a["rule"] is None for a in crowd)
        assert not app.call("rule.list", source="auto")["rules"]
