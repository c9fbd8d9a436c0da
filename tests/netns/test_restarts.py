"""A restart cuts no connection, idle or busy: the flow table is pinned, so the
next run finds every flow, fast-path ones included (SIGTERM and SIGKILL)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from lab import ORIGIN_V4, Appliance, lab, wait_for

from xdpguard.netns import Netns

pytestmark = pytest.mark.netns

PORT = 5201
CONNS = 20


def open_idle(ns: str, n: int) -> list[socket.socket]:
    """``n`` echo connections from the client, used once and then left idle."""

    def dial() -> list[socket.socket]:
        out = []
        for i in range(n):
            s = socket.create_connection((ORIGIN_V4, PORT), timeout=10)
            s.sendall(f"ECHO\nhello {i}\n".encode())
            assert s.recv(64) == f"hello {i}\n".encode()
            out.append(s)
        return out

    return Netns(ns).run(dial)


@pytest.mark.parametrize(
    ("sig", "resize"),
    [(signal.SIGTERM, ()), (signal.SIGKILL, ()), (signal.SIGKILL, ("--max-flows", "300000"))],
    ids=["sigterm", "sigkill", "sigkill-resized"],
)
def test_idle_connections_survive_a_restart(
    tmp_path: Path, sig: signal.Signals, resize: tuple[str, ...]
) -> None:
    """The resized case restarts with another --max-flows: the flows move to
    the new table, and the verified sources (their capacity changes too)
    come along."""
    with lab(queues=2) as the_lab, the_lab.server(PORT):
        app = Appliance(the_lab, tmp_path, "--learn", "0").start()
        try:
            app.cli("tcp", "mode", "on")
            conns = open_idle(the_lab.client_ns, CONNS)
            wait_for(lambda: app.call("tcp.flows", top=0)["fast_path"] >= CONNS, what="fast")
            verified = app.call("tcp.verified.list")["entries"]
            assert len(verified) == 1, verified  # the client answered one challenge
            app.stop(sig)
            app = Appliance(the_lab, tmp_path, "--learn", "0", *resize).start()
            st = app.call("status")
            assert st["flow_table"]["restored"], st["flow_table"]
            assert app.call("tcp.config")["learning_left"] == 0  # nothing to adopt
            after = app.call("tcp.verified.list")["entries"]
            assert [e["source"] for e in after] == [e["source"] for e in verified]
            # Every idle connection still carries data both ways.
            for i, s in enumerate(conns):
                s.sendall(f"again {i}\n".encode())
                assert s.recv(64) == f"again {i}\n".encode(), i
            reasons = app.call("stats")["reasons"]
            assert reasons["tcp_no_flow"]["packets"] == 0, reasons
            for s in conns:
                s.close()
        finally:
            app.stop()


def test_a_cold_start_has_its_learning_window(tmp_path: Path) -> None:
    """No pinned table (forgotten, or a first start): flows are adopted as before."""
    from xdpguard.flowtable import forget

    with lab(queues=1) as the_lab, Appliance(the_lab, tmp_path) as app:
        assert not app.call("status")["flow_table"]["restored"]
        assert app.call("tcp.config")["learning_left"] > 0
    assert forget(app.state_dir)
    assert not forget(app.state_dir)
