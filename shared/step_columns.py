"""A metrics_batch read as columns: the supervisor's fast way in for the steps of one flush.

At > 100 steps/s the worker sends one `metrics_batch` (shared/protocol.py StepMetricsBatch)
per 50 ms telemetry flush, ~7 rows each. `protocol.decode` checks such a message field by
field through shared/records.py (a converter call per value, a StepRow dataclass per row)
and `unfold()` builds a StepMetrics per row: ~25-35 us a step, most of the supervisor's
CPU at that rate. `parse(raw)` reads the same message as columns instead:

- the bytes are parsed with orjson (already a dependency: the morning's metrics reader),
  which has no per-number Python callbacks;
- the envelope (type, v, run_id, attempt, token, rank) is checked once, every row's keys in
  one set comparison, and each column with one type test over its values (`type(v) is
  float` for all of them, the common case), with no dataclass built per row.

It accepts only what `protocol.decode` accepts, and gives the same values: anything it is
not sure of — any parse error (orjson refuses what the standard library may accept: a
byte-order mark, UTF-16, lone surrogates), a number of 2**63 or more in magnitude (orjson
reads an integer literal past 64 bits as a float or an unsigned int, where the wire refuses
it; a float that large is legal but rare), a missing, extra or wrongly typed field, a row
count outside 1..MAX_BATCH_STEPS, another message type — returns None, and the caller
decodes the message the one general way (`protocol.decode`), which accepts it or raises
the ProtocolError naming the problem. So a hostile batch is refused exactly as before,
with the same reason; tests/test_step_columns.py holds the two ways to the same answer on
valid and perturbed batches (Hypothesis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from shared.protocol import (
    MAX_BATCH_STEPS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ROW_FIELDS,
    StepMetrics,
    StepMetricsBatch,
)
from shared.records import NON_FINITE

INT_COLUMNS = ("step", "tokens", "data_position")
FLOAT_COLUMNS = tuple(k for k in ROW_FIELDS if k not in INT_COLUMNS)
OPTIONAL = {"data_position": -1, "cache_mb": 0.0, "footprint_mb": 0.0}  # StepRow's defaults
_ALL = frozenset(ROW_FIELDS)
_REQUIRED = _ALL - OPTIONAL.keys()
_ENVELOPE = frozenset({"type", "v", "run_id", "attempt", "steps", "token", "rank"})
# Numbers orjson reads that may have been integer literals beyond the wire's signed 64 bits
# (it makes those floats, or unsigned ints up to 2**64 - 1): at or past these, go the
# general way (shared/strictjson.py refuses such integers and reads such floats).
_INT_MIN, _INT_END = -(2**63), 2**63
_FLOAT_BOUND = 2.0**63


@dataclass(frozen=True)
class StepColumns:
    """The steps of one metrics_batch, column by column: `step[i]`, `loss[i]`, ... are row
    i's values (ints: step, tokens, data_position; the rest floats, "nan"/"inf" read back as
    floats), with the envelope the batch says once. Units as in StepMetrics (seconds, MB)."""

    run_id: str
    attempt: int
    token: str
    rank: int
    step: tuple[int, ...]
    time: tuple[float, ...]
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    lr: tuple[float, ...]
    tokens: tuple[int, ...]
    tokens_per_sec: tuple[float, ...]
    step_seconds: tuple[float, ...]
    active_mb: tuple[float, ...]
    peak_mb: tuple[float, ...]
    rss_mb: tuple[float, ...]
    data_position: tuple[int, ...]
    cache_mb: tuple[float, ...]
    footprint_mb: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.step)

    def row(self, i: int) -> StepMetrics:
        """Row `i` as the single StepMetrics it stands for (the batch's token and rank)."""
        return StepMetrics(self.run_id, self.attempt,
                           *(getattr(self, k)[i] for k in ROW_FIELDS),
                           token=self.token, rank=self.rank)

    def unfold(self) -> list[StepMetrics]:
        """Every row as a StepMetrics: what `protocol.decode_all` gives for the same bytes."""
        return [self.row(i) for i in range(len(self))]


def parse(raw: bytes | str) -> StepColumns | None:
    """The metrics_batch `raw` as columns, or None: not one, or not one this fast reader is
    sure of (then `protocol.decode` decides, and names any problem). Never raises."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_MESSAGE_BYTES:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or obj.get("type") != StepMetricsBatch.TYPE \
            or not obj.keys() <= _ENVELOPE:
        return None
    version, run_id, attempt = obj.get("v"), obj.get("run_id"), obj.get("attempt")
    token, rank, rows = obj.get("token", ""), obj.get("rank", 0), obj.get("steps")
    if type(version) is not int or version != PROTOCOL_VERSION or type(run_id) is not str \
            or type(attempt) is not int or type(token) is not str or type(rank) is not int \
            or type(rows) is not list or not 1 <= len(rows) <= MAX_BATCH_STEPS \
            or not (_INT_MIN <= attempt < _INT_END and _INT_MIN <= rank < _INT_END):
        return None
    full = True  # every row has every field (what a worker sends)
    for r in rows:
        if type(r) is not dict:
            return None
        keys = r.keys()
        if keys != _ALL:
            if not (_REQUIRED <= keys <= _ALL):
                return None
            full = False
    columns: dict[str, tuple[int, ...] | tuple[float, ...]] = {}
    for name in INT_COLUMNS:
        ints = [r[name] for r in rows] if full or name not in OPTIONAL else \
            [r.get(name, OPTIONAL[name]) for r in rows]
        for v in ints:
            if type(v) is not int or not _INT_MIN <= v < _INT_END:  # not a bool either
                return None
        columns[name] = tuple(ints)
    for name in FLOAT_COLUMNS:
        values = [r[name] for r in rows] if full or name not in OPTIONAL else \
            [r.get(name, OPTIONAL[name]) for r in rows]
        floats = _floats(values)
        if floats is None:
            return None
        columns[name] = floats
    return StepColumns(run_id, attempt, token, rank, **columns)  # type: ignore[arg-type]


def _floats(values: Sequence[object]) -> tuple[float, ...] | None:
    """A float column as records' strict rules read it (a float; an int as a float; the
    strings "nan", "inf", "-inf"), or None for anything else."""
    for v in values:
        if type(v) is not float or not -_FLOAT_BOUND < v < _FLOAT_BOUND:
            break
    else:
        return tuple(values)  # type: ignore[arg-type]
    out: list[float] = []
    for v in values:
        number = type(v) is float or type(v) is int
        if not ((number and -_FLOAT_BOUND < v < _FLOAT_BOUND)  # type: ignore[operator]
                or (type(v) is str and v in NON_FINITE)):
            return None
        out.append(float(v))  # type: ignore[arg-type]
    return tuple(out)
