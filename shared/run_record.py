"""run.json: the record of one supervised run — what happened, for status, logs and the report.

The supervisor is its only writer (supervisor/daemon/record.py: atomically, on every change);
`overnight status`, `report`, `logs`, `demo` and `services` read it through `load()` /
`decode()`, which name the first bad field. Times are ISO 8601 UTC strings; durations are
seconds (float); memory is MB. Schema version 1 (every run.json ever written is version 1):

    {
      "schema_version": 1,
      "run_id": "mini-20250102T013000-3fa2",
      "run_dir": "/abs/runs/mini",   "config_path": "/abs/mini.yaml",
      "config": {...},               # resolved config (shared.config.Config.to_dict())
      "config_hash": "9c1e...",
      "created": "...", "updated": "...", "ended": null | "...",
      "state": "training",           # State below
      "reason": "",                  # why the last state was entered (final: the verdict)
      "supervisor": {"pid": 123, "host": "mbp", "started": "...", "starts": 1,
                     "boot_id": "f56d..."},   # a changed boot id: the machine restarted
      "worker": null | {"pid": 456, "attempt": 3, "started": "...", "argv": [...]},
      "overrides": {"batch_size": 2, "grad_accumulation_steps": 8,   # the settings the
                    "lr_scale": 0.5,          # supervisor changed (only those); every attempt
                    "skip_batches": [41],     # gets them. Epoch-plan batches that are data
                    "skip_positions": [812]}, # problems; data positions skipped once (rollbacks)
      "rollbacks": 1,                # rollbacks so far (budget: supervisor.max_rollbacks)
      "high_water_step": 830,        # highest step the run ever reached (progress measure)
      "final_step": 812,             # the step the run is at (after a rollback: below the
                                     # high-water mark); at the end: the final step
      "total_steps": 2000,
      "best_checkpoint": null | {"step": 750, "path": "..." | null, "val_loss": 1.84},
      "latest_checkpoint": null | {"step": 800, "path": "..."},
      "quarantined": [{"checkpoint": "step-0000250", "path": "...", "reason": "...",
                       "time": "..."}],
      "totals": {"attempts": 3, "failures": 2, "planned_restarts": 0, "rollbacks": 1,
                 "restarts": 2, "steps_trained": 900, "tokens": 123456,
                 "train_seconds": 3600.0, "downtime_seconds": 42.0},
      "attempts": [{
        "attempt": 1, "pid": 456, "argv": [...], "log": "logs/worker-1.log",
        "started": "...", "ended": null | "...",
        "start_reason": "initial" | "<previous attempt's action_reason>",
        "resumed_from": null | {"step": 250, "path": "..."},   # null: fresh start
        "skip_steps": 0,               # data positions skipped after the resume point
                                       # (--skip-position, or --skip-steps: none was named)
        "lr_scale": null | 0.5,
        "settings": {...overrides in effect...},
        "start_step": 250, "end_step": 400, "steps_gained": 150,
        "checkpoints_saved": [300, 350, 400],
        # known once the attempt ended (null / 0 / "" / false before):
        "exit_code": null | 21, "signal": null | 6, "signal_name": null | "SIGABRT",
        "classification": null | "crash",  # shared.exitcodes.FailureClass; null while
                                           # running, or for "abandoned" attempts
        "detail": "killed by SIGABRT: ... command buffer ...",
        "detected_by": "exit" | "heartbeat_timeout" | "stall_timeout" | "memory" | "recycle"
                       | "power" | "stop_request",
        "detection_latency_s": 0.04,   # last sign of life (message or output) -> noticed
        "killed_after_stop_timeout": false,
        "time_to_first_heartbeat_s": 0.9, "time_to_first_step_s": 4.1,
        "downtime_s": null | 6.2,      # previous attempt's end noticed -> this one's first step
        "tokens": 40960, "tokens_per_sec_avg": 812.5,
        "peak_rss_mb": 1400.2, "peak_mlx_mb": 900.1, "min_available_mb": 5100.0,
        "stderr_tail": "last lines of logs/worker-1.log",
        "bad_data": null | {"position": 815, "batch": 41, "lines": "train.jsonl:88-91",
                            "lr_scale": 1.0},  # the failing step's batch (non-finite, spike)
        "injected": ["crash@40"],      # faults injected on purpose in this attempt
                                       # (debug.inject; shared/faults.py); [] for none
        "ranks": [{"rank": 1, "host": "localhost", "pid": 4242, "log": "worker-1-rank-1.log",
                   "returncode": -9, "lost_peer": false}, ...],  # a group's ranks; [] alone
        "failed_rank": null | 1,       # the rank whose end or silence failed the group
        "action": Action below,
        "action_reason": "crash: killed by SIGABRT ...",
        "restart_delay_s": 5.3,
        "settings_changed": {"batch_size": [4, 2], "grad_accumulation_steps": [2, 4]}
      }]
    }
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from shared import records, strictjson
from shared.errors import RecordError
from shared.exitcodes import FailureClass

SCHEMA_VERSION = 1
_RULES = records.Rules(RecordError)


class State(str, Enum):
    """The supervisor's state (the state machine is supervisor/daemon/state.py)."""

    STARTING = "starting"  # a worker is being started or loads/compiles (no step yet)
    TRAINING = "training"  # the worker reports steps
    STOPPING = "stopping"  # we sent SIGTERM and wait (stop_timeout, then SIGKILL)
    BACKING_OFF = "backing_off"  # no worker; waiting for the restart delay
    RESTARTING = "restarting"  # validating checkpoints and spawning the next attempt
    FINISHED = "finished"
    EARLY_STOPPED = "early_stopped"
    GAVE_UP = "gave_up"
    STOPPED = "stopped"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @property
    def has_worker(self) -> bool:
        return self in LIVE_STATES

    @property
    def is_complete(self) -> bool:
        """The run is done: starting it again does nothing."""
        return self in (State.FINISHED, State.EARLY_STOPPED)


FINAL_STATES = frozenset({State.FINISHED, State.EARLY_STOPPED, State.GAVE_UP, State.STOPPED})
LIVE_STATES = frozenset({State.STARTING, State.TRAINING, State.STOPPING})


class Action(str, Enum):
    """What the supervisor did after an attempt ended (supervisor/daemon/policy.py)."""

    RESTART = "restart"
    REDUCE_MEMORY = "reduce_memory"
    ROLLBACK = "rollback"
    SKIP_BATCH = "skip_batch"  # the same batch non-finite again: a data problem, skipped
    QUARANTINE_CHECKPOINT = "quarantine_checkpoint"  # the worker refused it: an older one next
    PLANNED_RESTART = "planned_restart"
    FINISH = "finish"
    EARLY_STOP = "early_stop"
    STOP = "stop"
    GIVE_UP = "give_up"
    ABANDONED = "abandoned"  # the supervisor died during the attempt; the next one went on
    WAIT_FOR_SPACE = "wait_for_space"  # a full disk: restart once there is room again
    WAIT_FOR_POWER = "wait_for_power"  # paused on battery: restart once on AC (or charged)


class Detection(str, Enum):
    """What noticed that an attempt ended or had to end."""

    EXIT = "exit"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    STALL_TIMEOUT = "stall_timeout"
    MEMORY = "memory"
    RECYCLE = "recycle"  # a planned worker recycle before Metal's resource limit
    POWER = "power"  # on battery below the configured charge
    STOP_REQUEST = "stop_request"


@dataclass(frozen=True)
class LatestCheckpoint:
    step: int
    path: str


@dataclass(frozen=True)
class BestCheckpoint:
    step: int
    path: str | None  # None: that checkpoint was not kept
    val_loss: float


@dataclass(frozen=True)
class SupervisorInfo:
    pid: int
    host: str
    started: str
    starts: int  # how many supervisors have run this run
    boot_id: str = ""  # the machine's boot (Linux: /proc/sys/kernel/random/boot_id)


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    attempt: int
    started: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Quarantined:
    checkpoint: str
    path: str
    reason: str
    time: str


@dataclass(frozen=True)
class Totals:
    attempts: int = 0
    failures: int = 0
    planned_restarts: int = 0
    rollbacks: int = 0
    restarts: int = 0
    steps_trained: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    downtime_seconds: float = 0.0


@dataclass(frozen=True)
class BadData:
    """The batch of a failing step, as the worker named it (non-finite loss, gradient spike):
    its data position, its group in the epoch plan, its file lines, and the learning-rate
    scale in effect."""

    position: int
    batch: int
    lines: str
    lr_scale: float


@dataclass(frozen=True)
class RankRecord:
    """One rank of a data-parallel group's attempt (supervisor/daemon/group.py).

    {"rank": 1, "host": "localhost", "pid": 4242, "log": "worker-3-rank-1.log",
     "returncode": -9, "lost_peer": false}
    """

    rank: int
    host: str
    pid: int
    log: str
    returncode: int | None = None
    lost_peer: bool = False  # it ended only because another rank had (collateral)


@dataclass(frozen=True)
class AttemptRecord:
    """One worker process: the first block is known at its start, the rest at its end."""

    attempt: int
    pid: int
    argv: tuple[str, ...]
    log: str
    started: str
    ended: str | None
    start_reason: str
    resumed_from: LatestCheckpoint | None
    skip_steps: int
    lr_scale: float | None
    settings: dict[str, Any]
    start_step: int
    end_step: int
    steps_gained: int
    checkpoints_saved: tuple[int, ...] = ()
    exit_code: int | None = None
    signal: int | None = None
    signal_name: str | None = None
    classification: FailureClass | None = None
    detail: str = ""
    detected_by: Detection | None = None
    detection_latency_s: float | None = None
    killed_after_stop_timeout: bool = False
    time_to_first_heartbeat_s: float | None = None
    time_to_first_step_s: float | None = None
    downtime_s: float | None = None
    tokens: int = 0
    tokens_per_sec_avg: float | None = None
    peak_rss_mb: float | None = None
    peak_mlx_mb: float | None = None
    min_available_mb: float | None = None
    stderr_tail: str = ""
    action: Action | None = None
    action_reason: str = ""
    restart_delay_s: float | None = None
    settings_changed: dict[str, Any] = field(default_factory=dict)
    bad_data: BadData | None = None
    injected: tuple[str, ...] = ()  # faults fired in it on purpose (shared/faults.py)
    ranks: tuple[RankRecord, ...] = ()  # a data-parallel group's ranks (one process: none)
    failed_rank: int | None = None  # the group's rank whose end (or silence) failed it


@dataclass(frozen=True)
class RunRecord:
    """The contents of run.json (see the module docstring for the JSON)."""

    run_id: str
    run_dir: str
    config_path: str
    config: dict[str, Any]
    config_hash: str
    created: str
    state: State
    supervisor: SupervisorInfo
    schema_version: int = SCHEMA_VERSION
    updated: str | None = None
    ended: str | None = None
    reason: str = ""
    worker: WorkerInfo | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    rollbacks: int = 0
    high_water_step: int = 0
    final_step: int = 0
    total_steps: int = 0
    best_checkpoint: BestCheckpoint | None = None
    latest_checkpoint: LatestCheckpoint | None = None
    quarantined: tuple[Quarantined, ...] = ()
    totals: Totals = field(default_factory=Totals)
    attempts: tuple[AttemptRecord, ...] = ()

    @property
    def current(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = records.to_dict(self)
        return out


def decode(obj: Any, where: str = "run.json") -> RunRecord:
    """A RunRecord from a parsed run.json; RecordError naming the field otherwise (and for a
    schema version this code does not know: a newer mlx-overnight wrote it)."""
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: expected schema_version {SCHEMA_VERSION}, got {version!r}")
    return records.build(RunRecord, obj, where, _RULES)


def load(path: Path) -> RunRecord | None:
    """The record in `path`, or None when there is none; RecordError when it is not one."""
    found = load_with_json(path)
    return found[0] if found is not None else None


def load_with_json(path: Path) -> tuple[RunRecord, dict[str, Any]] | None:
    """The record in `path` and the JSON object it was decoded from (`overnight status
    --json` prints the file as written); None when there is none; RecordError otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not valid JSON (not UTF-8: byte {raw[e.start]:#04x} at "
                          f"offset {e.start})") from None
    try:
        obj = strictjson.loads(text)  # bounded: never RecursionError (shared/strictjson.py)
    except ValueError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None
    return decode(obj, str(path)), obj
