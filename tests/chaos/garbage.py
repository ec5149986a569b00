"""Hostile bytes on the supervisor's two ipc:// endpoints (issue 12: "one message kills it",
"idle connections", "forged telemetry").

Payloads (chosen at random per fault; `variant` names them):

| payload    | bytes                                                                 |
|------------|-----------------------------------------------------------------------|
| random     | 1–4000 random bytes                                                   |
| huge       | 2–16 MB of random bytes (64 KiB is the protocol's limit)              |
| nested     | `[` × 60000: deeper than Python's recursion limit                     |
| bigint     | a control/metrics message whose number has 5000 digits                 |
| schema     | well-formed JSON of the wrong shape (types, missing fields, NaN)      |
| forged     | telemetry only: a well-formed `metrics` for this run and attempt claiming step 10⁹ |
| raw        | random bytes written to the Unix socket itself, not in a ZMTP frame   |
| idle       | control only: 300 idle connections held open for 0.5 s, with the supervisor's |
|            | soft open-file limit at 256 (macOS's default; the campaign starts every |
|            | supervisor with it)                                                   |

The control socket is REQ/REP: a request that gets no answer within 1.5 s is noted (a REP
that answers nothing wedges every later client). Telemetry is the supervisor's SUB.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import zmq

from shared.protocol import ControlReply, ControlRequest, decode

CONTROL_PAYLOADS = ("random", "huge", "nested", "bigint", "schema", "raw", "idle")
TELEMETRY_PAYLOADS = ("random", "huge", "nested", "bigint", "schema", "forged", "raw")
FORGED_STEP = 10**9
REPLY_TIMEOUT_S = 1.5


def payload(kind: str, rng: random.Random, endpoint: str, run_id: str = "",
            attempt: int = 1) -> bytes:
    """The bytes of one message of `kind` (see the module table)."""
    if kind == "random":
        return rng.randbytes(rng.randint(1, 4000))
    if kind == "huge":
        return os.urandom(rng.randint(2, 16) * 1024 * 1024)
    if kind == "nested":
        return b"[" * 60000
    if kind == "bigint":
        digits = "9" * 5000
        if endpoint == "control":
            return f'{{"type":"control","v":1,"command":{digits}}}'.encode()
        return (f'{{"type":"metrics","v":1,"run_id":"{run_id}","attempt":{attempt},'
                f'"step":{digits}}}').encode()
    if kind == "schema":
        return json.dumps(rng.choice([
            {"type": "control", "v": 1, "command": ["status"]},
            {"type": "control", "v": 1},
            {"type": "reply", "v": 1, "ok": True, "data": {"x": [1] * 100}},
            {"type": "heartbeat", "v": 1, "run_id": run_id, "pid": "x", "attempt": None},
            {"type": "metrics", "v": 2, "step": 1},
            {"type": "checkpoint", "v": 1, "step": -5, "path": "/etc/passwd"},
            [1, 2, 3], "control", 12, None,
        ])).encode() if rng.random() < 0.8 else b'{"type":"metrics","v":1,"loss":NaN}'
    if kind == "forged":
        return json.dumps({
            "type": "metrics", "v": 1, "run_id": run_id, "attempt": attempt,
            "step": FORGED_STEP, "time": time.time(), "loss": 0.01, "grad_norm": 1.0,
            "lr": 1e-3, "tokens": 10, "tokens_per_sec": 100.0, "step_seconds": 0.01,
            "active_mb": 1.0, "peak_mb": 1.0, "rss_mb": 100.0,
        }).encode()
    raise ValueError(f"unknown payload {kind!r}")


def send_control(path: Path, requests: list[tuple[str, bytes]]) -> list[str]:
    """Send each request on its own REQ socket, all at once, then wait (at most
    REPLY_TIMEOUT_S in all) for the replies: "name: reply ok=…" / "name: reply not a
    message" / "name: no reply"."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socks = []
    try:
        for name, data in requests:
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{path}")
            s.send(data)
            socks.append((name, s))
        poller = zmq.Poller()
        for _, s in socks:
            poller.register(s, zmq.POLLIN)
        answers: dict[str, str] = {}
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while len(answers) < len(socks) and time.monotonic() < deadline:
            ready = dict(poller.poll(max(1, int((deadline - time.monotonic()) * 1000))))
            for name, s in socks:
                if s in ready and name not in answers:
                    answers[name] = _reply(s.recv())
                    poller.unregister(s)
        return [f"{name}: {answers.get(name, 'no reply')}" for name, _ in socks]
    finally:
        for _, s in socks:
            s.close(linger=0)


def _reply(raw: bytes) -> str:
    try:
        reply = decode(raw)
    except Exception:
        return "reply not a message"
    return f"reply ok={reply.ok if isinstance(reply, ControlReply) else None}"


def send_telemetry(path: Path, messages: list[bytes]) -> str:
    """Connect a PUB to the supervisor's SUB and publish; PUB/SUB drops what is sent before
    the connection is up, so wait for it first."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.LINGER, 1000)
    s.setsockopt(zmq.SNDHWM, 100)
    try:
        s.connect(f"ipc://{path}")
        time.sleep(0.2)
        for m in messages:
            s.send(m)
        time.sleep(0.2)
        return f"published {len(messages)}"
    finally:
        s.close(linger=1000)


def send_raw(path: Path, data: bytes) -> str:
    """Random bytes straight onto the Unix socket (a client that does not speak ZMTP)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
            s.sendall(data)
            time.sleep(0.05)
        except OSError as e:
            return f"raw: {e.strerror or e}"
    return f"raw: sent {len(data)} bytes"


def hold_idle(path: Path, count: int = 300, seconds: float = 0.5) -> str:
    """`count` idle Unix connections to the endpoint, held `seconds`, then closed."""
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(str(path))
                held.append(s)
            except OSError:
                refused += 1
                s.close()
        time.sleep(seconds)
    finally:
        for s in held:
            s.close()
    return f"idle: held {len(held)}, refused {refused}"


def status(path: Path) -> dict[str, Any] | None:
    """A well-formed `status` request's reply data, or None without a good reply in 1.5 s."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(f"ipc://{path}")
        s.send(ControlRequest(command="status").to_json())
        if not s.poll(int(REPLY_TIMEOUT_S * 1000)):
            return None
        reply = decode(s.recv())
        if isinstance(reply, ControlReply) and reply.ok:
            return reply.data
        return None
    except Exception:
        return None
    finally:
        s.close(linger=0)
