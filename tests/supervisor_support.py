"""Helpers for the supervisor tests: configs for the fake worker, running the daemon."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().parent / "fake_worker.py"

FAST = {
    "heartbeat_timeout": 1.5, "startup_timeout": 3.0, "stall_timeout": 60.0,
    "stop_timeout": 3.0, "backoff_initial": 0.1, "backoff_max": 0.5, "sample_interval": 0.3,
    "caffeinate": False, "openblas": "false",
}


def write_config(tmp: Path, *, inject: str = "", iters: int = 40, fake: bool = True,
                 supervisor: dict[str, Any] | None = None, **top: Any) -> Path:
    """A config for the fake worker (fast timeouts) in tmp/; returns its path."""
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {
        "model": str(tmp / "model"), "data": str(data), "iters": iters, "save_every": 10,
        "steps_per_eval": 20, "batch_size": 4, "grad_accumulation_steps": 1,
        "debug": {"inject": inject},
        "supervisor": {**FAST, "worker_command": [sys.executable, str(FAKE)] if fake else [],
                       **(supervisor or {})},
    }
    cfg.update(top)
    path = tmp / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_inprocess(config: Path, run_dir: Path) -> int:
    """The `run` command in this process (signals work: pytest runs on the main thread)."""
    from supervisor.daemon import main as daemon

    args = argparse.Namespace(config=config, run_dir=run_dir, log_level="info")
    return daemon.main(args)


def start_daemon(config: Path, run_dir: Path, env: dict[str, str] | None = None,
                 ) -> subprocess.Popen[bytes]:
    """The `run` command as a separate process (to kill it or signal it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.daemon", str(config), "--run-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
    )


def record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text())


def events(run_dir: Path, name: str | None = None) -> list[dict[str, Any]]:
    lines = (run_dir / "logs" / "supervisor.jsonl").read_text().splitlines()
    evs = [json.loads(line) for line in lines if line.strip()]
    return [e for e in evs if name is None or e["event"] == name]


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


def worker_intervals(run_dir: Path) -> list[tuple[int, float, float]]:
    """(pid, start, end) of every fake worker process, from RUN_DIR/fake.log."""
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for line in (run_dir / "fake.log").read_text().splitlines():
        kind, pid, t = line.split()[:3]
        if kind in ("start", "end"):
            (starts if kind == "start" else ends)[int(pid)] = float(t)
    return [(pid, t, ends.get(pid, float("inf"))) for pid, t in starts.items()]
