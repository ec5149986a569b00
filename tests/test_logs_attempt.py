"""`overnight logs --attempt N` for an attempt the run does not have: one line and exit 78
(it used to print nothing, exit 0, as if the attempt had been silent)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import overnight, subprocess_env

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-11"  # 3 attempts


def test_an_attempt_the_run_does_not_have_is_one_line(tmp_path):
    run = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    for n in ("99", "0"):
        done = overnight("logs", str(run), "--attempt", n, env=subprocess_env(TZ="UTC"))
        assert done.returncode == 78, done.stderr
        assert done.stderr.splitlines() == [
            f"overnight logs: --attempt {n}: {run} has attempts 1 to 3"]
        assert done.stdout == ""
    done = overnight("logs", str(run), "--attempt", "2", env=subprocess_env(TZ="UTC"))
    assert done.returncode == 0 and done.stdout
