"""The hot loop's contract: stops promptly, runs once, accounts every frame."""

from __future__ import annotations

import errno
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from lab import veth_netns

from xdpguard import _bindings as B
from xdpguard.defs import Role
from xdpguard.netns import Netns

pytestmark = pytest.mark.bpf

FRAMES = 8192


@pytest.fixture
def worker() -> Iterator[B.Worker]:
    """A worker between the two ends of a veth pair in a private namespace."""
    with veth_netns("xgwrk") as name:
        made: list = []
        try:
            ns = Netns(name)
            umem = B.Umem(FRAMES, 2048)
            made.append(umem)
            outer = ns.run(B.Sock, umem, "xgv0", 0, 2048, B.XDP_USE_NEED_WAKEUP, int(Role.OUTER))
            made.append(outer)
            inner = ns.run(B.Sock, umem, "xgv1", 0, 2048, 0, int(Role.INNER))
            made.append(inner)
            w = B.Worker(umem, outer, inner, 0, FRAMES, 0)
            made.append(w)
            w.netns_name = name  # type: ignore[attr-defined]
            yield w
        finally:
            for obj in reversed(made):
                obj.close()


def test_sockets_live_in_their_devices_namespace(worker: B.Worker) -> None:
    """The UMEM was allocated in this (root) thread, the sockets in the lab's netns.

    libxdp binds the UMEM's registration socket as the first XSK, so if that
    socket were made here it would bind whatever device has the same ifindex
    in the root namespace.
    """
    outer, inner = worker.socks
    ns = Netns(worker.netns_name)
    lab_cookie, root_cookie = ns.cookie(), B.netns_cookie()
    assert lab_cookie != root_cookie
    for sock, dev in ((outer, "xgv0"), (inner, "xgv1")):
        info = sock.info()
        assert info["netns_cookie"] == lab_cookie
        link = subprocess.run(
            ["ip", "-n", worker.netns_name, "-o", "link", "show", dev],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert link.startswith(f"{info['ifindex']}: {dev}")
        assert B.sock_registered(worker.umem, lab_cookie, info["ifindex"], 0)
        assert not B.sock_registered(worker.umem, root_cookie, info["ifindex"], 0)


def test_stops_within_200ms(worker: B.Worker) -> None:
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()))
    t.start()
    time.sleep(0.3)  # into its idle poll()
    start = time.monotonic()
    worker.stop()
    t.join(timeout=2)
    assert not t.is_alive()
    assert time.monotonic() - start < 0.2
    assert rc == [0]


def test_runs_once(worker: B.Worker) -> None:
    t = threading.Thread(target=worker.run)
    t.start()
    try:
        time.sleep(0.05)
        assert worker.run() == -errno.EALREADY
    finally:
        worker.stop()
        t.join()


def test_idle_account(worker: B.Worker) -> None:
    t = threading.Thread(target=worker.run)
    t.start()
    try:
        time.sleep(0.1)
        live = worker.account()
    finally:
        worker.stop()
        t.join()
    stopped = worker.account()
    for acct in (live, stopped):
        assert acct["consistent"]
        assert acct["total"] == FRAMES
        assert acct["free"] + acct["fill"] == FRAMES
        assert acct["rx"] == acct["tx"] == acct["completion"] == acct["in_flight"] == 0
    # Both fill rings were topped up at creation.
    assert stopped["fill"] == 2 * 2048


def test_rejects_overlapping_or_foreign_frames(worker: B.Worker) -> None:
    umem = B.Umem(FRAMES, 2048)
    try:
        with pytest.raises(OSError) as err:
            B.Worker(umem, *worker.socks, 0, FRAMES, 0)
        assert err.value.errno == errno.EINVAL
    finally:
        umem.close()


def test_lost_device_stops_the_loop(worker: B.Worker) -> None:
    """The kernel unbinds a socket whose device goes and poll() says nothing:
    the loop must notice by itself, say which socket, and stop."""
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()))
    t.start()
    try:
        time.sleep(0.2)
        subprocess.run(
            ["ip", "-n", worker.netns_name, "link", "del", "xgv1"], check=True, timeout=10
        )
        t.join(timeout=3)
        assert not t.is_alive(), "the loop did not notice its device was deleted"
    finally:
        worker.stop()
        t.join()
    assert rc == [-errno.ENODEV]
    stats = worker.stats()
    assert stats["error"] == -errno.ENODEV
    # Deleting one end of a veth deletes both: either socket may be first.
    assert stats["error_role"] in (int(Role.OUTER), int(Role.INNER))
