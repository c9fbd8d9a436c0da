"""Verdict reasons: names derived from the header's enum, every reason owned by one stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xdpguard import _bindings as B
from xdpguard.defs import LOOP_REASONS, XDP_REASONS, Reason
from xdpguard.stats import XDP_REASONS as XDP_REASON_NAMES

pytestmark = pytest.mark.unit

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "xdpguard.h"


def header_reasons() -> dict[str, int]:
    """enum xg_reason as written in the header, read as text (not through cffi)."""
    body = HEADER.read_text().split("enum xg_reason {", 1)[1].split("};", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"XG_REASON_(\w+) = (\d+),", body)}


def test_names_and_numbers_come_from_the_header() -> None:
    assert {r.name: int(r) for r in Reason} == {
        name.lower(): n for name, n in header_reasons().items()
    }


def test_reasons_are_dense_and_fit_the_counters() -> None:
    numbers = sorted(int(r) for r in Reason)
    assert numbers == list(range(len(numbers)))  # append-only: no gaps, no reuse
    assert numbers[-1] < B.REASON_CAP
    assert numbers[-1] < 32, "the stage masks need a second word"


def test_every_reason_has_a_stage() -> None:
    assert set(Reason) == XDP_REASONS | LOOP_REASONS
    # Only the parser's verdicts are both: the loop parses with the same
    # parser and fails closed the same way (in counters of its own).
    assert {Reason.malformed, Reason.ext_header_limit} == XDP_REASONS & LOOP_REASONS
    # Nothing outside the enum is claimed by a mask.
    assert B.STAGE_XDP >> len(Reason) == B.STAGE_LOOP >> len(Reason) == 0


def test_stats_uses_the_headers_stage_mask() -> None:
    """What stats counts as XDP's verdicts is what the header's XG_STAGE_XDP
    names, read from the header's text (not through the same derivation)."""
    text = (Path(__file__).resolve().parents[2] / "bpf" / "xdpguard.h").read_text()
    mask = re.search(r"XG_STAGE_XDP\s*=(.*?),\n", text, re.S)
    assert mask is not None
    named = {m.lower() for m in re.findall(r"1 << XG_REASON_(\w+)\)", mask.group(1))}
    assert named and named == XDP_REASON_NAMES
