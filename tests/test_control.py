"""supervisor/daemon/control.py and supervisor/morning/status.py: JSON over a real REP
socket, a typed status reply, clear errors, and `overnight status` without a supervisor."""

from __future__ import annotations

import argparse
import json
import threading

import pytest
import structlog
import zmq

from shared.errors import ProtocolError
from shared.layout import RunDir
from shared.protocol import MAX_MESSAGE_BYTES, ControlReply, Phase, decode
from shared.run_record import BestCheckpoint, State
from shared.runlock import Role, RunLock
from supervisor.daemon.control import ControlError, ControlServer, RunStatus, decode_status, handle
from supervisor.daemon.record import RecordKeeper
from supervisor.morning import status as control_client

STATUS = RunStatus(
    run_id="r1", run_dir="/runs/r1", state=State.TRAINING, reason="", supervisor_pid=1,
    worker_pid=2, attempt=1, phase=Phase.TRAINING, step=12, total_steps=40,
    last_heartbeat_s=0.4, tokens_per_sec=812.5, rss_mb=1400.2, mlx_mb=900.1, overrides={},
    latest_checkpoint=None, best_checkpoint=BestCheckpoint(10, "/runs/r1/step-10", 1.25),
    restart_in_s=None, attempts=1, failures=0)


class FakeTarget:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def status(self) -> RunStatus:
        self.calls.append("status")
        return STATUS

    def request_stop(self, source, reason=""):
        self.calls.append(f"stop:{source}" + (f":{reason}" if reason else ""))
        return {"state": "stopping", "supervisor_pid": 1, "stop_timeout": 3.0}

    def request_checkpoint(self, source):
        raise ControlError("no worker is training (state backing_off)")


def test_commands_reply_with_data():
    t = FakeTarget()
    reply = handle(b'{"type":"control","v":1,"command":"status"}', t)
    assert reply.ok and reply.data["step"] == 12 and reply.data["state"] == "training"
    assert decode_status(decode(reply.to_json()).data) == STATUS  # type: ignore[union-attr]
    reply = handle(b'{"type":"control","v":1,"command":"stop"}', t)
    assert reply.ok and t.calls == ["status", "stop:control"]


@pytest.mark.parametrize("raw,fragment", [
    (b"not json", "not JSON"),
    (b'{"type":"control","v":1,"command":"reboot"}', "expected command in"),
    (b'{"type":"control","v":9,"command":"status"}', "protocol version"),
    (b'{"type":"heartbeat","v":1}', "missing field"),
    (b'{"type":"reply","v":1,"ok":true}', "expected a control message"),
    (b"x" * (MAX_MESSAGE_BYTES + 1), "too large"),
])
def test_bad_requests_get_clear_error_replies(raw, fragment):
    reply = handle(raw, FakeTarget())
    assert not reply.ok and fragment in reply.error


def test_a_refused_command_is_an_error_reply():
    reply = handle(b'{"type":"control","v":1,"command":"checkpoint"}', FakeTarget())
    assert not reply.ok and reply.error == "no worker is training (state backing_off)"


def _serve(server: ControlServer, n: int) -> threading.Thread:
    def loop() -> None:
        served = 0
        while served < n:
            if server.socket.poll(2000):
                served += server.serve_ready(structlog.get_logger())
            else:
                return

    t = threading.Thread(target=loop)
    t.start()
    return t


def test_the_client_talks_to_a_live_server_over_ipc(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.create()
    run.create_socket_dir()
    ctx = zmq.Context()
    server = ControlServer(ctx, run.control_endpoint, FakeTarget())
    with RunLock(run.lock, Role.SUPERVISOR):
        t = _serve(server, 4)
        assert control_client.request(run, "status").data["state"] == "training"
        control_client.main_status(argparse.Namespace(run_dir=run.root, json=False,
                                                      timeout=2.0))
        live = capsys.readouterr().out
        assert "run      r1  [live]" in live and "phase training" in live
        assert "best     step 10  val_loss 1.250  /runs/r1/step-10" in live
        # raw garbage on the wire still gets an answer
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(run.control_endpoint)
        req.send(b"\xff\xfe")
        assert req.poll(2000)
        assert not decode(req.recv()).ok
        req.close()
        args = argparse.Namespace(run_dir=run.root, json=False, timeout=2.0, wait=False, reason="")
        assert control_client.main_stop(args) == 0
        t.join(5)
    server.close()
    ctx.term()
    assert "stopping" in capsys.readouterr().out
    assert (run.sockets.stat().st_mode & 0o777) == 0o700


def test_status_without_a_supervisor_reads_the_record(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.create()
    rec, _ = RecordKeeper.open(run.record, "r-offline", run.root, tmp_path / "c.yaml", {}, "h")
    rec.update(final_step=40, total_steps=40, save=False)
    rec.set_state(State.FINISHED, "all steps done")
    args = argparse.Namespace(run_dir=run.root, json=True, timeout=0.5)
    assert control_client.main_status(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["live"], out["state"], out["run_id"]) == (False, "finished", "r-offline")
    args.json = False
    control_client.main_status(args)
    text = capsys.readouterr().out
    assert "finished" in text and "no supervisor running" in text


def test_stop_without_a_supervisor_fails_cleanly(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.create()
    args = argparse.Namespace(run_dir=run.root, json=False, timeout=0.5, wait=False, reason="")
    assert control_client.main_stop(args) == 1
    assert "no supervisor is running" in capsys.readouterr().err


def test_reply_json_roundtrip():
    r = ControlReply(ok=False, error="x", data={"a": 1})
    assert decode(r.to_json()) == r


def test_a_status_reply_that_is_not_one_is_named_by_field():
    data = {**STATUS.to_dict(), "state": "dancing"}
    with pytest.raises(ProtocolError, match=r"status reply.state: expected one of"):
        decode_status(data)


def test_a_failed_control_socket_is_reopened_and_answers_again(tmp_path):
    """A socket error (here: the socket closed under the server) would leave REP unable to
    answer and, before, ended the supervisor: the server logs it, binds a new socket on the
    same path, and the next client gets its answer."""
    run = RunDir(tmp_path / "run")
    run.create()
    run.create_socket_dir()
    ctx = zmq.Context()
    server = ControlServer(ctx, run.control_endpoint, FakeTarget())
    try:
        old = server.socket
        old.close(linger=0)
        assert server.serve_ready(structlog.get_logger()) == 0  # no exception
        assert server.socket is not old and server.failures == 1
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(run.control_endpoint)
        req.send(b'{"type":"control","v":1,"command":"status"}')
        t = _serve(server, 1)
        assert req.poll(3000) and decode(req.recv()).ok
        t.join(5)
        req.close()
    finally:
        server.close()
        ctx.destroy(linger=0)


def test_bad_requests_are_each_answered_but_logged_once_a_minute(tmp_path):
    """A client sending garbage in a loop gets every answer, and the log one line (with the
    count), not one line per request."""
    lines: list[tuple[str, dict]] = []

    class Log:
        def __getattr__(self, level):
            return lambda event, **kw: lines.append((event, kw))

    ctx = zmq.Context()
    server = ControlServer(ctx, f"ipc://{tmp_path}/control", FakeTarget())
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"ipc://{tmp_path}/control")
    try:
        for _ in range(5):
            req.send(b"\xff garbage")
            while not req.poll(10):
                server.serve_ready(Log())
            assert not decode(req.recv()).ok
        req.send(b'{"type":"control","v":1,"command":"status"}')
        while not req.poll(10):
            server.serve_ready(Log())
        assert decode(req.recv()).ok
    finally:
        server.close()
        ctx.destroy(linger=0)
    assert [e for e, _ in lines] == ["control_request_bad", "control_request"]
    assert server.bad_requests == 5 and lines[0][1]["count"] == 1


def test_a_stop_says_why_when_asked_and_a_bad_reason_is_refused():
    t = FakeTarget()
    reply = handle(b'{"type":"control","v":1,"command":"stop","reason":"the GPU is needed"}', t)
    assert reply.ok and t.calls == ["stop:control:the GPU is needed"]
    for bad in ('"a\\nb"', '"' + "x" * 201 + '"', "5"):
        reply = handle(b'{"type":"control","v":1,"command":"stop","reason":' + bad.encode()
                       + b"}", t)
        assert not reply.ok and reply.error.startswith("bad request:"), reply.error
    assert t.calls == ["stop:control:the GPU is needed"]
    # a request without a reason carries no "reason" field (an older supervisor refuses it)
    from shared.protocol import ControlRequest

    assert ControlRequest("status").to_json() == b'{"command":"status","type":"control","v":1}'
