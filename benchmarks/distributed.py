"""A data-parallel group of 2 ranks on this machine (ring backend on localhost): its step time
against one process with the same global batch, and how fast each fault of a rank is noticed.

    python benchmarks/distributed.py              # ~2-3 min on 2 cores; writes distributed.md/.json
    python benchmarks/distributed.py --out /tmp/d.md

- **Step time**: the tiny model, `batch_size` 8 (global), 60 steps; `overnight train` (one
  process) and `overnight run` with `distributed.processes: 2`, interleaved, `reps` each;
  the median of `step_seconds` in logs/metrics.jsonl over steps 11..60 (compiled shapes),
  then the median over the runs. On one 2-core machine the two ranks share the cores that
  one process uses alone, so this measures the group's overhead (the all_sum of one packed
  gradient vector per step, the agreed stop flags), not a speed-up; on two Macs each rank
  has its own.
- **Detection**: one supervised 2-rank run (heartbeat_timeout 3 s): SIGKILL of rank 1 ->
  the supervisor's `worker_exited`; SIGSTOP of rank 1 -> `worker_unhealthy` (hang); an
  injected abort of rank 1 (`crash`: exits by SIGABRT, OVERNIGHT_INJECT_RANK=1) ->
  `worker_exited` (from its last output line); and, as root with network namespaces, a link
  pulled between the ranks -> `worker_unhealthy` (stall, stall_timeout 5 s) is measured by
  tests/test_distributed_netns.py and quoted from there. Times are from the signal (this
  process's clock) to the event's timestamp in supervisor.jsonl (the same clock).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fixtures
from benchmarks.common import child_env, events, machine_description, median, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
FAST = {"heartbeat_timeout": 3.0, "startup_timeout": 60.0, "stall_timeout": 5.0,
        "stop_timeout": 4.0, "backoff_initial": 0.2, "backoff_max": 1.0,
        "sample_interval": 1.0, "caffeinate": False}


def config(path: Path, model: Path, data: Path, processes: int, iters: int) -> Path:
    cfg = {"model": str(model), "data": str(data), "iters": iters, "batch_size": 8,
           "learning_rate": 1e-3, "steps_per_report": 20, "steps_per_eval": 1000,
           "save_every": 10, "val_batches": 1, "num_layers": -1,
           "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
           "training": {"warmup_steps": 5}, "supervisor": FAST,
           "distributed": {"processes": processes}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def step_time(run_dir: Path) -> float:
    steps = [m["step_seconds"] for m in read_jsonl(run_dir / "logs" / "metrics.jsonl")
             if m.get("step", 0) > 10]
    return median(steps)


def wait_until(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"waited {timeout} s")


def detection(tmp: Path, model: Path, data: Path) -> dict[str, float]:
    run_dir = tmp / "faults"
    cfg = config(tmp / "faults.yaml", model, data, 2, 400)
    env = child_env(True, OVERNIGHT_INJECT="crash@60", OVERNIGHT_INJECT_RANK="1")
    sup = cli("run", str(cfg), "--run-dir", str(run_dir), env=env)
    log = run_dir / "logs" / "supervisor.jsonl"
    out: dict[str, float] = {}
    try:
        def group(n: int) -> list[int]:
            spawned = events(log, "group_spawned")
            return spawned[n - 1]["pids"] if len(spawned) >= n else []

        def trained(n: int, step: int) -> bool:
            return any(m.get("attempt") == n and m["step"] >= step
                       for m in read_jsonl(run_dir / "logs" / "metrics.jsonl"))

        pids = wait_until(lambda: group(1), 120)
        wait_until(lambda: trained(1, 15), 120)
        t = time.time()
        os.kill(pids[1], signal.SIGKILL)
        ended = wait_until(lambda: events(log, "group_rank_ended"), 60)[0]
        out["sigkill_s"] = ended["t"] - t
        out["sigkill_group_ended_s"] = wait_until(
            lambda: events(log, "worker_exited"), 60)[0]["t"] - t
        pids = wait_until(lambda: group(2), 60)
        wait_until(lambda: trained(2, 30), 120)
        t = time.time()
        os.kill(pids[1], signal.SIGSTOP)
        hang = wait_until(lambda: events(log, "worker_unhealthy"), 60)[0]
        out["sigstop_s"] = hang["t"] - t
        wait_until(lambda: len(events(log, "worker_exited")) >= 3, 240)  # the injected crash
        crash = [e for e in events(log, "worker_exited")][2]
        out["abort_s"] = crash["detection_latency_s"]
        out["abort_class"] = crash["classification"]  # type: ignore[assignment]
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(60)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "distributed.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ovn-bench-dist-"))
    model = fixtures.tiny_model(tmp)
    data = fixtures.paragraph_corpus(tmp, "mixed", 128, 16, max_sentences=4)
    env = child_env(True)
    one, two = [], []
    for rep in range(args.reps):
        c1 = config(tmp / f"one{rep}.yaml", model, data, 1, 60)
        p = cli("train", str(c1), "--run-dir", str(tmp / f"one{rep}"), env=env)
        assert p.wait(600) == 0, p.stderr.read() if p.stderr else ""
        one.append(step_time(tmp / f"one{rep}"))
        c2 = config(tmp / f"two{rep}.yaml", model, data, 2, 60)
        p = cli("run", str(c2), "--run-dir", str(tmp / f"two{rep}"), env=env)
        assert p.wait(600) == 0, p.stderr.read() if p.stderr else ""
        two.append(step_time(tmp / f"two{rep}"))
    det = detection(tmp, model, data)
    raw = {"machine": machine_description(), "step_seconds_one": one, "step_seconds_two": two,
           "detection": det}
    m1, m2 = median(one), median(two)
    rows = [
        ("step time, tiny model, global batch 8, 1 process vs 2 ranks (ring, localhost)",
         f"{m2 * 1000:.1f} ms", f"{m1 * 1000:.1f} ms", f"{m2 / m1:.2f}",
         f"{args.reps}+{args.reps} runs; medians of steps 11-60; both ranks share 2 cores"),
        ("SIGKILL of rank 1 -> its end seen (group_rank_ended)",
         f"{det['sigkill_s'] * 1000:.0f} ms", "", "",
         f"the whole group ended (worker_exited) after {det['sigkill_group_ended_s']:.2f} s: "
         "rank 0 ends on its own, [ring] connection to a peer was lost"),
        ("SIGSTOP of rank 1 -> hang naming rank 1 (heartbeat_timeout 3 s)",
         f"{det['sigstop_s']:.2f} s", "", "", "rank 0 blocked in a collective, still beating"),
        ("rank 1 aborts (injected crash) -> group failure noticed",
         f"{det['abort_s'] * 1000:.0f} ms", "", "",
         f"after its last output line; classified {det['abort_class']}"),
        ("link pulled between the ranks (netns + veth) -> stall (stall_timeout 5 s)",
         "5.0 s", "", "", "tests/test_distributed_netns.py (root); no rank stands out"),
    ]
    m = raw["machine"]
    lines = ["# Benchmark: a 2-rank data-parallel group on this machine", "",
             "Reproduce: `python benchmarks/distributed.py` (method: its docstring).", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; "
             f"mlx {m['mlx']} (CPU), mlx-lm {m['mlx-lm']}. "
             f"Date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}.", "",
             "| Measure | 2 ranks / time | 1 process | Ratio | Notes |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
