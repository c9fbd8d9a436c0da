"""The settings of ``xdpguard run``: one table for the command line, the file
and the engine; the file is input, checked whole, its errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdpguard import settings
from xdpguard.cli import main
from xdpguard.engine import EngineConfig
from xdpguard.settings import MissingSetting, SettingError, check_file, merge, read_file

pytestmark = pytest.mark.unit

GOOD = """
outer = "eth0"
inner = "veth1"
inner_netns = "origin"
max_flows = 2000000
fast_path = "off"
metrics = "9464"

[tcp]
syn_mode = "on"
verify_ttl = 900
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdpguard.toml"
    path.write_text(text)
    return path


def test_a_good_file(tmp_path: Path) -> None:
    run, tcp = check_file(path := write(tmp_path, GOOD), read_file(path))
    assert run["max_flows"] == 2_000_000 and run["fast_path"] == "off"
    assert run["metrics"] == ("127.0.0.1", 9464)
    assert tcp == {"syn_mode": "on", "verify_ttl": 900}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('outr = "eth0"', "outr: unknown setting"),
        ('max_flows = "many"', "max_flows: 'many' is not a whole number"),
        ("max_flows = 12", "max_flows: 12 is not within 1024.."),
        ("learn = true", "learn: True is not a number"),
        ('xdp_mode = "hw"', "xdp_mode: 'hw' is not one of native, skb"),
        ("ring_size = 1000", "ring_size: 1000 is not one of"),
        ('outer = "a/b"', "outer: 'a/b' is not a valid device name"),
        ('metrics = "0.0.0.0"', "metrics: '0.0.0.0': the port must be"),
        ("tcp = 5", "tcp: must be a table"),
        ('[tcp]\nsyn_mod = "on"', "tcp.syn_mod: unknown TCP setting"),
        ("[tcp]\nverify_ttl = -1", "tcp.verify_ttl: verify_ttl -1: must be a whole number"),
        ("outer = ", "not valid TOML"),
        ('state_dir = "var/xdpguard"', "state_dir: 'var/xdpguard' is not an absolute path"),
        ('control = "c.sock"', "control: 'c.sock' is not an absolute path"),
    ],
)
def test_a_bad_file_says_which_key_and_which_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingError) as err:
        check_file(path, read_file(path))
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), str(err.value)
    # The same through the command a user types, one line, non-zero.
    res = CliRunner().invoke(main, ["config", "check", str(path)])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and needle in res.output


def test_config_check_says_ok(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["config", "check", str(write(tmp_path, GOOD))])
    assert res.exit_code == 0 and res.output.endswith(": ok (8 settings)\n")


def test_the_command_line_overrides_the_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    run, tcp = merge({"max_flows": 4096, "queues": 2}, path)
    assert run["max_flows"] == 4096 and run["queues"] == 2  # the command line
    assert run["fast_path"] == "off" and run["outer"] == "eth0"  # the file
    assert run["learn"] == settings.DEFAULTS["learn"] and run["xdp_mode"] == "native"  # defaults
    assert tcp["syn_mode"] == "on"


def test_a_missing_required_setting_names_the_option_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'outer = "eth0"\ninner = "i"\n')
    with pytest.raises(
        MissingSetting, match=f"no --inner-netns given \\(nor 'inner_netns' in {path}"
    ):
        merge({}, path)


def test_a_named_file_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match="no such file"):
        merge({}, tmp_path / "nope.toml")


def test_one_place_for_the_defaults() -> None:
    """The engine's defaults are the table's, not copies of them."""
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for key, default in settings.DEFAULTS.items():
        if key in ("summary_interval", "control", "log_format") or settings.BY_KEY[key].required:
            continue  # the daemon's, not the engine's; or no default at all
        if key == "fast_path":
            want = default == "on"
        elif key == "state_dir":
            want = Path(default)
        else:
            want = default
        assert fields[key] == want, key
    res = CliRunner().invoke(main, ["run", "--help"])
    for s in settings.RUN:
        assert s.flag in res.output


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "xdpguard.toml"
    path.write_bytes(b'outer = "eth0"\n\xff\xfe\n')
    res = CliRunner().invoke(main, ["config", "check", str(path)])
    assert res.exit_code == 1 and res.output == f"Error: {path}: not UTF-8 text (byte 15)\n"
