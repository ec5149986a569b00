"""Wire messages between worker, supervisor and CLI: versioned JSON, validated on both ends.

Telemetry flows worker -> supervisor over ZeroMQ PUB/SUB (the supervisor binds SUB, the
worker connects PUB). PUB/SUB drops messages around a (re)connect, so no message is
essential: every Heartbeat carries the worker's full current state.

Control flows CLI -> supervisor over REQ/REP (`ControlRequest` / `ControlReply`).

Every message is a frozen dataclass with a `type` tag; `decode()` is the only way in and
raises ProtocolError for anything malformed (fields are checked by shared/records.py) —
for every byte string whatsoever (tests/test_protocol_fuzz.py): a message is at most
MAX_MESSAGE_BYTES, nested at most MAX_DEPTH deep, its integers fit in 64 bits and it has no
NaN/Infinity tokens (non-finite floats travel as the strings "nan"/"inf"/"-inf").

Telemetry messages carry `token`, the attempt's telemetry token: the supervisor makes one per
attempt and hands it to the worker in the environment (TOKEN_ENV, never on the command
line); the worker's sender (worker/telemetry.py) stamps it, and the rank of a data-parallel
group's member (`rank`, left out when 0), on every message; the supervisor
believes only messages of the running attempt with its token
(supervisor/daemon/telemetry_gate.py). An empty token is left out of the JSON, so a worker
started by hand (no supervisor, no token) sends exactly the version-1 messages it always did.

Longer than 400 lines: it is the whole wire format, one dataclass per message type with its
JSON example, and the one decoder that admits them; read in one place, both ends agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from itertools import chain
from operator import attrgetter
from typing import Any, ClassVar

import orjson

from shared import records, strictjson
from shared.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DEPTH = 16  # a status reply is 4 deep (reply > data > overrides > skip_batches)
TOKEN_ENV = "OVERNIGHT_TELEMETRY_TOKEN"  # the attempt's telemetry token, worker environment


class Phase(str, Enum):
    """What the worker is doing; hang timeouts are longer while loading/compiling."""

    STARTING = "starting"
    LOADING = "loading"
    COMPILING = "compiling"
    TRAINING = "training"
    EVALUATING = "evaluating"
    CHECKPOINTING = "checkpointing"
    STOPPING = "stopping"


_FLAT: dict[type, tuple[str, ...] | None] = {}


def _flat_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of a message class whose fields are all scalars (str, int, float,
    bool, an Enum) — None when one may hold a container (asdict's deep copy is needed)."""
    if cls not in _FLAT:
        scalar = {"str", "int", "float", "bool", "Phase"}
        fs = fields(cls)
        _FLAT[cls] = tuple(f.name for f in fs) if all(str(f.type) in scalar for f in fs) else None
    return _FLAT[cls]


@dataclass(frozen=True)
class _Message:
    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this message. Flat messages (every one but ControlReply) are
        read field by field: `dataclasses.asdict` deep-copies and costs ~40 us, a tenth of a
        small model's step when it ran for every step's metrics."""
        names = _flat_fields(type(self))
        d = asdict(self) if names is None else {name: getattr(self, name) for name in names}
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
            elif isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)  # JSON has no NaN/Inf; keep them readable ("nan", "inf")
            elif isinstance(v, (dict, list)):
                d[k] = strictjson.finite(v)  # nested (ControlReply.data): null
        if d.get("token") == "":
            del d["token"]  # no token (a worker without a supervisor): the v1 message as before
        if d.get("rank") == 0:
            del d["rank"]  # one process, or rank 0 of a group: the v1 message as before
        d["type"] = self.TYPE
        d["v"] = PROTOCOL_VERSION
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class _Telemetry(_Message):
    """A message from the worker. `token` (keyword-only, every telemetry message): the
    attempt's telemetry token from TOKEN_ENV, stamped by the sender; "" = none."""

    token: str = field(default="", kw_only=True, repr=False)
    # The sender's rank in a data-parallel group (shared/distributed_config.py; MLX_RANK);
    # 0 for one process, and then left out of the JSON like an empty token.
    rank: int = field(default=0, kw_only=True)

    def with_token(self, token: str, rank: int = 0) -> _Telemetry:
        """This message stamped with the attempt's token and the sender's rank (the sender
        does this)."""
        return dataclasses.replace(self, token=token, rank=rank or self.rank)


@dataclass(frozen=True)
class Heartbeat(_Telemetry):
    """Sent every second from the worker's telemetry thread, whatever the main thread does.

    {"type":"heartbeat","v":1,"run_id":"r1","pid":123,"attempt":2,"seq":17,"time":1.7e9,
     "phase":"training","step":120,"total_steps":2000,"last_step_time":1.7e9,
     "active_mb":812.0,"peak_mb":900.1,"rss_mb":1400.2,"dropped":0,"cache_mb":96.0,
     "footprint_mb":2210.5,"token":"9f1c…"}

    `cache_mb`: MLX's buffer cache (`mx.get_cache_memory()`); `footprint_mb`: the process's
    physical footprint on macOS (shared/footprint.py: Metal's memory included, which RSS and
    MLX's counters miss), 0 where it is not measured. Both absent in older workers' messages.
    """

    TYPE: ClassVar[str] = "heartbeat"
    run_id: str
    pid: int
    attempt: int
    seq: int
    time: float
    phase: Phase
    step: int
    total_steps: int
    last_step_time: float
    active_mb: float
    peak_mb: float
    rss_mb: float
    dropped: int
    cache_mb: float = 0.0
    footprint_mb: float = 0.0


@dataclass(frozen=True)
class StepMetrics(_Telemetry):
    """One per optimizer step.

    {"type":"metrics","v":1,"run_id":"r1","attempt":1,"step":120,"time":1.7e9,"loss":2.31,
     "grad_norm":0.82,"lr":1e-5,"tokens":4096,"tokens_per_sec":812.5,"step_seconds":5.04,
     "active_mb":812.0,"peak_mb":900.1,"rss_mb":1400.2,"data_position":121,
     "cache_mb":96.0,"footprint_mb":2210.5}

    `cache_mb`, `footprint_mb`: as in Heartbeat.
    """

    TYPE: ClassVar[str] = "metrics"
    run_id: str
    attempt: int
    step: int
    time: float
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_sec: float
    step_seconds: float
    active_mb: float
    peak_mb: float
    rss_mb: float
    data_position: int = -1  # the data position of the batch it trained (-1: not said)
    cache_mb: float = 0.0  # MLX's buffer cache
    footprint_mb: float = 0.0  # macOS physical footprint (0: not measured)


@dataclass(frozen=True)
class StepRow:
    """One step of a StepMetricsBatch: StepMetrics without what the batch says once."""

    step: int
    time: float
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_sec: float
    step_seconds: float
    active_mb: float
    peak_mb: float
    rss_mb: float
    data_position: int = -1
    cache_mb: float = 0.0
    footprint_mb: float = 0.0


ROW_FIELDS = tuple(f.name for f in fields(StepRow))
_row_values = attrgetter(*ROW_FIELDS)  # a StepMetrics' or StepRow's row, as one tuple
MAX_BATCH_STEPS = 64  # ~22 KB of JSON, a third of MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class StepMetricsBatch(_Telemetry):
    """The StepMetrics of one telemetry flush (up to MAX_BATCH_STEPS consecutive steps of
    one attempt) in one message: at > 100 steps/s, one message per 50 ms flush instead of
    one per step, so the supervisor receives, parses and gates a handful of messages a
    second. The supervisor unfolds it (`unfold()`) and handles each step as the single
    StepMetrics it stands for; single StepMetrics stay valid.

    {"type":"metrics_batch","v":1,"run_id":"r1","attempt":1,
     "steps":[{"step":120,"time":1.7e9,"loss":2.31,"grad_norm":0.82,"lr":1e-5,"tokens":4096,
               "tokens_per_sec":812.5,"step_seconds":5.04,"active_mb":812.0,"peak_mb":900.1,
               "rss_mb":1400.2,"data_position":121,"cache_mb":96.0,"footprint_mb":2210.5}, ...]}
    """

    TYPE: ClassVar[str] = "metrics_batch"
    run_id: str
    attempt: int
    steps: tuple[StepRow, ...]

    @classmethod
    def fold(cls, metrics: list[StepMetrics]) -> StepMetricsBatch:
        """The batch of `metrics` (one run, attempt and rank, in order; the first one's token)."""
        first = metrics[0]
        rows = tuple(StepRow(*_row_values(m)) for m in metrics)
        return cls(run_id=first.run_id, attempt=first.attempt, steps=rows, token=first.token,
                   rank=first.rank)

    @classmethod
    def encode(cls, metrics: list[StepMetrics], token: str, rank: int) -> bytes:
        """The wire bytes of `fold(metrics)` stamped with `token` and `rank` (what
        `with_token(token, rank).to_json()` gives), without the intermediate objects: the
        worker's telemetry thread sends ~100-1000 steps a second this way (~5 us a step
        against ~10, benchmarks/telemetry_cost.py). Raises ProtocolError for 0 or more than
        MAX_BATCH_STEPS steps."""
        _check_batch_steps(len(metrics))
        first = metrics[0]
        return orjson.dumps(_batch_dict(first.run_id, first.attempt, token, rank,
                                        [_row_values(m) for m in metrics]))

    def unfold(self) -> list[StepMetrics]:
        """The single StepMetrics this batch stands for, each with the batch's token and rank."""
        return [StepMetrics(self.run_id, self.attempt,
                            *(getattr(r, k) for k in ROW_FIELDS), token=self.token,
                            rank=self.rank)
                for r in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return _batch_dict(self.run_id, self.attempt, self.token, self.rank,
                           [_row_values(r) for r in self.steps])

    def to_json(self) -> bytes:
        """As every message's, with orjson (same values; floats may be spelled otherwise,
        e.g. 1e-5 for 1e-05): the one message sent many times a second."""
        return orjson.dumps(self.to_dict())

    def __post_init__(self) -> None:
        _check_batch_steps(len(self.steps))


def _check_batch_steps(n: int) -> None:
    """ProtocolError unless a batch has 1..MAX_BATCH_STEPS steps."""
    if not 1 <= n <= MAX_BATCH_STEPS:
        raise ProtocolError(f"metrics_batch: expected 1..{MAX_BATCH_STEPS} steps, got {n}")


def _batch_dict(run_id: str, attempt: int, token: str, rank: int,
                rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """StepMetricsBatch's JSON object from its rows' values (ROW_FIELDS order)."""
    d: dict[str, Any] = {"run_id": run_id, "attempt": attempt}
    if token:
        d["token"] = token
    if rank:  # a group's member (rank 0 and one process: left out, as in to_dict)
        d["rank"] = rank
    if all(map(math.isfinite, chain.from_iterable(rows))):  # the common case, in C
        d["steps"] = [dict(zip(ROW_FIELDS, r, strict=True)) for r in rows]
    else:
        d["steps"] = [{k: _wire(v) for k, v in zip(ROW_FIELDS, r, strict=True)} for r in rows]
    d["type"] = StepMetricsBatch.TYPE
    d["v"] = PROTOCOL_VERSION
    return d


def _wire(v: Any) -> Any:
    """A float JSON cannot hold as its readable string (as _Message.to_dict does)."""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


@dataclass(frozen=True)
class EvalResult(_Telemetry):
    """After each validation pass.

    {"type":"eval","v":1,"run_id":"r1","attempt":1,"step":250,"val_loss":1.9,
     "best_val_loss":1.9,"best_step":250,"seconds":3.2}
    """

    TYPE: ClassVar[str] = "eval"
    run_id: str
    attempt: int
    step: int
    val_loss: float
    best_val_loss: float
    best_step: int
    seconds: float


@dataclass(frozen=True)
class CheckpointSaved(_Telemetry):
    """After a checkpoint directory is complete (manifest written, renamed, fsynced).

    {"type":"checkpoint","v":1,"run_id":"r1","attempt":1,"step":250,
     "path":"/runs/x/checkpoints/step-0000250","seconds":0.4,"bytes":123456}
    """

    TYPE: ClassVar[str] = "checkpoint"
    run_id: str
    attempt: int
    step: int
    path: str
    seconds: float
    bytes: int


@dataclass(frozen=True)
class WorkerStopping(_Telemetry):
    """Sent (best effort) just before the worker exits on purpose; says why.

    {"type":"stopping","v":1,"run_id":"r1","attempt":1,"step":812,"exit_code":21,
     "reason":"grad_spike","detail":"grad norm 3.1e4 > 1000 for 3 steps","first_bad_step":810,
     "data_position":815,"data_batch":41,"data_lines":"train.jsonl:80-91",
     "first_bad_position":813}

    The data fields (non-finite loss, gradient spike) name the batch of the failing step: its
    data position, its group in the epoch plan (the same group in every epoch,
    worker/batching.py) and the file lines of its examples; -1 / "" when unknown (and in
    messages from older workers). A gradient spike spans `grad_spike.patience` steps: its
    window's batches are the positions `first_bad_position` .. `data_position`, and
    `data_lines` names the examples of all of them.
    """

    TYPE: ClassVar[str] = "stopping"
    run_id: str
    attempt: int
    step: int
    exit_code: int
    reason: str
    detail: str
    first_bad_step: int = -1
    data_position: int = -1
    data_batch: int = -1
    data_lines: str = ""
    first_bad_position: int = -1  # a spike: its window is first_bad_position..data_position


@dataclass(frozen=True)
class ControlRequest(_Message):
    """CLI -> supervisor. {"type":"control","v":1,"command":"status"}

    Commands: "status", "stop", "checkpoint". A stop may say why, in at most
    MAX_REASON_CHARS printable characters: {"type":"control","v":1,"command":"stop",
    "reason":"the queue's deadline 07:00 came"} (`overnight stop --reason`, the queue runner
    at its deadline); the run's record and report then say it.
    """

    TYPE: ClassVar[str] = "control"
    COMMANDS: ClassVar[tuple[str, ...]] = ("status", "stop", "checkpoint")
    MAX_REASON_CHARS: ClassVar[int] = 200
    command: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.command not in self.COMMANDS:
            raise ProtocolError(
                f"control: expected command in {list(self.COMMANDS)}, got "
                f"{records.short(self.command)}"
            )
        if len(self.reason) > self.MAX_REASON_CHARS or not self.reason.isprintable():
            raise ProtocolError(f"control: reason must be at most {self.MAX_REASON_CHARS} "
                                f"printable characters, got {records.short(self.reason)}")

    def to_dict(self) -> dict[str, Any]:
        """Without an empty `reason`: a supervisor started before `reason` existed refuses
        unknown fields, and `overnight status` must still reach it."""
        d = super().to_dict()
        if not self.reason:
            del d["reason"]
        return d


@dataclass(frozen=True)
class ControlReply(_Message):
    """supervisor -> CLI. {"type":"reply","v":1,"ok":true,"error":"","data":{...}}"""

    TYPE: ClassVar[str] = "reply"
    ok: bool
    error: str = ""
    data: dict[str, Any] = field(default_factory=dict)


Message = (
    Heartbeat | StepMetrics | StepMetricsBatch | EvalResult | CheckpointSaved | WorkerStopping
    | ControlRequest | ControlReply
)
_TYPES: dict[str, type[_Message]] = {
    cls.TYPE: cls
    for cls in (
        Heartbeat, StepMetrics, StepMetricsBatch, EvalResult, CheckpointSaved, WorkerStopping,
        ControlRequest, ControlReply,
    )
}
_RULES = records.Rules(ProtocolError)


def decode(raw: bytes | str) -> Message:
    """Parse and validate one message; raise ProtocolError naming the problem — and nothing
    else, for any input: too large, not JSON, out of bounds (strictjson.loads: nesting,
    integers, NaN tokens), not an object, wrong version, unknown type, or a field of the
    wrong type, missing or unknown."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message too large: {len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = strictjson.loads(raw, max_depth=MAX_DEPTH, strict=True)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"message is not JSON: {e}") from None
    except ValueError as e:
        raise ProtocolError(f"message refused: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    version = obj.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
        raise ProtocolError(f"expected protocol version {PROTOCOL_VERSION}, got "
                            f"{records.short(version)}")
    tag = obj.pop("type", None)
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {records.short(tag)}; expected one of "
                            f"{sorted(_TYPES)}")
    return records.build(cls, obj, cls.__name__, _RULES)  # type: ignore[return-value]



def decode_all(raw: bytes | str) -> list[Message]:
    """`decode`, with a StepMetricsBatch unfolded into the StepMetrics it stands for: what
    a reader of the telemetry stream handles, one message per step as before."""
    msg = decode(raw)
    return list(msg.unfold()) if isinstance(msg, StepMetricsBatch) else [msg]
