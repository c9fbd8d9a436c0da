"""Prometheus metrics of a running appliance, with real traffic: what
promtool accepts, counters that never go down, and a real Prometheus server
that scrapes them and answers a query for them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from lab import ORIGIN_V4, Appliance, lab, wait_for

pytestmark = pytest.mark.netns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def counters(text: str) -> dict[str, float]:
    """Every sample of a counter (``*_total``), by series."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(xdpguard_\w+_total(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_during_traffic(tmp_path: Path) -> None:
    port = free_port()
    with lab(queues=2) as the_lab, the_lab.server():
        with Appliance(the_lab, tmp_path, "--metrics", str(port)) as app:
            app.cli("block", "add", "192.0.2.0/24")
            app.cli("rule", "add", "dst", "192.0.2.0/24", "proto", "udp", "drop")
            app.cli("protect", "add", "169.254.0.0/24", "--name", "lab")
            mover = subprocess.Popen(
                ["ip", "netns", "exec", the_lab.client_ns, "ping", "-c", "50", "-i", "0.02",
                 ORIGIN_V4], stdout=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                first = scrape(port)
                check = subprocess.run(
                    ["promtool", "check", "metrics"], input=first, text=True, capture_output=True
                )
                assert check.returncode == 0, check.stdout + check.stderr
                before = counters(first)
                # Every reason and direction, zeros included: a bounded, fixed set.
                reasons = json.loads(app.cli("stats", "--json").stdout)["reasons"]
                for d in ("in", "out"):
                    for r in reasons:
                        assert f'xdpguard_packets_total{{direction="{d}",reason="{r}"}}' in before
                assert 'xdpguard_policy_prefixes{family="v4",list="block"} 1.0' in first
                assert 'xdpguard_rules{source="local"} 1.0' in first
                assert "xdpguard_build_info{" in first
                assert "xdpguard_protected_addresses_capacity 65536.0" in first
                wait_for(lambda: mover.poll() is not None, what="the pings")
                icmp = (
                    'xdpguard_protected_packets_total{class="icmp",name="lab",'
                    'prefix="169.254.0.0/24"}'
                )
                # Per protected prefix, read once a second: the 50 pings to the origin.
                wait_for(lambda: counters(scrape(port))[icmp] >= 50, what="the pings counted")
                after = counters(scrape(port))
            finally:
                mover.wait(30)
        assert set(after) == set(before)
        went_down = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
        assert not went_down, went_down
        moved = after['xdpguard_packets_total{direction="in",reason="fast_path"}']
        assert moved > before['xdpguard_packets_total{direction="in",reason="fast_path"}']


def slowloris(port: int, source: str, n: int) -> list[socket.socket]:
    """``n`` connections from ``source`` that never finish a request: some
    send nothing, some half a request line, some a header without its end."""
    conns = []
    for i in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(30)
        try:
            s.connect(("127.0.0.1", port))
            s.send([b"", b"GET /metr", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"][i % 3])
        except OSError:
            pass  # refused over the caps: as good
        conns.append(s)
    return conns


def test_a_prometheus_server_scrapes_them(tmp_path: Path) -> None:
    """... beside a slowloris: connections that send an unfinished request, or
    nothing, from another address; every scrape is still answered, and the
    server cuts them after its deadline (issue 23, 6)."""
    from xdpguard.metrics import CONN_DEADLINE, MAX_CONNS_PER_PEER

    port, prom_port = free_port(), free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: xdpguard\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path, "--metrics", str(port)):
        assert the_lab.ping(ORIGIN_V4)
        held = slowloris(port, "127.0.0.2", 3 * MAX_CONNS_PER_PEER)
        t_held = time.monotonic()
        for _ in range(5):  # the single-threaded server of old hung on the first
            assert "xdpguard_up_seconds" in scrape(port, timeout=3)
        # Every slowloris connection is cut: none lives past the deadline.
        for c in held:
            try:
                while c.recv(4096):
                    pass
            except OSError:
                pass
            c.close()
        assert time.monotonic() - t_held < CONN_DEADLINE + 5
        held = slowloris(port, "127.0.0.2", 3 * MAX_CONNS_PER_PEER)  # and beside Prometheus
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            query = urllib.parse.urlencode(
                {"query": 'xdpguard_packets_total{direction="in",reason="fast_path"}'}
            )
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"
            found: list = []

            def answered() -> bool:
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        found[:] = json.loads(r.read())["data"]["result"]
                except OSError:
                    return False
                return bool(found)

            wait_for(answered, timeout=60, what="Prometheus to scrape xdpguard")
            (sample,) = found
            assert sample["metric"]["job"] == "xdpguard"
            assert float(sample["value"][1]) > 0  # the pings, forwarded in XDP
        finally:
            for c in held:
                c.close()
            prom.terminate()
            prom.wait(30)
