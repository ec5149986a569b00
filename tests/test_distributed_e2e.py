"""A data-parallel group of 2 ranks on localhost (mx.distributed, ring backend), started,
watched and restarted by the real supervisor: real MLX training of the tiny model, real
ports, real signals.

- 2 ranks trained to the end equal one process with the same global batch (mixed-length
  examples: mlx_lm's per-rank token means would differ, issue 14 measured 4e-2);
- one supervised run gets SIGKILL of rank 1, SIGSTOP of rank 1 (a silent peer) and an
  injected out-of-memory abort on rank 1; each restarts the whole group, no rank of an old
  attempt survives, the record names rank and class, and the adapters equal the
  uninterrupted 2-rank run's.

The measured detection times are printed (-s) and quoted in the README and benchmarks/.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import overnight, subprocess_env, write_config
from tests.supervisor_support import ROOT, events, record, wait_for

FAST = {"heartbeat_timeout": 3.0, "startup_timeout": 60.0, "stall_timeout": 6.0,
        "stop_timeout": 4.0, "backoff_initial": 0.2, "backoff_max": 1.0,
        "sample_interval": 1.0, "caffeinate": False}
ITERS = 16


def mixed_corpus(out: Path) -> Path:
    """24 training examples of 1 to 50 words: the ranks' shares of a batch differ in tokens."""
    rng = random.Random(14)
    words = ["the", "a", "cat", "owl", "robot", "moon", "runs", "sings", "over", "past",
             "red", "lazy", "old", "bridge", "dog"]
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 24), ("valid", 8)):
        lines = [json.dumps({"text": " ".join(rng.choice(words)
                                              for _ in range(rng.randint(1, 50)))})
                 for _ in range(n)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapters" / "adapters.safetensors"))


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def supervise(config: Path, run_dir: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir", str(run_dir)],
        cwd=ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def last_step(run_dir: Path, attempt: int | None = None) -> int:
    """The highest step in the metrics log (of attempt `attempt` only, when given)."""
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((m["step"] for m in lines if attempt is None or m["attempt"] == attempt),
               default=0)


def group_pids(run_dir: Path, attempt: int) -> list[int]:
    """The rank pids of attempt `attempt` (1-based), from the supervisor's log."""
    exists = (run_dir / "logs" / "supervisor.jsonl").exists()
    spawned = events(run_dir, "group_spawned") if exists else []
    return spawned[attempt - 1]["pids"] if len(spawned) >= attempt else []


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory, tiny_model):
    """One process and 2 ranks, both to the end, same config and global batch."""
    tmp = tmp_path_factory.mktemp("group")
    data = mixed_corpus(tmp / "data")
    common = {"iters": ITERS, "batch_size": 4, "save_every": 4, "steps_per_eval": 8,
              "supervisor": FAST}
    one = write_config(tmp / "one.yaml", tiny_model, data, **common)
    two = write_config(tmp / "two.yaml", tiny_model, data, distributed={"processes": 2},
                       **common)
    t0 = time.monotonic()
    res = overnight("train", str(one), "--run-dir", str(tmp / "one"))
    assert res.returncode == 0, res.stderr[-2000:]
    t1 = time.monotonic()
    sup = supervise(two, tmp / "two")
    _, err = sup.communicate(timeout=240)
    assert sup.returncode == 0, err[-3000:]
    print(f"\n1 process: {t1 - t0:.1f} s; 2 ranks: {time.monotonic() - t1:.1f} s")
    return tmp, two


def test_two_ranks_equal_one_process_with_the_same_global_batch(group_runs):
    tmp, _ = group_runs
    diff = max_diff(adapters(tmp / "one"), adapters(tmp / "two"))
    print(f"max |2 ranks - 1 process| = {diff:.2e}")
    assert diff < 1e-5
    rec = record(tmp / "two")
    last = rec["attempts"][-1]
    assert rec["state"] == "finished" and rec["final_step"] == ITERS
    assert [r["rank"] for r in last["ranks"]] == [0, 1]
    assert [r["returncode"] for r in last["ranks"]] == [0, 0]
    assert last["failed_rank"] is None
    # rank 0 alone writes: one metrics line per step, checkpoints only from rank 0
    lines = (tmp / "two" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == ITERS
    assert (tmp / "two" / "logs" / "worker-rank1.jsonl").exists()


def test_kill_stop_and_oom_of_a_rank_restart_the_whole_group(group_runs, tmp_path):
    base, config = group_runs
    run_dir = tmp_path / "faults"
    t0 = time.monotonic()
    sup = supervise(config, run_dir, OVERNIGHT_INJECT="oom@14", OVERNIGHT_INJECT_RANK="1")
    try:
        pids1 = wait_for(lambda: group_pids(run_dir, 1), timeout=60)
        wait_for(lambda: last_step(run_dir) >= 3, timeout=90)
        killed_at = time.monotonic()
        os.kill(pids1[1], signal.SIGKILL)
        pids2 = wait_for(lambda: group_pids(run_dir, 2), timeout=60)
        restart_s = time.monotonic() - killed_at
        assert not any(psutil.pid_exists(p) for p in pids1), "a rank of attempt 1 survived"
        wait_for(lambda: last_step(run_dir, attempt=2) >= 7, timeout=90)
        stopped_at = time.monotonic()
        os.kill(pids2[1], signal.SIGSTOP)
        wait_for(lambda: group_pids(run_dir, 3), timeout=60)
        hang_s = time.monotonic() - stopped_at
        assert not any(psutil.pid_exists(p) for p in pids2), "a rank of attempt 2 survived"
        _, err = sup.communicate(timeout=240)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert sup.returncode == 0, err[-3000:]
    print(f"\nfaults run {time.monotonic() - t0:.1f} s; SIGKILL -> next group {restart_s:.2f} s;"
          f" SIGSTOP -> next group {hang_s:.2f} s")
    rec = record(run_dir)
    attempts = rec["attempts"]
    assert [a["classification"] for a in attempts] == ["crash", "hang", "oom", "completed"], [
        (a["classification"], a["detail"]) for a in attempts]
    assert [a["failed_rank"] for a in attempts] == [1, 1, 1, None]
    kill, hang, oom = attempts[:3]
    assert kill["signal_name"] == "SIGKILL" and kill["detail"].startswith("rank 1 (pid ")
    assert kill["ranks"][1]["returncode"] == -9 and kill["ranks"][0]["lost_peer"]
    assert hang["detected_by"] == "heartbeat_timeout" and "rank 1" in hang["detail"]
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in oom["stderr_tail"]  # rank 1 said
    # OOM on any rank halves the micro-batch of all (same global batch: same math)
    assert oom["settings_changed"] == {"batch_size": [4, 2], "grad_accumulation_steps": [1, 2]}
    assert "--set" in attempts[3]["argv"]
    for a in attempts:
        for r in a["ranks"]:
            assert not psutil.pid_exists(r["pid"]), f"rank {r['rank']} of {a['attempt']} lives"
    for e in events(run_dir, "worker_exited")[:3]:
        print(f"  {e['classification']}: detected {e['detection_latency_s']} s after the "
              f"last sign of life")
    ports = [p for e in events(run_dir, "group_spawned") for p in e["ports"]]
    assert len(ports) == 2 * len(attempts) == len(set(ports))  # fresh ports every attempt
    received = [e for e in map(json.loads, (run_dir / "logs" / "worker-rank1.jsonl")
                                .read_text().splitlines()) if e["event"] == "checkpoint_received"]
    # rank 0 sent the checkpoint at each restart that had one (attempt 2 may start fresh)
    assert {3, 4} <= {e["attempt"] for e in received}
    diff = max_diff(adapters(base / "two"), adapters(run_dir))
    print(f"max |faulted - uninterrupted 2 ranks| = {diff:.2e}")
    assert diff < 1e-5


def test_no_rank_outlives_a_killed_supervisor(group_runs, tmp_path):
    """SIGKILL of the supervisor: every rank's orphan guard stops it (SIGTERM, then SIGKILL
    after min(stop_timeout, 10 s)); the group leaves a checkpoint and no process."""
    _, config = group_runs
    run_dir = tmp_path / "orphans"
    long = config.with_name("long.yaml")
    long.write_text(config.read_text().replace(f"iters: {ITERS}", "iters: 400"))
    sup = supervise(long, run_dir)
    try:
        pids = wait_for(lambda: group_pids(run_dir, 1), timeout=60)
        wait_for(lambda: last_step(run_dir) >= 2, timeout=90)
        sup.kill()
        sup.wait()
        gone_at = time.monotonic()
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=15)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    print(f"\nsupervisor SIGKILL -> every rank gone in {time.monotonic() - gone_at:.2f} s")
