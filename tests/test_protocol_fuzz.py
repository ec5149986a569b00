"""shared/protocol.py and supervisor/daemon/control.py under any input: every byte string gives
a ProtocolError or a message (decode), and an error reply or an answer (the control handler) —
never another exception. Property-based (Hypothesis, bounded and derandomized: the same
examples on every run, a few seconds in all) plus the named inputs that used to kill the
supervisor (issue 12: 60000 "[" raised RecursionError, a 5000-digit integer ValueError)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import protocol as p
from shared.errors import ProtocolError
from supervisor.daemon.control import ControlError, ControlServer, handle
from tests.test_control import STATUS

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
STRUCTURED = settings(FUZZ, max_examples=150)  # drawing nested JSON costs more

HEARTBEAT = p.Heartbeat("r1", 12, 2, 7, 1.5, p.Phase.TRAINING, 3, 100, 0.0, 1.0, 2.0, 3.0, 0)
METRICS = p.StepMetrics("r1", 1, 5, 1.5, 2.25, 0.5, 1e-4, 128, 512.0, 0.25, 10.0, 20.0, 30.0)
VALID = [HEARTBEAT, METRICS, p.EvalResult("r1", 1, 250, 1.9, 1.8, 200, 3.2),
         p.CheckpointSaved("r1", 1, 250, "/x/step-0000250", 0.4, 12345),
         p.WorkerStopping("r1", 1, 812, 21, "grad_spike", "norm", 810),
         p.ControlRequest("status"), p.ControlReply(True, "", {"state": "training"})]

DIGITS = b"1" * 5000
NAMED = {
    "60000 [": b"[" * 60000,
    "60000 {": b'{"a":' * 12000,
    "deep inside a valid message": b'{"type":"control","v":1,"command":' + b"[" * 5000
                                   + b"]" * 5000 + b"}",
    "nesting just past the limit": json.dumps(
        {"type": "reply", "v": 1, "ok": True,
         "data": json.loads("[" * 16 + "]" * 16)}).encode(),
    "5000-digit integer": DIGITS,
    "5000-digit version": b'{"v":' + DIGITS + b',"type":"control","command":"status"}',
    "5000-digit step": HEARTBEAT.to_json().replace(b'"step":3', b'"step":' + DIGITS),
    "integer past 64 bits": HEARTBEAT.to_json().replace(b'"step":3', b'"step":' + b"9" * 19),
    "negative 5000 digits": b"-" + DIGITS,
    "float with 5000 digits": b"0." + DIGITS,
    "huge exponent": HEARTBEAT.to_json().replace(b'"time":1.5', b'"time":1e999999'),
    "NaN token": HEARTBEAT.to_json().replace(b'"time":1.5', b'"time":NaN'),
    "-Infinity token": METRICS.to_json().replace(b'"loss":2.25', b'"loss":-Infinity'),
    "utf-32 looking": b"\x00\x00\x00[",
    "utf-16 bom": b"\xff\xfe[\x00",
    "lone surrogate": b'{"type":"control","v":1,"command":"\\ud800"}',
    "version true": b'{"type":"control","v":true,"command":"status"}',
    "version 1.0": b'{"type":"control","v":1.0,"command":"status"}',
    "type is a list": b'{"type":["control"],"v":1,"command":"status"}',
    "type is an object": b'{"type":{"a":1},"v":1}',
    "empty": b"",
    "nul bytes": b"\x00" * 100,
    "just over the size limit": b" " * (p.MAX_MESSAGE_BYTES + 1),
}


@pytest.mark.parametrize("raw", NAMED.values(), ids=NAMED.keys())
def test_named_inputs_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode(raw)
    with pytest.raises(ProtocolError):
        p.decode(raw.decode("latin-1"))  # the str form too


def test_the_issue_examples_say_what_is_wrong() -> None:
    with pytest.raises(ProtocolError, match="nested deeper than 16"):
        p.decode(b"[" * 60000)
    with pytest.raises(ProtocolError, match="5000 digits"):
        p.decode(DIGITS)
    with pytest.raises(ProtocolError, match="NaN is not JSON"):
        p.decode(NAMED["NaN token"])


def test_error_messages_quote_at_most_a_little_of_the_input() -> None:
    raw = json.dumps({"type": "control", "v": 1, "command": "x" * 50_000}).encode()
    with pytest.raises(ProtocolError) as e:
        p.decode(raw)
    assert len(str(e.value)) < 300 and "50002 characters" in str(e.value)


def test_nesting_up_to_the_limit_is_fine() -> None:
    data = {"a": json.loads("[" * 14 + "]" * 14)}  # reply > data > a > 14 lists = 16 deep
    raw = json.dumps({"type": "reply", "v": 1, "ok": True, "data": data}).encode()
    assert isinstance(p.decode(raw), p.ControlReply)


def _decodes_or_refuses(raw: bytes | str) -> None:
    try:
        msg = p.decode(raw)
    except ProtocolError as e:
        assert str(e)  # a reason, never empty
        return
    # What decodes is a message that encodes again and decodes to itself.
    assert p.decode(msg.to_json()) == msg


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes(raw: bytes) -> None:
    _decodes_or_refuses(raw)


# Byte soup is short; what broke decode was length: deep nesting and long numbers. So also:
# a run of one token, repeated up to past the size limit, between two arbitrary pieces.
RUNS = st.tuples(
    st.binary(max_size=16),
    st.sampled_from([b"[", b"{", b'{"a":', b'[{"v":', b"1", b"9", b"-", b"0.", b"1e9",
                     b" ", b'"\\u', b"\\"]),
    st.integers(min_value=1, max_value=p.MAX_MESSAGE_BYTES // 2 + 8),
    st.binary(max_size=16),
).map(lambda t: t[0] + t[1] * t[2] + t[3])


@settings(FUZZ, max_examples=150)
@given(RUNS)
def test_long_runs(raw: bytes) -> None:
    _decodes_or_refuses(raw)
    _answers(raw)


@FUZZ
@given(st.text(max_size=512))
def test_any_text(raw: str) -> None:
    _decodes_or_refuses(raw)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@STRUCTURED
@given(st.sampled_from(VALID), st.data())
def test_valid_messages_with_any_field_values(message: Any, data: st.DataObject) -> None:
    """A real message with some fields replaced, removed or added by arbitrary JSON values
    (including integers far beyond 64 bits and floats written as huge literals)."""
    obj = json.loads(message.to_json())
    for key in data.draw(st.lists(st.sampled_from(sorted(obj)), max_size=3)):
        action = data.draw(st.sampled_from(["replace", "delete"]))
        if action == "delete":
            obj.pop(key, None)
        else:
            obj[key] = data.draw(JSON_VALUES)
    if data.draw(st.booleans()):
        obj[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    raw = json.dumps(obj, allow_nan=True).encode()
    _decodes_or_refuses(raw)


@FUZZ
@given(st.sampled_from(VALID), st.integers(min_value=0, max_value=400), st.binary(max_size=8))
def test_valid_messages_cut_or_spliced(message: Any, at: int, junk: bytes) -> None:
    raw = message.to_json()
    _decodes_or_refuses(raw[:at] + junk + raw[at:])
    _decodes_or_refuses(raw[:at])


# ---- the control handler ---------------------------------------------------------------


class Target:
    """Answers every command; `checkpoint` is refused as the supervisor does between attempts."""

    def status(self):  # type: ignore[no-untyped-def]
        return STATUS

    def request_stop(self, source: str, reason: str = "") -> dict[str, Any]:
        return {"state": "stopping", "supervisor_pid": 1, "stop_timeout": 3.0}

    def request_checkpoint(self, source: str) -> dict[str, Any]:
        raise ControlError("no worker is training (state backing_off)")


def _answers(raw: bytes) -> None:
    reply = handle(raw, Target())
    assert isinstance(reply, p.ControlReply)
    assert reply.ok or reply.error
    back = p.decode(reply.to_json())  # the reply itself is a well-formed message
    assert isinstance(back, p.ControlReply) and back.ok == reply.ok


@FUZZ
@given(st.binary(max_size=2048))
def test_the_control_handler_answers_any_bytes(raw: bytes) -> None:
    _answers(raw)


@STRUCTURED
@given(st.sampled_from(VALID), st.data())
def test_the_control_handler_answers_any_message(message: Any, data: st.DataObject) -> None:
    obj = json.loads(message.to_json())
    if data.draw(st.booleans()):
        obj["command"] = data.draw(st.sampled_from(["status", "stop", "checkpoint"])
                                   | JSON_VALUES)
    for key in data.draw(st.lists(st.sampled_from(sorted(obj)), max_size=2)):
        obj[key] = data.draw(JSON_VALUES)
    _answers(json.dumps(obj).encode())


@pytest.mark.parametrize("raw", NAMED.values(), ids=NAMED.keys())
def test_the_control_handler_answers_the_named_inputs(raw: bytes) -> None:
    reply = handle(raw, Target())
    assert not reply.ok and reply.error.startswith("bad request")


def test_the_control_handler_answers_when_a_command_fails_unexpectedly() -> None:
    """A bug in a command (anything but ControlError) is an error reply, not a dead loop."""

    class Broken(Target):
        def status(self):  # type: ignore[no-untyped-def]
            raise KeyError("boom")

    reply = handle(p.ControlRequest("status").to_json(), Broken())
    assert not reply.ok and "internal error" in reply.error and "KeyError" in reply.error


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_the_live_control_socket_answers_any_frames(frames: list[bytes]) -> None:
    """Over a real REP socket: one or several frames of anything, always one reply."""
    server, client = _LIVE["server"], _LIVE["client"]
    client.send_multipart(frames)
    deadline = 200
    while not client.poll(10) and deadline:
        server.serve_ready(_NullLog())
        deadline -= 1
    assert client.poll(0), "no reply"
    reply = p.decode(client.recv())
    assert isinstance(reply, p.ControlReply)
    if len(frames) != 1:
        assert not reply.ok and "one frame" in reply.error


_LIVE: dict[str, Any] = {}


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


@pytest.fixture(autouse=True, scope="module")
def _live_socket(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("sock")
    ctx = zmq.Context()
    server = ControlServer(ctx, f"ipc://{path}/control", Target())
    client = ctx.socket(zmq.REQ)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"ipc://{path}/control")
    _LIVE.update(server=server, client=client)
    yield
    client.close(0)
    server.close()
    ctx.term()


# ---- the same kind on disk: JSON another process wrote ----------------------------------
# run.json, trainer_state.json, a safetensors header and logs/metrics.jsonl are read with
# shared.strictjson.loads: 60000 "[" or a 5000-digit number is the reader's one-line error
# (or a skipped line), never RecursionError/ValueError escaping into the supervisor.

POISON = [b"[" * 60000, b'{"step":' + DIGITS + b"}"]


@pytest.mark.parametrize("raw", POISON, ids=["deep", "digits"])
def test_files_from_another_process_are_one_line_errors(tmp_path, raw: bytes) -> None:
    import struct

    from shared import run_record, trainer_state
    from shared.errors import CheckpointError, RecordError
    from shared.safetensors_check import read_header
    from supervisor.daemon.ending import last_logged_step

    (tmp_path / "run.json").write_bytes(raw)
    with pytest.raises(RecordError, match=r"run\.json: not valid JSON"):
        run_record.load_with_json(tmp_path / "run.json")
    (tmp_path / "trainer_state.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not valid JSON"):
        trainer_state.load(tmp_path / "trainer_state.json")
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="header is not JSON"):
        read_header(tmp_path / "a.safetensors")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"attempt":1,"step":7}\n' + raw + b"\n")
    assert last_logged_step(tmp_path / "metrics.jsonl", 1) == 7
