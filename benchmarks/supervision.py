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
    """SIGKILL -> detection + recovery breakdown (`_recovery`: the critical path, compile
    apart from the first step's own compute, the restart overhead); then SIGSTOP -> hang
    detection."""
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
        wait(popen, t0, out, timeout=300)
    sev = events(sup_log)
    wev = events(worker_log)
    result.update({
        "kill_detection_s": None, "hang_detection_s": hang["t"] - t_stop,
        "backoff_configured_s": 1.0,  # supervisor.backoff_initial above
    })
    result.update(_recovery(rd, sev, wev, t_kill, step2))
    result["kill_detection_s"] = result["recovery"]["detection"]
    record = _records(rd)
    result["kill_detection_record_s"] = record[0].detection_latency_s
    result["hang_detection_record_s"] = record[1].detection_latency_s
    result["resumed_from_step"] = record[1].resumed_from.step if record[1].resumed_from else None
    result["checkpoint_bytes"] = _checkpoint_bytes(rd)
    r = result["recovery"]
    log(f"  failures {w.name}: SIGKILL noticed in {result['kill_detection_s'] * 1000:.0f} ms, "
        f"SIGSTOP in {result['hang_detection_s']:.2f} s (timeout {heartbeat_timeout:g} s), "
        f"recovery {result['recovery_total_s']:.2f} s = "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.items())
        + f"; checkpoint validation {result['checkpoint_validation_s']:.2f} s alongside; "
        f"restart overhead {result['restart_overhead_s']:.2f} s "
        f"(= total - backoff - the first step's own compute "
        f"{result['first_step_compute_s']:.2f} s)")
    return result


def _records(rd: Path) -> tuple[AttemptRecord, ...]:
    stored = run_record.load(rd / "run.json")
    assert stored is not None
    return stored.attempts


def _recovery(rd: Path, sev: list[dict[str, Any]], wev: list[dict[str, Any]], t_kill: float,
              step2: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL -> attempt 2's first step, split along its critical path from the logs.

    The worker starts while the supervisor validates the checkpoint
    (supervisor/daemon/early_start.py) — after a crash already when the backoff starts
    (supervisor/daemon/loop.py), so its start and model load run alongside the backoff and
    `spawn` counts from the attempt's end — and validation is reported beside the path, not
    in it; `handoff_wait` is what the loaded worker waited for its checkpoint choice (the
    rest of the backoff, then validation; 0 when loading took longer).
    The first step's time (its metrics' step_seconds, from before the batch to the end of
    its update) is its own compute — the tokens of that batch at the median tokens/s of
    the run's other steps (first steps excluded) — plus `compile` (mx.compile's traces,
    worker/train.py) for the rest. restart overhead = total - the configured backoff (the
    crash policy's delay, supervisor.backoff_initial) - the first step's own compute.
    """
    def sup(name: str, **match: Any) -> dict[str, Any]:
        found = _first(sev, name, t_kill, **match)
        if found is None:
            raise RuntimeError(f"{rd}: recovery event {name} {match} missing")
        return found

    def wrk(name: str, **match: Any) -> dict[str, Any]:
        found = _first(wev, name, t_kill, attempt=2, **match)
        if found is None:
            raise RuntimeError(f"{rd}: worker event {name} {match} missing")
        return found

    exited = sup("worker_exited", attempt=1)
    restarting = sup("state_changed", to_state="restarting")
    validation = sup("checkpoint_validated")
    early = _first(sev, "worker_started_early", t_kill, attempt=2)
    spawned = early or sup("worker_spawned", attempt=2)
    started, loading = wrk("worker_started"), wrk("phase_changed", phase="loading")
    loaded = _first(wev, "model_loaded", t_kill, attempt=2)
    handoff = _first(wev, "resume_handoff_received", t_kill, attempt=2)
    compiling = wrk("phase_changed", phase="compiling")
    metrics = read_jsonl(rd / "logs" / "metrics.jsonl")
    firsts = {min(m["step"] for m in metrics if m["attempt"] == a): a
              for a in {m["attempt"] for m in metrics}}
    later = [m["tokens_per_sec"] for m in metrics if firsts.get(m["step"]) != m["attempt"]]
    own = step2["tokens"] / median(later) if later else step2["step_seconds"]
    compile_s = max(0.0, step2["step_seconds"] - own)
    path = {"detection": exited["t"] - t_kill, "backoff": restarting["t"] - exited["t"]}
    during_backoff = early is not None and early["t"] < restarting["t"]
    if early is not None and loaded is not None and handoff is not None:
        waited = float(handoff.get("waited_s", 0.0))
        path.update({  # started at the backoff's start (a crash), or at its end (validating)
            "spawn": spawned["t"] - (exited["t"] if during_backoff else restarting["t"]),
            "process_start": started["t"] - spawned["t"],
            "worker_checks": loading["t"] - started["t"],
            "mlx_lm_imports": float(loaded.get("imports_s", 0.0)),
            "model_load": loaded["t"] - loading["t"] - float(loaded.get("imports_s", 0.0)),
            "handoff_wait": waited,
            "data_load_and_restore": compiling["t"] - handoff["t"],
        })
    else:  # validated first, then spawned (a group, or before early start)
        path.update({
            "checkpoint_validation": validation["t"] - restarting["t"],
            "spawn": spawned["t"] - validation["t"],
            "process_start": started["t"] - spawned["t"],
            "worker_checks": loading["t"] - started["t"],
            "model_and_data_load": compiling["t"] - loading["t"],
        })
    path.update({
        "first_batch": step2["time"] - compiling["t"] - step2["step_seconds"],
        "compile": compile_s,
        "first_step_compute": own,
    })
    total = step2["time"] - t_kill
    return {
        "recovery": path,
        "recovery_total_s": total,
        "checkpoint_validation_s": float(validation.get("seconds", 0.0)),
        "first_step_compute_s": own,
        "compile_s": compile_s,
        "restart_overhead_s": total - path["backoff"] - own,
        "started_during_backoff": during_backoff,
        "validation_plus_start_s": path.get("checkpoint_validation", 0.0) + path["spawn"]
        + path["process_start"] + path["worker_checks"],
    }


def _checkpoint_bytes(rd: Path) -> int:
    dirs = sorted((rd / "checkpoints").glob("step-*"))
    return sum(f.stat().st_size for f in dirs[-1].iterdir()) if dirs else 0
