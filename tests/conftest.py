"""Test tiers and their privileges.

Tiers are markers: ``unit`` needs nothing, ``bpf`` loads programs, ``netns``
builds labs. Every test carries exactly one; a ``bpf`` or ``netns`` test is
skipped without the capabilities it needs, decided from the process'
effective capabilities (never the user name). Under CI=true a skip is a
failure: CI runs as root, so a test that skips there has silently stopped
testing anything.

Randomness is seeded: every test starts ``random`` from a seed derived from
the run's seed (printed in the header, and with every failure) and the
test's name. XDPGUARD_TEST_SEED=N replays a run.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import zlib
from collections.abc import Iterator

import pytest

TIERS = ("unit", "bpf", "netns")
# CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN, CAP_BPF
_NEEDED_CAPS = (12, 13, 21, 39)


RUN_SEED = int(os.environ.get("XDPGUARD_TEST_SEED") or random.SystemRandom().randrange(1 << 32))


def seed_for(nodeid: str) -> int:
    """The seed of one test: stable for a run seed and a test name."""
    return RUN_SEED ^ zlib.crc32(nodeid.encode())


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so
    # every lab's finally still tears it down.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_report_header(config: pytest.Config) -> str:
    return f"random seed: XDPGUARD_TEST_SEED={RUN_SEED}"


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    random.seed(seed_for(request.node.nodeid))


@pytest.fixture(autouse=True)
def _forget_flow_tables() -> Iterator[None]:
    """A test's appliances pin their flow tables (they outlive the process,
    as they should); the tables of this test's state directories go with it,
    whatever happened, and nobody else's (another run may be going on)."""
    yield
    lab = sys.modules.get("lab")
    if lab is not None:
        from xdpguard.flowtable import forget

        while lab.STATE_DIRS:
            forget(lab.STATE_DIRS.pop())


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def privileged() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return all(eff & (1 << bit) for bit in _NEEDED_CAPS)
    except OSError:
        pass
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = privileged()
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one tier marker of {TIERS}")
        if tiers[0] != "unit" and not root:
            item.add_marker(
                pytest.mark.skip(reason=f"{tiers[0]} tier needs CAP_NET_ADMIN/SYS_ADMIN/BPF")
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(
            ("random seed", f"XDPGUARD_TEST_SEED={RUN_SEED} (this test: {seed_for(item.nodeid)})")
        )
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"
