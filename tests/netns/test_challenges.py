"""SYN challenges answered in XDP, with real traffic: xdpguard is no
reflector (what the spoofed sources' /24s receive is counted where they
would receive it), and a challenge answered across a restart still verifies.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import CLIENT_V4, ORIGIN_V4, Appliance, Lab, import_bench, lab, sh
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.netns import Netns, resolve_device

pytestmark = pytest.mark.netns

PORT = 5201


@pytest.fixture
def lab1() -> Iterator[Lab]:
    with lab(queues=2) as the_lab, the_lab.server(PORT):
        yield the_lab


def reasons(app: Appliance) -> dict[str, int]:
    return {k: v["packets"] for k, v in app.call("stats")["reasons"].items() if v["packets"]}


def test_the_reflection_caps_hold_at_the_victims(lab1: Lab, tmp_path: Path) -> None:
    """A spoofed SYN flood from 512 /24s: each /24 receives at most its cap of
    challenges, everyone together at most the global cap, over the flood's
    duration (each per-CPU bucket starts full: one second's worth more)."""
    xgbench = import_bench()
    prefix_rate, global_rate = 100, 20_000
    counter = xgbench.attach(lab1.client_ns, "eth0", "xg_count_synacks")
    try:
        with Appliance(lab1, tmp_path) as app:
            app.cli("tcp", "mode", "on")
            app.cli("tcp", "config", "--learn", "0", "--challenge-prefix-rate", str(prefix_rate),
                    "--challenge-rate", str(global_rate))  # fmt: skip
            client = resolve_device(Netns(lab1.client_ns), "eth0")
            origin = resolve_device(Netns(lab1.origin_ns), "eth0")
            frame = xgbench.tcp4_frame(
                client.mac, origin.mac, "198.18.0.1", ORIGIN_V4, 40000, PORT, "S"
            )
            gen = xgbench.Generator(
                lab1.client_ns, "eth0", frame, random_saddr=True, random_sport=True
            )
            t0 = time.monotonic()
            try:
                gen.run(200_000, pps=200_000)
            finally:
                gen.close()
            # The window the buckets refilled in ends when XDP stopped judging
            # SYNs (later than the generator on a busy machine), and the
            # answers are all counted once the counter stands still.
            judged = ("syn_challenged", "challenge_rate_limited")
            _, t_end = xgbench.settled(lambda: [reasons(app).get(k, 0) for k in judged])
            elapsed = t_end - t0
            xgbench.wait_quiet(lambda: B.map_dump(counter.map_fd("synacks_per_24"), 65536))
            r = reasons(app)
        per_24 = {}
        fd = counter.map_fd("synacks_per_24")
        ncpus = B.num_possible_cpus()
        for key, raw in B.map_dump(fd, 65536):
            per_24[socket.inet_ntoa(key)] = sum(struct.unpack(f"={ncpus}Q", raw))
    finally:
        counter.close()
    total = sum(per_24.values())
    print(f"{elapsed:.2f} s: {total} challenges to {len(per_24)} /24s, reasons {r}")
    assert r["challenge_rate_limited"] > 0  # the caps bit
    assert total <= r["syn_challenged"]  # every answer XDP sent, at most, arrived
    assert max(per_24.values()) <= prefix_rate * (elapsed + 1), per_24
    assert total <= global_rate * (elapsed + 1)
    assert all(ip.startswith(("198.18.", "198.19.")) for ip in per_24)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_challenge_answered_across_a_restart_verifies(
    lab1: Lab, tmp_path: Path, sig: signal.Signals
) -> None:
    """The SYN is challenged by one run of xdpguard, its RST reaches the next."""
    app = Appliance(lab1, tmp_path).start()
    try:
        app.cli("tcp", "mode", "on")
        app.cli("tcp", "config", "--learn", "0")
        client = resolve_device(Netns(lab1.client_ns), "eth0")
        origin = resolve_device(Netns(lab1.origin_ns), "eth0")
        syn = (
            Ether(src=client.mac, dst=origin.mac)
            / IP(src=CLIENT_V4, dst=ORIGIN_V4)
            / TCP(sport=41000, dport=PORT, flags="S", seq=1234)
        )

        def challenge() -> int:
            """Send the SYN from the client's eth0; the cookie of the SYN-ACK back."""
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)) as raw:
                raw.bind(("eth0", 0))
                raw.settimeout(5)
                raw.send(bytes(syn))
                while True:
                    got = Ether(raw.recv(2048))
                    if TCP in got and got[TCP].dport == 41000 and got[TCP].flags == "SA":
                        return int(got[TCP].ack)

        # The client's kernel would answer the SYN-ACK of a port it never
        # opened with the RST itself, at once: hold that back (a raw
        # socket's frames pass by netfilter).
        hold = (
            "table ip xgholdrst {\n chain out {\n  type filter hook output priority 0;\n"
            "  tcp flags & rst == rst drop\n }\n}\n"
        )
        sh("ip", "netns", "exec", lab1.client_ns, "nft", "-f", "-", input=hold)
        try:
            cookie = Netns(lab1.client_ns).run(challenge)
        finally:
            lab1.ns_exec(lab1.client_ns, "nft", "delete", "table", "ip", "xgholdrst")
        assert reasons(app)["syn_challenged"] == 1
        assert json.loads(app.cli("tcp", "verified", "list", "--json").stdout)["count"] == 0
        app.stop(sig)
        app = Appliance(lab1, tmp_path).start()
        rst = (
            Ether(src=client.mac, dst=origin.mac)
            / IP(src=CLIENT_V4, dst=ORIGIN_V4)
            / TCP(sport=41000, dport=PORT, flags="R", seq=cookie)
        )

        def answer() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind(("eth0", 0))
                raw.send(bytes(rst))

        Netns(lab1.client_ns).run(answer)
        deadline = time.monotonic() + 10
        while "challenge_passed" not in reasons(app):
            assert time.monotonic() < deadline, reasons(app)
            time.sleep(0.02)
        verified = json.loads(app.cli("tcp", "verified", "list", "--json").stdout)
        assert [e["source"] for e in verified["entries"]] == [CLIENT_V4]
        # A real client from that source now connects without a challenge.
        s = Netns(lab1.client_ns).run(lambda: socket.create_connection((ORIGIN_V4, PORT), 5))
        s.sendall(b"ECHO\nacross\n")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(64) == b"across\n"
        s.close()
        assert "syn_challenged" not in reasons(app)
    finally:
        app.stop()
