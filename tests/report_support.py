"""One real supervised run of the tiny model with an injected crash and hang, shared by the
log and report tests (built once per test session, ~15 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import overnight, write_config

FAST = {
    "heartbeat_timeout": 3.0, "startup_timeout": 90.0, "stall_timeout": 60.0,
    "stop_timeout": 10.0, "backoff_initial": 0.2, "backoff_max": 1.0, "sample_interval": 1.0,
    "caffeinate": False,
}
ITERS, CRASH_AT, HANG_AT = 60, 25, 45
# Small log files: both processes' logs rotate during the run (nothing is lost: 20 backups).
LOGGING = {"max_bytes": 6000, "backups": 20}

_runs: dict[str, Path] = {}


def supervised_run(factory: pytest.TempPathFactory, model: Path, corpus: Path) -> Path:
    """RUN_DIR of a finished `overnight run` (3 attempts: crash, hang, completed); the
    training data has one malformed line."""
    if "supervised" not in _runs:
        base = factory.mktemp("supervised")
        data = base / "data"
        shutil.copytree(corpus, data)
        with open(data / "train.jsonl", "a") as f:
            f.write('{"text": "cut off\n')
        config = write_config(base / "night.yaml", model, data, iters=ITERS,
                              debug={"inject": f"crash@{CRASH_AT},hang@{HANG_AT}"},
                              supervisor=FAST, logging=LOGGING)
        run = base / "run"
        done = overnight("run", str(config), "--run-dir", str(run), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        _runs["supervised"] = run
    return _runs["supervised"]


def copy_run(run: Path, dest: Path) -> Path:
    """A copy to change (truncate a log, remove run.json) without touching the shared run."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("sock"))
    return dest
