"""A supervisor that refuses to start under a service manager is recorded and exits 0, so
that neither launchd nor systemd relaunches it in a loop (supervisor/daemon/service_exit.py).
Checked against the service managers' documented restart rules, applied to the service
files `overnight install` writes, and a real `overnight run` process."""

from __future__ import annotations

import json
import plistlib
import signal

from supervisor.service import examples
from tests.conftest import overnight, subprocess_env
from tests.supervisor_support import record
from tests.test_reconcile import left_training

CRASH_SIGNALS = {signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT,
                 signal.SIGTRAP, signal.SIGSYS}


def launchd_relaunches(plist: dict, status: int | None, sig: int | None = None) -> bool:
    """launchd.plist(5), KeepAlive: `true` restarts whatever happened; a dictionary's
    "SuccessfulExit: If true, the job will be restarted as long as the program exits and with
    an exit status of zero. If false, the job will be restarted in the inverse condition" and
    "Crashed: If true, the job will be restarted as long as it exited due to a signal which
    is typically associated with a crash (SIGILL, SIGSEGV, etc.). If false, the job will be
    restarted in the inverse condition." A killed job has no exit status."""
    keep = plist.get("KeepAlive", False)
    if isinstance(keep, bool):
        return keep
    wanted = []
    if "SuccessfulExit" in keep:
        exited_zero = sig is None and status == 0
        wanted.append(exited_zero if keep["SuccessfulExit"] else not exited_zero)
    if "Crashed" in keep:
        crashed = sig in CRASH_SIGNALS
        wanted.append(crashed if keep["Crashed"] else not crashed)
    return any(wanted)


def systemd_restarts(unit: str, status: int) -> bool:
    """systemd.service(5): Restart=on-failure restarts "when the process exits with a non-zero
    exit code"; "exit status definitions ... in RestartPreventExitStatus= ... will not result
    in automatic service restarting"."""
    keys = dict(line.split("=", 1) for line in unit.splitlines()
                if "=" in line and not line.startswith(("#", "Environment")))
    assert keys["Restart"] == "on-failure"
    prevent = {int(x) for x in keys.get("RestartPreventExitStatus", "").split()}
    return status != 0 and status not in prevent


def installed_files() -> tuple[dict, str]:
    files = examples.rendered()
    plist = next(v for k, v in files.items() if k.suffix == ".plist")
    unit = next(v for k, v in files.items() if k.suffix == ".service")
    return plistlib.loads(plist.encode()), unit


def test_the_rules_as_documented_on_our_agent():
    plist, _ = installed_files()
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert launchd_relaunches(plist, 78)  # the loop this issue is about
    assert launchd_relaunches(plist, 1)  # a supervisor that failed: restarted, as it should
    assert launchd_relaunches(plist, None, signal.SIGKILL)  # jetsam
    assert not launchd_relaunches(plist, 0)
    assert plist["EnvironmentVariables"]["OVERNIGHT_SERVICE_MANAGER"] == "launchd"


def bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\ndata: d\nlearning_rate: fast\n")
    return path


def test_a_refusal_under_launchd_exits_0_and_the_record_says_why(tmp_path):
    plist, unit = installed_files()
    run = left_training(tmp_path / "run")  # a run whose supervisor died while training
    config = bad_config(tmp_path)
    alone = overnight("run", str(config), "--run-dir", str(run.root), timeout=60)
    assert alone.returncode == 78  # by hand: EX_CONFIG, as before
    assert launchd_relaunches(plist, alone.returncode)

    env = subprocess_env(OVERNIGHT_SERVICE_MANAGER=plist["EnvironmentVariables"][
        "OVERNIGHT_SERVICE_MANAGER"])
    done = overnight("run", str(config), "--run-dir", str(run.root), timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert not launchd_relaunches(plist, done.returncode)
    assert not systemd_restarts(unit, done.returncode)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to start under launchd" in lines[0]
    assert "learning_rate" in lines[0] and "exiting 0" in lines[0]
    rec = record(run.root)
    assert rec["state"] == "gave_up" and "learning_rate" in rec["reason"]
    events = [json.loads(x) for x in run.supervisor_log.read_text().splitlines()]
    assert events[-1]["event"] == "supervisor_refused"
    assert events[-1]["service_manager"] == "launchd"


def test_systemd_does_not_restart_a_refusal_either_way():
    _, unit = installed_files()
    assert not systemd_restarts(unit, 78) and not systemd_restarts(unit, 0)
    assert systemd_restarts(unit, 1)
    assert 'Environment="OVERNIGHT_SERVICE_MANAGER=systemd"' in unit
