"""No frame is lost or duplicated by the hot loop, under a million packets."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from lab import CLIENT_V4, ORIGIN_V4, Appliance, Ledger, import_bench, lab

from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

PACKETS = 1_000_000


def test_fast_path_forwards_a_million_packets_outside_the_umem(tmp_path: Path) -> None:
    xgbench = import_bench()
    with lab(queues=2) as the_lab, Appliance(the_lab, tmp_path) as app:
        client = resolve_device(Netns(the_lab.client_ns), "eth0")
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        frame = xgbench.udp4_frame(client.mac, origin.mac, CLIENT_V4, ORIGIN_V4, 40000, 9)
        gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_sport=True)
        sink = xgbench.Sink(the_lab.origin_ns, "eth0")
        try:
            with Ledger(the_lab, app) as ledger:
                before = sink.count()
                try:
                    gen.send(PACKETS)
                    sent = gen.sent()
                finally:
                    gen.close()
            acct = ledger.account()
            received = sink.count() - before
        finally:
            sink.close()
        acct.check(sent)
        # XDP forwarded every frame it saw itself; the loop saw none, and each
        # reached the origin but for what the veth refused.
        # (The client's own stack may add a frame of its own, forwarded alike.)
        assert acct.xdp.get("fast_path", 0) == acct.xdp_seen >= acct.xmit > 0, acct
        assert acct.rx == 0, acct
        assert 0 < received <= acct.xdp["fast_path"]
        f = app.call("stats")["frames"]
        assert f["consistent"] and f["in_flight"] == 0 and f["free"] + f["fill"] == f["total"]


def test_frame_account_after_a_million_packets(tmp_path: Path) -> None:
    """The AF_XDP path (fast path off): every frame through the loop accounted for."""
    xgbench = import_bench()
    with lab(queues=2) as the_lab, Appliance(the_lab, tmp_path, "--fast-path", "off") as app:
        client = resolve_device(Netns(the_lab.client_ns), "eth0")
        origin = resolve_device(Netns(the_lab.origin_ns), "eth0")
        frame = xgbench.udp4_frame(client.mac, origin.mac, CLIENT_V4, ORIGIN_V4, 40000, 9)
        gen = xgbench.Generator(the_lab.client_ns, "eth0", frame, random_sport=True)
        with Ledger(the_lab, app) as ledger:
            try:
                gen.send(PACKETS)
                sent = gen.sent()
            finally:
                gen.close()
        # Every frame is accounted for: sent = dropped by the veth + seen by
        # XDP = its verdicts; redirected = judged by the loop + dropped by
        # the kernel at the socket; judged = forwarded + freed and counted.
        acct = ledger.account()
        acct.check(sent)
        assert sent == PACKETS and acct.xdp["redirected"] >= acct.xmit > 0, acct
        assert acct.tx + acct.tx_ring_full == acct.rx and acct.dropped == 0, acct

        def settled() -> dict:
            """A snapshot with the rings drained that no stray frame (the client's
            IPv6 housekeeping) changed while it was read: two alike in a row."""
            deadline = time.monotonic() + 10
            prev = None
            while True:
                stats = app.call("stats")
                f = stats["frames"]
                key = (
                    stats["directions"]["in"],
                    [
                        (q["xsk"]["outer"]["rx_ring_full"], q["xsk"]["outer"]["rx_dropped"])
                        for q in stats["queues"]
                    ],
                )
                drained = f["in_flight_tx"] == f["rx"] == f["tx"] == f["completion"] == 0
                if drained and key == prev:
                    return stats
                assert time.monotonic() < deadline, json.dumps(
                    [q["frames"] for q in stats["queues"]]
                )
                prev = key
                time.sleep(0.2)

        stats = settled()
        f = stats["frames"]
        assert f["consistent"], f
        for q in stats["queues"]:
            assert q["frames"]["consistent"], q
        # After a frame is dropped for a full RX ring, the kernel keeps the
        # buffer it took from the fill ring for the next frame on that queue
        # (in_flight_rx). A few frames on every queue take them all back.
        assert f["free"] + f["fill"] + f["in_flight_rx"] == f["total"], f
        settle = xgbench.Generator(the_lab.client_ns, "eth0", frame)
        try:
            for _ in range(3):
                for cpu in range(os.cpu_count() or 1):  # the sender's CPU picks the queue
                    settle.run(16, cpu=cpu)
        finally:
            settle.close()
        f = settled()["frames"]
        assert f["consistent"] and f["in_flight"] == 0, f
        assert f["free"] + f["fill"] == f["total"], f

        inbound = stats["directions"]["in"]
        # Since start (the same laws, cumulative): every frame the loop took
        # was forwarded, or freed and counted.
        assert inbound["rx_packets"] == (
            inbound["tx_packets"] + inbound["tx_ring_full"] + inbound["dropped"]
        )
        assert inbound["completions"] == inbound["tx_packets"]
        # The generator outruns the loop; what the loop did not take, the
        # kernel dropped at the socket and counted (rx_dropped covers an
        # empty fill ring). Together they account for every redirect.
        kernel_dropped = sum(
            q["xsk"]["outer"]["rx_ring_full"] + q["xsk"]["outer"]["rx_dropped"]
            for q in stats["queues"]
        )
        redirected = inbound["reasons"]["redirected"]["packets"]
        assert inbound["rx_packets"] + kernel_dropped == redirected
        assert inbound["rx_packets"] > 0
