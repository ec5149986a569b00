"""The control socket, server side: a ZeroMQ REP socket answering one JSON request at a time.

One class per command; its docstring is the wire format. Requests are decoded with
shared.protocol.decode (size-limited, validated); anything malformed gets an error reply, the
socket never stays without an answer (REP would wedge otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import zmq

from shared import records
from shared.errors import ProtocolError
from shared.protocol import MAX_MESSAGE_BYTES, ControlReply, ControlRequest, Phase, decode
from shared.run_record import BestCheckpoint, LatestCheckpoint, State

_RULES = records.Rules(ProtocolError)


class ControlError(Exception):
    """A command that cannot be carried out now; the message goes into the error reply."""


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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = records.to_dict(self)
        return out


def decode_status(data: dict[str, Any]) -> RunStatus:
    """A status reply's data as a RunStatus; ProtocolError naming the field otherwise."""
    return records.build(RunStatus, data, "status reply", _RULES)


class Target(Protocol):
    """What the commands act on (the supervisor loop)."""

    def status(self) -> RunStatus: ...

    def request_stop(self, source: str) -> dict[str, Any]: ...

    def request_checkpoint(self, source: str) -> dict[str, Any]: ...


class Command:
    name: ClassVar[str] = ""

    def execute(self, target: Target) -> dict[str, Any]:
        raise NotImplementedError


class Status(Command):
    """The supervisor's live view of the run.

    -> {"type":"control","v":1,"command":"status"}
    <- {"type":"reply","v":1,"ok":true,"error":"","data":{"run_id":"mini-...","state":"training",
        "reason":"","supervisor_pid":123,"worker_pid":456,"attempt":2,"phase":"training",
        "step":120,"total_steps":2000,"last_heartbeat_s":0.4,"tokens_per_sec":812.5,
        "rss_mb":1400.2,"mlx_mb":900.1,"overrides":{...},"latest_checkpoint":{...},
        "best_checkpoint":{...},"restart_in_s":null,"attempts":2,"failures":1}}
    """

    name = "status"

    def execute(self, target: Target) -> dict[str, Any]:
        return target.status().to_dict()


class Stop(Command):
    """Stop the run: the worker saves a checkpoint and exits; the supervisor ends `stopped`.

    -> {"type":"control","v":1,"command":"stop"}
    <- {"type":"reply","v":1,"ok":true,"error":"","data":{"state":"stopping",
        "supervisor_pid":123,"stop_timeout":120.0}}
    """

    name = "stop"

    def execute(self, target: Target) -> dict[str, Any]:
        return target.request_stop("control")


class Checkpoint(Command):
    """Save a checkpoint now (SIGUSR1: at the end of the current step) and keep training.

    -> {"type":"control","v":1,"command":"checkpoint"}
    <- {"type":"reply","v":1,"ok":true,"error":"","data":{"worker_pid":456,"step":120}}
    <- {"type":"reply","v":1,"ok":false,"error":"no worker is training (state backing_off)",
        "data":{}}
    """

    name = "checkpoint"

    def execute(self, target: Target) -> dict[str, Any]:
        return target.request_checkpoint("control")


COMMANDS: dict[str, type[Command]] = {c.name: c for c in (Status, Stop, Checkpoint)}


def handle(raw: bytes, target: Target) -> ControlReply:
    """Decode one request, run its command, and build the reply; never raises."""
    try:
        msg = decode(raw)
    except ProtocolError as e:
        return ControlReply(ok=False, error=f"bad request: {e}")
    if not isinstance(msg, ControlRequest):
        return ControlReply(ok=False, error=f"bad request: expected a control message, got "
                                            f"{type(msg).__name__}")
    try:
        return ControlReply(ok=True, data=COMMANDS[msg.command]().execute(target))
    except ControlError as e:
        return ControlReply(ok=False, error=str(e))


class ControlServer:
    """The REP socket; `serve_ready()` answers whatever requests are waiting."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, target: Target) -> None:
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Far larger than any valid request: a bigger one drops the sender's connection
        # instead of filling our memory; up to this size we reply with a clear error.
        self.socket.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_MESSAGE_BYTES)
        self.socket.bind(endpoint)
        self.target = target

    def serve_ready(self, log: Any) -> int:
        served = 0
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            if len(frames) != 1:
                reply = ControlReply(ok=False, error="bad request: expected one frame")
            else:
                reply = handle(frames[0], self.target)
            self.socket.send(reply.to_json())
            log.info("control_request", ok=reply.ok, error=reply.error or None,
                     command=_command_name(frames))
            served += 1

    def close(self) -> None:
        self.socket.close(linger=0)


def _command_name(frames: list[bytes]) -> str | None:
    try:
        msg = decode(frames[0])
    except (ProtocolError, IndexError):
        return None
    return msg.command if isinstance(msg, ControlRequest) else None
