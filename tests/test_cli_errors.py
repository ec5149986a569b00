"""shared/cli.py's outermost boundary (run as `python -m supervisor.cli`), with real
processes: a run directory that cannot be created is one line and exit 78 (train, run,
install); output to a closed pipe ends a command quietly (exit 141, no BrokenPipeError
traceback) whatever the command."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import RunDirError
from shared.layout import RunDir, creation_problem
from tests.conftest import subprocess_env
from tests.conftest import write_config as write_real_config
from tests.supervisor_support import ROOT, record, start_daemon, wait_for, write_config

BAD_CONFIG = 78
BROKEN_PIPE = 141  # 128 + SIGPIPE (13): what a shell reports for `yes | head -1`
FAKE_SYSTEMCTL = """#!{python} -I
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def cli(*argv: str, env: dict[str, str] | None = None, **kw: object
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *argv], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env=env or subprocess_env(), **kw,  # type: ignore[arg-type]
    )


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- a run directory that cannot be created ------------------------------------------------


@pytest.fixture
def blocked(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Run directories mkdir refuses: (path, what the line must say)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    return {
        "parent is a file": (a_file / "run", f"{a_file} is a file, not a directory"),
        "run dir is a file": (a_file, f"{a_file} is a file, not a directory"),
        # sysfs refuses new directories, even to root: a real OS refusal without a mount
        "sysfs refuses": (Path("/sys/overnight-test/run"),
                          "Operation not permitted (/sys/overnight-test)"),
    }


@pytest.mark.parametrize("case", ["parent is a file", "run dir is a file", "sysfs refuses"])
def test_train_and_run_with_a_run_dir_that_cannot_be_created(tmp_path, blocked, case):
    run_dir, why = blocked[case]
    config = write_config(tmp_path)
    for command in ("train", "run"):
        done = cli(command, str(config), "--run-dir", str(run_dir))
        assert done.returncode == BAD_CONFIG, done.stderr
        assert one_line(done.stderr) == (
            f"overnight {command}: {run_dir}: cannot create the run directory: {why}")


@pytest.mark.parametrize("case", ["parent is a file", "run dir is a file"])
def test_install_with_a_run_dir_that_cannot_be_created_starts_nothing(tmp_path, blocked,
                                                                      case):
    run_dir, why = blocked[case]
    home = tmp_path / "home"
    home.mkdir()
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL.format(python=sys.executable))
    systemctl.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = subprocess_env(HOME=str(home), FAKE_LOG=str(log), OVERNIGHT_SYSTEMCTL=str(systemctl),
                         OVERNIGHT_LOGINCTL=str(systemctl))
    config = write_config(tmp_path)
    for extra in ([], ["--dry-run"]):
        done = cli("install", str(config), "--run-dir", str(run_dir), "--platform", "systemd",
                   *extra, env=env)
        assert done.returncode == BAD_CONFIG, done.stderr
        assert one_line(done.stderr) == (
            f"overnight install: {run_dir}: cannot create the run directory: {why}")
        assert done.stdout == ""
    assert not log.exists()  # no systemctl call
    assert not (home / ".config" / "systemd").exists()  # no unit written


def test_demo_with_a_directory_that_cannot_be_created(tmp_path, blocked):
    run_dir, why = blocked["parent is a file"]
    done = cli("demo", "--keep", str(run_dir))
    assert done.returncode == BAD_CONFIG
    assert one_line(done.stderr) == (
        f"overnight demo: {run_dir}: cannot create the demo directory: {why}")
    done = cli("demo", "--keep", str(tmp_path / "demo"), "--run-dir", str(run_dir))
    assert done.returncode == BAD_CONFIG
    assert one_line(done.stderr) == (
        f"overnight demo: {run_dir}: cannot create the run directory: {why}")


def test_the_os_reason_is_in_the_line(tmp_path, monkeypatch):
    """Read-only file system and permission denied (not reproducible as root without a
    mount): the errno's text and the path mkdir names."""
    run = RunDir(tmp_path / "ro" / "run")

    def refuse(self: Path, *a: object, **k: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(RunDirError) as e:
        run.create()
    assert str(e.value) == (f"{run.root}: cannot create the run directory: "
                            f"Read-only file system ({run.root})")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_directory_without_write_permission(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert creation_problem(parent / "run") == (
            f"{parent / 'run'}: cannot create the run directory: {parent} is not writable "
            "by this user")
        done = cli("train", str(write_config(tmp_path)), "--run-dir", str(parent / "run"))
        assert done.returncode == BAD_CONFIG
        assert "Permission denied" in one_line(done.stderr)
    finally:
        parent.chmod(0o700)


def test_creation_problem_says_nothing_for_a_good_directory(tmp_path):
    assert creation_problem(tmp_path / "new" / "run") is None
    (tmp_path / "f").write_text("")
    assert creation_problem(tmp_path / "f" / "run") == (
        f"{tmp_path / 'f' / 'run'}: cannot create the run directory: {tmp_path / 'f'} is a "
        "file, not a directory")


# ---- output to a closed pipe ---------------------------------------------------------------


def to_closed_pipe(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run with stdout on a pipe whose reader has already gone (`| head -1` after one line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.cli", *argv], cwd=ROOT, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=timeout, env=subprocess_env(),
        )
    finally:
        os.close(write_end)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    run_dir = tmp / "run"
    sup = start_daemon(write_config(tmp, iters=30), run_dir)
    assert sup.wait(60) == 0
    assert record(run_dir)["state"] == "finished"
    return run_dir


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["logs"], ["logs", "--json"], ["report"],
    ["checkpoints"], ["checkpoints", "--json"],
])
def test_every_command_to_a_closed_pipe_ends_quietly(finished_run, argv):
    done = to_closed_pipe(*argv, str(finished_run))
    assert done.stderr.count("\n") <= 1 and "Error" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert done.returncode == BROKEN_PIPE, done.stderr


def test_status_of_a_live_supervisor_to_a_closed_pipe(tmp_path):
    """The issue's case: `overnight status RUN | head -1` while a supervisor runs."""
    config = write_config(tmp_path, iters=400, save_every=1000)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, {"FAKE_STEP_SECONDS": "0.05"})
    try:
        wait_for(lambda: (run_dir / "run.json").exists()
                 and record(run_dir)["state"] == "training")
        done = to_closed_pipe("status", str(run_dir))
        assert done.stderr == "" and done.returncode == BROKEN_PIPE
        # and on a pipe that is read, the same command prints the live state
        done = cli("status", str(run_dir), "--json")
        assert json.loads(done.stdout)["live"] is True
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(30)


def test_train_whose_progress_line_reader_has_gone(tmp_path, tiny_model, corpus):
    """`overnight train CONFIG | head -1`: the worker ends as the pipe's signal would end it,
    with a log event and no crash traceback."""
    config = write_real_config(tmp_path / "c.yaml", tiny_model, corpus, iters=40,
                               steps_per_report=2)
    run_dir = tmp_path / "run"
    done = to_closed_pipe("train", str(config), "--run-dir", str(run_dir), timeout=180)
    assert done.returncode == BROKEN_PIPE, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "worker_crashed" not in done.stderr
    logged = [json.loads(line) for line in (run_dir / "logs" / "worker.jsonl").open()]
    closed = [e for e in logged if e["event"] == "output_closed"]
    assert len(closed) == 1 and closed[0]["step"] == 2


@pytest.mark.parametrize("command", ["run", "status", "queue list"])
def test_an_unknown_option_names_the_command_and_its_help(tmp_path, command):
    """`overnight run x.yaml --iters 5` (a train flag): the subcommand's own name and help,
    not the top-level parser's."""
    args = command.split() if " " in command else [command, str(tmp_path / "x.yaml")]
    done = cli(*args, "--iters", "5")
    assert done.returncode == BAD_CONFIG
    assert done.stderr.splitlines() == [
        f"overnight {command}: unrecognized arguments: --iters 5 "
        f"(see overnight {command} --help)"]


# ---- a RUN_DIR that is not a run ---------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "report", "logs", "checkpoints"])
def test_every_reading_command_refuses_a_directory_that_is_not_a_run(tmp_path, command):
    """One line, exit 78, the same words from each (checkpoints said "no checkpoints in
    DIR/checkpoints" and exited 0, as if the run had simply saved none yet)."""
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("a directory, but nothing a run leaves\n")
    done = cli(command, str(empty))
    assert done.returncode == BAD_CONFIG, done.stdout + done.stderr
    assert one_line(done.stderr) == (
        f"overnight {command}: {empty}: not a run directory (expected run.json, logs/ or "
        "checkpoints/ in it)")
    assert done.stdout == ""
