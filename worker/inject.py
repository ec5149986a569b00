"""Fault injection: make the worker fail on purpose, to test and rehearse recovery.

Spec (config `debug.inject` or env OVERNIGHT_INJECT, comma-separated): `kind@step`, e.g.
`crash@120,hang@300`. Each fault fires once per run: a marker file in RUN_DIR/inject/ is
written (and fsynced) before it fires, so the restarted worker trains through that step. The
marker (shared/faults.py) names the process it fired in, so the supervisor records which
attempt ended by an injected fault and the report and the demo say so; the worker also logs
`fault_injected` and, for the faults that print an emulated error, says on stderr first that
the next line is an emulation (an injected "Metal" error on Linux is not a GPU problem).

| kind               | what happens at that step                                          |
|--------------------|--------------------------------------------------------------------|
| crash              | a Metal-style command-buffer error on stderr, then abort (SIGABRT) |
| hang               | the process stops itself (SIGSTOP): no heartbeats, no progress      |
| stall              | the training thread sleeps forever; heartbeats continue            |
| nan                | the loss becomes NaN (the worker exits NON_FINITE)                 |
| spike              | the gradient norm explodes for grad_spike.patience steps           |
| oom                | an MLX allocation failure on stderr, then abort                    |
| gpu_watchdog       | the macOS GPU watchdog error on stderr, then abort                 |
| checkpoint_crash   | SIGKILL while writing this step's checkpoint, before the manifest  |
| disk_full          | the first checkpoint written at or after this step fails with      |
|                    | ENOSPC before its manifest, as on a full disk (where a small tmpfs |
|                    | cannot be mounted, tests/test_disk_full.py uses this instead)      |
| leak               | the worker holds 1 GB more MLX memory from this step on: the       |
|                    | supervisor's memory watch (memory_limit_mb) restarts it as planned |

`oom` reproduces how an MLX out-of-memory ends on a Mac (Metal's allocation error, then
abort) rather than exhausting memory for real: on a shared machine that takes everything else
down with it, and under an address-space limit the MLX CPU build segfaults instead of raising.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shared.errors import ConfigError
from shared.faults import EMULATES, KINDS, LEAK_MB, Injected, write_marker

ENV = "OVERNIGHT_INJECT"
_held: list[Any] = []  # what `leak` holds on to, for the rest of the process

CRASH_MESSAGE = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[METAL] Command buffer execution failed: Caused GPU Hang Error "
    "(00000003:kIOGPUCommandBufferCallbackErrorHang)"
)
# Metal's out-of-memory abort, as mlx prints it (ml-explore/mlx#479). Not "[metal::malloc]
# Resource limit (499000) exceeded": that is Metal's buffer count (metal_resource_limit).
OOM_MESSAGE = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
)
WATCHDOG_MESSAGE = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[METAL] Command buffer execution failed: Impacting Interactivity "
    "(0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)"
)


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.step}"


def parse(spec: str) -> list[Fault]:
    faults = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        kind, _, step = part.partition("@")
        if kind not in KINDS or not step.isdigit():
            raise ConfigError(
                f"debug.inject: expected kind@step with kind in {list(KINDS)}, got {part!r}"
            )
        faults.append(Fault(kind, int(step)))
    return faults


class Injector:
    def __init__(self, spec: str, marker_dir: Path, attempt: int | None = None):
        self.faults = parse(spec)
        self.marker_dir = marker_dir
        self.attempt = attempt
        self.spike_steps_left = 0

    def _claim(self, kind: str, step: int) -> bool:
        """True (once per run) if a fault of this kind is due at this step: its marker is
        written (naming this process) and `fault_injected` logged before it fires."""
        for f in self.faults:
            if f.kind == kind and f.step == step:
                if (self.marker_dir / f.name).exists():
                    return False
                attempt = self.attempt
                if attempt is None:  # the worker binds its attempt number to every event
                    bound = structlog.contextvars.get_contextvars().get("attempt")
                    attempt = bound if isinstance(bound, int) else None
                write_marker(self.marker_dir, Injected(f.name, kind, step, os.getpid(), attempt,
                                                       time.time(), EMULATES[kind]))
                structlog.get_logger("worker").warning(
                    "fault_injected", fault=f.name, kind=kind, step=step,
                    emulates=EMULATES[kind])
                return True
        return False

    def due(self, step: int) -> bool:
        """True if any fault is scheduled for `step` (fired or not: a cheap check, no I/O)."""
        return any(f.step == step for f in self.faults)

    def before_step(self, step: int) -> None:
        """Process-level faults, fired just before training step `step`."""
        if self._claim("crash", step):
            _die(CRASH_MESSAGE, f"crash@{step}")
        if self._claim("oom", step):
            _die(OOM_MESSAGE, f"oom@{step}")
        if self._claim("gpu_watchdog", step):
            _die(WATCHDOG_MESSAGE, f"gpu_watchdog@{step}")
        if self._claim("leak", step):
            _leak(LEAK_MB)
        if self._claim("hang", step):
            os.kill(os.getpid(), signal.SIGSTOP)
        if self._claim("stall", step):
            while True:
                time.sleep(3600)

    def loss_is_nan(self, step: int) -> bool:
        return self._claim("nan", step)

    def spike_factor(self, step: int, patience: int) -> float:
        if self._claim("spike", step):
            self.spike_steps_left = patience
        if self.spike_steps_left > 0:
            self.spike_steps_left -= 1
            return 1e7
        return 1.0

    def checkpoint_hook(self, step: int):  # type: ignore[no-untyped-def]
        """A `before_manifest` hook for the checkpoint writer, or None."""
        crash = any(f.kind == "checkpoint_crash" and f.step == step for f in self.faults)
        full = [f for f in self.faults if f.kind == "disk_full" and f.step <= step]
        if not crash and not full:
            return None

        def fire(tmp: Path) -> None:
            if crash and self._claim("checkpoint_crash", step):
                os.kill(os.getpid(), signal.SIGKILL)
            for f in full:
                if self._claim("disk_full", f.step):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                  str(tmp / "manifest.json"))

        return fire


def _die(message: str, fault: str) -> None:
    """Print the emulated error (after a line saying it is one) and abort, as MLX does."""
    print(f"overnight: injected fault {fault} (debug.inject): the next line emulates "
          f"{EMULATES[fault.partition('@')[0]]}; it is not a real error", file=sys.stderr,
          flush=True)
    print(message, file=sys.stderr, flush=True)
    os.abort()


def _leak(mb: int) -> None:
    """Hold `mb` MB of MLX memory (written, so it is resident) until the process ends."""
    import mlx.core as mx

    block = mx.ones((mb * 2**20,), dtype=mx.uint8)
    mx.eval(block)
    _held.append(block)
