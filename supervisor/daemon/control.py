"""The control socket, server side: a ZeroMQ REP socket answering one JSON request at a time.

One class per command; its docstring is the wire format. Requests are decoded with
shared.protocol.decode (size-limited, validated); anything malformed gets an error reply, the
socket never stays without an answer (REP would wedge otherwise) — whatever the bytes
(tests/test_protocol_fuzz.py) and even when a command fails unexpectedly (an "internal
error" reply, logged with its traceback). The socket is bounded as supervisor/daemon/
sockets.py says (message size, queues, handshake and heartbeat timeouts), and one pass of
the loop answers at most MAX_PER_PASS requests, so a client flooding requests cannot starve
the loop (the worker's exit, timers, the watchdog).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import zmq

from shared import records
from shared.errors import ProtocolError
from shared.protocol import ControlReply, ControlRequest, Phase, decode
from shared.run_record import BestCheckpoint, LatestCheckpoint, State
from supervisor.daemon import sockets

_RULES = records.Rules(ProtocolError)
MAX_PER_PASS = 100  # requests answered per pass of the loop


class ControlError(Exception):
    """A command that cannot be carried out now; the message goes into the error reply."""


@dataclass(frozen=True)
class RankStatus:
    """One rank of a running group: {"rank": 1, "pid": 4242, "phase": "training", "step": 120,
    "last_heartbeat_s": 0.4} (pid 0: on another host)."""

    rank: int
    pid: int
    phase: Phase
    step: int
    last_heartbeat_s: float


@dataclass(frozen=True)
class RunStatus:
    """The data of a status reply: the supervisor's live view of the run (JSON: see Status).
    `step` is the worker's while one runs, else the record's final_step."""

    run_id: str
    run_dir: str
    state: State
    reason: str
    supervisor_pid: int
    worker_pid: int | None
    attempt: int
    phase: Phase | None
    step: int | None
    total_steps: int | None
    last_heartbeat_s: float | None
    tokens_per_sec: float | None
    rss_mb: float | None
    mlx_mb: float | None
    overrides: dict[str, Any]
    latest_checkpoint: LatestCheckpoint | None
    best_checkpoint: BestCheckpoint | None
    restart_in_s: float | None
    attempts: int
    failures: int
    telemetry_rejected: int = 0  # messages not believed (supervisor/daemon/telemetry_gate.py)
    ranks: tuple[RankStatus, ...] = ()  # a data-parallel group's ranks (one process: none)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = records.to_dict(self)
        return out


def decode_status(data: dict[str, Any]) -> RunStatus:
    """A status reply's data as a RunStatus; ProtocolError naming the field otherwise."""
    return records.build(RunStatus, data, "status reply", _RULES)


class Target(Protocol):
    """What the commands act on (the supervisor loop)."""

    def status(self) -> RunStatus: ...

    def request_stop(self, source: str, reason: str = "") -> dict[str, Any]: ...

    def request_checkpoint(self, source: str) -> dict[str, Any]: ...


class Command:
    name: ClassVar[str] = ""

    def execute(self, target: Target, request: ControlRequest) -> dict[str, Any]:
        raise NotImplementedError


class Status(Command):
    """The supervisor's live view of the run.

    -> {"type":"control","v":1,"command":"status"}
    <- {"type":"reply","v":1,"ok":true,"error":"","data":{"run_id":"mini-...","state":"training",
        "reason":"","supervisor_pid":123,"worker_pid":456,"attempt":2,"phase":"training",
        "step":120,"total_steps":2000,"last_heartbeat_s":0.4,"tokens_per_sec":812.5,
        "rss_mb":1400.2,"mlx_mb":900.1,"overrides":{...},"latest_checkpoint":{...},
        "best_checkpoint":{...},"restart_in_s":null,"attempts":2,"failures":1,
        "telemetry_rejected":0}}
    """

    name = "status"

    def execute(self, target: Target, request: ControlRequest) -> dict[str, Any]:
        return target.status().to_dict()


class Stop(Command):
    """Stop the run: the worker saves a checkpoint and exits; the supervisor ends `stopped`
    (with the request's `reason`, if any, in its record: "stopped on request: REASON").

    -> {"type":"control","v":1,"command":"stop"}
    -> {"type":"control","v":1,"command":"stop","reason":"the queue's deadline 07:00 came"}
    <- {"type":"reply","v":1,"ok":true,"error":"","data":{"state":"stopping",
        "supervisor_pid":123,"stop_timeout":120.0}}
    """

    name = "stop"

    def execute(self, target: Target, request: ControlRequest) -> dict[str, Any]:
        return target.request_stop("control", request.reason)


class Checkpoint(Command):
    """Save a checkpoint now (SIGUSR1: at the end of the current step) and keep training.

    -> {"type":"control","v":1,"command":"checkpoint"}
    <- {"type":"reply","v":1,"ok":true,"error":"","data":{"worker_pid":456,"step":120}}
    <- {"type":"reply","v":1,"ok":false,"error":"no worker is training (state backing_off)",
        "data":{}}
    """

    name = "checkpoint"

    def execute(self, target: Target, request: ControlRequest) -> dict[str, Any]:
        return target.request_checkpoint("control")


COMMANDS: dict[str, type[Command]] = {c.name: c for c in (Status, Stop, Checkpoint)}


def handle(raw: bytes, target: Target, log: Any = None) -> ControlReply:
    """Decode one request, run its command, and build the reply; never raises. A command
    that fails with anything but ControlError is a bug: an "internal error" reply, and the
    traceback goes to `log` (control_command_failed)."""
    try:
        msg = decode(raw)
    except ProtocolError as e:
        return ControlReply(ok=False, error=f"bad request: {e}")
    if not isinstance(msg, ControlRequest):
        return ControlReply(ok=False, error=f"bad request: expected a control message, got "
                                            f"{type(msg).__name__}")
    try:
        return ControlReply(ok=True, data=COMMANDS[msg.command]().execute(target, msg))
    except ControlError as e:
        return ControlReply(ok=False, error=str(e))
    except Exception as e:  # the outermost boundary of a command: the loop must go on
        if log is not None:
            log.exception("control_command_failed", command=msg.command)
        return ControlReply(ok=False, error=f"internal error: {type(e).__name__}: "
                                            f"{records.short(str(e), 200)}")


INTERNAL_ERROR = ControlReply(ok=False, error="internal error: the reply could not be encoded")


class ControlServer:
    """The REP socket; `serve_ready()` answers the requests that are waiting."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, target: Target) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.target = target
        self.failures = 0  # socket errors survived (the socket was reopened)
        self.bad_requests = 0
        self._bad_log = sockets.Every(sockets.LOG_EVERY)
        self.socket = self._new()
        self.socket.bind(endpoint)  # at start a failure is the caller's (exit 1)
        self._bound = True

    def _new(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.REP)
        sockets.bound(sock, hwm=sockets.CONTROL_HWM, heartbeat=True)
        # A reply never waits: REP drops it when the client has gone.
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        return sock

    def serve_ready(self, log: Any) -> int:
        """Answer up to MAX_PER_PASS waiting requests; returns how many. Never raises: a
        socket error (which would leave REP unable to answer) reopens the socket. Bad
        requests are answered each, and logged at most once a minute (with their count)."""
        served = 0
        if not self._bound:
            self._bind(log)
        while served < MAX_PER_PASS:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            except zmq.ZMQError as e:
                self._reopen(log, e)
                return served
            if len(frames) != 1:
                reply = ControlReply(ok=False, error="bad request: expected one frame")
            else:
                reply = handle(frames[0], self.target, log)
            try:
                raw = reply.to_json()
            except Exception:  # e.g. a status field JSON cannot hold: still answer
                log.exception("control_reply_failed")
                reply, raw = INTERNAL_ERROR, INTERNAL_ERROR.to_json()
            try:
                self.socket.send(raw)
            except zmq.ZMQError as e:
                self._reopen(log, e)
                return served
            command = _command_name(frames)
            if command is not None:
                log.info("control_request", ok=reply.ok, error=reply.error or None,
                         command=command)
            else:
                self.bad_requests += 1
                if new := self._bad_log.due(self.bad_requests, time.monotonic()):
                    log.warning("control_request_bad", count=self.bad_requests, new=new,
                                error=reply.error)
            served += 1
        return served

    def _reopen(self, log: Any, error: zmq.ZMQError) -> None:
        """A REP socket whose send failed cannot receive again (EFSM): start over. The old
        listener unlinks its socket file when it closes, so bind once that has happened."""
        self.failures += 1
        log.error("control_socket_failed", error=str(error), failures=self.failures)
        path = Path(self.endpoint.removeprefix("ipc://"))
        self.socket.close(linger=0)
        deadline = time.monotonic() + 1.0
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.socket = self._new()  # the loop registers the new socket with its poller
        self._bound = False
        self._bind(log)

    def _bind(self, log: Any) -> None:
        try:
            self.socket.bind(self.endpoint)
            self._bound = True
        except zmq.ZMQError as e:  # tried again on the next pass
            log.error("control_socket_bind_failed", error=str(e), endpoint=self.endpoint)

    def close(self) -> None:
        self.socket.close(linger=0)


def _command_name(frames: list[bytes]) -> str | None:
    try:
        msg = decode(frames[0])
    except (ProtocolError, IndexError):
        return None
    return msg.command if isinstance(msg, ControlRequest) else None
