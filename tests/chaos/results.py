"""What the campaign found: one record per fault and per run (strict JSON when written)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.chaos.plan import PlannedFault


@dataclass
class FaultResult:
    id: int
    kind: str
    variant: str
    run: int
    trigger: int
    seed: int
    fired: bool = False
    skipped: str = ""  # why it never fired
    t_fired: float | None = None  # epoch seconds
    step: int | None = None  # the step the run was at when it fired
    worker_pid: int | None = None  # the worker it hit (or that ran when it fired)
    attempt: int | None = None  # run.json attempt number it hit
    landed: str = ""  # where a timed kill landed: "mid-checkpoint", "while loading", ...
    facts: dict[str, Any] = field(default_factory=dict)  # kind-specific observations
    expected: str = ""
    observed: str = ""
    classified_ok: bool | None = None
    blamed: str = ""  # the run's supervisor died or gave up because of this fault
    recovered: bool | None = None
    corrupt_accepted: bool | None = None  # corrupt kinds: the worker resumed from it
    delta: float | None = None  # max |Δ| of the run's final adapters vs the reference
    delta_required: bool = False  # the run changed nothing trained: Δ must be 0.0
    recovery_s: float | None = None  # fired -> first step of the next attempt
    notes: list[str] = field(default_factory=list)

    @classmethod
    def planned(cls, f: PlannedFault, run: int) -> FaultResult:
        return cls(f.id, f.kind, f.variant, run, f.trigger, f.seed)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = finite(asdict(self))
        return out


@dataclass
class RunResult:
    index: int
    plan: dict[str, Any]
    run_dir: str
    seconds: float = 0.0
    state: str | None = None
    final_step: int | None = None
    high_water_step: int | None = None
    total_steps: int | None = None
    finished: bool = False
    delta: float | None = None
    attempts: int = 0
    supervisors_started: int = 0
    rescues: int = 0
    unexpected: list[str] = field(default_factory=list)
    faults: list[FaultResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = finite(asdict(self))
        d["faults"] = [f.to_dict() for f in self.faults]
        return d


def finite(value: Any) -> Any:
    """Strict JSON: NaN and ±inf become their names as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
