"""shared/protocol.py: every message round-trips; anything malformed is a ProtocolError."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from shared import protocol as p
from shared.errors import ProtocolError

SAMPLES = [
    p.Heartbeat("r1", 12, 2, 7, 1.5, p.Phase.LOADING, 0, 100, 0.0, 1.0, 2.0, 3.0, 0),
    p.StepMetrics("r1", 1, 5, 1.5, 2.25, 0.5, 1e-4, 128, 512.0, 0.25, 10.0, 20.0, 30.0),
    p.EvalResult("r1", 1, 250, 1.9, 1.8, 200, 3.2),
    p.CheckpointSaved("r1", 1, 250, "/x/step-0000250", 0.4, 12345),
    p.WorkerStopping("r1", 1, 812, 21, "grad_spike", "norm 3e4 > 1000", 810),
    p.ControlRequest("status"),
    p.ControlReply(True, "", {"state": "training"}),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: p._Message) -> None:
    assert p.decode(message.to_json()) == message


def test_non_finite_floats_survive_as_strings() -> None:
    m = p.StepMetrics("r", 1, 1, 0.0, math.nan, math.inf, 0.0, 1, 0.0, 0.0, 0.0, 0.0, 0.0)
    raw = json.loads(m.to_json())
    assert raw["loss"] == "nan" and raw["grad_norm"] == "inf"
    back = p.decode(m.to_json())
    assert isinstance(back, p.StepMetrics)
    assert math.isnan(back.loss) and math.isinf(back.grad_norm)


def _raw(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (_raw(type="heartbeat"), "protocol version"),
        (_raw(type="bogus", v=1), "unknown message type"),
        (_raw(type="control", v=1), "missing field 'command'"),
        (_raw(type="control", v=1, command="reboot"), "expected command in"),
        (_raw(type="control", v=1, command="status", extra=1), "unexpected fields"),
        (_raw(type="eval", v=1, run_id="r", attempt="1", step=1, val_loss=1.0,
              best_val_loss=1.0, best_step=1, seconds=1.0), "attempt: expected an integer"),
        (_raw(type="eval", v=1, run_id="r", attempt=1, step=1, val_loss="low",
              best_val_loss=1.0, best_step=1, seconds=1.0), "val_loss: expected a number"),
        (b"{" + b" " * p.MAX_MESSAGE_BYTES + b"}", "too large"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        p.decode(raw)


def test_heartbeat_phase_must_be_known() -> None:
    d = json.loads(SAMPLES[0].to_json())
    d["phase"] = "dreaming"
    with pytest.raises(ProtocolError, match="phase: expected one of"):
        p.decode(json.dumps(d))


def test_a_metrics_batch_stands_for_its_single_step_messages() -> None:
    """The worker folds a flush's steps into one message; the reader gets each step back as
    the StepMetrics it was, token included. Single StepMetrics still decode as before."""
    steps = [p.StepMetrics("r1", 2, s, 1.5, 2.25, 0.5, 1e-4, 128, 512.0, 0.25, 10.0, 20.0,
                           30.0, data_position=s - 1, token="t" * 32) for s in (7, 8, 9)]
    raw = p.StepMetricsBatch.fold(steps).to_json()
    assert json.loads(raw)["type"] == "metrics_batch" and json.loads(raw)["token"] == "t" * 32
    assert p.decode_all(raw) == steps
    assert p.decode_all(steps[0].to_json()) == [steps[0]]  # the version-1 single message


def test_a_metrics_batch_keeps_the_rank_of_a_group_member() -> None:
    """A rank's folded steps must stay that rank's (the group's step is the minimum over the
    ranks, shared/protocol.py `rank`): rank 1's batch unfolds as rank 1's steps."""
    steps = [p.StepMetrics("r1", 1, s, 1.5, 2.25, 0.5, 1e-4, 128, 512.0, 0.25, 10.0, 20.0,
                           30.0, token="t" * 32, rank=1) for s in (4, 5)]
    raw = p.StepMetricsBatch.fold(steps).to_json()
    assert json.loads(raw)["rank"] == 1
    assert [(m.step, m.rank) for m in p.decode_all(raw)] == [(4, 1), (5, 1)]


def test_a_metrics_batch_of_no_steps_or_too_many_is_refused() -> None:
    row = {"step": 1, "time": 0.0, "loss": 1.0, "grad_norm": 1.0, "lr": 1e-4, "tokens": 1,
           "tokens_per_sec": 1.0, "step_seconds": 1.0, "active_mb": 1.0, "peak_mb": 1.0,
           "rss_mb": 1.0}
    for rows in ([], [row] * 65):
        raw = json.dumps({"type": "metrics_batch", "v": 1, "run_id": "r", "attempt": 1,
                          "steps": rows})
        with pytest.raises(ProtocolError, match=r"expected 1\.\.64 steps"):
            p.decode(raw)
    with pytest.raises(ProtocolError, match="loss"):
        p.decode(json.dumps({"type": "metrics_batch", "v": 1, "run_id": "r", "attempt": 1,
                             "steps": [{**row, "loss": "x"}]}))


@pytest.mark.parametrize("token,rank", [("", 0), ("t" * 32, 0), ("u" * 32, 3)])
def test_the_senders_batch_bytes_decode_to_the_steps_it_was_given(token: str, rank: int) -> None:
    """StepMetricsBatch.encode (the worker's telemetry thread) skips the intermediate objects:
    what it sends must decode to the very steps, stamped, non-finite values included, and
    equal the bytes of the objects' own path."""
    steps = [p.StepMetrics("r1", 2, s, 1.7e9 + s / 3, 2.25 + s / 7, math.nan if s == 8 else 0.5,
                           1e-5, 128, 512.0 / 3, 0.25, 10.0, 20.0, math.inf if s == 9 else 30.0,
                           data_position=s - 1, cache_mb=1.5, footprint_mb=2.5)
             for s in (7, 8, 9)]
    raw = p.StepMetricsBatch.encode(steps, token, rank)
    stamped = [m.with_token(token, rank) for m in steps]
    assert raw == p.StepMetricsBatch.fold(stamped).to_json()
    got = p.decode_all(raw)
    assert len(got) == 3 and json.loads(raw).get("rank", 0) == rank
    for a, b in zip(got, stamped, strict=True):  # NaN != NaN: compare field by field
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert x == y or (math.isnan(x) and math.isnan(y)), f.name
    with pytest.raises(ProtocolError, match=r"expected 1\.\.64 steps"):
        p.StepMetricsBatch.encode([], token, rank)
