"""Part 2b: the supervisor's CPU at a steady > 100 steps/s, whatever else the machine does.

    python -m benchmarks.supervisor_cpu [--before TREE] [--rate 150] [--seconds 20] [--reps 3]

`overnight run` (the real supervisor, default settings: sample_interval 5 s) watching the
scripted worker of tests/fake_worker.py, which speaks through the real worker's telemetry
sender (worker/telemetry.py: a heartbeat a second, the steps of each 50 ms flush as one
metrics_batch) and sleeps instead of training, FAKE_STEP_SECONDS = 1/rate a step — so the
step rate does not depend on how busy the 2 shared cores are, as the tiny model's does
(benchmarks/supervision.py: 144 steps/s on a quiet machine, 40-54 at load 4-7).

The supervisor's CPU is its own (user + system, all its threads: ZeroMQ's I/O thread
included) from psutil's `cpu_times`, sampled every 0.1 s; the timed window runs from the
first sample after the 2nd second of steps to the last before the steps end (a ~20 s window:
the 10 ms resolution of /proc's CPU times is 0.05% of it), CPU seconds / wall seconds =
fraction of a core. `--before TREE` runs another checkout's supervisor (and its fake worker)
alternately with this one on the same workload: before/after in one invocation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, child_env, read_jsonl, start, wait
from benchmarks.supervision import ProcessSampler


def run_once(tree: Path, work: Path, tag: str, rate: float, seconds: float) -> dict[str, Any]:
    """One supervised fake run of (2 + seconds + 1) x rate steps with `tree`'s code; the
    supervisor's CPU fraction over the steady window and the step rate in it."""
    rd, data = work / f"run-{tag}", work / "data"
    shutil.rmtree(rd, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    steps = int(rate * (seconds + 3))
    config = work / f"paced-{tag}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(work / "no-model"), "data": str(data), "iters": steps,
        "save_every": 10**6, "steps_per_eval": 10**6, "steps_per_report": 10**6,
        "batch_size": 4,
        "supervisor": {"worker_command": [sys.executable, str(tree / "tests" / "fake_worker.py")],
                       "openblas": "false"}}))
    env = child_env(False, FAKE_STEP_SECONDS=f"{1 / rate:.6f}", FAKE_LOAD_SECONDS="0",
                    FAKE_HEARTBEAT="1.0")
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    output = work / f"paced-{tag}.log"
    t0 = time.monotonic()
    popen = start([sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir", str(rd)],
                  env, output, cwd=tree)
    sampler = ProcessSampler(popen.pid)
    wait(popen, t0, output).check()
    sampler.stop()
    metrics = read_jsonl(rd / "logs" / "metrics.jsonl")
    first, last = metrics[int(2 * rate)]["time"], metrics[-1]["time"] - 0.5
    _, cpu = sampler.between(first, last)
    inside = [m for m in metrics if first <= m["time"] <= last]
    return {"tree": str(tree), "cpu_fraction": cpu,
            "steps_per_s": len(inside) / (last - first), "window_s": last - first}


def paced(trees: dict[str, Path], work: Path, rate: float = 150.0, seconds: float = 20.0,
          reps: int = 3, log: Any = print) -> dict[str, Any]:
    """{name: {"cpu": [fractions], "steps_per_s": [...], "median_cpu": f}, "load": [...]}
    for each tree, the trees run alternately (the order flipped every repetition)."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {name: {"cpu": [], "steps_per_s": []} for name in trees}
    out["load"] = [round(os.getloadavg()[0], 2)]
    names = list(trees)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            one = run_once(trees[name], work, f"{name}-{r}", rate, seconds)
            out[name]["cpu"].append(one["cpu_fraction"])
            out[name]["steps_per_s"].append(one["steps_per_s"])
            log(f"  supervisor CPU, {name} rep {r + 1}/{reps}: {one['cpu_fraction'] * 100:.2f}% "
                f"of a core at {one['steps_per_s']:.0f} steps/s over {one['window_s']:.0f} s")
    out["load"].append(round(os.getloadavg()[0], 2))
    for name in names:
        out[name]["median_cpu"] = statistics.median(out[name]["cpu"])
        out[name]["median_steps_per_s"] = statistics.median(out[name]["steps_per_s"])
    return out


def rows(res: Any, r: dict[str, Any]) -> None:
    after = r["after"]
    before = r.get("before")
    cpu = after["median_cpu"]
    res.add("2 supervision", f"paced fake worker at {after['median_steps_per_s']:.0f} steps/s: "
            "supervisor CPU while watching", f"{cpu * 100:.2f}% of a core",
            f"{before['median_cpu'] * 100:.2f}% before" if before else "",
            f"{before['median_cpu'] / cpu:.1f}x" if before else "", "< 1%", cpu < 0.01,
            f"runs {', '.join(f'{c * 100:.2f}' for c in after['cpu'])}%; default settings, "
            f"real telemetry sender; load average {r['load'][0]} -> {r['load'][1]}")
    res.raw["supervisor_cpu_paced"] = r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="another checkout to run alternately")
    ap.add_argument("--rate", type=float, default=150.0, help="steps per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed window, seconds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/overnight-supervisor-cpu"))
    a = ap.parse_args()
    trees = {"after": ROOT}
    if a.before is not None:
        trees = {"before": a.before.resolve(), **trees}
    r = paced(trees, a.work, a.rate, a.seconds, a.reps)
    for name in trees:
        print(f"{name}: median {r[name]['median_cpu'] * 100:.2f}% of a core at "
              f"{r[name]['median_steps_per_s']:.0f} steps/s (runs: "
              + ", ".join(f"{c * 100:.2f}%" for c in r[name]["cpu"]) + ")")
    print(f"load average {r['load'][0]} -> {r['load'][1]}; CPU of this machine: "
          f"{psutil.cpu_count()} cores")


if __name__ == "__main__":
    main()
