"""`overnight install --at-boot` (supervisor/service/at_boot.py): a LaunchDaemon in the system
domain with UserName, or a systemd system unit with User=, running as the user who ran sudo;
the commands are the system domain's / manager's; the run directory is handed to that user.
Fake launchctl / systemctl record their calls (tests/test_service_cli.py); the files go to
temporary directories."""

from __future__ import annotations

import grp
import plistlib
import pwd

import pytest

from shared.errors import ConfigError
from supervisor.service import at_boot
from tests.test_service_cli import Env, env, overnight  # noqa: F401  (env: the fixture)

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def root_for(env: Env, tmp_path):  # noqa: F811
    """As `sudo` leaves it: root, SUDO_USER the user the job runs as."""
    env.monkeypatch.setenv("SUDO_USER", "nobody")
    env.monkeypatch.setenv(at_boot.ENV_LAUNCH_DAEMONS, str(tmp_path / "LaunchDaemons"))
    env.monkeypatch.setenv(at_boot.ENV_SYSTEM_UNITS, str(tmp_path / "system"))
    env.work.chmod(0o755)
    return env


def test_a_launch_daemon_runs_as_the_sudo_user_in_the_system_domain(root_for, tmp_path,
                                                                      capsys):
    e = root_for
    cfg = e.config()
    assert overnight("install", str(cfg), "--platform", "launchd", "--at-boot") == 0
    path = tmp_path / "LaunchDaemons" / "io.mlx-overnight.tiny.plist"
    plist = plistlib.loads(path.read_bytes())
    assert plist["UserName"] == "nobody"
    assert plist["Label"] == "io.mlx-overnight.tiny"
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["EnvironmentVariables"]["HOME"] == NOBODY.pw_dir
    assert plist["EnvironmentVariables"]["USER"] == "nobody"
    assert plist["EnvironmentVariables"]["OVERNIGHT_SERVICE_MANAGER"] == "launchd"
    assert e.calls() == [
        ["launchctl", "enable", "system/io.mlx-overnight.tiny"],
        ["launchctl", "bootstrap", "system", str(path)],
    ]
    run_dir = e.work / "runs" / "tiny"
    assert run_dir.stat().st_uid == NOBODY.pw_uid  # the job's user can write its run
    assert (run_dir / "logs").stat().st_uid == NOBODY.pw_uid
    out = capsys.readouterr().out
    assert "starts at boot with nobody logged in" in out and "sudo" in out

    e.answer("print", rc=113)  # launchctl print: the job is gone
    assert overnight("uninstall", "tiny", "--platform", "launchd", "--at-boot") == 0
    assert e.calls()[2] == ["launchctl", "bootout", "system/io.mlx-overnight.tiny"]
    assert not path.exists()


def test_a_system_unit_runs_as_the_sudo_user_and_starts_at_boot(root_for, tmp_path):
    e = root_for
    assert overnight("install", str(e.config()), "--platform", "systemd", "--at-boot") == 0
    unit = (tmp_path / "system" / "mlx-overnight-tiny.service").read_text()
    lines = unit.splitlines()
    group = grp.getgrgid(NOBODY.pw_gid).gr_name
    assert "User=nobody" in lines and f"Group={group}" in lines
    assert "WantedBy=multi-user.target" in lines and "WantedBy=default.target" not in lines
    assert lines.index("User=nobody") == lines.index("[Service]") + 1
    assert "RestartPreventExitStatus=78" in lines
    assert e.calls() == [["systemctl", "daemon-reload"],
                           ["systemctl", "enable", "--now", "mlx-overnight-tiny.service"]]


def test_the_default_is_still_the_per_user_agent(env: Env):  # noqa: F811
    assert overnight("install", str(env.config()), "--platform", "launchd") == 0
    assert env.calls()[1][2] == f"gui/{pwd.getpwnam(env.home.owner()).pw_uid}"
    plist = plistlib.loads((env.agents / "io.mlx-overnight.tiny.plist").read_bytes())
    assert "UserName" not in plist


def test_at_boot_needs_root_and_says_how():
    with pytest.raises(ConfigError, match=r"run it with sudo, e\.g\. `sudo overnight install "
                                          r"--at-boot CONFIG`"):
        at_boot.require_root(euid=501)
    at_boot.require_root(euid=0)
