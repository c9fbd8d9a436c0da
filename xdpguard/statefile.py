"""Files in the state directory: written whole or not at all.

Every saved fact (policy.npz, rules.json, verified.json) goes through
write_atomically(): a crash at any point leaves the previous file or the new
one, never half of one, and at worst a ``.NAME.PID.tmp`` that the next start
removes (remove_stale_temp_files)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger("xdpguard")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` (mode 0600, its directory made 0700 if missing) with what
    ``write`` puts into the file it is handed: write, fsync, rename, fsync the
    directory. Raises OSError with ``path`` as it was and no temporary file left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def save(
    path: Path, write: Callable[[IO[bytes]], None], what: str, unsaved: str | None
) -> str | None:
    """write_atomically() for a store that has already changed in memory and
    in the kernel: never raises. None once saved, else why not, logged once
    per reason (``unsaved``: why the last save failed, None if it did not)."""
    try:
        write_atomically(path, write)
    except OSError as exc:
        why = f"{path}: {exc.strerror or exc}"
        if why != unsaved:
            log.error("%s applied but not saved: %s", what, why)
        return why
    if unsaved is not None:
        log.info("%s saved again to %s", what, path)
    return None


def remove_stale_temp_files(state_dir: Path) -> list[Path]:
    """Delete what an interrupted save left behind (``.NAME.PID.tmp``); which."""
    gone = []
    with contextlib.suppress(OSError):
        for path in state_dir.glob(".*.tmp"):
            parts = path.name.split(".")
            if len(parts) >= 4 and parts[-2].isdigit() and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    gone.append(path)
    return gone
