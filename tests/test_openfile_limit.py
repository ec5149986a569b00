"""A hard open-file limit below 4096 (shared/openfile_limit.py, issue 12): mlx_lm's import
raises the limit to 4096 and fails without the privilege to; every worker would die the same
way at start. Said in one line, and given up on with that reason, never restarted."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env, write_config
from tests.supervisor_support import ROOT, record

HARD = 1024


def limited() -> None:
    """preexec_fn: the child runs with soft = hard = 1024 open files."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (HARD, HARD))


def run_limited(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(),
                          preexec_fn=limited, capture_output=True, text=True, timeout=180,
                          check=False)


@pytest.fixture(autouse=True)
def _unprivileged() -> None:
    """With CAP_SYS_RESOURCE the limit can be raised and mlx_lm works: nothing to test."""
    probe = run_limited("-c", "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, "
                              "(1024, 4096))")
    if probe.returncode == 0:
        pytest.skip("this process may raise its hard open-file limit (privileged)")


def test_the_supervisor_refuses_to_start_in_one_line(tmp_path, tiny_model, corpus):
    config = write_config(tmp_path / "lim.yaml", tiny_model, corpus)
    run_dir = tmp_path / "run"
    done = run_limited("-m", "shared.cli", "run", str(config), "--run-dir", str(run_dir))
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"overnight run: cannot run: the hard open-file limit is {HARD} "
                               "(ulimit -Hn), below the 4096 mlx_lm sets"), lines[0]
    assert "`ulimit -Hn 4096`" in lines[0] and "LimitNOFILE=4096" in lines[0]
    assert not run_dir.exists()  # nothing was started or written


def test_the_worker_alone_exits_system_limit_with_one_line(tmp_path, tiny_model, corpus):
    bare = run_limited("-c", "import mlx_lm")  # the fault as it is: inside mlx_lm's import
    assert bare.stderr.strip().splitlines()[-1] == \
        "ValueError: not allowed to raise maximum limit"
    config = write_config(tmp_path / "lim.yaml", tiny_model, corpus)
    done = run_limited("-m", "shared.cli", "train", str(config), "--run-dir",
                       str(tmp_path / "run"))
    assert done.returncode == 71  # ExitCode.SYSTEM_LIMIT (EX_OSERR)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"overnight train: the hard open-file limit is {HARD} (ulimit -Hn)")


def test_a_supervised_worker_under_the_limit_is_given_up_on_at_once(tmp_path, tiny_model,
                                                                    corpus):
    """Only the worker is limited (a wrapper lowers it): the supervisor gives up after the
    first attempt, with the worker's reason, instead of restarting into the same wall."""
    wrapper = [sys.executable, "-c",
               "import os, resource, sys; "
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({HARD}, {HARD})); "
               "os.execv(sys.executable, [sys.executable, '-m', 'worker', *sys.argv[1:]])"]
    config = write_config(tmp_path / "lim.yaml", tiny_model, corpus,
                          supervisor={"worker_command": wrapper, "caffeinate": False,
                                      "backoff_initial": 0.1, "backoff_max": 0.2})
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir",
                           str(run_dir)], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = record(run_dir)
    assert rec["state"] == "gave_up"
    assert [(a["classification"], a["exit_code"]) for a in rec["attempts"]] == [
        ("system_limit", 71)]
    assert rec["reason"].startswith(f"system limit: the hard open-file limit is {HARD}")
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"overnight run: gave_up: system limit: the hard open-file limit is {HARD}")
