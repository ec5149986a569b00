"""`overnight install | uninstall | services` against a temporary HOME.

launchctl, systemctl and loginctl are replaced (OVERNIGHT_LAUNCHCTL, ...) by a recording fake
that appends its argv to a log and answers with FAKE_RC_<subcommand> / FAKE_OUT_<subcommand>;
the exact command lines are asserted. The last tests run the real CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
import plistlib
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import cli
from shared.exitcodes import ExitCode

REPO = Path(__file__).resolve().parent.parent
OLD_RECORD = REPO / "tests" / "fixtures" / "run-before-11" / "run.json"


def record_in_state(state: str) -> str:
    """A real run.json (recorded by a supervisor) in another state."""
    record = json.loads(OLD_RECORD.read_text())
    record["state"] = state
    return json.dumps(record)
UID = os.getuid()
USER = pwd.getpwuid(UID).pw_name
FAKE = """#!{python} -I
import json, os, sys
args = sys.argv[1:]
sub = (args[1:2] if args[:1] == ["--user"] else args[:1]) or [""]
key = sub[0].replace("-", "_")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + "\\n")
sys.stdout.write(os.environ.get("FAKE_OUT_" + key, ""))
sys.exit(int(os.environ.get("FAKE_RC_" + key, "0")))
"""


@dataclass(frozen=True)
class Env:
    home: Path
    work: Path
    log: Path
    monkeypatch: pytest.MonkeyPatch

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def answer(self, subcommand: str, rc: int = 0, out: str = "") -> None:
        key = subcommand.replace("-", "_")
        self.monkeypatch.setenv(f"FAKE_RC_{key}", str(rc))
        self.monkeypatch.setenv(f"FAKE_OUT_{key}", out)

    def config(self, name: str = "tiny", stop_timeout: float = 120) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(f"model: m\ndata: d\nsupervisor:\n  stop_timeout: {stop_timeout}\n")
        return path

    @property
    def unit_dir(self) -> Path:
        return self.home / ".config" / "systemd" / "user"

    @property
    def agents(self) -> Path:
        return self.home / "Library" / "LaunchAgents"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    home, work, bin_dir = tmp_path / "home", tmp_path / "work", tmp_path / "bin"
    for d in (home, work, bin_dir):
        d.mkdir()
    for tool in ("launchctl", "systemctl", "loginctl"):
        fake = bin_dir / tool
        fake.write_text(FAKE.format(python=sys.executable))
        fake.chmod(0o755)
        monkeypatch.setenv(f"OVERNIGHT_{tool.upper()}", str(fake))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.chdir(work)
    e = Env(home, work, log, monkeypatch)
    e.answer("show-user", out="Linger=no\n")
    return e


def overnight(*argv: str) -> int:
    return cli.main(list(argv))


# --- systemd -------------------------------------------------------------------------------


def test_systemd_install_writes_the_unit_reloads_and_enables_it(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = env.config(stop_timeout=90)
    assert overnight("install", str(cfg), "--platform", "systemd") == 0
    unit = env.unit_dir / "mlx-overnight-tiny.service"
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m supervisor.cli run {cfg} " \
           f"--run-dir {env.work / 'runs' / 'tiny'}" in text
    assert f"WorkingDirectory={env.work}\n" in text
    assert "TimeoutStopSec=150\n" in text  # stop_timeout 90 + 60
    assert f'Environment="PATH={Path(sys.executable).parent}{os.pathsep}' in text
    assert env.calls() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "mlx-overnight-tiny.service"],
        ["loginctl", "show-user", USER, "-p", "Linger"],
    ]
    out = capsys.readouterr().out
    assert f"loginctl enable-linger {USER}" in out
    assert (env.work / "runs" / "tiny" / "logs").is_dir()


def test_systemd_install_says_nothing_about_lingering_when_it_is_on(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env.answer("show-user", out="Linger=yes\n")
    assert overnight("install", str(env.config()), "--platform", "systemd") == 0
    assert "enable-linger" not in capsys.readouterr().out


def test_systemd_install_never_fails_because_loginctl_is_missing(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env.monkeypatch.setenv("OVERNIGHT_LOGINCTL", str(env.home / "no-such-loginctl"))
    assert overnight("install", str(env.config()), "--platform", "systemd") == 0
    out = capsys.readouterr().out
    assert "could not check lingering" in out and f"loginctl enable-linger {USER}" in out


def test_installing_the_same_service_again_is_idempotent(env: Env) -> None:
    cfg = env.config()
    assert overnight("install", str(cfg), "--platform", "systemd") == 0
    unit = env.unit_dir / "mlx-overnight-tiny.service"
    before = unit.stat().st_mtime_ns
    env.log.unlink()
    assert overnight("install", str(cfg), "--platform", "systemd") == 0
    assert unit.stat().st_mtime_ns == before
    assert env.calls()[:2] == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "mlx-overnight-tiny.service"],
    ]


def test_a_different_service_of_the_same_name_needs_force(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert overnight("install", str(env.config()), "--platform", "systemd") == 0
    unit = env.unit_dir / "mlx-overnight-tiny.service"
    old = unit.read_text()
    env.log.unlink()
    capsys.readouterr()
    cfg2 = env.config(stop_timeout=300)
    assert overnight("install", str(cfg2), "--platform", "systemd") == ExitCode.BAD_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and str(unit) in err
    assert unit.read_text() == old
    assert env.calls() == []

    assert overnight("install", str(cfg2), "--platform", "systemd", "--force") == 0
    assert "TimeoutStopSec=360\n" in unit.read_text()
    assert env.calls()[:3] == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "mlx-overnight-tiny.service"],
        ["systemctl", "--user", "restart", "mlx-overnight-tiny.service"],
    ]


def test_systemd_uninstall_stops_disables_and_removes_the_unit(env: Env) -> None:
    assert overnight("install", str(env.config()), "--platform", "systemd") == 0
    env.log.unlink()
    assert overnight("uninstall", "tiny", "--platform", "systemd") == 0
    assert not (env.unit_dir / "mlx-overnight-tiny.service").exists()
    assert env.calls() == [
        ["systemctl", "--user", "disable", "--now", "mlx-overnight-tiny.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_uninstall_accepts_the_unit_name_too(env: Env) -> None:
    assert overnight("install", str(env.config()), "--platform", "systemd") == 0
    assert overnight("uninstall", "mlx-overnight-tiny.service", "--platform", "systemd") == 0
    assert not (env.unit_dir / "mlx-overnight-tiny.service").exists()


def test_a_failing_systemctl_is_one_line_with_its_message_and_a_hint(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env.answer("daemon-reload", rc=1, out="Failed to connect to bus: No medium found\n")
    assert overnight("install", str(env.config()), "--platform", "systemd") != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "`" + f"{env.home.parent / 'bin' / 'systemctl'} --user daemon-reload` failed (exit 1)" \
        in err
    assert "Failed to connect to bus" in err and "XDG_RUNTIME_DIR" in err


def test_a_missing_systemctl_is_one_line(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.monkeypatch.setenv("OVERNIGHT_SYSTEMCTL", str(env.home / "no-such-systemctl"))
    assert overnight("install", str(env.config()), "--platform", "systemd") != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-systemctl: cannot run" in err


# --- launchd -------------------------------------------------------------------------------


def test_launchd_install_writes_the_plist_enables_and_bootstraps_it(env: Env) -> None:
    cfg = env.config()
    assert overnight("install", str(cfg), "--platform", "launchd", "--name", "night-1") == 0
    path = env.agents / "io.mlx-overnight.night-1.plist"
    plist = plistlib.loads(path.read_bytes())
    run_dir = env.work / "runs" / "tiny"
    assert plist["Label"] == "io.mlx-overnight.night-1"
    assert plist["ProgramArguments"] == [
        sys.executable, "-m", "supervisor.cli", "run", str(cfg), "--run-dir", str(run_dir)]
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ExitTimeOut"] == 180
    assert plist["StandardErrorPath"] == str(run_dir / "logs" / "service.err.log")
    assert plist["EnvironmentVariables"]["PATH"].startswith(str(Path(sys.executable).parent))
    if sys.prefix != sys.base_prefix:
        assert plist["EnvironmentVariables"]["VIRTUAL_ENV"] == sys.prefix
    assert (run_dir / "logs").is_dir()  # launchd opens the log files itself
    assert env.calls() == [
        ["launchctl", "enable", f"gui/{UID}/io.mlx-overnight.night-1"],
        ["launchctl", "bootstrap", f"gui/{UID}", str(path)],
    ]


def test_launchd_reinstall_of_the_same_job_bootstraps_and_kickstarts(env: Env) -> None:
    cfg = env.config()
    assert overnight("install", str(cfg), "--platform", "launchd") == 0
    env.log.unlink()
    env.answer("bootstrap", rc=5)  # already loaded: "Bootstrap failed: 5: Input/output error"
    assert overnight("install", str(cfg), "--platform", "launchd") == 0
    target = f"gui/{UID}/io.mlx-overnight.tiny"
    assert env.calls() == [
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", f"gui/{UID}", str(env.agents / "io.mlx-overnight.tiny.plist")],
        ["launchctl", "kickstart", target],
    ]


def test_launchd_force_replaces_a_loaded_job_by_booting_it_out_first(env: Env) -> None:
    assert overnight("install", str(env.config()), "--platform", "launchd") == 0
    env.log.unlink()
    env.answer("print", rc=113)  # "Could not find service": the old job is gone
    assert overnight("install", str(env.config(stop_timeout=10)), "--platform", "launchd",
                     "--force") == 0
    path = env.agents / "io.mlx-overnight.tiny.plist"
    assert plistlib.loads(path.read_bytes())["ExitTimeOut"] == 70
    target = f"gui/{UID}/io.mlx-overnight.tiny"
    assert env.calls() == [
        ["launchctl", "bootout", target],
        ["launchctl", "print", target],
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", f"gui/{UID}", str(path)],
    ]


def test_launchd_uninstall_boots_out_and_removes_the_plist(env: Env) -> None:
    assert overnight("install", str(env.config()), "--platform", "launchd") == 0
    env.log.unlink()
    env.answer("print", rc=113)
    assert overnight("uninstall", "io.mlx-overnight.tiny", "--platform", "launchd") == 0
    assert not (env.agents / "io.mlx-overnight.tiny.plist").exists()
    target = f"gui/{UID}/io.mlx-overnight.tiny"
    assert env.calls() == [["launchctl", "bootout", target], ["launchctl", "print", target]]


def test_a_failing_bootstrap_names_the_gui_domain(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env.answer("bootstrap", rc=125, out="Bootstrap failed: 125: Domain does not support it\n")
    assert overnight("install", str(env.config()), "--platform", "launchd") != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "failed (exit 125): Bootstrap failed: 125" in err and f"gui/{UID} domain" in err


# --- services ------------------------------------------------------------------------------


def test_services_lists_jobs_with_the_state_of_their_run_record(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("alpha", "beta", "gamma"):
        assert overnight("install", str(env.config(name)), "--platform", "systemd") == 0
    (env.work / "runs" / "alpha" / "run.json").write_text(record_in_state("training"))
    (env.work / "runs" / "beta" / "run.json").write_text("{not json")
    capsys.readouterr()
    env.log.unlink()
    env.answer("is-active", rc=3, out="inactive\n")
    assert overnight("services", "--platform", "systemd") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SERVICE", "RUN", "STATE", "RUN", "DIR"]
    assert [line.split() for line in lines[1:]] == [
        ["alpha", "inactive", "training", str(env.work / "runs" / "alpha")],
        ["beta", "inactive", "unknown", str(env.work / "runs" / "beta")],
        ["gamma", "inactive", "unknown", str(env.work / "runs" / "gamma")],
    ]
    assert env.calls() == [
        ["systemctl", "--user", "is-active", f"mlx-overnight-{n}.service"]
        for n in ("alpha", "beta", "gamma")
    ]


def test_services_on_launchd_shows_the_job_state(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert overnight("install", str(env.config()), "--platform", "launchd") == 0
    (env.work / "runs" / "tiny" / "run.json").write_text(record_in_state("finished"))
    env.answer("print", out="io.mlx-overnight.tiny = {\n\tstate = not running\n}\n")
    capsys.readouterr()
    assert overnight("services", "--platform", "launchd") == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split() == ["tiny", "not", "running", "finished", str(env.work / "runs" / "tiny")]


def test_services_with_nothing_installed(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert overnight("services", "--platform", "systemd") == 0
    assert "no services installed" in capsys.readouterr().out


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["install", "missing.yaml"], "config file not found"),
        (["install", "{cfg}", "--name", "bad name"], "--name: expected letters"),
        (["install", "{cfg}", "--name", "../x"], "--name: expected letters"),
        (["install", "{cfg}", "--env", "NOEQUALS"], "--env: expected KEY=VALUE"),
        (["install", "{cfg}", "--workdir", "nowhere"], "--workdir: expected a directory"),
        (["install", "{cfg}", "--watchdog-sec", "-1"], "--watchdog-sec"),
        (["uninstall", "ghost"], "no service named 'ghost' is installed (installed: none)"),
        (["uninstall", "a/b"], "NAME: expected letters"),
    ],
)
@pytest.mark.parametrize("platform", ["launchd", "systemd"])
def test_bad_input_is_one_line_on_stderr_and_a_non_zero_exit(
    env: Env, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str, platform: str
) -> None:
    cfg = env.config()
    args = [a.replace("{cfg}", str(cfg)) for a in argv]
    assert overnight(*args, "--platform", platform) == ExitCode.BAD_CONFIG
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and expected in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert env.calls() == []


def test_the_name_is_derived_from_the_run_directory_and_sanitised(env: Env) -> None:
    assert overnight("install", str(env.config()), "--run-dir", "runs/My Run!",
                     "--platform", "systemd") == 0
    assert (env.unit_dir / "mlx-overnight-My-Run.service").is_file()


def test_two_services_may_not_share_a_run_directory(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = env.config()
    assert overnight("install", str(cfg), "--platform", "systemd") == 0
    assert overnight("install", str(cfg), "--name", "other", "--platform", "systemd") != 0
    assert "service 'tiny' already runs" in capsys.readouterr().err


def test_extra_environment_from_env_options(env: Env) -> None:
    assert overnight("install", str(env.config()), "--env", "HF_HOME=/data/hf",
                     "--platform", "launchd") == 0
    plist = plistlib.loads((env.agents / "io.mlx-overnight.tiny.plist").read_bytes())
    assert plist["EnvironmentVariables"]["HF_HOME"] == "/data/hf"
    assert plist["EnvironmentVariables"]["PYTHONUNBUFFERED"] == "1"


# --- dry runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["launchd", "systemd"])
def test_dry_run_prints_the_file_and_commands_and_touches_nothing(
    env: Env, capsys: pytest.CaptureFixture[str], platform: str
) -> None:
    assert overnight("install", str(env.config()), "--platform", platform, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run" in out
    assert ("<string>supervisor.cli</string>" if platform == "launchd"
            else "-m supervisor.cli run") in out
    assert ("$ " + str(env.home.parent / "bin" / ("launchctl" if platform == "launchd"
                                                  else "systemctl"))) in out
    assert not (env.home / "Library").exists() and not (env.home / ".config").exists()
    assert not (env.work / "runs").exists()
    assert env.calls() == []


def test_uninstall_dry_run_keeps_the_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert overnight("install", str(env.config()), "--platform", "systemd") == 0
    env.log.unlink()
    capsys.readouterr()
    assert overnight("uninstall", "tiny", "--platform", "systemd", "--dry-run") == 0
    assert "$ " in capsys.readouterr().out
    assert (env.unit_dir / "mlx-overnight-tiny.service").is_file()
    assert env.calls() == []


def run_real_cli(env: Env, *argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m shared.cli ...` in a fresh process, the way a user runs it."""
    child_env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *argv], cwd=env.work, env=child_env,
        capture_output=True, text=True, timeout=60,
    )


def test_real_cli_dry_run_for_systemd(env: Env, tmp_path: Path) -> None:
    env.config()
    done = run_real_cli(env, "install", "tiny.yaml", "--dry-run", "--platform", "systemd",
                        "--run-dir", "runs/night")
    assert done.returncode == 0, done.stderr
    assert f"{env.unit_dir / 'mlx-overnight-night.service'} (new)" in done.stdout
    assert f"ExecStart={sys.executable} -m supervisor.cli run {env.work / 'tiny.yaml'} " \
           f"--run-dir {env.work / 'runs' / 'night'}" in done.stdout
    assert "$ " + f"{tmp_path / 'bin' / 'systemctl'} --user enable --now " \
        "mlx-overnight-night.service" in done.stdout
    assert not env.unit_dir.exists() and env.calls() == []


def test_real_cli_dry_run_for_launchd(env: Env) -> None:
    env.config()
    done = run_real_cli(env, "install", "tiny.yaml", "--dry-run", "--platform", "launchd")
    assert done.returncode == 0, done.stderr
    start = done.stdout.index("<?xml")
    end = done.stdout.index("</plist>") + len("</plist>")
    plist = plistlib.loads(done.stdout[start:end].encode())
    assert plist["ProgramArguments"][0] == sys.executable
    assert f"bootstrap gui/{UID} {env.agents / 'io.mlx-overnight.tiny.plist'}" in done.stdout
    assert not env.agents.exists() and env.calls() == []


def test_real_cli_bad_config_is_one_line_without_traceback(env: Env) -> None:
    done = run_real_cli(env, "install", "missing.yaml", "--dry-run", "--platform", "systemd")
    assert done.returncode == ExitCode.BAD_CONFIG
    assert done.stderr.count("\n") == 1 and "config file not found" in done.stderr


def test_the_units_pythonpath_is_the_checkout_that_holds_the_package() -> None:
    """A source checkout's unit runs `python -m supervisor.cli` from the user's workdir: its
    PYTHONPATH must be the directory holding `supervisor/`, not `supervisor/` itself."""
    from supervisor.service.commands import default_environment

    environment = default_environment(sys.executable, {"PATH": "/usr/bin"})
    if "PYTHONPATH" in environment:
        assert (Path(environment["PYTHONPATH"]) / "supervisor" / "cli.py").is_file()
        assert Path(environment["PYTHONPATH"]) == REPO
