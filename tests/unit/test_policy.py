"""xdpguard.policy without a kernel: parsing, sets, persistence, TTLs.

The maps here are a recording stand-in; what the kernel does with the same
calls is checked by tests/bpf (verdicts) and tests/netns (real traffic).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from xdpguard.errors import XdpguardError
from xdpguard.policy import (
    CANON,
    FAMILIES,
    Policy,
    PolicyInputError,
    PrefixSet,
    canon_valid,
    format_prefix,
    parse_items,
    parse_lines,
    parse_prefix,
    parse_text,
    read_lines,
)

pytestmark = pytest.mark.unit


class RecordingMaps:
    """Keeps what the kernel would hold, as sets of prefix strings.

    ``fail`` makes the next update of that family fail as the kernel would
    (a full trie); a replace builds every family before it swaps any, as
    xdpguard.xdp.PolicyMaps does."""

    def __init__(self) -> None:
        self.lists = {(lst, f): set() for lst in ("allow", "block") for f in FAMILIES}
        self.ports: list[int] = []
        self.l2: list[int] = []
        self.frags = "pass"
        self.fail: set[str] = set()

    def _names(self, family: str, canon: np.ndarray) -> set[str]:
        return {format_prefix(family, bytes(k)) for k in canon}

    def _maybe_fail(self, family: str) -> None:
        if family in self.fail:
            self.fail.discard(family)
            raise OSError(28, "No space left on device")

    @property
    def fail_next(self) -> bool:
        return bool(self.fail)

    @fail_next.setter
    def fail_next(self, value: bool) -> None:
        self.fail = set(FAMILIES) if value else set()

    def lists_add(self, lst: str, family: str, canon: np.ndarray) -> None:
        self._maybe_fail(family)
        self.lists[(lst, family)] |= self._names(family, canon)

    def lists_delete(self, lst: str, family: str, canon: np.ndarray) -> None:
        self._maybe_fail(family)
        self.lists[(lst, family)] -= self._names(family, canon)

    def lists_replace(self, lst: str, canon: dict[str, np.ndarray]) -> None:
        for family in canon:
            self._maybe_fail(family)
        for family, keys in canon.items():
            self.lists[(lst, family)] = self._names(family, keys)

    def set_ports(self, ports: list[int]) -> None:
        self.ports = list(ports)

    def set_l2(self, ethertypes: list[int]) -> None:
        self.l2 = list(ethertypes)

    def set_frag_policy(self, policy: str) -> None:
        self.frags = policy


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("192.0.2.0/24", "192.0.2.0/24"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:db8:0::/32", "2001:db8::/32"),
        ("2001:0db8:0000:0000::1", "2001:db8::1/128"),
        ("::/64", "::/64"),  # covers the IPv4-mapped range, and more: a real IPv6 prefix
    ],
)
def test_parse_normalises(text: str, canonical: str) -> None:
    assert format_prefix(*parse_prefix(text)) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("192.0.2.1/24", "host bits set (the network is 192.0.2.0/24)"),
        ("2001:db8::1/32", "host bits set (the network is 2001:db8::/32)"),
        ("192.0.2.0/33", "prefix length 33 is more than 32"),
        ("192.0.2.0/", "prefix length must be a number"),
        ("192.0.2.0/-1", "prefix length must be a number"),
        ("192.0.2.0/ 8", "prefix length must be a number"),
        ("192.0.2", "not an IPv4 address"),
        ("1.2.3.04", "not an IPv4 address"),
        ("0x7f.0.0.1", "not an IPv4 address"),
        ("2001:db8:::1", "not an IPv6 address"),
        ("", "not an IPv4 address"),
        ("::ffff:192.0.2.1", "an IPv4-mapped address: write it as IPv4 (192.0.2.1/32)"),
        ("::ffff:192.0.2.0/120", "an IPv4-mapped address: write it as IPv4 (192.0.2.0/24)"),
    ],
)
def test_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        parse_prefix(text)


def test_parse_text_names_the_line() -> None:
    text = "# feed\n10.0.0.0/8\n\n  11.0.0.0/8   # a comment\n12.0.0.1/8\n"
    with pytest.raises(PolicyInputError, match=r"^line 5: '12.0.0.1/8': host bits set"):
        parse_text(text)


def test_parse_text_dedups_equivalent_spellings() -> None:
    p = parse_text("2001:DB8::/32\n2001:db8:0::/32\n10.0.0.0/8\n10.0.0.0/8\n")
    assert len(p.v4) == 1 and len(p.v6) == 1


def test_canon_valid_matches_parse_prefix() -> None:
    rng = np.random.default_rng(1)
    for family, n in (("v4", 5), ("v6", 17)):
        raw = rng.integers(0, 256, size=(4000, n), dtype=np.uint8)
        raw[:, -1] = rng.integers(0, 140, size=4000)
        keys = raw.view(CANON[family]).ravel()
        fast = canon_valid(family, keys)
        for k, ok in zip(keys[:500], fast[:500], strict=True):
            b = bytes(k)
            bits = 32 if family == "v4" else 128
            expect = b[-1] <= bits
            if expect:
                value = int.from_bytes(b[:-1], "big")
                expect = value & ((1 << (bits - b[-1])) - 1) == 0
            assert bool(ok) == expect


def test_prefix_set_merge_remove() -> None:
    s = PrefixSet("v4")
    new, updated = s.merge(parse_items(["10.0.0.0/8", "1.0.0.0/8"]).v4, 5.0, 0)
    assert len(new) == 2 and updated == 0
    new, updated = s.merge(parse_items(["10.0.0.0/8", "2.0.0.0/8"]).v4, 9.0, 1)
    assert len(new) == 1 and updated == 1
    assert np.array_equal(s.keys, np.sort(s.keys))
    assert dict(zip([format_prefix("v4", bytes(k)) for k in s.keys], s.deadline, strict=True)) == {
        "1.0.0.0/8": 5.0,
        "2.0.0.0/8": 9.0,
        "10.0.0.0/8": 9.0,
    }
    gone, missing = s.remove(parse_items(["1.0.0.0/8", "3.0.0.0/8"]).v4)
    assert len(gone) == 1 and len(missing) == 1 and len(s) == 2


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    p = Policy(RecordingMaps(), tmp_path / "state", clock=Clock())
    p.restore()
    return p


def test_add_del_list(policy: Policy) -> None:
    maps: RecordingMaps = policy.maps  # type: ignore[assignment]
    r = policy.list_add("block", ["192.0.2.0/24", "2001:db8::/48"], ttl=60, comment="incident")
    assert r == {"added": 2, "updated": 0, "saved": True}
    assert maps.lists[("block", "v4")] == {"192.0.2.0/24"}
    r = policy.list_add("block", ["192.0.2.0/24"], comment="again")
    assert r == {"added": 0, "updated": 1, "saved": True}
    entries = policy.list_entries("block")["entries"]
    assert [(e["prefix"], e["comment"], e["ttl"]) for e in entries] == [
        ("192.0.2.0/24", "again", None),
        ("2001:db8::/48", "incident", 60.0),
    ]
    r = policy.list_del("block", ["192.0.2.0/24", "198.51.100.0/24"])
    assert r == {"deleted": 1, "missing": ["198.51.100.0/24"], "saved": True}
    assert maps.lists[("block", "v4")] == set()


def test_bad_item_changes_nothing(policy: Policy) -> None:
    policy.list_add("block", ["10.0.0.0/8"])
    before = policy.list_entries("block")
    for call in (
        lambda: policy.list_add("block", ["11.0.0.0/8", "12.0.0.1/8"]),
        lambda: policy.list_add("block", ["11.0.0.0/8"], ttl=0),
        lambda: policy.list_add("block", ["11.0.0.0/8"], ttl=True),
        lambda: policy.list_add("block", ["11.0.0.0/8"], comment="a\nb"),
        lambda: policy.list_load("block", parse_text("11.0.0.0/8\nbogus\n"), replace=True),
        lambda: policy.ports_add([53, 65536]),
        lambda: policy.ports_add("53"),  # a string is not a list of ports
        lambda: policy.list_add("block", ["0.0.0.0/0"]),  # a /0 needs force
        lambda: policy.list_load("block", parse_text("# nothing\n"), replace=True),
        lambda: policy.frags_set("sometimes"),
    ):
        with pytest.raises(PolicyInputError):
            call()
        assert policy.list_entries("block") == before
    assert policy.ports == [] and policy.frags == "pass"


def test_kernel_failure_restores_maps(policy: Policy) -> None:
    maps: RecordingMaps = policy.maps  # type: ignore[assignment]
    policy.list_add("block", ["10.0.0.0/8"])
    maps.fail_next = True
    with pytest.raises(XdpguardError, match="kernel refused"):
        policy.list_add("block", ["11.0.0.0/8"])
    assert maps.lists[("block", "v4")] == {"10.0.0.0/8"}
    assert [e["prefix"] for e in policy.list_entries("block")["entries"]] == ["10.0.0.0/8"]


def test_ttl_expiry(policy: Policy) -> None:
    clock: Clock = policy.clock  # type: ignore[assignment]
    maps: RecordingMaps = policy.maps  # type: ignore[assignment]
    policy.list_add("block", ["10.0.0.0/8"], ttl=2)
    policy.list_add("block", ["11.0.0.0/8"])
    clock.now += 1.9
    assert policy.expire() == 0
    clock.now += 0.2
    assert policy.expire() == 1
    assert maps.lists[("block", "v4")] == {"11.0.0.0/8"}


def test_replace_swaps_whole_list(policy: Policy) -> None:
    maps: RecordingMaps = policy.maps  # type: ignore[assignment]
    policy.list_add("block", ["10.0.0.0/8", "2001:db8::/32"], ttl=100)
    r = policy.list_load("block", parse_text("11.0.0.0/8\n10.0.0.0/8\n"), replace=True)
    assert r == {"loaded": 2, "added": 2, "replaced": True, "saved": True}
    assert maps.lists[("block", "v4")] == {"10.0.0.0/8", "11.0.0.0/8"}
    assert maps.lists[("block", "v6")] == set()
    # Replacing drops the old entries' TTLs along with the old list.
    assert all(e["ttl"] is None for e in policy.list_entries("block")["entries"])


def test_persistence_round_trip(tmp_path: Path) -> None:
    clock = Clock()
    a = Policy(RecordingMaps(), tmp_path, clock=clock)
    a.restore()
    a.list_add("block", ["10.0.0.0/8", "2001:db8::/32"], ttl=50, comment="c1")
    a.list_add("allow", ["10.1.2.3"])
    a.list_add("block", ["12.0.0.0/8"], ttl=5)
    a.ports_add([53], preset="drdos")
    a.frags_set("drop")
    assert (tmp_path / "policy.npz").stat().st_mode & 0o777 == 0o600

    clock.now += 10  # the 5 s entry expired while "down"
    maps = RecordingMaps()
    b = Policy(maps, tmp_path, clock=clock)
    b.restore()
    assert maps.lists[("block", "v4")] == {"10.0.0.0/8"}
    assert maps.lists[("block", "v6")] == {"2001:db8::/32"}
    assert maps.lists[("allow", "v4")] == {"10.1.2.3/32"}
    assert maps.ports == [19, 53, 123, 161, 389, 1900, 3702, 11211]
    assert maps.frags == "drop"
    ttl = {e["prefix"]: (e["ttl"], e["comment"]) for e in b.list_entries("block")["entries"]}
    assert ttl == {"10.0.0.0/8": (40.0, "c1"), "2001:db8::/32": (40.0, "c1")}


def corrupt_variants(path: Path) -> dict[str, bytes]:
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x55
    return {"flipped": bytes(flipped), "truncated": good[: len(good) // 2], "empty": b""}


def test_corrupt_state_is_refused(tmp_path: Path) -> None:
    a = Policy(RecordingMaps(), tmp_path)
    a.restore()
    a.list_add("block", [f"10.{i}.0.0/16" for i in range(200)])
    state = tmp_path / "policy.npz"
    for name, data in corrupt_variants(state).items():
        bad = tmp_path / name
        bad.mkdir()
        (bad / "policy.npz").write_bytes(data)
        with pytest.raises(XdpguardError, match="is corrupt"):
            Policy(RecordingMaps(), bad).restore()


def test_state_with_invalid_prefix_is_refused(tmp_path: Path) -> None:
    a = Policy(RecordingMaps(), tmp_path)
    a.restore()
    a.list_add("block", ["10.0.0.0/8"])
    with np.load(tmp_path / "policy.npz") as z:
        arrays = dict(z)
    good_keys = arrays["block_v4_keys"]
    keys = good_keys.copy()
    keys[3] = 1  # 10.0.0.1/8: host bits
    arrays["block_v4_keys"] = keys
    np.savez(tmp_path / "policy.npz", **arrays)
    with pytest.raises(XdpguardError, match="invalid prefix"):
        Policy(RecordingMaps(), tmp_path).restore()
    meta = json.loads(bytes(arrays["meta"]))
    meta["version"] = 99
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    # The prefixes are good again: the version alone must refuse the file.
    arrays["block_v4_keys"] = good_keys
    np.savez(tmp_path / "policy.npz", **arrays)
    with pytest.raises(XdpguardError, match="not a version 1"):
        Policy(RecordingMaps(), tmp_path).restore()
    assert zipfile.is_zipfile(tmp_path / "policy.npz")


# ---- hardening: no half-applied change, saving that can fail, state files as input ----


def state_bytes(policy: Policy) -> bytes:
    assert policy.state_path is not None
    return policy.state_path.read_bytes()


@pytest.mark.parametrize("replace", [False, True])
def test_a_failure_in_the_second_family_changes_neither(policy: Policy, replace: bool) -> None:
    """v4 is applied first: when v6 fails, v4 must not stay live and unsaved."""
    maps: RecordingMaps = policy.maps  # type: ignore[assignment]
    policy.list_add("block", ["10.0.0.0/8", "2001:db8::/32"])
    before_maps = {k: set(v) for k, v in maps.lists.items()}
    before_file = state_bytes(policy)
    maps.fail = {"v6"}
    change = parse_text("11.0.0.0/8\n2001:db8:1::/48\n")
    with pytest.raises(XdpguardError, match="blocklist not changed: the kernel refused"):
        policy.list_load("block", change, replace=replace)
    assert maps.lists == before_maps
    assert [e["prefix"] for e in policy.list_entries("block")["entries"]] == [
        "10.0.0.0/8",
        "2001:db8::/32",
    ]
    assert state_bytes(policy) == before_file
    maps.fail = {"v6"}
    with pytest.raises(XdpguardError, match="not changed"):
        policy.list_add("block", ["12.0.0.0/8", "2001:db8:2::/48"])
    maps.fail = {"v6"}
    with pytest.raises(XdpguardError, match="not changed"):
        policy.list_del("block", ["10.0.0.0/8", "2001:db8::/32"])
    assert maps.lists == before_maps and state_bytes(policy) == before_file


def test_a_change_that_cannot_be_saved_says_so_and_is_saved_later(tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = Policy(RecordingMaps(), state, clock=Clock())
    p.restore()
    state.mkdir()
    state.chmod(0o500)  # read-only (root ignores modes, so also make saving fail below)
    real_replace = os.replace
    broken = {"on": True}

    def replace(a: object, b: object) -> None:
        if broken["on"]:
            raise OSError(30, "Read-only file system")
        real_replace(a, b)  # type: ignore[arg-type]

    try:
        os.replace = replace  # type: ignore[assignment]
        r = p.list_add("block", ["10.0.0.0/8"])
        assert r["added"] == 1 and r["saved"] is False
        assert "applied, but not saved" in r["warning"] and "Read-only file system" in r["warning"]
        assert p.maps.lists[("block", "v4")] == {"10.0.0.0/8"}  # type: ignore[attr-defined]
        assert not p.save_if_behind()
        assert not list(state.glob(".*.tmp"))  # no temp file left behind
        broken["on"] = False
        assert p.save_if_behind()
    finally:
        os.replace = real_replace  # type: ignore[assignment]
        state.chmod(0o700)
    q = Policy(RecordingMaps(), state)
    q.restore()
    assert [e["prefix"] for e in q.list_entries("block")["entries"]] == ["10.0.0.0/8"]


def test_interrupted_saves_are_cleaned_at_start(tmp_path: Path) -> None:
    tmp_path.joinpath(".policy.npz.4242.tmp").write_bytes(b"half a file")
    tmp_path.joinpath(".verified.json.17.tmp").write_bytes(b"{")
    tmp_path.joinpath("notes.tmp").write_text("not ours")
    Policy(RecordingMaps(), tmp_path).restore()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]


def rewrite_state(path: Path, **changes: object) -> None:
    with np.load(path) as z:
        arrays = dict(z)
    meta = json.loads(bytes(arrays["meta"]))
    for key, value in changes.items():
        if key in arrays:
            arrays[key] = value  # type: ignore[assignment]
        else:
            meta[key] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "changes",
    [
        {"ports": "53"},
        {"ports": [53, True]},
        {"ports": [70000]},
        {"frags": ["drop"]},
        {"comments": "c"},
        {"comments": ["a\nb"]},
        {"tcp": ["on"]},
        {"tcp": {"syn_mode": "sometimes"}},
        {"version": 1.0},
        {"block_v4_deadline": np.array([np.nan])},
        {"block_v4_deadline": np.array([-np.inf])},
        {"block_v4_deadline": np.array(["x"])},
        {"block_v4_comment": np.array([5], dtype=np.int32)},
        {"block_v4_keys": np.zeros((2, 5), dtype=np.uint8)},
    ],
    ids=lambda c: ",".join(c),
)
def test_crafted_state_files_are_corrupt(tmp_path: Path, changes: dict) -> None:
    a = Policy(RecordingMaps(), tmp_path)
    a.restore()
    a.list_add("block", ["10.0.0.0/8"], ttl=60)
    rewrite_state(tmp_path / "policy.npz", **changes)
    with pytest.raises(XdpguardError, match=r"is corrupt \(.+\); fix or move it away") as err:
        Policy(RecordingMaps(), tmp_path).restore()
    assert "\n" not in str(err.value)


def test_a_state_file_that_is_not_an_object_is_corrupt(tmp_path: Path) -> None:
    for meta in (b"[1, 2]", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"):
        np.savez(tmp_path / "policy.npz", meta=np.frombuffer(meta, dtype=np.uint8))
        with pytest.raises(XdpguardError, match="is corrupt"):
            Policy(RecordingMaps(), tmp_path).restore()


def test_list_files_are_split_on_newlines_only() -> None:
    text = "10.0.0.0/8 # a form feed \f in a comment\n11.0.0.0/8\r\n12.0.0.1/8\n"
    with pytest.raises(PolicyInputError, match=r"^line 3: '12.0.0.1/8'"):
        parse_text(text)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("10.0.0.0/8\ncafé\n".encode("latin-1"), "line 2: not UTF-8 text"),
        (b"\x00" * 100, "line 1: a NUL byte"),
        (b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40, "line 1: a NUL byte"),
        (b"10.0.0.0/8\n" + b"x" * 5000, "line 2: longer than 4096 bytes"),
    ],
    ids=["latin-1", "nul", "binary", "long-line"],
)
def test_list_files_that_are_not_text(data: bytes, error: str) -> None:
    with pytest.raises(PolicyInputError, match=f"^{error}"):
        parse_lines(read_lines(io.BytesIO(data)))


def test_dev_zero_is_refused_after_one_line() -> None:
    with open("/dev/zero", "rb") as f, pytest.raises(PolicyInputError, match=r"^line 1: longer"):
        parse_lines(read_lines(f))


@pytest.mark.parametrize("prefix", ["0.0.0.0/0", "::/0"])
def test_a_whole_family_needs_force(policy: Policy, prefix: str) -> None:
    with pytest.raises(PolicyInputError, match=r"covers every IPv.* source; add --force"):
        policy.list_add("allow", [prefix])
    assert policy.list_add("allow", [prefix], force=True)["added"] == 1


def test_emptying_a_list_by_replace_needs_force(policy: Policy) -> None:
    policy.list_add("block", ["10.0.0.0/8"])
    with pytest.raises(PolicyInputError, match="would empty the list; add --force"):
        policy.list_load("block", parse_text(""), replace=True)
    assert policy.list_load("block", parse_text(""), replace=True, force=True)["loaded"] == 0
    assert policy.list_entries("block")["count"] == 0


def test_l2_allows_only_what_carries_no_ip_and_survives_a_restart(tmp_path: Path) -> None:
    maps = RecordingMaps()
    policy = Policy(maps, tmp_path)
    policy.restore()
    assert policy.l2_allow([0x88CC, 0x88F7])["ethertypes"] == [0x88CC, 0x88F7]
    assert maps.l2 == [0x88CC, 0x88F7]
    for bad, why in (
        (0x8847, "MPLS carries IP"),
        (0x0800, "IPv4 is judged"),
        (0x0806, "ARP is judged"),
        (0x8100, "VLAN tags"),
        (0x05DC, "802.3 length"),
        (70000, "from 0x0600 to 0xffff"),
    ):
        with pytest.raises(PolicyInputError, match=why):
            policy.l2_allow([0x88B5, bad])  # nothing of a bad request changes
    assert maps.l2 == [0x88CC, 0x88F7]
    r = policy.l2_del([0x88CC, 0x88B5])
    assert (r["deleted"], r["missing"], r["ethertypes"]) == (1, [0x88B5], [0x88F7])
    again = RecordingMaps()
    restored = Policy(again, tmp_path)
    restored.restore()
    assert again.l2 == [0x88F7] and restored.l2_list() == {"ethertypes": [0x88F7]}
