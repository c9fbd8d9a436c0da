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


def started(worker: B.Worker) -> threading.Thread:
    """The worker's loop in a thread, returned once the loop is going round."""
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.rc = rc  # type: ignore[attr-defined]
    t.start()
    deadline = time.monotonic() + 30
    while not worker.stats()["loops"]:
        assert t.is_alive() and time.monotonic() < deadline, f"the loop did not start: {rc}"
        time.sleep(0.005)
    return t


def test_stop_returns_from_the_loop(worker: B.Worker) -> None:
    t = started(worker)
    polls = worker.stats()["polls"]
    while worker.stats()["polls"] == polls:  # into its idle poll()
        time.sleep(0.005)
    start = time.monotonic()
    worker.stop()
    t.join(timeout=30)
    assert not t.is_alive()
    assert t.rc == [0]  # type: ignore[attr-defined]
    # How fast (XG_IDLE_POLL_MS bounds it) is a timing, not a test's business.
    print(f"stopped {1e3 * (time.monotonic() - start):.1f} ms after stop()")


def test_runs_once(worker: B.Worker) -> None:
    t = started(worker)
    second: list[int] = []
    again = threading.Thread(target=lambda: second.append(worker.run()), daemon=True)
    try:
        again.start()
        again.join(timeout=30)  # a second loop would never return: fail, not hang
        assert second == [-errno.EALREADY]
    finally:
        worker.stop()
        t.join(timeout=30)
        again.join(timeout=30)
    assert not t.is_alive() and not again.is_alive()


def test_idle_account(worker: B.Worker) -> None:
    t = started(worker)
    try:
        live = worker.account()
    finally:
        worker.stop()
        t.join(timeout=30)
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
    t = started(worker)
    try:
        subprocess.run(
            ["ip", "-n", worker.netns_name, "link", "del", "xgv1"], check=True, timeout=10
        )
        t.join(timeout=60)
        assert not t.is_alive(), "the loop did not notice its device was deleted"
    finally:
        worker.stop()
        t.join()
    rc = t.rc  # type: ignore[attr-defined]
    assert rc == [-errno.ENODEV]
    stats = worker.stats()
    assert stats["error"] == -errno.ENODEV
    # Deleting one end of a veth deletes both: either socket may be first.
    assert stats["error_role"] in (int(Role.OUTER), int(Role.INNER))


def test_a_closed_worker_refuses_calls(worker: B.Worker) -> None:
    """A request in flight at shutdown must get an error, not read freed memory."""
    w = worker
    w.close()
    for call in (w.stats, w.account, w.stop):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.EBADF
    w.close()  # twice is fine
