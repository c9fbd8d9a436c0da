"""Errors a user can cause: one line naming the thing, non-zero exit, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab import ROOT, STATE_DIRS, XDPGUARD, Appliance, Lab, lab, sh

pytestmark = pytest.mark.netns

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


@pytest.fixture
def lab2() -> Lab:
    with lab(queues=2) as the_lab:
        yield the_lab


def run_args(the_lab: Lab, control: Path, **over: str) -> list[str]:
    opts = {
        "--outer": the_lab.outer,
        "--inner": the_lab.inner,
        "--inner-netns": the_lab.inner_ns,
        "--control": str(control),
    }
    opts.update(over)
    args = [str(XDPGUARD), "run"]
    for k, v in opts.items():
        args += [k, v]
    return args


def assert_user_error(res, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert res.returncode != 0, res
    lines = res.stderr.strip().splitlines()
    assert lines, res
    last = lines[-1]
    assert last.startswith("Error: "), res.stderr
    for needle in needles:
        assert needle in last, (needle, res.stderr)
    assert "Traceback" not in res.stderr


def assert_nothing_left(the_lab: Lab, control: Path) -> None:
    assert the_lab.xdp_attached() == {"outer": False, "inner": False}
    assert not control.exists()


@pytest.mark.parametrize(
    ("over", "needles"),
    [
        ({"--outer": "nosuchdev0"}, ["device 'nosuchdev0' not found"]),
        ({"--inner": "nosuchdev1"}, ["device 'nosuchdev1' not found in network namespace xg"]),
        ({"--inner-netns": "xg-no-such-ns"}, ["network namespace 'xg-no-such-ns' not found"]),
        ({"--outer-netns": "xg-no-such-ns"}, ["network namespace 'xg-no-such-ns' not found"]),
        ({"--queues": "3"}, ["queue count mismatch", "--queues 3"]),
        ({"--outer": "bad/name"}, ["bad/name"]),
    ],
    ids=["outer-device", "inner-device", "inner-netns", "outer-netns", "queues", "bad-name"],
)
def test_run_argument_errors(
    lab2: Lab, tmp_path: Path, over: dict[str, str], needles: list[str]
) -> None:
    control = tmp_path / "c.sock"
    res = sh(*run_args(lab2, control, **over), check=False)
    assert_user_error(res, *needles)
    assert_nothing_left(lab2, control)


def test_device_queue_counts_differ(lab2: Lab, tmp_path: Path) -> None:
    lab2.ns_exec(lab2.inner_ns, "ethtool", "-L", lab2.inner, "rx", "1", "tx", "1")
    control = tmp_path / "c.sock"
    res = sh(*run_args(lab2, control), check=False)
    assert_user_error(res, "queue count mismatch", lab2.outer, lab2.inner)
    assert_nothing_left(lab2, control)


def test_not_root(lab2: Lab, tmp_path: Path) -> None:
    control = tmp_path / "c.sock"
    res = sh(*NOBODY, *run_args(lab2, control), check=False)
    assert_user_error(res, "needs root")
    assert_nothing_left(lab2, control)
    # Even when the state directory exists and only root can read it.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    res = sh(*NOBODY, *run_args(lab2, control, **{"--state-dir": str(state)}), check=False)
    assert_user_error(res, "needs root")


def test_program_already_attached(lab2: Lab, tmp_path: Path) -> None:
    obj = ROOT / "bpf" / "xdpguard.bpf.o"
    sh("ip", "link", "set", "dev", lab2.outer, "xdp", "obj", str(obj), "sec", "xdp")
    try:
        control = tmp_path / "c.sock"
        res = sh(*run_args(lab2, control), check=False)
        assert_user_error(res, lab2.outer, "already has an XDP program", "xdp off")
        # Someone else's program stays; ours never got attached anywhere.
        assert lab2.xdp_attached() == {"outer": True, "inner": False}
        assert not control.exists()
    finally:
        sh("ip", "link", "set", "dev", lab2.outer, "xdp", "off")


def test_program_held_by_a_link_names_its_holder(lab2: Lab, tmp_path: Path) -> None:
    """A BPF link is not detached with ip: the error names the link and its process."""
    with Appliance(lab2, tmp_path) as app:
        assert app.proc is not None
        res = sh(*run_args(lab2, tmp_path / "second.sock"), check=False)
        assert_user_error(
            res, lab2.outer, "through BPF link", f"held by pid {app.proc.pid}", "bpftool link"
        )
        assert "xdp off" not in res.stderr
        assert app.call("status")["state"] == "ready"


def test_second_instance_on_same_state_directory(lab2: Lab, tmp_path: Path) -> None:
    """One state directory, one appliance: a second would share its flow table,
    secret and policy file. Nor is its pinned table forgotten under it."""
    with Appliance(lab2, tmp_path) as app:
        assert app.proc is not None
        state = ["--state-dir", str(app.state_dir)]
        res = sh(*run_args(lab2, tmp_path / "second.sock"), *state, check=False)
        assert_user_error(
            res, f"another xdpguard (pid {app.proc.pid}) uses the state directory", "--state-dir"
        )
        res = sh(str(XDPGUARD), "flows", "forget", *state, check=False)
        assert_user_error(res, f"another xdpguard (pid {app.proc.pid})")
        assert app.call("status")["flow_table"]["pinned"]
        assert app.call("status")["state"] == "ready"
    assert "removed" in sh(str(XDPGUARD), "flows", "forget", *state).stdout


def test_second_instance_on_same_control_socket(lab2: Lab, tmp_path: Path) -> None:
    with Appliance(lab2, tmp_path) as app:
        res = sh(*run_args(lab2, app.control), check=False)
        assert_user_error(res, "another xdpguard is running", str(app.control))
        # The first one is untouched and still answers.
        assert app.call("status")["devices"]["outer"]["name"] == lab2.outer


def test_clients_without_a_daemon(tmp_path: Path) -> None:
    control = tmp_path / "none.sock"
    for cmd in ("status", "stats"):
        res = sh(str(XDPGUARD), cmd, "--control", str(control), check=False)
        assert_user_error(res, "not running", str(control))


def test_clients_not_root(lab2: Lab, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with Appliance(lab2, tmp_path) as app:
        res = sh(*NOBODY, str(XDPGUARD), "status", "--control", str(app.control), check=False)
        assert_user_error(res, "permission denied", "root only")


def test_a_settings_file_runs_the_appliance(lab2: Lab, tmp_path: Path) -> None:
    """The devices and the first TCP settings from the file, a command-line
    option over it; after 'tcp config', the saved setting wins over the file."""
    import json
    import signal
    import subprocess
    import time

    from xdpguard.control import wait_ready

    control, state = tmp_path / "c.sock", tmp_path / "state"
    STATE_DIRS.add(state)  # its pinned tables go after the test
    conf = tmp_path / "xdpguard.toml"
    conf.write_text(
        f'outer = "{lab2.outer}"\ninner = "{lab2.inner}"\ninner_netns = "{lab2.inner_ns}"\n'
        f'control = "{control}"\nstate_dir = "{state}"\nmax_flows = 8192\n'
        '[tcp]\nsyn_mode = "on"\nverify_ttl = 900\n'
    )
    assert "ok" in sh(str(XDPGUARD), "config", "check", str(conf)).stdout

    def start(*extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([str(XDPGUARD), "run", "--config", str(conf), *extra],
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_ready(control, 1.0)
                return proc
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()

    def cli(*args: str) -> dict:
        return json.loads(sh(str(XDPGUARD), *args, "--json", "--control", str(control)).stdout)

    proc = start("--max-flows", "4096")
    try:
        assert cli("tcp", "flows")["capacity"] == 4096  # the command line won
        tcp = cli("tcp", "config")
        assert (tcp["syn_mode"], tcp["verify_ttl"], tcp["state_mode"]) == ("on", 900, "auto")
        cli("tcp", "config", "--syn-mode", "off")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    proc = start()
    try:
        assert cli("tcp", "flows")["capacity"] == 8192  # the file's, now
        tcp = cli("tcp", "config")
        assert (tcp["syn_mode"], tcp["verify_ttl"]) == ("off", 900)  # saved beats the file
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "the saved syn_mode=off of" in err and "win over the settings file's [tcp]" in err


def _unit_caps() -> list[str]:
    unit = ROOT / "contrib" / "systemd" / "xdpguard.service"
    (line,) = [
        ln for ln in unit.read_text().splitlines() if ln.startswith("CapabilityBoundingSet=")
    ]
    return line.split("=", 1)[1].split()


def _with_caps(caps: list[str]) -> list[str]:
    """setpriv keeping root's uid but only ``caps``, as the unit's bounding set does."""
    spec = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return ["setpriv", f"--bounding-set={spec}", f"--inh-caps={spec}", f"--ambient-caps={spec}"]


def test_the_units_capabilities_are_enough_and_each_is_needed(lab2: Lab, tmp_path: Path) -> None:
    import subprocess

    from lab import ORIGIN_V4

    caps = _unit_caps()
    control = tmp_path / "c.sock"
    state = tmp_path / "state"
    STATE_DIRS.add(state)
    args = run_args(lab2, control, **{"--state-dir": str(state)})
    proc = subprocess.Popen([*_with_caps(caps), *args], stderr=subprocess.PIPE, text=True)
    try:
        res = sh(str(XDPGUARD), "status", "--wait", "30", "--control", str(control), check=False)
        assert res.returncode == 0, proc.stderr.read() if proc.poll() is not None else res
        assert lab2.ping(ORIGIN_V4)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    for missing in caps:
        res = sh(*_with_caps([c for c in caps if c != missing]), *args, check=False)
        assert_user_error(res, f"(missing {missing})")
        assert_nothing_left(lab2, control)
