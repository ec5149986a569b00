"""Classify how a worker attempt ended, from its exit status, what the supervisor did to it,
its last telemetry, its stderr and the memory samples. Pure: no processes, no clock.

Order of evidence (first match wins):
1. The supervisor stopped the worker (hang, stall, memory, user): that is the class, unless
   the worker completed or early-stopped meanwhile.
2. A deliberate exit code (shared/exitcodes.py): completed, early-stopped, gradient spike,
   non-finite, graceful stop, disk full, system limit, bad config.
3. The last error line says why: no space left (ENOSPC, EDQUOT, MLX's "[write] Unable to
   write": disk_full), the open-file limit mlx_lm could not raise (system_limit).
4. Known MLX/Metal failures in stderr: Metal's buffer-count limit (metal_resource_limit:
   "[metal::malloc] Resource limit (499000) exceeded" counts buffers, not bytes), out of
   memory (also "... greater than the maximum allowed buffer size": one buffer too big for
   the device), GPU watchdog, other command-buffer aborts (crash). The texts are the ones
   public mlx / mlx-lm reports show (tests/fixtures/metal/).
5. SIGKILL the supervisor did not send, with memory near the limit: OOM (kernel / jetsam).
6. A crash while the run directory's file system has less room than a checkpoint needs:
   disk_full (the worker's own output is on that disk and may not say so).
7. Anything else: crash (signal or unexpected exit code).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from shared.exitcodes import EXIT_TO_CLASS, ExitCode, FailureClass
from shared.fsutil import human_bytes
from supervisor.daemon.state import StopReason

# Metal / MLX messages, as they appear in the worker's stderr.
# mlx's metal allocator: the live-buffer count over `iogpu.rsrc_limit` (499000 fallback).
RESOURCE_LIMIT_PATTERN = re.compile(r"\[metal::malloc\] Resource limit \((\d+)\) exceeded")
OOM_PATTERNS = (
    re.compile(r"kIOGPUCommandBufferCallbackErrorOutOfMemory"),
    re.compile(r"\[metal::malloc\] Attempting to allocate \d+ bytes which is greater than "
               r"the maximum allowed buffer size"),
    re.compile(r"\[metal::malloc\].*(?:Unable to allocate|exceeded|out of memory)", re.I),
    re.compile(r"\[malloc(?:_or_wait)?\] Unable to allocate", re.I),
    re.compile(r"std::bad_alloc|MemoryError"),
)
# A write that found no space (Errno 28 ENOSPC; EDQUOT is 122 on Linux, 69 on macOS) and
# MLX's short write (mlx/io/load.cpp), on the last error line of a traceback or abort.
DISK_FULL_PATTERN = re.compile(
    r"\[Errno 28\]|No space left on device|Disk quota exceeded|\[write\] Unable to write")
# mlx_lm's import raising the hard open-file limit it may not (shared/openfile_limit.py).
SYSTEM_LIMIT_PATTERN = re.compile(r"not allowed to raise maximum limit")
WORKER_PREFIX = re.compile(r"^overnight [a-z-]+: ")  # how shared/cli.py starts an error line
# The watchdogs that end long GPU work: "Impacting Interactivity" (the window server starved)
# and the classic GPU timeout ("Caused GPU Timeout Error", kIOGPUCommandBufferCallbackErrorTimeout).
GPU_WATCHDOG_PATTERN = re.compile(r"kIOGPUCommandBufferCallbackErrorImpactingInteractivity"
                                  r"|kIOGPUCommandBufferCallbackErrorTimeout"
                                  r"|Caused GPU Timeout Error")
COMMAND_BUFFER_PATTERN = re.compile(r"command buffer|kIOGPUCommandBufferCallbackError", re.I)

# A file system with less free space than this (or than a checkpoint needs) is full.
FULL_BYTES = 2**20
# Memory within this fraction of the limit at the last sample counts as "near the limit".
NEAR_LIMIT = 0.9
# System available memory below this fraction of the total counts as memory pressure.
LOW_AVAILABLE = 0.05

_STOP_CLASS = {
    StopReason.HANG: FailureClass.HANG,
    StopReason.STALL: FailureClass.STALL,
    StopReason.MEMORY: FailureClass.PLANNED_RESTART,
    StopReason.RECYCLE: FailureClass.PLANNED_RESTART,
    StopReason.POWER: FailureClass.BATTERY_PAUSE,
    StopReason.USER: FailureClass.GRACEFUL_STOP,
}


@dataclass(frozen=True)
class ExitFacts:
    """Everything known about one ended attempt."""

    returncode: int  # Popen convention: negative = killed by that signal
    stop_reason: StopReason | None = None  # set when the supervisor asked it to stop
    killed_by_supervisor: bool = False  # the supervisor sent SIGKILL after stop_timeout
    stopping_reason: str = ""  # WorkerStopping.reason, if one arrived
    stopping_detail: str = ""
    first_bad_step: int = -1
    data_position: int = -1  # WorkerStopping's data fields: the failing step's batch
    data_batch: int = -1
    data_lines: str = ""
    stderr_tail: str = ""
    memory_mb: float = 0.0  # the worker's memory at the last sample (max of RSS and MLX)
    memory_limit_mb: float = 0.0
    available_fraction: float = 1.0  # system available / total at the last sample
    stop_detail: str = ""  # why the supervisor stopped it, e.g. "no heartbeat for 121 s"
    disk_free: int = -1  # bytes free on the run directory's file system at the end (-1: ?)
    disk_needed: int = 0  # bytes a checkpoint needs (the newest one's size)


@dataclass(frozen=True)
class Classification:
    failure: FailureClass
    detail: str
    exit_code: int | None
    signal: int | None
    first_bad_step: int = -1
    data_position: int = -1  # the failing batch, when the worker named it (non-finite, spike)
    data_batch: int = -1
    data_lines: str = ""

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"


def _status(rc: int) -> tuple[int | None, int | None, str]:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return None, -rc, f"killed by {name}"
    return rc, None, f"exit code {rc}"


def _first_line(text: str, pattern: re.Pattern[str]) -> str:
    for line in text.splitlines():
        if pattern.search(line):
            return line.strip()[:300]
    return ""


def _oom_line(text: str) -> str:
    for p in OOM_PATTERNS:
        line = _first_line(text, p)
        if line:
            return line
    return ""


def classify(f: ExitFacts) -> Classification:
    exit_code, sig, status = _status(f.returncode)

    def result(failure: FailureClass, detail: str) -> Classification:
        if failure in (FailureClass.NON_FINITE, FailureClass.GRAD_SPIKE):
            return Classification(failure, detail, exit_code, sig, f.first_bad_step,
                                  f.data_position, f.data_batch, f.data_lines)
        return Classification(failure, detail, exit_code, sig, f.first_bad_step)

    code = ExitCode.from_returncode(exit_code) if exit_code is not None else None
    if code in (ExitCode.COMPLETED, ExitCode.EARLY_STOPPED):
        return result(EXIT_TO_CLASS[code], f.stopping_detail or status)

    if f.stop_reason is not None:
        how = "killed after stop_timeout" if f.killed_by_supervisor else status
        if f.stop_reason is StopReason.USER:
            return result(FailureClass.GRACEFUL_STOP, f"worker {how}")
        why = f.stop_detail or f.stop_reason.value
        return result(_STOP_CLASS[f.stop_reason], f"{why}; {how}")

    if code is not None and code is not ExitCode.CRASH:
        detail = f.stopping_detail or f.stopping_reason
        if not detail and code in (ExitCode.BAD_CONFIG, ExitCode.DISK_FULL,
                                   ExitCode.SYSTEM_LIMIT, ExitCode.CHECKPOINT_REFUSED):
            # Telemetry sent right after connecting can be lost (PUB/SUB slow joiner); the
            # worker's one-line error on stderr is the message then, without the program's
            # name (shared/cli.py): the same reason whichever way it arrived.
            detail = WORKER_PREFIX.sub("", _last_error_line(f.stderr_tail), count=1)
        detail = detail or status
        return result(EXIT_TO_CLASS[code], detail)

    last = _last_error_line(f.stderr_tail)
    if DISK_FULL_PATTERN.search(last):
        return result(FailureClass.DISK_FULL, f"disk full: {status}: {last}")
    if SYSTEM_LIMIT_PATTERN.search(last):
        return result(FailureClass.SYSTEM_LIMIT,
                      f"{status}: {last} (the hard open-file limit is below the 4096 "
                      "mlx_lm sets: raise it, e.g. `ulimit -Hn 4096`)")
    limit = _first_line(f.stderr_tail, RESOURCE_LIMIT_PATTERN)
    if limit:
        return result(FailureClass.METAL_RESOURCE_LIMIT,
                      f"{status}: {limit} (Metal's count of live buffers, not memory: a "
                      "smaller batch does not help)")
    oom = _oom_line(f.stderr_tail)
    if oom:
        return result(FailureClass.OOM, f"{status}: {oom}")
    watchdog = _first_line(f.stderr_tail, GPU_WATCHDOG_PATTERN)
    if watchdog:
        return result(
            FailureClass.GPU_WATCHDOG,
            f"{status}: {watchdog} (macOS GPU watchdog: long GPU work while the display is on)",
        )
    if sig == signal.SIGKILL and _near_limit(f):
        return result(
            FailureClass.OOM,
            f"{status} with memory near the limit ({f.memory_mb:.0f} MB, "
            f"{f.available_fraction:.0%} of system memory available)",
        )
    buffer = _first_line(f.stderr_tail, COMMAND_BUFFER_PATTERN)
    if buffer:
        return result(FailureClass.CRASH, f"{status}: Metal command buffer abort: {buffer}")
    crash = f"{status}: {last}" if last else status
    if 0 <= f.disk_free < max(f.disk_needed, FULL_BYTES):
        return result(FailureClass.DISK_FULL,
                      f"disk full: {crash}; the run directory's file system had "
                      f"{human_bytes(f.disk_free)} free, less than a checkpoint needs "
                      f"({human_bytes(max(f.disk_needed, FULL_BYTES))})")
    return result(FailureClass.CRASH, crash)


def _near_limit(f: ExitFacts) -> bool:
    if f.memory_limit_mb > 0 and f.memory_mb >= NEAR_LIMIT * f.memory_limit_mb:
        return True
    return f.available_fraction < LOW_AVAILABLE


# What a worker prints while all is well: its progress line, an info log line, a bullet of
# the mlx_lm-differences block. A killed worker's last line is often one of them: no evidence.
_ROUTINE = re.compile(r"^(Training: \d|\d{4}-\d\d-\d\dT\S+ \[(debug|info)\s*\]|- )")


def _last_error_line(text: str) -> str:
    """The most telling line of a traceback or abort message: the last non-empty one ("" when
    that is routine output, not an error)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines and not _ROUTINE.match(lines[-1]) else ""
