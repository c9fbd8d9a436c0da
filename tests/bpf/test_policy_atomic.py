"""A list change that the kernel refuses half-way changes nothing, in the real maps.

The v6 trie holds XG_LPM_V6_MAX entries: one more fails the v6 half of a
load after the v4 half went in. Before, the v4 prefix then stayed live
(dropping traffic) under a "not changed" error, unsaved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from xdpguard import _bindings as B
from xdpguard.defs import Role
from xdpguard.errors import XdpguardError
from xdpguard.policy import CANON, Policy, Prefixes, parse_items
from xdpguard.xdp import PolicyMaps, XdpProgram

pytestmark = pytest.mark.bpf

FRAME = bytes(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    / IP(src="192.0.2.7", dst="169.254.0.2")
    / UDP(sport=4000, dport=9)
)


def v6_hosts(n: int) -> np.ndarray:
    """``n`` distinct 2001:db8::/32 host prefixes, canonical."""
    raw = np.zeros((n, 17), dtype=np.uint8)
    raw[:, :4] = (0x20, 0x01, 0x0D, 0xB8)
    raw[:, 12:16] = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    raw[:, 16] = 128
    return raw.view(CANON["v6"]).ravel()


@pytest.mark.parametrize("replace", [False, True])
def test_a_full_v6_trie_leaves_v4_untouched(tmp_path: Path, replace: bool) -> None:
    prog = XdpProgram(Role.OUTER, flags=B.CFG_SUMMARY)
    maps = PolicyMaps(prog)
    try:
        policy = Policy(maps, tmp_path)
        policy.restore()
        policy.list_add("block", ["2001:db8:ffff::/48"])
        before = (tmp_path / "policy.npz").read_bytes()
        change = Prefixes(v4=parse_items(["192.0.2.0/24"]).v4, v6=v6_hosts(B.lib.XG_LPM_V6_MAX + 1))
        with pytest.raises(XdpguardError, match="blocklist not changed: the kernel refused"):
            policy.list_load("block", change, replace=replace)
        runner = B.TestRunner(prog.fd)
        meta = np.frombuffer(runner.run(FRAME)[1][:16], dtype=B.struct_dtype("struct xg_summary"))
        assert int(meta["reason"][0]) != B.lib.XG_REASON_BLOCKLIST  # 192.0.2.7 is not blocked
        assert [e["prefix"] for e in policy.list_entries("block")["entries"]] == [
            "2001:db8:ffff::/48"
        ]
        assert (tmp_path / "policy.npz").read_bytes() == before
        # ... and the lists still work: the same v4 prefix alone goes in.
        policy.list_add("block", ["192.0.2.0/24"])
        meta = np.frombuffer(runner.run(FRAME)[1][:16], dtype=B.struct_dtype("struct xg_summary"))
        assert int(meta["reason"][0]) == B.lib.XG_REASON_BLOCKLIST
    finally:
        maps.close()
        prog.close()
