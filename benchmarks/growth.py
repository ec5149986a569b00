"""Cost as the night grows (issue 15): `status`, `report`, `logs --since`, `logs -f` on run
directories of 10k, 100k and 1M steps, and the supervisor's RSS over 10^6 telemetry messages.

The run directories are made here, not committed: a real supervised run of the tiny model
(100 steps, a crash at step 70 and a restart: two attempts, checkpoints, evaluations) is
*stretched* to N steps. Every step number in run.json, the logs and the checkpoint names is
multiplied by k = N / 100 and every time spread k times as long; each metrics line becomes k
lines (one per step, as the worker writes them: ~400 bytes each, so 1M steps = ~400 MB);
the periodic worker events keep a realistic cadence — `progress` every 10 steps, `evaluated`
and its `phase_changed` pair every 200 (k/10 copies of each). What the commands read is
then what a real N-step night leaves, minus the checkpoint files' contents.

Each command is one child process timed as a whole (wall seconds) with its own peak RSS
(wait4): `overnight status RUN` (no supervisor: run.json and the tail of the logs),
`overnight report RUN --quiet` (report.md + report.png), `overnight logs RUN --since 1h`,
and `overnight logs RUN -f -n 20` until its first line (then SIGINT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import OVERNIGHT, child_env, run, start, wait
from benchmarks.throughput import Workload

TEMPLATE_STEPS = 100
STEP_KEYS = frozenset({"step", "best_step", "start_step", "end_step", "final_step",
                       "total_steps", "high_water_step", "iters", "first_bad_step"})
STEP_LISTS = frozenset({"checkpoints_saved"})
CKPT_NAME = re.compile(r"step-(\d{7})")
SIZES = (10_000, 100_000, 1_000_000)
GOALS = {"status": 0.5, "report": 10.0}  # seconds at 1M steps (issue 15)


@dataclasses.dataclass
class Measured:
    steps: int
    command: str
    wall_s: float
    peak_rss_mb: float
    bytes_read: int  # the run directory's log bytes


def template(w: Workload, work: Path, log: Callable[[str], None] = print) -> Path:
    """The real run to stretch: `overnight run` of the tiny model, 100 steps, a crash at 70."""
    rd = work / "growth-template"
    if (rd / "COMPLETE").exists():
        return rd
    shutil.rmtree(rd, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "growth.yaml"
    config.write_text(json.dumps({
        "model": str(w.model), "data": str(w.data), "iters": TEMPLATE_STEPS, "batch_size": 4,
        "learning_rate": 1e-3, "steps_per_report": 10, "steps_per_eval": 20,
        "save_every": 20, "val_batches": 2, "num_layers": -1,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        "supervisor": {"backoff_initial": 0.2, "sample_interval": 1.0},
    }))
    log("growth: the template run (tiny model, 100 steps, one crash) ...")
    run([*OVERNIGHT, "run", str(config), "--run-dir", str(rd)],
        child_env(True, OVERNIGHT_INJECT="crash@70"), work / "growth-template.log").check()
    return rd


def stretch(src: Path, dst: Path, steps: int) -> None:
    """`src` (a TEMPLATE_STEPS run) as a `steps`-step run in `dst` (module docstring)."""
    k = steps // TEMPLATE_STEPS
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "logs").mkdir(parents=True)
    (dst / "checkpoints").mkdir()
    record = json.loads((src / "run.json").read_text())
    t0 = _epoch(record["created"])
    remap = _Remap(t0, k, str(src), str(dst))
    ms = list(_lines(src / "logs" / "metrics.jsonl"))
    remap.step_seconds = (float(ms[-1]["time"]) - float(ms[0]["time"])) / TEMPLATE_STEPS
    (dst / "run.json").write_text(json.dumps(remap.value(record)))
    for name in ("COMPLETE", "run_id", "config.yaml"):
        if (src / name).exists():
            text = (src / name).read_text()
            (dst / name).write_text(json.dumps(remap.value(json.loads(text)))
                                    if name == "COMPLETE" else text.replace(str(src), str(dst)))
    for ckpt in sorted((src / "checkpoints").iterdir()):
        m = CKPT_NAME.fullmatch(ckpt.name)
        if m:
            shutil.copytree(ckpt, dst / "checkpoints" / f"step-{int(m.group(1)) * k:07d}")
    if (src / "adapters").is_dir():
        shutil.copytree(src / "adapters", dst / "adapters")
    with open(dst / "logs" / "metrics.jsonl", "w") as out:
        prev_t: dict[int, float] = {}
        for m in ms:
            s, t = int(m["step"]), remap.time(float(m["time"]))
            a = int(m.get("attempt", 1))
            start_t = prev_t.get(a, t - k * float(m.get("step_seconds") or 0.01))
            for j in range(k):
                line = dict(m, step=(s - 1) * k + j + 1, time=start_t + (t - start_t) * (j + 1) / k)
                out.write(json.dumps(line) + "\n")
            prev_t[a] = t
    # event -> (copies, steps between them): progress every 10 steps, evaluations every 200
    copies = {"progress": (k, 10), "evaluated": (max(1, k // 10), 200),
              "phase_changed": (max(1, k // 10), 200)}
    for name in ("worker.jsonl", "supervisor.jsonl"):
        with open(dst / "logs" / name, "w") as out:
            for e in _lines(src / "logs" / name):
                n, every = copies.get(e.get("event", ""), (1, 0)) \
                    if isinstance(e.get("step"), int) and e.get("step") else (1, 0)
                first = remap.value(e)
                for j in range(n):
                    line = dict(first)
                    if n > 1:  # spread back over the interval the template event closes
                        back = (n - 1 - j) * every
                        line["step"] = first["step"] - back
                        line["timestamp"] = _iso(_epoch(first["timestamp"])
                                                 - back * remap.step_seconds)
                    out.write(json.dumps(line) + "\n")
    for log in (src / "logs").glob("worker-*.log"):
        shutil.copy(log, dst / "logs" / log.name)


class _Remap:
    """Steps x k, times spread k times as long from the run's start, paths moved."""

    def __init__(self, t0: float, k: int, src: str, dst: str):
        self.t0, self.k, self.src, self.dst = t0, k, src, dst
        self.step_seconds = 0.01

    def time(self, t: float) -> float:
        return self.t0 + (t - self.t0) * self.k

    def value(self, v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {kk: self.value(vv, kk) for kk, vv in v.items()}
        if isinstance(v, list):
            if key in STEP_LISTS:
                return [x * self.k if isinstance(x, int) else x for x in v]
            return [self.value(x) for x in v]
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and key in STEP_KEYS:
            return v * self.k
        if isinstance(v, float) and key == "time":
            return self.time(v)
        if isinstance(v, str):
            if key in ("timestamp", "created", "ended", "updated", "started", "time"):
                with contextlib.suppress(ValueError):
                    return _iso(self.time(_epoch(v)), v)
            v = v.replace(self.src, self.dst)
            return CKPT_NAME.sub(lambda m: f"step-{int(m.group(1)) * self.k:07d}", v)
        return v


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    for raw in path.read_text().splitlines():
        if raw.strip():
            yield json.loads(raw)


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _iso(t: float, like: str = "Z") -> str:
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if like.endswith("Z") else d.isoformat(
        timespec="milliseconds")


def _log_bytes(rd: Path) -> int:
    return sum(p.stat().st_size for p in (rd / "logs").iterdir())


def measure(rd: Path, steps: int, work: Path) -> list[Measured]:
    """The four commands on one stretched run directory (module docstring)."""
    env = child_env(False)
    size = _log_bytes(rd)
    out: list[Measured] = []
    for name, args in (("status", ["status", str(rd)]),
                       ("report", ["report", str(rd), "--quiet"]),
                       ("logs --since 1h", ["logs", str(rd), "--since", "1h"])):
        p = run([*OVERNIGHT, *args], env, work / f"growth-{steps}-{name.split()[0]}.out")
        p.check()
        out.append(Measured(steps, name, round(p.wall_s, 3), round(p.peak_rss_mb, 1), size))
    output = work / f"growth-{steps}-follow.out"
    t0 = time.monotonic()
    popen = start([*OVERNIGHT, "logs", str(rd), "-f", "-n", "20"], env, output)
    while time.monotonic() - t0 < 120 and (not output.exists() or output.stat().st_size == 0):
        time.sleep(0.01)
    first = time.monotonic() - t0
    os.kill(popen.pid, signal.SIGINT)
    p = wait(popen, t0, output)
    out.append(Measured(steps, "logs -f (first line)", round(first, 3), round(p.peak_rss_mb, 1),
                        size))
    return out


def growth(w: Workload, work: Path, sizes: tuple[int, ...] = SIZES,
           log: Callable[[str], None] = print) -> list[Measured]:
    """Stretch the template to each size and measure; the directories are removed after."""
    src = template(w, work, log)
    results: list[Measured] = []
    for n in sizes:
        dst = work / f"growth-{n}"
        t0 = time.monotonic()
        stretch(src, dst, n)
        log(f"growth: {n} steps made in {time.monotonic() - t0:.0f} s "
            f"({_log_bytes(dst) / 1e6:.0f} MB of logs)")
        rows = measure(dst, n, work)
        for r in rows:
            log(f"  {r.command}: {r.wall_s} s, peak RSS {r.peak_rss_mb} MB")
        results.extend(rows)
        shutil.rmtree(dst, ignore_errors=True)
    return results
