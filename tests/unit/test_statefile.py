"""State files are replaced whole or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

import pytest

from xdpguard.errors import XdpguardError
from xdpguard.statefile import (
    check_private_dir,
    remove_stale_temp_files,
    save,
    write_atomically,
)

pytestmark = pytest.mark.unit


def test_a_write_replaces_the_file_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "rules.json"
    write_atomically(path, lambda f: f.write(b"one"))
    write_atomically(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["rules.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "policy.npz"
    write_atomically(path, lambda f: f.write(b"old"))

    def half_then_fail(f: IO[bytes]) -> None:
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["policy.npz"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path: Path) -> None:
    keep = [tmp_path / "policy.npz", tmp_path / ".hidden.tmp", tmp_path / ".a.notpid.tmp"]
    stale = [
        tmp_path / ".policy.npz.4242.tmp",  # an older build's name
        tmp_path / ".rules.json.7.tmp",
        tmp_path / ".rules.json.7.k2j_x9ab.tmp",
    ]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_save_says_once_why_it_could_not_and_when_it_could_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    path = blocker / "rules.json"
    caplog.set_level("INFO", logger="xdpguard")
    why = save(path, lambda f: f.write(b"{}"), "rules", None)
    assert why is not None and str(path) in why
    assert save(path, lambda f: f.write(b"{}"), "rules", why) == why
    assert [r.getMessage() for r in caplog.records] == [f"rules applied but not saved: {why}"]
    blocker.unlink()
    assert save(path, lambda f: f.write(b"{}"), "rules", why) is None
    assert path.read_bytes() == b"{}"
    assert caplog.records[-1].getMessage() == f"rules saved again to {path}"


def test_a_planted_link_is_never_followed(tmp_path: Path) -> None:
    """Links planted at every name an older build would have used (its
    temporary file was .NAME.PID.tmp, opened without O_EXCL): the victim
    stays as it was, and so does each link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for pid in {os.getpid(), *range(1, 64)}:
        (state / f".rules.json.{pid}.tmp").symlink_to(victim)
    write_atomically(state / "rules.json", lambda f: f.write(b"{}"))
    assert victim.read_bytes() == b"root's"
    assert (state / "rules.json").read_bytes() == b"{}"
    assert all(p.is_symlink() for p in state.glob(".rules.json.*.tmp"))
    # ... nor removed as stale: a link is not a temporary of ours.
    assert remove_stale_temp_files(state) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o702])
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(XdpguardError) as exc:
        check_private_dir(state, "state directory")
    assert "group- or world-writable" in str(exc.value) and str(state) in str(exc.value)


def test_a_private_or_missing_state_directory_is_fine(tmp_path: Path) -> None:
    check_private_dir(tmp_path / "not-yet", "state directory")
    (tmp_path / "ok").mkdir(mode=0o700)
    check_private_dir(tmp_path / "ok", "state directory")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(XdpguardError, match="is not a directory"):
        check_private_dir(tmp_path / "file", "state directory")
