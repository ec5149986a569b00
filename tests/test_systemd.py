"""The systemd user unit and systemctl command lines (supervisor/service/systemd.py).

`systemd-analyze verify --user` checks generated units for real (Debian package `systemd`);
it needs a runtime directory, so XDG_RUNTIME_DIR points at a private tmp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from supervisor.service import systemd

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install -y systemd)"
)


def render(**changes: Any) -> str:
    kwargs: dict[str, Any] = {
        "name": "tiny",
        "python": sys.executable,
        "config": Path("/home/ada/work/tiny.yaml"),
        "run_dir": Path("/home/ada/work/runs/tiny"),
        "working_directory": Path("/home/ada/work"),
        "environment": {"PATH": "/home/ada/venv/bin:/usr/bin", "VIRTUAL_ENV": "/home/ada/venv"},
        "stop_timeout": 120.0,
        "timeout_stop_sec": 180,
    }
    kwargs.update(changes)
    return systemd.render(**kwargs)


def settings(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, the way systemd reads the file (comments skipped)."""
    result: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            result.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        result[section].setdefault(key, []).append(value)
    return result


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--user", "--man=no", str(unit)],
        capture_output=True, text=True, env=env, timeout=30,
    )


def test_the_example_unit_at_the_top_of_the_repository_is_what_install_writes() -> None:
    """systemd/ shows readers a real unit: the one rendered for examples.SPEC."""
    from supervisor.service import examples

    path = REPO / "systemd" / "mlx-overnight-example.service"
    assert path.read_text() == examples.rendered()[path], (
        "run: python -m supervisor.service.examples")


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_example_unit(tmp_path: Path) -> None:
    done = verify(REPO / "systemd" / "mlx-overnight-example.service", tmp_path)
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr


def test_unit_has_every_required_setting() -> None:
    s = settings(render())
    # the documented values (docs/architecture.md "Running as a service"): at most 5 starts
    # in 30 min, a 60 s watchdog, 30 s between restarts, exit 78 is never restarted
    assert s["Unit"]["StartLimitIntervalSec"] == ["1800"]
    assert s["Unit"]["StartLimitBurst"] == ["5"]
    service = s["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["60"]
    assert service["TimeoutStartSec"] == ["300"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartSec"] == ["30"]
    assert service["RestartPreventExitStatus"] == ["78"]
    assert service["KillMode"] == ["mixed"]
    assert service["TimeoutStopSec"] == ["180"]  # stop_timeout 120 + 60
    assert service["ExecStart"] == [
        f"{sys.executable} -m supervisor.cli run /home/ada/work/tiny.yaml "
        "--run-dir /home/ada/work/runs/tiny"
    ]
    assert service["WorkingDirectory"] == ["/home/ada/work"]
    assert service["Environment"] == [
        '"PATH=/home/ada/venv/bin:/usr/bin"', '"VIRTUAL_ENV=/home/ada/venv"'
    ]
    assert s["Install"]["WantedBy"] == ["default.target"]
    assert "$" not in render()


def test_watchdog_can_be_turned_off() -> None:
    assert settings(render(watchdog_sec=0))["Service"]["WatchdogSec"] == ["0"]


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("--run-dir", "--run-dir"),
        ("/a b/c", '"/a b/c"'),
        ("100%", "100%%"),
        ("$HOME", '"$$HOME"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("it's", '"it\'s"'),
        ("", '""'),
    ],
)
def test_quote_escapes_specifiers_variables_and_quotes(word: str, quoted: str) -> None:
    assert systemd.quote(word) == quoted


@pytest.mark.parametrize("path", ["/a$b/python", '/a"b/python', "/a'b/python", "/a\\b/python",
                                  "python3", "/a\nb"])
def test_an_interpreter_path_systemd_cannot_start_is_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="interpreter"):
        systemd.executable(path)


def test_environment_lines_are_quoted_and_escaped() -> None:
    assert systemd.environment_line("X", 'a "b" \\ 100% $y') == (
        'Environment="X=a \\"b\\" \\\\ 100%% $y"'
    )


def test_run_dir_is_read_back_from_the_header_comment() -> None:
    assert systemd.run_dir_of(render()) == Path("/home/ada/work/runs/tiny")
    assert systemd.run_dir_of("[Service]\nExecStart=/bin/true\n") is None


def test_names_and_paths() -> None:
    assert systemd.unit_name("tiny") == "mlx-overnight-tiny.service"
    assert systemd.name_of("mlx-overnight-tiny.service") == "tiny"
    assert systemd.name_of("mlx-overnight-tiny") == "tiny"
    assert systemd.name_of("mlx-overnight-.service") is None
    assert systemd.name_of("ssh.service") is None
    home = Path("/home/ada")
    assert systemd.unit_path(home, "tiny") == Path(
        "/home/ada/.config/systemd/user/mlx-overnight-tiny.service"
    )
    assert systemd.units_dir(home, "/xdg") == Path("/xdg/systemd/user")
    assert systemd.units_dir(home, "relative") == Path("/home/ada/.config/systemd/user")


def test_command_lines() -> None:
    assert systemd.daemon_reload("systemctl") == ["systemctl", "--user", "daemon-reload"]
    assert systemd.enable_now("systemctl", "tiny") == [
        "systemctl", "--user", "enable", "--now", "mlx-overnight-tiny.service"]
    assert systemd.enable("systemctl", "tiny") == [
        "systemctl", "--user", "enable", "mlx-overnight-tiny.service"]
    assert systemd.restart("systemctl", "tiny") == [
        "systemctl", "--user", "restart", "mlx-overnight-tiny.service"]
    assert systemd.disable_now("systemctl", "tiny") == [
        "systemctl", "--user", "disable", "--now", "mlx-overnight-tiny.service"]
    assert systemd.is_active("systemctl", "tiny") == [
        "systemctl", "--user", "is-active", "mlx-overnight-tiny.service"]
    assert systemd.linger_query("loginctl", "ada") == [
        "loginctl", "show-user", "ada", "-p", "Linger"]


@pytest.mark.parametrize(
    ("output", "linger"),
    [("Linger=yes\n", True), ("Linger=no\n", False), ("", None), ("Linger=maybe", None)],
)
def test_parse_linger(output: str, linger: bool | None) -> None:
    assert systemd.parse_linger(output) is linger


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / systemd.unit_name("tiny")
    unit.write_text(render())
    done = verify(unit, tmp_path)
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_awkward_paths(tmp_path: Path) -> None:
    """Spaces, quotes, %, $ and backslashes in every path: the quoting holds up."""
    odd = tmp_path / "my runs \"q\" 'x' $HOME %h \\ é"
    (odd / "bin").mkdir(parents=True)
    python = tmp_path / "py env" / "bin" / "python"  # the interpreter may contain spaces
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    unit = tmp_path / systemd.unit_name("odd")
    unit.write_text(render(
        name="odd", python=str(python), config=odd / "c.yaml", run_dir=odd / "run",
        working_directory=odd, environment={"PATH": f"{odd}/bin:/usr/bin", "Q": 'a"b\\c%d$e'},
    ))
    done = verify(unit, tmp_path)
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
    assert systemd.run_dir_of(unit.read_text()) == odd / "run"


@needs_systemd_analyze
def test_systemd_analyze_verify_is_not_vacuous(tmp_path: Path) -> None:
    """The same check fails a unit whose interpreter does not exist."""
    unit = tmp_path / systemd.unit_name("broken")
    unit.write_text(render(python=str(tmp_path / "no-such-python")))
    done = verify(unit, tmp_path)
    assert done.returncode != 0
    assert "no-such-python" in done.stdout + done.stderr
