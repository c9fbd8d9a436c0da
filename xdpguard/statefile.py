"""Files in the state directory: written whole or not at all.

Every saved fact (policy.npz, rules.json, verified.json) goes through
write_atomically(): a crash at any point leaves the previous file or the new
one, never half of one, and at worst a ``.NAME.PID.RANDOM.tmp`` that the
next start removes (remove_stale_temp_files).

The directory is trusted only if nobody else can write it
(check_private_dir(), at every start): root reads and replaces files there,
so a directory others can write would let them point root at any file. The
temporary file is made with O_EXCL under a name nobody can guess, so not
even a link planted there is followed."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard")


def check_private_dir(path: Path, what: str) -> None:
    """Refuse, in one line, a directory that someone other than root (or this
    user) owns or can write: they could swap or plant files root then uses."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return  # made 0700 when first needed
    except OSError as exc:
        raise XdpguardError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise XdpguardError(f"{what} {path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise XdpguardError(
            f"{what} {path} belongs to uid {st.st_uid}, not root; "
            "use a directory only root can write"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise XdpguardError(
            f"{what} {path} is group- or world-writable "
            f"(mode {stat.S_IMODE(st.st_mode):o}); use a directory only root can write"
        )


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
    tmp: Path | None = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp: O_CREAT | O_EXCL (a link there is never followed), a
        # random name, mode 0600.
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=path.parent)  # fmt: skip
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp is not None:
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
    """Delete what an interrupted save left behind (``.NAME.PID.RANDOM.tmp``,
    or an older build's ``.NAME.PID.tmp``); which."""
    gone = []
    with contextlib.suppress(OSError):
        for path in state_dir.glob(".*.tmp"):
            parts = path.name.split(".")
            pid_at = -3 if len(parts) >= 5 and parts[-3].isdigit() else -2
            ours = len(parts) >= 4 and parts[pid_at].isdigit()
            if ours and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()
                    gone.append(path)
    return gone
