"""Parts 2-4: the supervisor's cost, how fast it notices a failure, how fast it recovers.

- overhead: the same run under `overnight run` and as `overnight train` alone, interleaved;
  second-epoch time as in part 1 (throughput.py), plus the supervisor process's RSS and CPU
  (its own user + system CPU times, all threads, psutil, sampled every 0.1 s) from the end
  of the first epoch to the last step: the tiny run trains 6 epochs (`CPU_EPOCHS`) so that
  window is ~10 s at > 100 steps/s, not the one ~2 s epoch whose 10 ms CPU-time ticks
  (/proc) made 1% of a core a count of two. `before=TREE` adds supervised runs of another
  checkout's supervisor (and worker), interleaved, for a before/after CPU figure;
- failures: one supervised run (short backoff and heartbeat timeout). After the first
  checkpoint the worker gets SIGKILL: detection latency = the supervisor's `worker_exited`
  log time minus the kill time (same clock); recovery = kill -> first training step of
  attempt 2, split by the supervisor's and the new worker's log events. Then the new worker
  gets SIGSTOP: hang detection latency = `worker_unhealthy kind=hang` minus the stop time.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    OVERNIGHT,
    child_env,
    events,
    median,
    noise,
    read_jsonl,
    start,
    wait,
)
from benchmarks.throughput import Sample, Workload, ours_config, ours_sample, run_ours
from shared import run_record
from shared.run_record import AttemptRecord


class ProcessSampler:
    """(time, rss_mb, cpu_seconds) of one process every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                with self.proc.oneshot():
                    rss = self.proc.memory_info().rss / 2**20
                    t = self.proc.cpu_times()
                self.samples.append((time.time(), rss, t.user + t.system))
            except psutil.Error:
                return
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(peak RSS MB over the whole run, CPU fraction of one core in [t0, t1])."""
        peak = max((s[1] for s in self.samples), default=0.0)
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return peak, float("nan")
        (ta, _, ca), (tb, _, cb) = inside[0], inside[-1]
        return peak, (cb - ca) / (tb - ta) if tb > ta else float("nan")


CPU_EPOCHS = 6  # a tiny supervised run's epochs: the CPU window is epochs 2..6


def run_supervised(w: Workload, work: Path, openblas: bool, tag: str, tree: Path | None = None,
                   **sections: Any) -> tuple[Sample, dict[str, float]]:
    """`overnight run` on a fresh run dir (`tree`: another checkout's code, else this one);
    the supervisor itself runs without the preload (supervisor.openblas decides for its
    worker)."""
    work.mkdir(parents=True, exist_ok=True)
    sup = {"openblas": "auto" if openblas else "false", "sample_interval": 1.0,
           **sections.pop("supervisor", {})}
    config = ours_config(w, work, supervisor=sup, **sections)
    rd = work / f"run-{tag}"
    shutil.rmtree(rd, ignore_errors=True)
    out = work / f"supervised-{tag}.log"
    env = child_env(False)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env["PYTHONPATH"]])
    t0 = time.monotonic()
    popen = start([*OVERNIGHT, "run", str(config), "--run-dir", str(rd)], env, out, cwd=tree)
    sampler = ProcessSampler(popen.pid)
    proc = wait(popen, t0, out).check()
    sampler.stop()
    record = run_record.load(rd / "run.json")
    worker = list(record.attempts) if record is not None else []
    metrics = {m["step"]: m for m in read_jsonl(rd / "logs" / "metrics.jsonl")}
    e = w.steps_per_epoch
    peak, cpu = sampler.between(metrics[e]["time"], metrics[max(metrics)]["time"])
    window_steps_per_s = (max(metrics) - e) / (metrics[max(metrics)]["time"] - metrics[e]["time"])
    # The worker's peak RSS is not in wait4's answer for the supervisor alone: use the
    # supervisor's own samples for it and metrics.jsonl (rss_mb per step) for the worker.
    s = ours_sample(w, rd, proc.wall_s, max(m["rss_mb"] for m in metrics.values()))
    return s, {"supervisor_peak_rss_mb": peak, "supervisor_cpu_fraction": cpu,
               "attempts": len(worker), "window_steps_per_s": window_steps_per_s}


def overhead(w: Workload, work: Path, reps: int, openblas: bool,
             log: Any = print, before: Path | None = None) -> dict[str, Any]:
    alone: list[float] = []
    supervised: list[float] = []
    sup_rss: list[float] = []
    sup_cpu: list[float] = []
    rates: list[float] = []
    cpu_before: list[float] = []
    modes = ["alone", "supervised", *(["before"] if before is not None else [])]
    for r in range(reps):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            if mode == "alone":
                s = run_ours(w, work / "alone", openblas, f"{r}")
                alone.append(s.epoch_s)
            elif mode == "before":
                s, info = run_supervised(w, work / "before", openblas, f"{r}", tree=before)
                cpu_before.append(info["supervisor_cpu_fraction"])
            else:
                s, info = run_supervised(w, work / "supervised", openblas, f"{r}")
                supervised.append(s.epoch_s)
                sup_rss.append(info["supervisor_peak_rss_mb"])
                sup_cpu.append(info["supervisor_cpu_fraction"])
                rates.append(info["window_steps_per_s"])
            cpu = f", supervisor {info['supervisor_cpu_fraction'] * 100:.2f}% of a core at " \
                  f"{info['window_steps_per_s']:.0f} steps/s" if mode != "alone" else ""
            log(f"  {w.name} {mode:10s} rep {r + 1}/{reps}: epoch {s.epoch_s:.3f} s{cpu}")
    out = {"workload": w.name, "alone_epoch_s": alone, "supervised_epoch_s": supervised,
           "throughput_loss": 1 - median(alone) / median(supervised),
           "noise": max(noise(alone), noise(supervised)),
           "supervisor_peak_rss_mb": max(sup_rss), "supervisor_cpu_fraction": median(sup_cpu),
           "supervisor_cpu_runs": sup_cpu, "cpu_window_steps_per_s": median(rates),
           "steps_per_s": w.steps_per_epoch / median(supervised)}
    if cpu_before:
        out["supervisor_cpu_fraction_before"] = median(cpu_before)
        out["supervisor_cpu_runs_before"] = cpu_before
    log(f"  supervision {w.name}: throughput loss {out['throughput_loss'] * 100:+.1f}%, "
        f"supervisor RSS {out['supervisor_peak_rss_mb']:.1f} MB, CPU "
        f"{out['supervisor_cpu_fraction'] * 100:.2f}% of a core")
    return out


def _wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _attempt(rd: Path, n: int) -> AttemptRecord | None:
    """Attempt n of the run record (shared/run_record.py), once the supervisor started it."""
    record = run_record.load(rd / "run.json")
    if record is None or len(record.attempts) < n:
        return None
    return record.attempts[n - 1]


def _first(evs: list[dict[str, Any]], name: str, after: float = 0.0,
           **match: Any) -> dict[str, Any] | None:
    for e in evs:
        if e.get("event") == name and e["t"] >= after and all(
                e.get(k) == v for k, v in match.items()):
            return e
    return None


def failures(w: Workload, work: Path, openblas: bool, save_every: int,
             heartbeat_timeout: float = 3.0, log: Any = print) -> dict[str, Any]:
    """SIGKILL -> detection + recovery breakdown; then SIGSTOP -> hang detection."""
    from dataclasses import replace

    endless = replace(w, save_every=save_every, total_iters=10**6)  # until stopped
    work.mkdir(parents=True, exist_ok=True)
    config = ours_config(endless, work, supervisor={
        "openblas": "auto" if openblas else "false", "heartbeat_timeout": heartbeat_timeout,
        "backoff_initial": 1.0, "backoff_max": 2.0, "sample_interval": 1.0})
    rd = work / "run-failures"
    shutil.rmtree(rd, ignore_errors=True)
    out = work / "failures.log"
    t0 = time.monotonic()
    popen = start([*OVERNIGHT, "run", str(config), "--run-dir", str(rd)], child_env(False), out)
    sup_log, worker_log = rd / "logs" / "supervisor.jsonl", rd / "logs" / "worker.jsonl"
    result: dict[str, Any] = {"workload": w.name, "heartbeat_timeout_s": heartbeat_timeout}
    try:
        first = _wait_for(lambda: _attempt(rd, 1), 120, "attempt 1")
        _wait_for(lambda: _first(events(sup_log), "checkpoint_saved"), 600, "a checkpoint")
        t_kill = time.time()
        os.kill(first.pid, signal.SIGKILL)
        # Recovery ends at attempt 2's first step (its first line in metrics.jsonl).
        step2 = _wait_for(lambda: next((m for m in read_jsonl(rd / "logs" / "metrics.jsonl")
                                        if m["attempt"] == 2), None), 600, "attempt 2's step")
        second = _attempt(rd, 2)
        assert second is not None
        time.sleep(0.3)
        t_stop = time.time()
        os.kill(second.pid, signal.SIGSTOP)
        hang = _wait_for(lambda: _first(events(sup_log), "worker_unhealthy", t_stop,
                                        kind="hang"), heartbeat_timeout + 30, "hang detection")
        _wait_for(lambda: _attempt(rd, 3), 120, "attempt 3")
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        proc = wait(popen, t0, out, timeout=300)
    sev = events(sup_log)
    wev = events(worker_log)
    exited = _first(sev, "worker_exited", attempt=1)
    backoff_end = _first(sev, "state_changed", t_kill, to_state="restarting")
    validated = _first(sev, "checkpoint_validated", t_kill)
    spawned = _first(sev, "worker_spawned", t_kill, attempt=2)
    started = _first(wev, "worker_started", t_kill, attempt=2)
    loading = _first(wev, "phase_changed", t_kill, attempt=2, phase="loading")
    compiling = _first(wev, "phase_changed", t_kill, attempt=2, phase="compiling")
    if None in (exited, backoff_end, validated, spawned, started, loading, compiling):
        raise RuntimeError(f"{rd}: recovery events missing (supervisor exit {proc.returncode})")
    assert exited and backoff_end and validated and spawned and started and loading and compiling
    stored = run_record.load(rd / "run.json")
    assert stored is not None
    record = stored.attempts
    result.update({
        "kill_detection_s": exited["t"] - t_kill,
        "kill_detection_record_s": record[0].detection_latency_s,
        "hang_detection_s": hang["t"] - t_stop,
        "hang_detection_record_s": record[1].detection_latency_s,
        "recovery": {
            "detection": exited["t"] - t_kill,
            "backoff": backoff_end["t"] - exited["t"],
            "checkpoint_validation": validated["t"] - backoff_end["t"],
            "spawn": spawned["t"] - validated["t"],
            "process_start": started["t"] - spawned["t"],
            "worker_checks": loading["t"] - started["t"],
            "model_and_data_load": compiling["t"] - loading["t"],
            "compile_and_first_step": step2["time"] - compiling["t"],
        },
        "recovery_total_s": step2["time"] - t_kill,
        "resumed_from_step": record[1].resumed_from.step if record[1].resumed_from else None,
        "checkpoint_bytes": _checkpoint_bytes(rd),
    })
    r = result["recovery"]
    result["validation_plus_start_s"] = (r["checkpoint_validation"] + r["spawn"]
                                         + r["process_start"] + r["worker_checks"])
    log(f"  failures {w.name}: SIGKILL noticed in {result['kill_detection_s'] * 1000:.0f} ms, "
        f"SIGSTOP in {result['hang_detection_s']:.2f} s (timeout {heartbeat_timeout:g} s), "
        f"recovery {result['recovery_total_s']:.2f} s = "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    return result


def _checkpoint_bytes(rd: Path) -> int:
    dirs = sorted((rd / "checkpoints").glob("step-*"))
    return sum(f.stat().st_size for f in dirs[-1].iterdir()) if dirs else 0
