"""Watching a run from outside, as a user could: run.json, the JSON-lines logs, processes.

Nothing here talks to the supervisor; everything is read from the run directory
(shared/layout.py) while other processes write it, so a line being written (cut off) is
kept for the next read, and a run.json being replaced is read again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil


class JsonlTail:
    """New complete JSON lines of a growing file, each read once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self.partial + chunk
        *complete, self.partial = data.split(b"\n")
        new = []
        for raw in complete:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut by a killed writer
            if isinstance(obj, dict):
                new.append(obj)
        self.lines.extend(new)
        return new


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    tail = JsonlTail(path)
    tail.poll()
    return tail.lines


def epoch(iso: str | None) -> float | None:
    """ISO 8601 (run.json, structlog's `timestamp`) → seconds since the epoch."""
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Observer:
    """The run directory's live state: the record, steps, worker phases."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics = JsonlTail(run_dir / "logs" / "metrics.jsonl")
        self.worker_log = JsonlTail(run_dir / "logs" / "worker.jsonl")
        self.last_metric: dict[str, Any] | None = None
        self.phases: dict[int, list[str]] = {}  # worker pid -> phases logged, in order
        self.loading_order: list[int] = []  # pids in the order they logged "loading"

    def poll(self) -> None:
        new = self.metrics.poll()
        if new:
            self.last_metric = new[-1]
        for e in self.worker_log.poll():
            if e.get("event") == "phase_changed" and isinstance(e.get("pid"), int):
                self.phases.setdefault(e["pid"], []).append(str(e.get("phase")))
                if e.get("phase") == "loading":
                    self.loading_order.append(e["pid"])

    def record(self) -> dict[str, Any] | None:
        for _ in range(5):
            try:
                return dict(json.loads((self.run_dir / "run.json").read_text()))
            except FileNotFoundError:
                return None
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                time.sleep(0.01)  # being replaced (atomic rename: rare) or a full disk
        return None

    def worker(self) -> tuple[int, int] | None:
        """(pid, attempt) of the worker the record names, if it is alive."""
        rec = self.record()
        w = rec.get("worker") if rec else None
        if not w or not alive(int(w["pid"])):
            return None
        return int(w["pid"]), int(w["attempt"])

    def training_step(self, at_least: int = 0) -> tuple[int, int, int] | None:
        """(pid, attempt, step) once the record's live worker reports a step >= at_least
        (cheap while the newest step is below it: run.json is read only then)."""
        self.poll()
        m = self.last_metric
        if m is None or int(m["step"]) < at_least:
            return None
        w = self.worker()
        if w is None or m.get("attempt") != w[1]:
            return None
        return w[0], w[1], int(m["step"])

    def step(self) -> int:
        self.poll()
        return int(self.last_metric["step"]) if self.last_metric else 0


def alive(pid: int) -> bool:
    """Running or stopped (not a zombie, not gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def freeze(pid: int, timeout: float = 5.0) -> bool:
    """SIGSTOP `pid` and wait until it is stopped (a signal is delivered when the process
    next runs: kill() returns before that). False: it did not stop within `timeout` s."""
    kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_STOPPED
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return True  # gone: nothing of it runs either
    return bool(wait_until(stopped, timeout, 0.001))


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names this run directory (supervisors, workers)."""
    found = []
    needle = str(run_dir)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid != os.getpid() and any(needle == c for c in cmd):
            found.append(p)
    return found


def workers_of(run_dir: Path) -> list[int]:
    """Live worker processes (`… worker train …`) of this run directory."""
    out = []
    for p in run_processes(run_dir):
        try:
            cmd = p.cmdline()
            if "train" in cmd and "worker" in cmd and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """The predicate's first truthy value, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_dead(pid: int | None, timeout: float = 10.0) -> float | None:
    """Seconds until `pid` is gone (or a zombie), None if it still lives after `timeout`."""
    if pid is None:
        return 0.0
    t0 = time.monotonic()
    if wait_until(lambda: not alive(pid), timeout, 0.005):
        return time.monotonic() - t0
    return None
