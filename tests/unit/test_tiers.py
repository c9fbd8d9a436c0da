"""Under CI=true a privileged test that would skip must fail instead."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()
TESTS = """
import pytest

@pytest.mark.netns
def test_needs_a_lab():
    pytest.skip("no privileges here")

@pytest.mark.unit
def test_plain():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None):  # type: ignore[no-untyped-def]
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    unit\n    bpf\n    netns\n")
    pytester.makepyfile(TESTS)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_skip_is_a_skip_outside_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(pytester, monkeypatch, None).assert_outcomes(passed=1, skipped=1)


def test_skip_fails_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    res = run(pytester, monkeypatch, "true")
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*skipped under CI=true*"])


def test_untiered_test_is_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("def test_x():\n    pass\n")
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert res.ret != 0
    res.stderr.fnmatch_lines(["*needs exactly one tier marker*"])
