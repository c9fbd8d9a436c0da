"""The table of kernel features and what run does without one (no privileges)."""

from __future__ import annotations

import pytest

from xdpguard import features
from xdpguard.errors import XdpguardError
from xdpguard.settings import SettingError, check_file

pytestmark = pytest.mark.unit


def test_without_takes_only_features_run_can_do_without() -> None:
    assert features.check_without(["devmap_redirect", "ktime_coarse", "devmap_redirect"]) == (
        "devmap_redirect",
        "ktime_coarse",
    )
    with pytest.raises(XdpguardError, match="'nosuch': no such feature"):
        features.check_without(["nosuch"])
    with pytest.raises(XdpguardError, match="xdp_adjust_head: xdpguard cannot run without it"):
        features.check_without(["xdp_adjust_head"])
    with pytest.raises(XdpguardError, match="tp_btf: not a feature xdpguard run can do without"):
        features.check_without(["tp_btf"])


def test_every_optional_feature_has_a_fallback() -> None:
    for name in features.OPTIONAL:
        assert features.BY_NAME[name].fallback


def found(name: str, available: bool, forced: bool = False) -> features.Found:
    f = features.BY_NAME[name]
    return features.Found(name, available, "how", f.fallback or "required", f.uses, f.since, forced)


def test_a_missing_required_feature_refuses_in_one_line() -> None:
    with pytest.raises(XdpguardError) as exc:
        features.require({"xdp_load_bytes": found("xdp_load_bytes", False)}, log_missing=False)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("this kernel lacks xdp_load_bytes")
    assert "xdpguard features" in msg


def test_a_missing_optional_feature_says_its_fallback(caplog: pytest.LogCaptureFixture) -> None:
    features.require(
        {
            "ktime_coarse": found("ktime_coarse", False),
            "devmap_redirect": found("devmap_redirect", True, forced=True),
            "xskmap": found("xskmap", True),
        }
    )
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "kernel feature ktime_coarse missing: how; using precise_clock",
        "kernel feature devmap_redirect turned off (--without); using af_xdp_path",
    ]


def test_the_settings_file_takes_without(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.toml"
    run, _ = check_file(path, {"without": ["devmap_redirect"]})
    assert run["without"] == ("devmap_redirect",)
    run, _ = check_file(path, {"without": "ktime_coarse"})
    assert run["without"] == ("ktime_coarse",)
    with pytest.raises(SettingError, match="without: 'nosuch': no such feature"):
        check_file(path, {"without": ["nosuch"]})
    with pytest.raises(SettingError, match="without: 3 is not a feature name"):
        check_file(path, {"without": 3})


def test_why_refused_picks_the_verifiers_words() -> None:
    log = (
        "libbpf: prog 'p': BPF program load failed: Invalid argument\n"
        "libbpf: prog 'p': -- BEGIN PROG LOAD LOG --\n"
        "0: R1=ctx() R10=fp0\n"
        "0: (b7) r2 = -8                       ; R2_w=-8\n"
        "1: (85) call bpf_xdp_adjust_meta#54\n"
        "program of this type cannot use helper bpf_xdp_adjust_meta#54\n"
        "processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0\n"
        "-- END PROG LOAD LOG --\n"
        "libbpf: prog 'p': failed to load: -22\n"
        "libbpf: failed to load object 'x.bpf.o'\n"
    )
    said = features.why_refused_text(log, OSError(22, "Invalid argument"))
    assert said == "program of this type cannot use helper bpf_xdp_adjust_meta#54"
    assert features.why_refused_text("", OSError(1, "Operation not permitted")) == (
        "Operation not permitted"
    )
