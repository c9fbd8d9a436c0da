"""Prometheus metrics of a running appliance (``xdpguard run --metrics``).

One source, two formats: every scrape reads the same snapshot ``stats
--json`` prints (Engine.stats()), plus the tables behind ``tcp flows`` and
the policy's sizes, and turns it into metrics with a custom collector of
prometheus_client. Every series that can exist is exported, zeros
included; no label carries a flow or a source address, so the number of
series is fixed by the reasons, directions, queues and states.

    xdpguard_packets_total{direction,reason}      every frame's verdict (XDP's and the loop's)
    xdpguard_bytes_total{direction,reason}
    xdpguard_monitor_packets_total{reason}        what monitor mode let through
    xdpguard_challenges_total{result}             sent, passed, failed, rate_limited
    xdpguard_queue_packets_total{queue,direction,kind}   the loop: rx, tx, dropped, tx_ring_full
    xdpguard_xsk_drops_total{queue,device,kind}   the kernel's drops at the AF_XDP sockets
    xdpguard_flows{state}, xdpguard_flows_fast_path, xdpguard_flows_capacity,
    xdpguard_rules{source}, xdpguard_ratelimits,
    xdpguard_flow_evictions_total, xdpguard_verified_sources
    xdpguard_policy_prefixes{list,family}, xdpguard_policy_udp_ports
    xdpguard_frames{place}                        the frame account: where every UMEM frame is
    xdpguard_worker_busy_ratio{queue}             CPU time of each worker since the last scrape
    xdpguard_protected_packets_total{prefix,name,class}  frames to a protected prefix
    xdpguard_protected_bytes_total{prefix,name,class}    (xdpguard protect: the operator's
    xdpguard_protected_addresses, _capacity,             own networks, a bounded set)
    xdpguard_protected_address_evictions_total
    xdpguard_samples_total{result}                taken, capped, ring_full
    xdpguard_attacks_active{class}, xdpguard_attacks_total{class}   (xdpguard attacks)
    xdpguard_up_seconds, xdpguard_build_info{version,abi}

Heavy hitters ('xdpguard top') are not exported: by address they would be
a label per attacker, and by rank ({rank="1"}) a series that is a
different source from one scrape to the next, which no query can use.
Scripts read 'xdpguard top --json'.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from xdpguard import __version__
from xdpguard import _bindings as B
from xdpguard.defs import Reason
from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard")

_CHALLENGES = {
    "sent": "syn_challenged",
    "passed": "challenge_passed",
    "failed": "challenge_failed",
    "rate_limited": "challenge_rate_limited",
}
_QUEUE_KINDS = {
    "rx": "rx_packets",
    "tx": "tx_packets",
    "dropped": "dropped",
    "tx_ring_full": "tx_ring_full",
}
_XSK_KINDS = ("rx_dropped", "rx_ring_full", "rx_fill_ring_empty_descs", "tx_invalid_descs")
_FRAME_PLACES = ("free", "fill", "rx", "tx", "completion", "in_flight")


class ApplianceCollector(Collector):
    """Metrics of one engine, read at each scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._busy: dict[int, tuple[float, float]] = {}  # queue -> (cpu seconds, when)
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Any]:
        return iter(())  # unchecked: the collector's series come from the snapshot

    def _busy_ratios(self) -> dict[int, float]:
        """Each worker's share of one CPU since the previous scrape."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        with self._lock:
            for path in self.engine.paths:
                tid = getattr(path, "tid", None)
                if tid is None:
                    continue
                try:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                cpu, now = (int(fields[11]) + int(fields[12])) / tick, time.monotonic()
                last = self._busy.get(path.queue)
                self._busy[path.queue] = (cpu, now)
                if last is not None and now > last[1]:
                    out[path.queue] = max(0.0, min(1.0, (cpu - last[0]) / (now - last[1])))
                else:
                    out[path.queue] = 0.0
        return out

    def collect(self) -> Iterator[Any]:
        engine = self.engine
        st = engine.stats(account=True)
        flows = engine.tcp.flows(0) if engine.tcp is not None else None
        policy = engine.policy.summary() if engine.policy is not None else None

        info = InfoMetricFamily("xdpguard_build", "xdpguard's version and data-path ABI.")
        info.add_metric([], {"version": __version__, "abi": str(B.ABI_VERSION)})
        yield info
        up = GaugeMetricFamily("xdpguard_up_seconds", "Seconds since xdpguard started.")
        up.add_metric([], st["uptime"])
        yield up

        packets = CounterMetricFamily(
            "xdpguard_packets", "Frames by verdict (XDP's and the loop's).",
            labels=["direction", "reason"],
        )  # fmt: skip
        nbytes = CounterMetricFamily(
            "xdpguard_bytes", "Bytes by verdict.", labels=["direction", "reason"]
        )
        for direction, d in st["directions"].items():
            for r in Reason:
                v = d["reasons"][r.name]
                packets.add_metric([direction, r.name], v["packets"])
                nbytes.add_metric([direction, r.name], v["bytes"])
        yield packets
        yield nbytes

        monitor = CounterMetricFamily(
            "xdpguard_monitor_packets", "What monitor mode let through, by the verdict it "
            "would have had.", labels=["reason"],
        )  # fmt: skip
        for r in Reason:
            monitor.add_metric([r.name], st["monitor"].get(r.name, {"packets": 0})["packets"])
        yield monitor

        challenges = CounterMetricFamily(
            "xdpguard_challenges", "SYN challenges, answered in XDP.", labels=["result"]
        )
        for result, reason in _CHALLENGES.items():
            challenges.add_metric([result], st["reasons"][reason]["packets"])
        yield challenges

        queue = CounterMetricFamily(
            "xdpguard_queue_packets", "Frames the AF_XDP loop moved, per queue.",
            labels=["queue", "direction", "kind"],
        )  # fmt: skip
        xsk = CounterMetricFamily(
            "xdpguard_xsk_drops", "Frames the kernel dropped at an AF_XDP socket.",
            labels=["queue", "device", "kind"],
        )  # fmt: skip
        for q in st["queues"]:
            for direction in ("in", "out"):
                for kind, field in _QUEUE_KINDS.items():
                    queue.add_metric([str(q["queue"]), direction, kind], q[direction][field])
            for device in ("outer", "inner"):
                for kind in _XSK_KINDS:
                    xsk.add_metric([str(q["queue"]), device, kind], q["xsk"][device][kind])
        yield queue
        yield xsk

        frames = GaugeMetricFamily(
            "xdpguard_frames", "Where the UMEM's frames are (the frame account).",
            labels=["place"],
        )  # fmt: skip
        for place in _FRAME_PLACES:
            frames.add_metric([place], st["frames"][place])
        yield frames
        busy = GaugeMetricFamily(
            "xdpguard_worker_busy_ratio", "Each worker's CPU time per second since the last "
            "scrape (1: a whole core).", labels=["queue"],
        )  # fmt: skip
        for q, ratio in self._busy_ratios().items():
            busy.add_metric([str(q)], ratio)
        yield busy

        if flows is not None:
            by_state = GaugeMetricFamily("xdpguard_flows", "Tracked TCP flows.", labels=["state"])
            for state, n in flows["states"].items():
                by_state.add_metric([state], n)
            yield by_state
            for name, doc, value in (
                ("xdpguard_flows_fast_path", "Flows XDP forwards itself.", flows["fast_path"]),
                ("xdpguard_flows_capacity", "Slots of the flow table.", flows["capacity"]),
                ("xdpguard_verified_sources", "Sources that answered a challenge.",
                 flows["verified"]),
            ):  # fmt: skip
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
            ev = CounterMetricFamily(
                "xdpguard_flow_evictions", "Flows given up for a new one in a full bucket."
            )
            ev.add_metric([], flows["evictions"])
            yield ev
        if policy is not None:
            prefixes = GaugeMetricFamily(
                "xdpguard_policy_prefixes", "Prefixes of each list.", labels=["list", "family"]
            )
            for lst in ("allow", "block"):
                for family, n in policy[lst].items():
                    prefixes.add_metric([lst, family], n)
            yield prefixes
            ports = GaugeMetricFamily("xdpguard_policy_udp_ports", "UDP source ports dropped.")
            ports.add_metric([], len(policy["ports"]))
            yield ports
        rules = engine.rules.summary() if getattr(engine, "rules", None) is not None else None
        if rules is not None:
            # One series per source: local and each BGP peer (a handful).
            by = GaugeMetricFamily(
                "xdpguard_rules", "N-tuple rules, by source (local, bgp:PEER).", labels=["source"]
            )
            by.add_metric(["local"], rules["by_source"].get("local", 0))
            for source, n in sorted(rules["by_source"].items()):
                if source != "local":
                    by.add_metric([source], n)
            yield by
            lim = GaugeMetricFamily("xdpguard_ratelimits", "Per-source rate limits.")
            lim.add_metric([], rules["ratelimits"])
            yield lim
        yield from self._protected(engine)
        yield from self._samples(engine)
        yield from self._attacks(engine)

    @staticmethod
    def _attacks(engine: Any) -> Iterator[Any]:
        detector = getattr(engine, "detector", None)
        if detector is None:
            return
        m = detector.metrics()
        active = GaugeMetricFamily("xdpguard_attacks_active", "Attacks in progress, by class.",
                                   labels=["class"])  # fmt: skip
        total = CounterMetricFamily("xdpguard_attacks", "Attacks found, by class.",
                                    labels=["class"])  # fmt: skip
        for c, n in m["active"].items():
            active.add_metric([c], n)
            total.add_metric([c], m["total"][c])
        yield active
        yield total

    @staticmethod
    def _protected(engine: Any) -> Iterator[Any]:
        """Per protected prefix (the operator's own networks, a bounded set):
        frames from outside per protocol class. No address of an attacker
        or of a single host is a label: per address is 'xdpguard top'."""
        protect = getattr(engine, "protect", None)
        if protect is None:
            return
        from xdpguard.protect import CLASSES

        pk = CounterMetricFamily("xdpguard_protected_packets",
                                 "Frames from outside to a protected prefix, by protocol class "
                                 "(whatever their verdict).",
                                 labels=["prefix", "name", "class"])  # fmt: skip
        by = CounterMetricFamily("xdpguard_protected_bytes", "Bytes of those frames.",
                                 labels=["prefix", "name", "class"])  # fmt: skip
        for row in protect.prefixes():
            for c in CLASSES:
                labels = [row["prefix"], row["name"] or "", c]
                pk.add_metric(labels, row.get("packets", {}).get(c, 0))
                by.add_metric(labels, row.get("bytes", {}).get(c, 0))
        yield pk
        yield by
        occ = protect.occupancy()
        held = GaugeMetricFamily(
            "xdpguard_protected_addresses",
            "Protected addresses counted one by one (the LRU's entries).",
        )
        held.add_metric([], occ["tracked"])
        yield held
        cap = GaugeMetricFamily("xdpguard_protected_addresses_capacity", "--max-dests.")
        cap.add_metric([], occ["capacity"])
        yield cap
        ev = CounterMetricFamily("xdpguard_protected_address_evictions",
                                 "Addresses the LRU let go of to count new ones.")  # fmt: skip
        ev.add_metric([], occ["evicted"])
        yield ev

    @staticmethod
    def _samples(engine: Any) -> Iterator[Any]:
        sampler = getattr(engine, "sampler", None)
        if sampler is None:
            return
        st = sampler.maps.state()
        m = CounterMetricFamily("xdpguard_samples",
                                "Packet samples: taken onto the ring, refused by the cap, or "
                                "lost for a full ring.", labels=["result"])  # fmt: skip
        for result in ("taken", "capped", "ring_full"):
            m.add_metric([result], st[result])
        yield m


# Bounds of the HTTP server: one connection that sends an unfinished request,
# or nothing, or sends it a byte at a time, must not keep the next scrape
# waiting. Each connection is closed CONN_DEADLINE seconds after it came,
# whatever it is doing; at most MAX_CONNS are served at once, and at most
# MAX_CONNS_PER_PEER from one address (the rest are closed at once), so one
# host cannot take every slot.
CONN_DEADLINE = 10.0
MAX_CONNS = 256
MAX_CONNS_PER_PEER = 8


class _Handler(WSGIRequestHandler):
    timeout = CONN_DEADLINE  # each read and write (socketserver sets it)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, a thread per connection, bounded as said above."""

    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:
        super().server_bind()
        self._slots = threading.Lock()
        self._conns: dict[str, int] = {}
        self._pending: dict[int, threading.Timer] = {}

    def _take(self, peer: str) -> bool:
        with self._slots:
            if (
                sum(self._conns.values()) >= MAX_CONNS
                or self._conns.get(peer, 0) >= MAX_CONNS_PER_PEER
            ):
                return False
            self._conns[peer] = self._conns.get(peer, 0) + 1
            return True

    def _give(self, peer: str) -> None:
        with self._slots:
            self._conns[peer] -= 1
            if not self._conns[peer]:
                del self._conns[peer]

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        if not self._take(peer):
            self.shutdown_request(request)
            return
        # The whole exchange has a deadline, not only each read: a request
        # trickled a byte at a time would otherwise last for ever.
        timer = threading.Timer(CONN_DEADLINE, _cut, (request,))
        timer.daemon = True
        with self._slots:
            self._pending[id(request)] = timer
        timer.start()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request, peer)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request, str(client_address[0]))

    def _done(self, request: Any, peer: str) -> None:
        with self._slots:
            timer = self._pending.pop(id(request), None)
        if timer is not None:
            timer.cancel()
            self._give(peer)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class MetricsServer:
    """An HTTP server of /metrics for one engine, on its own thread. The port
    is taken at once (a busy one fails the start, before any device is
    touched); scrapes are served from start()."""

    def __init__(self, engine: Any, addr: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ApplianceCollector(engine))
        family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET

        class Server(_BoundedServer):
            address_family = family

        try:
            self._server = make_server(addr, port, make_wsgi_app(registry), Server, _Handler)
        except OSError as exc:
            raise XdpguardError(f"cannot serve metrics on {addr}:{port}: {exc.strerror}") from None
        self.address = f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="xg-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        # shutdown() waits for serve_forever() to notice: never call it on a
        # server that was not started (a failed start), it would wait forever.
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(2)
        self._server.server_close()
