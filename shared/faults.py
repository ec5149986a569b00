"""Injected faults: what each kind emulates, and the marker a fired fault leaves behind.

The worker injects faults on purpose (worker/inject.py: `debug.inject: "crash@40"` or
OVERNIGHT_INJECT) to test and rehearse recovery. An injected crash prints the Metal error a Mac
would print — on Linux too — so whoever reads the night afterwards must be told it was not
real. Before a fault fires, the worker writes its marker, `RUN_DIR/inject/<kind>@<step>`
(fsynced; it also makes each fault fire once per run), as strict JSON:

    {"fault": "crash@40", "kind": "crash", "step": 40, "pid": 4242, "attempt": 1,
     "time": 1735786800.5, "emulates": "a Metal command-buffer abort (SIGABRT)"}

The supervisor reads the markers of an attempt's process when the attempt ends and records
their names in run.json (`attempts[].injected`, shared/run_record.py); the report and the demo
say "injected" for an ending of the kind the fault emulates (`ENDS`). Markers written before
this format (a bare time) are still read, by their file name, with no process id.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import strictjson
from shared.exitcodes import FailureClass
from shared.fsutil import atomic_write_bytes
from shared.strictjson import dumps

MARKER_DIR = "inject"  # RUN_DIR/inject/
LEAK_MB = 1024  # what `leak` holds on to (MB of MLX memory)

# kind -> what it emulates (said in the worker's output, the logs, the report and the demo)
EMULATES: dict[str, str] = {
    "crash": "a Metal command-buffer abort (SIGABRT), as the GPU driver ends a process on a Mac",
    "hang": "a frozen worker (SIGSTOP): no heartbeat, no progress",
    "stall": "a training thread stuck while heartbeats go on",
    "nan": "a non-finite loss",
    "spike": "an exploding gradient norm",
    "oom": "MLX running out of Metal memory (allocation error, then abort)",
    "gpu_watchdog": "the macOS GPU watchdog killing a long command buffer",
    "checkpoint_crash": "a kill (SIGKILL) in the middle of a checkpoint write",
    "leak": f"a memory leak: the worker holds {LEAK_MB} MB more MLX memory from that step on",
    "disk_full": "a full disk (ENOSPC) while a checkpoint is written",
}
KINDS = tuple(EMULATES)
# kinds that print an emulated error (worker/inject.py, after a line saying so)
EMULATED_OUTPUT = frozenset({"crash", "oom", "gpu_watchdog"})

# kind -> how the attempt it ends is classified (shared/exitcodes.py): an attempt ended "by an
# injected fault" when a fault fired in it and its ending is of the class the fault emulates.
ENDS: dict[str, FailureClass] = {
    "crash": FailureClass.CRASH,
    "hang": FailureClass.HANG,
    "stall": FailureClass.STALL,
    "nan": FailureClass.NON_FINITE,
    "spike": FailureClass.GRAD_SPIKE,
    "oom": FailureClass.OOM,
    "gpu_watchdog": FailureClass.GPU_WATCHDOG,
    "checkpoint_crash": FailureClass.CRASH,
    "leak": FailureClass.PLANNED_RESTART,
    "disk_full": FailureClass.DISK_FULL,
}


@dataclass(frozen=True)
class Injected:
    """One fired fault (the marker's JSON, above)."""

    fault: str  # "crash@40"
    kind: str
    step: int
    pid: int | None  # the worker process it fired in (None: a marker of the older format)
    attempt: int | None
    time: float
    emulates: str

    def to_dict(self) -> dict[str, Any]:
        return {"fault": self.fault, "kind": self.kind, "step": self.step, "pid": self.pid,
                "attempt": self.attempt, "time": self.time, "emulates": self.emulates}


def marker_dir(run_root: Path) -> Path:
    return run_root / MARKER_DIR


def write_marker(directory: Path, fired: Injected) -> Path:
    """Write (atomically, fsynced) the marker of a fault about to fire; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / fired.fault
    atomic_write_bytes(path, (dumps(fired.to_dict()) + "\n").encode())
    return path


def read_markers(directory: Path) -> list[Injected]:
    """Every fired fault in `directory`, oldest first; unreadable markers are skipped."""
    out = []
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            found = _read(path)
            if found is not None:
                out.append(found)
    return sorted(out, key=lambda f: (f.time if math.isfinite(f.time) else 0.0, f.fault))


def fired_in(directory: Path, pid: int) -> tuple[str, ...]:
    """The names ("crash@40") of the faults that fired in worker process `pid`."""
    return tuple(f.fault for f in read_markers(directory) if f.pid == pid)


def ended_by(injected: tuple[str, ...] | list[str], ending: object) -> str:
    """The fault among `injected` (names) that explains an ending of class `ending`, or ""."""
    for name in injected:
        kind = name.partition("@")[0]
        if ENDS.get(kind) == ending:
            return name
    return ""


def describe(name: str) -> str:
    """What the fault named `name` ("crash@40") emulates ("" for an unknown kind)."""
    return EMULATES.get(name.partition("@")[0], "")


def _read(path: Path) -> Injected | None:
    kind, _, step = path.name.partition("@")
    if kind not in EMULATES or not step.isdigit():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    data: Any = None
    with contextlib.suppress(ValueError):
        data = strictjson.loads(text)
    if isinstance(data, dict):
        pid, attempt, t = data.get("pid"), data.get("attempt"), data.get("time")
        return Injected(path.name, kind, int(step), pid if isinstance(pid, int) else None,
                        attempt if isinstance(attempt, int) else None,
                        float(t) if isinstance(t, (int, float)) else math.nan, EMULATES[kind])
    t = math.nan
    with contextlib.suppress(ValueError):
        t = float(text.strip())  # the older marker: the time it fired
    return Injected(path.name, kind, int(step), None, None, t, EMULATES[kind])
