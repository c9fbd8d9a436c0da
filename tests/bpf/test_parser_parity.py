"""One parser, two builds: the XDP program and the C loop classify alike.

A corpus of generated and mutated frames (tests/framegen.py) goes through
the real XDP program with BPF_PROG_TEST_RUN (XG_CFG_SUMMARY: its
findings and verdict come back in front of the frame, dropped or not) and
through xg_classify(), the C build of the same parser. They must agree on
the IP and L4 offsets, the L4 protocol, the TCP flags, the fragment state
and the verdict, frame by frame; the program must never rewrite a frame.

This is also the fuzz run of the XDP program: XDPGUARD_FUZZ_FRAMES=10000000
(make fuzz) runs ten million.
"""

from __future__ import annotations

import collections
import os
import random

import numpy as np
import pytest
from framegen import corpus

from xdpguard import _bindings as B
from xdpguard.defs import Reason, Role
from xdpguard.xdp import XdpProgram

pytestmark = pytest.mark.bpf

FRAMES = int(os.environ.get("XDPGUARD_FUZZ_FRAMES", "100000"))
META = B.struct_dtype("struct xg_summary")
FIELDS = ("l3_off", "l4_off", "l4_proto", "tcp_flags", "frag", "reason")
# BPF_PROG_TEST_RUN takes an Ethernet header at the least, and a frame that
# fits a page with the kernel's head- and tailroom.
MIN_LEN, MAX_LEN = 14, 3000


def test_xdp_and_c_parse_alike() -> None:
    prog = XdpProgram(Role.OUTER, flags=B.CFG_SUMMARY)
    try:
        runner = B.TestRunner(prog.fd)
        rng = random.Random(random.getrandbits(64))  # the test's seed, see conftest
        seen: collections.Counter[str] = collections.Counter()
        disagree: list[tuple[bytes, dict, dict]] = []
        n = 0
        for frame in corpus(rng, FRAMES):
            n += 1
            c = B.classify(frame)
            seen[Reason(c["reason"]).name] += 1
            if not MIN_LEN <= len(frame) <= MAX_LEN:
                assert len(frame) >= MIN_LEN or c["reason"] == Reason.malformed, frame.hex()
                continue
            action, out = runner.run(frame)
            meta = np.frombuffer(out[: META.itemsize], dtype=META)[0]
            bpf = {f: int(meta[f]) for f in FIELDS}
            assert meta["magic"] == B.META_MAGIC and out[META.itemsize :] == frame, frame.hex()
            # No socket sits in the map: what passes falls back to a drop.
            assert action == B.XDP_DROP
            if bpf != {f: c[f] for f in FIELDS} and len(disagree) < 5:
                disagree.append((frame, bpf, c))
        print(f"\n{n} frames; C verdicts: {dict(seen)}")
        assert not disagree, "\n".join(f"{f.hex()}\n  bpf {b}\n  c   {c}" for f, b, c in disagree)
        # The corpus reaches every verdict the parser has.
        assert {"redirected", "malformed", "ext_header_limit"} <= set(seen)
    finally:
        prog.close()
