"""The per-kind table: injected, recovered, max |Δ|, corrupt checkpoints accepted, classified
right — as data (for tests and the JSON file) and as a Markdown table (for the terminal and
the README)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.kinds import CORRUPT_PREFIX, KINDS
from tests.chaos.results import FaultResult, RunResult


@dataclass
class KindRow:
    kind: str
    planned: int = 0
    injected: int = 0
    recovered: int = 0
    classified_ok: int = 0
    corrupt_accepted: int | None = None  # corrupt kinds only
    exact: bool = True
    delta_max: float | None = None  # over faults in runs that changed nothing trained
    delta_measured: float | None = None  # over all of them (rollback/OOM runs included)
    recovery_s: float | None = None  # median seconds from fault to the next attempt's step
    landed: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "#12: observed ..." per bad fault
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything the quick test asserts."""
        return (self.injected > 0 and self.recovered == self.injected
                and self.classified_ok == self.injected and not self.corrupt_accepted
                and (not self.exact or self.delta_max == 0.0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def rows(runs: list[RunResult], kinds: list[str]) -> list[KindRow]:
    faults = [f for run in runs for f in run.faults]
    out = []
    for kind in kinds:
        mine = [f for f in faults if f.kind == kind]
        row = KindRow(kind, planned=len(mine), exact=KINDS[kind].exact)
        fired = [f for f in mine if f.fired]
        row.injected = len(fired)
        row.recovered = sum(bool(f.recovered) for f in fired)
        row.classified_ok = sum(bool(f.classified_ok) for f in fired)
        if kind.startswith(CORRUPT_PREFIX):
            row.corrupt_accepted = sum(bool(f.corrupt_accepted) for f in fired)
        required = [f.delta for f in fired if f.delta is not None and f.delta_required]
        measured = [f.delta for f in fired if f.delta is not None]
        row.delta_max = _worst(required)
        row.delta_measured = _worst(measured)
        times = [f.recovery_s for f in fired if f.recovery_s is not None]
        row.recovery_s = round(statistics.median(times), 2) if times else None
        row.landed = dict(Counter(f.landed for f in fired if f.landed))
        row.failures = [_failure(f) for f in fired if not _good(f)]
        row.skipped = [f"#{f.id}: {f.skipped}" for f in mine if not f.fired]
        out.append(row)
    return out


def _worst(values: list[float]) -> float | None:
    if not values:
        return None
    if any(v != v for v in values):
        return float("nan")
    return max(values)


def _good(f: FaultResult) -> bool:
    return bool(f.recovered and f.classified_ok and not f.corrupt_accepted
                and (not f.delta_required or f.delta == 0.0))


def _failure(f: FaultResult) -> str:
    bits = []
    if not f.recovered:
        bits.append("not recovered" + (f" ({f.blamed[:200]})" if f.blamed else ""))
    if not f.classified_ok:
        bits.append(f"expected {f.expected}, got {f.observed[:200]}")
    if f.corrupt_accepted:
        bits.append(f"resumed from the damaged {f.facts.get('corrupted')}")
    if f.delta_required and f.delta is not None and f.delta != 0.0:
        bits.append(f"Δ {f.delta:.3g}")
    return f"#{f.id} (run {f.run}, step {f.step}): " + "; ".join(bits)


def _delta(row: KindRow) -> str:
    if not row.exact:
        measured = "" if row.delta_measured is None else f"; measured {row.delta_measured:.2g}"
        return f"n/a ({KINDS[row.kind].changes}{measured})"
    if row.delta_max is None:
        return "–"
    return "0.0" if row.delta_max == 0.0 else f"{row.delta_max:.3g}"


def markdown(table: list[KindRow]) -> str:
    lines = ["| fault | injected | recovered | max \\|Δ\\| | corrupt accepted | classified "
             "right | recovery s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        if not row.planned:
            continue
        notes = [f"{n} {where}" for where, n in sorted(row.landed.items())]
        if row.skipped:
            notes.append(f"{len(row.skipped)} not fired")
        if row.failures:
            notes.append("FAILED: " + " / ".join(row.failures)[:300])
        lines.append(
            f"| {row.kind} | {row.injected} | {row.recovered}/{row.injected} | {_delta(row)} | "
            f"{'–' if row.corrupt_accepted is None else row.corrupt_accepted} | "
            f"{row.classified_ok}/{row.injected} | "
            f"{'–' if row.recovery_s is None else row.recovery_s} | "
            f"{'; '.join(notes).replace('|', '/')} |")
    return "\n".join(lines)


def load(path: Path) -> tuple[dict[str, Any], list[KindRow]]:
    """A results file written by `--out`: its top-level data and its table."""
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(KindRow)}
    rows = []
    for d in data["table"]:
        row = KindRow(**{k: v for k, v in d.items() if k in names})
        for key in ("delta_max", "delta_measured"):  # strict JSON wrote "nan"/"inf"
            value = getattr(row, key)
            if isinstance(value, str):
                setattr(row, key, float(value))
        rows.append(row)
    return data, rows
