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
(wait4; "flat": the largest size's within FLAT_MB of the smallest's): `overnight status
RUN` (no supervisor: run.json and the tail of the logs),
`overnight report RUN --quiet` (report.md + report.png), `overnight logs RUN --since T` (T:
an hour before the last step),
and `overnight logs RUN -f -n 20` until its first line (then SIGTERM).

`supervisor_rss`: `overnight run` of the scripted fake worker (tests/fake_worker.py: the real
protocol and telemetry sender, no model) for 10^6 steps as fast as it can send them — one
StepMetrics message and one metrics.jsonl line a step — with the supervisor's RSS sampled
(psutil) as the steps go by: flat means the supervisor keeps nothing per message.
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
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.common import OVERNIGHT, ROOT, Results, child_env, run, start, vm_hwm_kb, wait
from benchmarks.throughput import Workload

TEMPLATE_STEPS = 100
STEP_KEYS = frozenset({"step", "best_step", "start_step", "end_step", "final_step",
                       "total_steps", "high_water_step", "iters", "first_bad_step"})
STEP_LISTS = frozenset({"checkpoints_saved"})
CKPT_NAME = re.compile(r"step-(\d{7})")
SIZES = (10_000, 100_000, 1_000_000)
GOALS = {"status": 0.5, "report": 10.0}  # seconds at 1M steps (issue 15)
FLAT_MB = 5.0  # "memory flat": peak RSS at the largest size within this of the smallest


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
    ms = list(_lines(src / "logs" / "metrics.jsonl"))
    t_end = _epoch(record["ended"]) if record.get("ended") else float(ms[-1]["time"])
    # the stretched night ends a minute ago (gaps between processes stretch too)
    remap = _Remap(t0, k, str(src), str(dst), start=time.time() - 60 - k * (t_end - t0))
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
    """Steps x k, times spread k times as long from the run's start (moved to `start`),
    paths moved."""

    def __init__(self, t0: float, k: int, src: str, dst: str, start: float):
        self.t0, self.k, self.src, self.dst, self.start = t0, k, src, dst, start
        self.step_seconds = 0.01

    def time(self, t: float) -> float:
        return self.start + (t - self.t0) * self.k

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
    last = json.loads((rd / "logs" / "metrics.jsonl").read_bytes()[-2000:].splitlines()[-1])
    hour_before = dt.datetime.fromtimestamp(last["time"] - 3600, dt.timezone.utc).isoformat()
    for name, args in (("status", ["status", str(rd)]),
                       ("report", ["report", str(rd), "--quiet"]),
                       ("logs --since (last hour)", ["logs", str(rd), "--since", hour_before])):
        p = run([*OVERNIGHT, *args], env, work / f"growth-{steps}-{name.split()[0]}.out")
        p.check()
        out.append(Measured(steps, name, round(p.wall_s, 3), round(p.peak_rss_mb, 1), size))
    output = work / f"growth-{steps}-follow.out"
    t0 = time.monotonic()
    popen = start([*OVERNIGHT, "logs", str(rd), "-f", "-n", "20"], env, output)
    while time.monotonic() - t0 < 120 and (not output.exists() or output.stat().st_size == 0):
        time.sleep(0.01)
    first = time.monotonic() - t0
    time.sleep(0.2)  # following now: its memory is what it keeps while it follows
    hwm_kb = vm_hwm_kb(Path(f"/proc/{popen.pid}/status"))  # before it is gone
    os.kill(popen.pid, signal.SIGTERM)  # (SIGINT is ignored in a background job)
    p = wait(popen, t0, output)
    peak = hwm_kb / 1024 if hwm_kb else p.peak_rss_mb
    out.append(Measured(steps, "logs -f (first line)", round(first, 3), round(peak, 1), size))
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


def supervisor_rss(work: Path, steps: int = 1_000_000, log: Callable[[str], None] = print,
                   ) -> list[tuple[int, float]]:
    """(steps done, supervisor RSS MB) sampled every ~2 s over a `steps`-step fake run
    (module docstring); the run directory is removed after."""
    rd, data = work / "rss-run", work / "rss-data"
    shutil.rmtree(rd, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    config = work / "rss.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(work / "no-model"), "data": str(data), "iters": steps,
        "save_every": steps // 4, "steps_per_eval": steps // 4, "steps_per_report": 1000,
        "batch_size": 4,
        "supervisor": {"worker_command": [sys.executable, str(ROOT / "tests" / "fake_worker.py")],
                       "heartbeat_timeout": 30.0, "stall_timeout": 60.0,
                       "sample_interval": 5.0}}))
    env = child_env(False, FAKE_STEP_SECONDS="0", FAKE_LOAD_SECONDS="0")
    output = work / "rss-run.log"
    t0 = time.monotonic()
    popen = start([*OVERNIGHT, "run", str(config), "--run-dir", str(rd)], env, output)
    proc = psutil.Process(popen.pid)
    samples: list[tuple[int, float]] = []
    metrics = rd / "logs" / "metrics.jsonl"
    while popen.poll() is None:
        time.sleep(2.0)
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.Error:
            break
        done = metrics.stat().st_size if metrics.exists() else 0
        if rss > 0:  # 0: a process that has ended
            samples.append((done, round(rss, 1)))
    wall = time.monotonic() - t0
    if popen.returncode != 0:
        raise RuntimeError(f"the fake run exited {popen.returncode}: see {output}")
    line_bytes = metrics.stat().st_size / steps if metrics.exists() else 1.0
    out = [(int(b / line_bytes), mb) for b, mb in samples]
    log(f"supervisor RSS over {steps} telemetry messages ({wall:.0f} s): "
        + ", ".join(f"{n}: {mb} MB" for n, mb in out[:: max(1, len(out) // 8)]))
    shutil.rmtree(rd, ignore_errors=True)
    return out


def rows(res: Results, measured: list[Measured], rss: list[tuple[int, float]]) -> None:
    """The growth table's rows: each command at each size (wall s, peak RSS), the goals of
    issue 15 at the largest size, and the supervisor's RSS at the start and end of its run."""
    largest = max((m.steps for m in measured), default=0)
    for m in measured:
        goal = GOALS.get(m.command) if m.steps == largest == 1_000_000 else None
        res.add("7 growth", f"`{m.command}` at {m.steps:,} steps ({m.bytes_read / 1e6:.0f} MB "
                "of logs)", f"{m.wall_s:.2f} s", "", "",
                f"< {goal:g} s" if goal else "", (m.wall_s < goal) if goal else None,
                f"peak RSS {m.peak_rss_mb:.0f} MB", kind="growth")
    for command in dict.fromkeys(m.command for m in measured):  # memory flat as it grows
        by_size = sorted((m.steps, m.peak_rss_mb) for m in measured if m.command == command)
        if len(by_size) > 1 and not command.startswith("logs -f"):
            (n0, first), (n1, last) = by_size[0], by_size[-1]
            res.add("7 growth", f"`{command}` peak RSS, {n0:,} -> {n1:,} steps",
                    f"{first:.0f} -> {last:.0f} MB", "", "",
                    f"flat (within {FLAT_MB:g} MB)", last <= first + FLAT_MB,
                    ", ".join(f"{mb:.0f} MB at {n:,}" for n, mb in by_size))
    if rss:
        (n0, first), (n1, last) = rss[0], rss[-1]
        peak = max(mb for _, mb in rss)
        res.add("7 growth", f"supervisor RSS over {n1:,} telemetry messages",
                f"{first:.0f} MB at {n0:,} -> {last:.0f} MB at {n1:,}", "", "",
                "flat (end < start + 10 %)", last <= first * 1.10,
                f"highest sample {peak:.0f} MB (a transient: it came back down)"
                if peak > last * 1.10 else f"highest sample {peak:.0f} MB")
    res.raw["growth"] = {"commands": [dataclasses.asdict(m) for m in measured], "rss": rss}
