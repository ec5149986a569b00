"""Fault injection: make the worker fail on purpose, to test and rehearse recovery.

Spec (config `debug.inject` or env OVERNIGHT_INJECT, comma-separated): `kind@step`, e.g.
`crash@120,hang@300`. Each fault fires once per run: a marker file in RUN_DIR/inject/ is
written (and fsynced) before it fires, so the restarted worker trains through that step.

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

`oom` reproduces how an MLX out-of-memory ends on a Mac (Metal's allocation error, then
abort) rather than exhausting memory for real: on a shared machine that takes everything else
down with it, and under an address-space limit the MLX CPU build segfaults instead of raising.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.fsutil import atomic_write_bytes

KINDS = ("crash", "hang", "stall", "nan", "spike", "oom", "gpu_watchdog", "checkpoint_crash")
ENV = "OVERNIGHT_INJECT"

CRASH_MESSAGE = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[METAL] Command buffer execution failed: Caused GPU Hang Error "
    "(00000003:kIOGPUCommandBufferCallbackErrorHang)"
)
OOM_MESSAGE = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[metal::malloc] Resource limit (499000) exceeded."
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
    def __init__(self, spec: str, marker_dir: Path):
        self.faults = parse(spec)
        self.marker_dir = marker_dir
        self.spike_steps_left = 0

    def _claim(self, kind: str, step: int) -> bool:
        """True (once per run) if a fault of this kind is due at this step."""
        for f in self.faults:
            if f.kind == kind and f.step == step:
                marker = self.marker_dir / f.name
                if marker.exists():
                    return False
                self.marker_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(marker, f"{time.time()}\n".encode())
                return True
        return False

    def before_step(self, step: int) -> None:
        """Process-level faults, fired just before training step `step`."""
        if self._claim("crash", step):
            _die(CRASH_MESSAGE)
        if self._claim("oom", step):
            _die(OOM_MESSAGE)
        if self._claim("gpu_watchdog", step):
            _die(WATCHDOG_MESSAGE)
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
        if not any(f.kind == "checkpoint_crash" and f.step == step for f in self.faults):
            return None

        def die(_tmp: Path) -> None:
            if self._claim("checkpoint_crash", step):
                os.kill(os.getpid(), signal.SIGKILL)

        return die


def _die(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os.abort()
