"""Part 6: what telemetry costs the training thread, and that a dead or slow supervisor
never blocks it.

- micro: a CPU-bound MLX loop (~1 ms of matrix products per iteration, so one message per
  iteration is ~1000 messages/s) calling `worker.telemetry.Telemetry.send(StepMetrics)`
  each iteration, against the same loop without telemetry; with a live SUB reading in
  another process, with nothing bound at the endpoint, and with a SUB that never reads.
  Blocks of iterations per condition are interleaved; medians of per-iteration time.
  Wall-clock slowdown of a ~1 ms loop swings by tens of percent between runs on a shared
  VM (the calibrated loop itself varies 0.4-1.4 ms), so the cost is also *counted*: the CPU
  time inside send() on the training thread (its thread clock: its wall time would also
  count its waits for the GIL while the sender thread runs, whose CPU is counted already)
  plus the CPU the telemetry thread and ZeroMQ's I/O threads used during the block
  (Linux: /proc/self/task/TID/schedstat, nanoseconds), per message sent
  (`cpu_per_message_s`) and as the share of a core it takes at 1000
  messages/s (`cpu_share`, judged against 2 %: the loop's own speed, and so the rate, varies
  from run to run).
- real: `overnight train` (tiny model) with --telemetry to an endpoint nobody binds and to a
  SUB that never reads, vs without --telemetry: second-epoch time, interleaved.

    python -m benchmarks.telemetry_cost sub live|stall ENDPOINT   # the SUB helper process
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, ROOT, child_env, median, noise
from benchmarks.throughput import Workload, run_ours

CONDITIONS = ("off", "live_sub", "no_sub", "stalled_sub", "frozen_sub")
SUB_MODE = {"live_sub": "live", "stalled_sub": "stall", "frozen_sub": "frozen"}


def _sub(mode: str, endpoint: str) -> None:
    """Bind a SUB like the supervisor does, then: `live` reads everything; `stall` never
    reads but stays alive (its subscription goes out: libzmq processes commands when the
    owner touches the socket, here once every 0.1 s); `frozen` never touches the socket
    again (a stopped or hung supervisor: the subscription never reaches the worker)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    count = 0
    while True:
        if mode == "live":
            if sock.poll(100):
                while True:
                    try:
                        sock.recv(zmq.NOBLOCK)
                        count += 1
                    except zmq.Again:
                        break
        else:
            time.sleep(0.1)
            if mode == "stall":
                sock.getsockopt(zmq.EVENTS)
        if sys.stdin.closed or _stdin_closed():
            break
    print(f"received {count}", flush=True)


def _stdin_closed() -> bool:
    import select

    r, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(r) and not sys.stdin.read(1)


class SubProcess:
    def __init__(self, mode: str, endpoint: str):
        import subprocess

        self.proc = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.telemetry_cost", "sub", mode, endpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env=child_env(False))
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready"

    def close(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=10)
        return int(out.split()[-1]) if out.strip() else 0


def _calibrate(target_s: float) -> tuple[Any, int]:
    """A 64x64 matrix and how many chained products of it take ~target_s (small steps, so
    the count can be fitted with or without OpenBLAS)."""
    import mlx.core as mx

    a = mx.random.normal((64, 64)) / 8
    mx.eval(a)

    def per_iteration(k: int) -> float:
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            x = a
            for _ in range(k):
                x = x @ a
            mx.eval(x)
            times.append(time.perf_counter() - t0)
        return median(times)

    k = 1
    while per_iteration(k) < target_s / 4 and k < 4096:
        k *= 2
    return a, max(1, round(k * target_s / per_iteration(k)))


def _task_cpu_ns(tid: int) -> int | None:
    """CPU nanoseconds thread `tid` of this process has run (Linux schedstat), or None."""
    try:
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _zmq_tids() -> list[int]:
    """ZeroMQ's background threads of this process (libzmq names them ZMQbg/...)."""
    out = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            if task.joinpath("comm").read_text().startswith("ZMQbg"):
                out.append(int(task.name))
        except (OSError, ValueError):
            continue
    return out


def _threads_cpu_ns(tids: list[int]) -> int | None:
    values = [_task_cpu_ns(t) for t in tids]
    return None if not tids or any(v is None for v in values) else sum(v or 0 for v in values)


def micro(work: Path, iterations: int, reps: int, log: Any = print) -> dict[str, Any]:
    import mlx.core as mx

    from shared import protocol as p
    from worker.telemetry import LiveStatus, Telemetry

    work.mkdir(parents=True, exist_ok=True)
    a, k = _calibrate(0.001)
    per_iter: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    send_max: dict[str, float] = {c: 0.0 for c in CONDITIONS}
    dropped: dict[str, int] = {c: 0 for c in CONDITIONS}
    sent: dict[str, int] = {c: 0 for c in CONDITIONS}
    spent_ns: dict[str, int] = {c: 0 for c in CONDITIONS}  # send() + telemetry threads' CPU
    counted = True  # False where the threads' CPU cannot be read (not Linux)
    received = 0
    for r in range(reps):
        order = CONDITIONS if r % 2 == 0 else tuple(reversed(CONDITIONS))
        for cond in order:
            endpoint = f"ipc://{work}/t-{cond}-{r}"
            sub = None
            if cond in SUB_MODE:
                sub = SubProcess(SUB_MODE[cond], endpoint)
            tel = None if cond == "off" else Telemetry(endpoint, LiveStatus("bench", 1, 10**6))
            times = []
            worst = 0.0
            in_send = 0  # CPU ns of the training thread inside send() (not wall: above)
            tids = ([tel._thread.native_id] if tel is not None and tel._thread.native_id
                    else []) + _zmq_tids()
            cpu0 = _threads_cpu_ns(tids) if tel is not None else 0
            for i in range(iterations):
                t0 = time.perf_counter()
                x = a
                for _ in range(k):
                    x = x @ a
                mx.eval(x)
                # The worker builds this message whether or not it has telemetry.
                m = p.StepMetrics(run_id="bench", attempt=1, step=i, time=time.time(),
                                  loss=2.0, grad_norm=1.0, lr=1e-4, tokens=512,
                                  tokens_per_sec=1e5, step_seconds=0.001, active_mb=100.0,
                                  peak_mb=120.0, rss_mb=300.0)
                if tel is not None:
                    t1, c1 = time.perf_counter(), time.thread_time_ns()
                    tel.send(m)
                    in_send += time.thread_time_ns() - c1
                    worst = max(worst, time.perf_counter() - t1)
                times.append(time.perf_counter() - t0)
            cpu1 = _threads_cpu_ns(tids) if tel is not None else 0
            if cpu0 is None or cpu1 is None:
                counted = False
            else:
                spent_ns[cond] += cpu1 - cpu0 + in_send
            if tel is not None:
                t1 = time.perf_counter()
                tel.close()
                send_max[cond] = max(send_max[cond], worst)
                dropped[cond] += tel.dropped
                sent[cond] += iterations
                if time.perf_counter() - t1 > 3.0:
                    log(f"  telemetry close took {time.perf_counter() - t1:.1f} s ({cond})")
            if sub is not None:
                n = sub.close()
                if cond == "live_sub":
                    received += n
            per_iter[cond].append(median(times))
    base = median(per_iter["off"])
    out: dict[str, Any] = {"iterations": iterations, "reps": reps, "matmuls_per_iter": k,
                           "iteration_s": {c: median(v) for c, v in per_iter.items()},
                           "send_max_s": send_max, "dropped": dropped, "sent": sent,
                           "live_received": received}
    out["slowdown"] = {c: median(v) / base - 1 for c, v in per_iter.items() if c != "off"}
    per_message = {c: spent_ns[c] / 1e9 / max(1, sent[c]) for c in CONDITIONS if c != "off"}
    out["cpu_per_message_s"] = per_message if counted else None
    out["cpu_share"] = {c: v * 1000 for c, v in per_message.items()} if counted else None
    out["noise"] = noise(per_iter["off"])
    out["messages_per_s"] = 1 / median(per_iter["live_sub"])
    share = out["cpu_share"] or {}
    log("  telemetry micro: " + ", ".join(
        f"{c} {out['slowdown'][c] * 100:+.1f}% (CPU {share.get(c, math.nan) * 1e3:.1f} us a "
        f"message, max send {send_max[c] * 1e6:.0f} us, dropped {dropped[c]})"
        for c in CONDITIONS[1:]))
    return out


def in_training(w: Workload, work: Path, openblas: bool, reps: int,
                log: Any = print) -> dict[str, Any]:
    epochs: dict[str, list[float]] = {"off": [], "no_sub": [], "stalled_sub": [],
                                      "frozen_sub": []}
    for r in range(reps):
        for cond in tuple(epochs) if r % 2 == 0 else tuple(reversed(epochs)):
            endpoint = f"ipc://{work}/real-{cond}-{r}"
            work.mkdir(parents=True, exist_ok=True)
            sub = SubProcess(SUB_MODE[cond], endpoint) if cond in SUB_MODE else None
            extra = [] if cond == "off" else ["--telemetry", endpoint]
            try:
                s = run_ours(w, work / cond, openblas, f"tel-{r}", extra=extra)
            finally:
                if sub is not None:
                    sub.close()
            epochs[cond].append(s.epoch_s)
    base = median(epochs["off"])
    out = {"epoch_s": epochs, "noise": noise(epochs["off"]),
           "slowdown": {c: median(v) / base - 1 for c, v in epochs.items() if c != "off"}}
    log("  telemetry in training: " + ", ".join(
        f"{c} {v * 100:+.1f}%" for c, v in out["slowdown"].items()))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "sub":
        _sub(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
