"""The launchd agent plist and launchctl command lines (supervisor/service/launchd.py)."""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.service import launchd

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/Users/ada/venvs/mlx/bin/python"


def render(**changes: Any) -> str:
    kwargs: dict[str, Any] = {
        "name": "tiny",
        "python": PYTHON,
        "config": Path("/Users/ada/work/tiny.yaml"),
        "run_dir": Path("/Users/ada/work/runs/tiny"),
        "working_directory": Path("/Users/ada/work"),
        "environment": {"PATH": "/Users/ada/venvs/mlx/bin:/usr/bin:/bin",
                        "VIRTUAL_ENV": "/Users/ada/venvs/mlx"},
        "log_dir": Path("/Users/ada/work/runs/tiny/logs"),
        "stop_timeout": 120.0,
        "exit_timeout": 180,
    }
    kwargs.update(changes)
    return launchd.render(**kwargs)


def test_the_example_plist_at_the_top_of_the_repository_is_what_install_writes() -> None:
    """launchd/ shows readers a real agent: the one rendered for examples.SPEC."""
    from supervisor.service import examples

    path = REPO / "launchd" / "io.mlx-overnight.example.plist"
    assert path.read_text() == examples.rendered()[path], (
        "run: python -m supervisor.service.examples")
    plist = plistlib.loads(path.read_bytes())
    assert plist["Label"] == "io.mlx-overnight.example" and plist["ExitTimeOut"] == 180


def test_plist_round_trips_through_plistlib_with_every_required_key() -> None:
    plist = plistlib.loads(render().encode())
    assert plist["Label"] == "io.mlx-overnight.tiny"
    assert plist["ProgramArguments"] == [
        PYTHON, "-m", "supervisor.cli", "run", "/Users/ada/work/tiny.yaml",
        "--run-dir", "/Users/ada/work/runs/tiny",
    ]
    assert plist["WorkingDirectory"] == "/Users/ada/work"
    assert plist["EnvironmentVariables"] == {
        "PATH": "/Users/ada/venvs/mlx/bin:/usr/bin:/bin", "VIRTUAL_ENV": "/Users/ada/venvs/mlx",
    }
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # not Crashed: jetsam is an exit
    assert plist["ThrottleInterval"] == 60  # documented; launchd's own default is 10
    assert plist["ExitTimeOut"] == 180 > 120  # launchd's 20 s default is too short to save
    assert plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == "/Users/ada/work/runs/tiny/logs/service.out.log"
    assert plist["StandardErrorPath"] == "/Users/ada/work/runs/tiny/logs/service.err.log"
    for key in ("WorkingDirectory", "StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith("/")
    assert plist["ProgramArguments"][0].startswith("/")


def test_awkward_paths_and_values_survive_xml_escaping() -> None:
    odd = Path("/Users/ada/My Runs & <tests>/\"q\" 'x' $HOME %h é")
    text = render(
        python=str(odd / "bin/python"), config=odd / "c.yaml", run_dir=odd / "run",
        working_directory=odd, log_dir=odd / "run/logs",
        environment={"PATH": f"{odd}/bin:/usr/bin", "NOTE": "a<b>&c"},
    )
    plist = plistlib.loads(text.encode())
    assert plist["ProgramArguments"][0] == str(odd / "bin/python")
    assert plist["ProgramArguments"][4] == str(odd / "c.yaml")
    assert plist["WorkingDirectory"] == str(odd)
    assert plist["EnvironmentVariables"] == {"PATH": f"{odd}/bin:/usr/bin", "NOTE": "a<b>&c"}
    assert launchd.run_dir_of(text) == odd / "run"


def test_every_template_placeholder_is_filled() -> None:
    text = render()
    assert "$" not in text
    assert not re.search(r"<!--(?:(?!-->).)*--(?!>)", text, re.S), "'--' inside an XML comment"


def test_render_without_environment_still_parses() -> None:
    assert plistlib.loads(render(environment={}).encode())["EnvironmentVariables"] == {}


def test_run_dir_and_exit_timeout_are_read_back_from_an_installed_plist() -> None:
    text = render()
    assert launchd.run_dir_of(text) == Path("/Users/ada/work/runs/tiny")
    assert launchd.exit_timeout_of(text) == 180


@pytest.mark.parametrize(
    "text",
    ["", "not xml", "<plist><dict><key>a</key></dict></plist>",
     plistlib.dumps({"ProgramArguments": ["x", "--run-dir"]}).decode(),
     plistlib.dumps({"ProgramArguments": "x --run-dir y"}).decode(),
     plistlib.dumps(["not", "a", "dict"]).decode()],
)
def test_unreadable_plists_give_none(text: str) -> None:
    assert launchd.run_dir_of(text) is None
    assert launchd.exit_timeout_of(text) is None


def test_names_labels_and_paths() -> None:
    assert launchd.label("tiny") == "io.mlx-overnight.tiny"
    assert launchd.name_of("io.mlx-overnight.tiny") == "tiny"
    assert launchd.name_of("io.mlx-overnight.tiny.plist") == "tiny"
    assert launchd.name_of("io.mlx-overnight.") is None
    assert launchd.name_of("com.apple.foo.plist") is None
    assert launchd.plist_path(Path("/Users/ada"), "tiny") == Path(
        "/Users/ada/Library/LaunchAgents/io.mlx-overnight.tiny.plist"
    )


def test_launchctl_command_lines_use_the_gui_domain() -> None:
    p = Path("/Users/ada/Library/LaunchAgents/io.mlx-overnight.tiny.plist")
    assert launchd.enable("launchctl", 501, "tiny") == [
        "launchctl", "enable", "gui/501/io.mlx-overnight.tiny"]
    assert launchd.bootstrap("launchctl", 501, p) == ["launchctl", "bootstrap", "gui/501", str(p)]
    assert launchd.kickstart("launchctl", 501, "tiny") == [
        "launchctl", "kickstart", "gui/501/io.mlx-overnight.tiny"]
    assert launchd.bootout("launchctl", 501, "tiny") == [
        "launchctl", "bootout", "gui/501/io.mlx-overnight.tiny"]
    assert launchd.print_service("launchctl", 501, "tiny") == [
        "launchctl", "print", "gui/501/io.mlx-overnight.tiny"]


def test_parse_state_reads_the_state_line_of_launchctl_print() -> None:
    out = "gui/501/io.mlx-overnight.tiny = {\n\tactive count = 1\n\tstate = running\n}\n"
    assert launchd.parse_state(out) == "running"
    assert launchd.parse_state("\tstate = not running\n") == "not running"
    assert launchd.parse_state("") == "loaded"


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="plutil exists only on macOS")
def test_plutil_lint_accepts_the_plist(tmp_path: Path) -> None:
    plutil = shutil.which("plutil")
    assert plutil is not None
    path = tmp_path / "io.mlx-overnight.tiny.plist"
    path.write_text(render())
    done = subprocess.run([plutil, "-lint", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
