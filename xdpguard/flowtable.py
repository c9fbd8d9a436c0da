"""The flow table's home: a BPF map that XDP and the loop share, pinned so it
outlives the process.

A table is pinned under /sys/fs/bpf/xdpguard/, in a directory named after
the state directory it belongs with, so two appliances on one machine keep
two tables. A restart (SIGTERM or SIGKILL alike) opens the pinned table and
finds every flow where it was: no learning window is needed, and no idle
connection is cut. A table of another size (--max-flows changed) gives its
flows to a new one (xg_flowtab_migrate()); one of another layout (another
ABI) cannot be read: it is replaced by an empty one, said once. The pin
directory is also the appliance's lock (lock()): one appliance per state
directory. ``xdpguard flows forget`` removes a pinned table.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import subprocess
from pathlib import Path

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard")

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "xdpguard"


def buckets_for(max_flows: int) -> int:
    """Buckets of XG_FLOW_WAYS slots for ``max_flows``: a power of two."""
    n = 1
    while n * B.FLOW_WAYS < max_flows:
        n <<= 1
    return n


def pin_dir_for(state_dir: Path) -> Path:
    """Where the flow table of the appliance with ``state_dir`` is pinned."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return PIN_ROOT / digest


def ensure_bpffs() -> None:
    """Mount the BPF filesystem at /sys/fs/bpf if nothing is mounted there."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
            return
    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if res.returncode:
        raise XdpguardError(f"cannot mount the BPF filesystem at {BPFFS}: {res.stderr.strip()}")


def _holder(pin: Path) -> str:
    """' (pid N)' of the process holding ``pin``'s lock, from /proc/locks; or ''."""
    try:
        st = pin.stat()
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and want in fields:
                    return f" (pid {fields[fields.index(want) - 1]})"
    except (OSError, IndexError, ValueError):
        pass
    return ""


def lock(state_dir: Path) -> int:
    """The appliance's hold on ``state_dir``: an flock on its pin directory,
    kept as long as the returned fd is open (the kernel lets go at any
    exit, SIGKILL included). Two appliances with one state directory would
    share one flow table, one challenge secret and one policy file, and the
    second would free bucket locks the first holds."""
    ensure_bpffs()
    pin = pin_dir_for(state_dir)
    try:
        pin.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(pin, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise XdpguardError(f"cannot use {pin}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise XdpguardError(
            f"another xdpguard{_holder(pin)} uses the state directory {state_dir}; "
            "give each appliance its own --state-dir"
        ) from None
    return fd


def unlock(state_dir: Path, fd: int) -> None:
    """Let go of what lock() took; its pin directory goes too if nothing was
    pinned there (a start that failed early leaves nothing behind)."""
    with contextlib.suppress(OSError):
        pin_dir_for(state_dir).rmdir()  # only if empty; still holding the lock
    os.close(fd)


def forget(state_dir: Path) -> bool:
    """Remove the pinned table of ``state_dir``; whether there was one. Refused
    while an appliance uses the directory."""
    pin = pin_dir_for(state_dir)
    if not pin.is_dir():
        return False
    fd = lock(state_dir)
    try:
        entries = list(pin.iterdir())
        for entry in entries:
            entry.unlink()
        pin.rmdir()
    finally:
        os.close(fd)
    return bool(entries)


def open_table(max_flows: int, state_dir: Path | None) -> tuple[B.FlowTab, bool]:
    """The flow table for this appliance, and whether it is one restored from its pin.

    With a state directory the table is pinned (reopened if it is there);
    without one it lives as long as the process."""
    nbuckets = buckets_for(max_flows)
    if state_dir is None:
        return B.FlowTab(nbuckets), False
    ensure_bpffs()
    pin = pin_dir_for(state_dir)
    restored = resized = False
    try:
        table = B.FlowTab(nbuckets, str(pin))
    except OSError as exc:
        if exc.errno == errno.ESTALE:
            table = B.FlowTab(nbuckets)
            restored, resized = _resize(table, pin)
        elif exc.errno != errno.ENOENT:
            raise XdpguardError(f"cannot open the pinned flow table in {pin}: {exc}") from None
        else:
            log.info("no flow table pinned in %s: a cold start (%s)", pin, exc.strerror)
            table = B.FlowTab(nbuckets)
    else:
        return table, True
    try:
        pin.mkdir(mode=0o700, parents=True, exist_ok=True)
        table.pin(str(pin))
    except OSError as exc:
        table.close()
        raise XdpguardError(f"cannot pin the flow table in {pin}: {exc}") from None
    os.chmod(pin, 0o700)
    log.info("flow table: %s, pinned in %s", "the resized one" if resized else "a new one", pin)
    return table, restored


def _resize(table: B.FlowTab, pin: Path) -> tuple[bool, bool]:
    """Move the flows of the table of another size pinned in ``pin`` into
    ``table`` (--max-flows changed): whether every one of them fit, and
    whether the old table could be read at all. If some do not fit, the
    learning window stays, to adopt those that carry data."""
    try:
        moved, left = table.migrate_from(str(pin))
    except OSError as exc:
        why = "another layout" if exc.errno == errno.ESTALE else exc.strerror
        log.warning(
            "the pinned flow table in %s cannot be read (%s); starting with an empty one "
            "(its flows are not restored)",
            pin,
            why,
        )
        return False, False
    if left:
        log.warning(
            "flow table resized to %d slots: %d flow(s) moved, %d left behind (their buckets "
            "are full); the learning window adopts those that carry data",
            table.nbuckets * B.FLOW_WAYS,
            moved,
            left,
        )
        return False, True
    log.info(
        "flow table resized to %d slots: %d flow(s) moved", table.nbuckets * B.FLOW_WAYS, moved
    )
    return True, True
