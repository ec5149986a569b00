"""trainer_state.json: everything besides weights and optimizer moments that resuming needs.

One file per checkpoint (shared/checkpoint.py). The worker writes it (worker/train.py) and
resumes from it (worker/session.py); the validator (`shared.checkpoint.validate`, run by the
supervisor before a restart and by `overnight checkpoints --verify`) decodes it with the same
`decode()`, so a checkpoint that validates has every field the worker's resume reads: "valid"
and "resumable" cannot disagree. Schema (version 1; files written before the version field
existed are version 1):

    {
      "schema_version": 1,
      "step": 250, "total_steps": 2000,
      "data_position": 250,          # effective batches consumed (worker/batching.py)
      "groups_per_epoch": 64,
      "plan": {"leftover": "short_group", "groups_per_epoch": 64, "examples": 256,
               "effective_batch": 4, "fingerprint": "..."},
      "skipped_batches": [41],       # epoch-plan batches never trained on (data problems)
      "rng": {"scheme": "seed(seed*1000003 + step*1009 + micro_batch)", "seed": 0},
      "early_stopping": {"best": 1.84, "best_step": 250, "bad_evals": 0},   # best: null = none
      "grad_spike": {"history": [0.8, ...], "consecutive": 0, "first_bad_step": -1},
      "best": {"val_loss": 1.84, "step": 250},   # val_loss null, step -1: no evaluation yet
      "last_val_loss": 1.84,
      "val_examples": 32,            # size of the fixed validation subset; -1: not chosen yet
      "batch": {"batch_size": 4, "grad_accumulation_steps": 2, "effective": 8},
      "config_hash": "9c1e...", "config": {...},   # shared.config.Config.hash() / to_dict()
      "lr_scale": 1.0, "lr": 1e-5,
      "loss_history": [...], "step_seconds": [...], "step_tokens": [...],  # last 50 steps
      "tokens_total": 123456, "train_seconds": 3600.0,
      "reason": "periodic",          # periodic, best, requested, final, early_stop,
                                     # grad_spike, graceful_stop
      "run_id": "...", "attempt": 2, "time": 1.7e9,
      "versions": {"mlx": "0.32.4", "mlx-lm": "0.32.2", "mlx-overnight": "0.1.0"},
      "data": {"train_fingerprint": "080969fc3b4e257d", "train_examples": 256,
               "path": ".../train.jsonl", "examples": 256, "malformed": 1, ...}
                                     # worker/data.py Examples.summary()
    }

Fields without a default are required: a file missing one is not a checkpoint. Beyond the
types, `TrainerState.inconsistency()` names what would make the worker refuse or misuse a
well-typed state: a batch split that is not its effective batch, a negative data position,
a learning-rate scale that is not a positive number, and a `config_hash` that is not the
hash of the `config` stored beside it (shared/config_identity.py). The validator runs it,
so a state the worker cannot resume from is no valid checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared import records, strictjson
from shared.config_identity import config_hash
from shared.errors import CheckpointError

SCHEMA_VERSION = 1
_RULES = records.Rules(CheckpointError)


@dataclass(frozen=True)
class RngScheme:
    """How dropout randomness is seeded: from (seed, step, micro-batch), nothing to save."""

    scheme: str
    seed: int


@dataclass(frozen=True)
class EarlyStoppingState:
    """worker.monitors.EarlyStopper's state; best is None before the first improvement."""

    best: float | None
    best_step: int
    bad_evals: int


@dataclass(frozen=True)
class GradSpikeState:
    """worker.monitors.SpikeDetector's state: recent gradient norms and the current streak."""

    history: tuple[float, ...]
    consecutive: int
    first_bad_step: int


@dataclass(frozen=True)
class Best:
    """The best validation loss so far and its step (None, -1: no evaluation yet)."""

    val_loss: float | None
    step: int


@dataclass(frozen=True)
class BatchSplit:
    """The micro-batch and accumulation the checkpoint was trained with; `effective` (their
    product) must stay the same on resume."""

    batch_size: int
    grad_accumulation_steps: int
    effective: int


@dataclass(frozen=True)
class PlanState:
    """The epoch plan the data position counts in (worker/batching.py EpochPlan.to_dict):
    written since the plan keeps a short last group; absent in older checkpoints."""

    leftover: Literal["short_group", "drop"]
    groups_per_epoch: int
    examples: int
    effective_batch: int
    fingerprint: str


@dataclass(frozen=True)
class DataIdentity:
    """Which training file the data position counts in (worker/data.py's fingerprint) and
    the worker's counts for it (worker/data.py Examples.summary(); `use`: streaming's counts
    so far, UseCounts.to_dict()). malformed_lines: what older workers wrote instead."""

    train_fingerprint: str
    train_examples: int
    malformed_lines: int | None = None
    path: str = ""
    examples: int | None = None
    malformed: int = 0
    no_targets: int = 0
    blank: int = 0
    truncated: int = 0
    longest: int = 0
    max_seq_length: int = 0
    lengths_known: bool = True
    first_problems: tuple[str, ...] = ()
    format: str = ""
    streaming: bool = False
    examples_read: int | None = None
    use: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainerState:
    """The contents of trainer_state.json (see the module docstring for the JSON)."""

    step: int
    total_steps: int
    data_position: int
    rng: RngScheme
    early_stopping: EarlyStoppingState
    grad_spike: GradSpikeState
    best: Best
    batch: BatchSplit
    config_hash: str
    versions: dict[str, str]
    lr_scale: float
    loss_history: tuple[float, ...]
    reason: str
    schema_version: int = SCHEMA_VERSION
    groups_per_epoch: int | None = None
    plan: PlanState | None = None
    skipped_batches: tuple[int, ...] = ()  # epoch-plan batches never trained on (--skip-batch)
    last_val_loss: float | None = None
    val_examples: int = -1
    config: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    step_seconds: tuple[float, ...] = ()
    step_tokens: tuple[int, ...] = ()
    tokens_total: int = 0
    train_seconds: float = 0.0
    run_id: str = ""
    attempt: int = 0
    time: float | None = None
    data: DataIdentity | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = records.to_dict(self)
        return out

    def inconsistency(self) -> str:
        """What makes this state unusable although every field has its type (the module
        docstring), naming the field; "" when nothing does."""
        b = self.batch
        if min(b.batch_size, b.grad_accumulation_steps) < 1 \
                or b.effective != b.batch_size * b.grad_accumulation_steps:
            return (f"batch: effective {b.effective} is not batch_size {b.batch_size} x "
                    f"grad_accumulation_steps {b.grad_accumulation_steps} (each >= 1)")
        if self.plan is not None and self.plan.effective_batch != b.effective:
            return (f"plan: effective_batch {self.plan.effective_batch}, batch: effective "
                    f"{b.effective}")
        if self.data_position < 0:
            return f"data_position: expected >= 0, got {self.data_position}"
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            return f"lr_scale: expected a positive number, got {self.lr_scale}"
        if self.config:
            own = config_hash(self.config)
            if own != self.config_hash:
                return (f"config_hash {self.config_hash} is not the hash of the config "
                        f"stored with it ({own})")
        return ""


def decode(obj: Any, where: str) -> TrainerState:
    """A TrainerState from a parsed trainer_state.json; CheckpointError naming `where` and
    the field when it is not one (wrong type, a required field missing, an unknown field, a
    schema version this code does not know)."""
    state = records.build(TrainerState, obj, where, _RULES)
    if state.schema_version != SCHEMA_VERSION:
        raise CheckpointError(f"{where}: expected schema_version {SCHEMA_VERSION}, got "
                              f"{state.schema_version} (written by another mlx-overnight?)")
    return state


def load(path: Path, where: str | None = None) -> TrainerState:
    """Read and decode one trainer_state.json; CheckpointError if it is unreadable."""
    where = where or f"{path.parent.name}/{path.name}"
    try:
        obj = strictjson.loads(path.read_text())  # bounded (shared/strictjson.py)
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{where}: {e.strerror or e}") from None
    return decode(obj, where)
