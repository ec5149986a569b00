"""shared/protocol.py: every message round-trips; anything malformed is a ProtocolError."""

from __future__ import annotations

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
