"""What every benchmark part needs: child processes with their peak memory, the environment
with or without OpenBLAS, medians, log readers, and a description of the machine.

Each figure in results.md is either a ratio of two measurements taken side by side in the
same `benchmarks/run.py` invocation (A/B repetitions interleaved, medians reported), or a
direct measurement (seconds, MB) taken in that invocation.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
CACHE = Path(os.environ.get("MLX_OVERNIGHT_BENCH_CACHE",
                            Path.home() / ".cache" / "mlx-overnight-bench"))
OVERNIGHT = [PYTHON, "-m", "shared.cli"]
MLX_LM_TIMED = [PYTHON, "-m", "benchmarks.mlxlm_timed"]


def openblas_available() -> bool:
    return sys.platform.startswith("linux") and OPENBLAS.exists()


def child_env(openblas: bool, **extra: str) -> dict[str, str]:
    """The environment of a measured child: this checkout first on the path, no inherited
    fault injection or preload, OpenBLAS preloaded only when asked."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "OVERNIGHT_INJECT", "OVERNIGHT_RUN_ID",
                        "OVERNIGHT_PARENT_PID")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["NO_COLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if openblas and openblas_available():
        env["LD_PRELOAD"] = str(OPENBLAS)
    env["OVERNIGHT_BLAS_CHOSEN"] = "1"  # shared/blas.py: `train` keeps the BLAS chosen here
    env.update(extra)
    return env


@dataclass
class Proc:
    """A finished child process: wall time, its own peak RSS (wait4), exit status."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    output: Path

    def check(self) -> Proc:
        if self.returncode != 0:
            tail = self.output.read_text(errors="replace")[-2000:] if self.output.exists() else ""
            raise RuntimeError(f"{' '.join(self.argv[:6])} ... exited {self.returncode}:\n{tail}")
        return self


def _maxrss_mb(ru_maxrss: int) -> float:
    # Linux reports KiB, macOS bytes.
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 1024


def start(argv: Sequence[str], env: dict[str, str], output: Path,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as out:
        return subprocess.Popen(list(argv), env=env, cwd=cwd or ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)


def wait(popen: subprocess.Popen[bytes], started: float, output: Path,
         timeout: float = 900.0) -> Proc:
    """Reap the child; its peak RSS is the high-water mark of its own memory (VmHWM of
    /proc/PID/status, read every 20 ms until it exits) on Linux, wait4's ru_maxrss elsewhere.

    Not wait4 on Linux: exec() folds the RSS the process had before it (a fork or vfork of
    this benchmark: all of this process's memory) into ru_maxrss, so a child of a 500 MB
    benchmark "peaked" at 500 MB whatever it did (measured: `overnight status` 504 MB)."""
    deadline = started + timeout
    hwm_kb = 0
    status_file = Path(f"/proc/{popen.pid}/status")
    while True:
        pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
        if pid:
            break
        hwm_kb = max(hwm_kb, vm_hwm_kb(status_file))
        if time.monotonic() > deadline:
            popen.kill()
            pid, status, usage = os.wait4(popen.pid, 0)
            break
        time.sleep(0.02)
    wall = time.monotonic() - started
    popen.returncode = os.waitstatus_to_exitcode(status)
    peak = hwm_kb / 1024 if hwm_kb else _maxrss_mb(usage.ru_maxrss)
    return Proc(list(popen.args), popen.returncode, wall,  # type: ignore[arg-type]
                peak, output)


def vm_hwm_kb(status_file: Path) -> int:
    """VmHWM (kB) of a live process's current program; 0 when unreadable (not Linux, gone,
    or a zombie, whose status has no VmHWM line)."""
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run(argv: Sequence[str], env: dict[str, str], output: Path, timeout: float = 900.0,
        cwd: Path | None = None) -> Proc:
    t0 = time.monotonic()
    return wait(start(argv, env, output, cwd), t0, output, timeout)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: how noisy a set of repetitions was."""
    if len(xs) < 2:
        return 0.0
    m = median(xs)
    return (max(xs) - min(xs)) / m if m else 0.0


def noise(xs: Sequence[float]) -> float:
    """Relative run-to-run noise of repetitions: 2 x median absolute deviation / median
    (robust to one outlier; equals the spread for two repetitions)."""
    if len(xs) < 2:
        return 0.0
    m = median(xs)
    return 2 * median([abs(x - m) for x in xs]) / m if m else 0.0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def iso_to_epoch(stamp: str) -> float:
    """structlog's TimeStamper(fmt="iso", utc=True) -> seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def events(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """JSON log events (worker.jsonl / supervisor.jsonl) with `t` = epoch seconds."""
    out = []
    for e in read_jsonl(path):
        if name is not None and e.get("event") != name:
            continue
        if "timestamp" in e:
            e["t"] = iso_to_epoch(e["timestamp"])
        out.append(e)
    return out


@dataclass
class Row:
    """One line of the results table."""

    part: str
    measure: str
    ours: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""
    kind: str = ""  # which explanation in report.MISSES applies when the goal is missed


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # findings, skips, misses (markdown)
    raw: dict[str, Any] = field(default_factory=dict)  # everything measured, for results.json

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _code_version() -> str:
    """The commit measured, and whether worker/supervisor/shared files differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker", "supervisor",
                                "shared"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def machine_description() -> dict[str, Any]:
    import psutil

    def version(name: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx-lm": version("mlx-lm"),
        "openblas": str(OPENBLAS) if openblas_available() else "not found",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "code": _code_version(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
