"""Telemetry for the supervisor: a ZeroMQ PUB socket fed by one background thread.

ZeroMQ sockets are not thread-safe, so exactly one thread (this one) owns the socket: the
training thread only appends to a bounded deque, which never blocks (nor wakes this thread:
queued messages go out every 0.1 s, serialised here, off the training thread). It sends a
Heartbeat every `interval` seconds carrying the full current state (PUB/SUB loses messages
around connects; nothing may depend on one message arriving) and drains queued messages with
non-blocking sends. When the supervisor is slow or gone, messages are dropped and counted —
training never waits for telemetry.

The socket is an XPUB, which is a PUB that also sees subscriptions arrive: until the
supervisor's subscription has reached us (a few ms after connecting), messages stay queued
instead of being sent into the void, so the first phase changes of an attempt — and the
reason of a worker that exits at once on a bad config — are not lost to the slow joiner.

Every message goes out stamped with the attempt's telemetry token, which the supervisor puts
in the worker's environment (shared.protocol.TOKEN_ENV; none when started by hand): the
supervisor believes only messages carrying it (supervisor/daemon/telemetry_gate.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import psutil

from shared import protocol as p
from shared.distributed_config import CURVE_PUBLIC_ENV, CURVE_SECRET_ENV, CURVE_SERVER_ENV
from shared.footprint import phys_footprint_mb

QUEUE_LIMIT = 10_000
SEND_HWM = 1_000
# Seconds: queued messages go out in batches, at most this late. Each flush is a wake-up of
# this thread, ~0.1 ms of CPU here whatever it sends (a cold wake-up on a VM): 10 a second
# keeps that at 0.1 % of a core; the supervisor reads telemetry every 0.25 s anyway.
FLUSH_INTERVAL = 0.1
UNSUBSCRIBED_POLL = 0.01  # seconds between looks for the subscription while waiting for it,
UNSUBSCRIBED_POLL_MAX = 0.25  # growing to this when nobody subscribes
CLOSE_WAIT_FOR_SUBSCRIBER = 1.0  # seconds a closing worker waits to deliver its last words


@dataclass
class LiveStatus:
    """What the heartbeat reports; written by the training thread, read by the sender."""

    run_id: str
    attempt: int
    total_steps: int
    phase: p.Phase = p.Phase.STARTING
    step: int = 0
    last_step_time: float = 0.0
    active_mb: float = 0.0
    peak_mb: float = 0.0
    cache_mb: float = 0.0  # MLX's buffer cache at the last step


class Telemetry:
    def __init__(self, endpoint: str, status: LiveStatus, interval: float = 1.0,
                 token: str | None = None):
        """`token`: the attempt's telemetry token (default: from the environment)."""
        import zmq

        self.token = os.environ.get(p.TOKEN_ENV, "") if token is None else token
        # A group's member says its rank in every message (MLX_RANK: mlx's own variable,
        # set by the supervisor for each rank, supervisor/daemon/group.py).
        self.rank = int(os.environ.get("MLX_RANK", "0") or 0)
        self.status = status
        self.interval = interval
        self.dropped = 0
        # deque appends/pops are atomic: the training thread never takes a lock here.
        self._queue: deque[p._Message] = deque(maxlen=QUEUE_LIMIT)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.LINGER, 500)  # flush the last messages briefly on exit
        if CURVE_SERVER_ENV in os.environ:  # across the network: CURVE (supervisor/daemon/curve.py)
            self._sock.curve_serverkey = os.environ[CURVE_SERVER_ENV].encode()
            self._sock.curve_publickey = os.environ[CURVE_PUBLIC_ENV].encode()
            self._sock.curve_secretkey = os.environ[CURVE_SECRET_ENV].encode()
        self._sock.connect(endpoint)
        self._proc = psutil.Process(os.getpid())
        self._seq = 0
        self._beat_due = True
        self.subscribed = False
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def beat_now(self) -> None:
        """Send a heartbeat now (on a phase change: the supervisor's timeouts depend on it)."""
        self._beat_due = True
        self._wake.set()

    def send(self, message: p._Message) -> None:
        """Queue a message; it goes out within FLUSH_INTERVAL. Never blocks, never wakes the
        sender thread (a wake-up per message costs the training thread GIL time)."""
        if len(self._queue) == QUEUE_LIMIT:
            self.dropped += 1  # the deque drops the oldest
        self._queue.append(message)

    def heartbeat(self) -> p.Heartbeat:
        s = self.status
        self._seq += 1
        return p.Heartbeat(
            run_id=s.run_id,
            pid=os.getpid(),
            attempt=s.attempt,
            seq=self._seq,
            time=time.time(),
            phase=s.phase,
            step=s.step,
            total_steps=s.total_steps,
            last_step_time=s.last_step_time,
            active_mb=s.active_mb,
            peak_mb=s.peak_mb,
            rss_mb=self._proc.memory_info().rss / 2**20,
            dropped=self.dropped,
            cache_mb=s.cache_mb,
            footprint_mb=phys_footprint_mb(os.getpid()) or 0.0,
            token=self.token,
            rank=self.rank,
        )

    def _stamp(self, message: p._Telemetry) -> tuple[str, int]:
        """The token and rank `message` goes out with: this attempt's when it has none
        (stamped here, off the training thread), else its own."""
        if (self.token or self.rank) and not message.token:
            return self.token, self.rank
        return message.token, message.rank

    def _send_now(self, message: p._Message) -> None:
        if isinstance(message, p._Telemetry):
            token, rank = self._stamp(message)
            if (token, rank) != (message.token, message.rank):
                message = message.with_token(token, rank)
        self._send_bytes(message.to_json())

    def _send_bytes(self, data: bytes) -> None:
        import zmq

        try:
            self._sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def _check_subscription(self) -> bool:
        """Read subscription messages (b"\\x01" + topic) that XPUB hands us, until the first
        (then no more reads: a recv that finds nothing costs ~0.1 ms of this thread's CPU,
        ~20 times a second; a later supervisor's subscription waits unread, one message)."""
        import zmq

        if self.subscribed:
            return True
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.subscribed
            if msg[:1] == b"\x01":
                self.subscribed = True

    def _flush(self) -> None:
        import zmq

        if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            # The subscriber is gone or frozen and its queue is full: drop without the cost
            # of serialising (the next heartbeat carries the state anyway).
            while self._queue:
                self._queue.popleft()
                self.dropped += 1
            return
        while self._queue:
            message = self._queue.popleft()
            if isinstance(message, p.StepMetrics):
                # Consecutive steps go out as one message (shared.protocol.StepMetricsBatch):
                # at > 100 steps/s the supervisor then handles a few messages a second.
                steps = [message]
                while (self._queue and isinstance(self._queue[0], p.StepMetrics)
                       and len(steps) < p.MAX_BATCH_STEPS):
                    steps.append(self._queue.popleft())  # type: ignore[arg-type]
                if len(steps) > 1:
                    self._send_bytes(p.StepMetricsBatch.encode(steps, *self._stamp(steps[0])))
                    continue
            self._send_now(message)

    def _run(self) -> None:
        next_beat = 0.0
        idle_poll = UNSUBSCRIBED_POLL
        while not self._stop.is_set():
            if self._check_subscription():
                now = time.monotonic()
                if now >= next_beat or self._beat_due:
                    self._beat_due = False
                    self._send_now(self.heartbeat())
                    next_beat = now + self.interval
                self._flush()
                timeout = min(FLUSH_INTERVAL, max(0.0, next_beat - time.monotonic()))
            else:
                # Nobody listening yet: keep everything queued (heartbeats are re-made). A
                # supervisor subscribes within milliseconds; without one, look less often.
                timeout = idle_poll
                idle_poll = min(UNSUBSCRIBED_POLL_MAX, idle_poll * 1.5)
            self._wake.wait(timeout=timeout)
            self._wake.clear()

    def close(self) -> None:
        """Deliver what is queued plus a final heartbeat (briefly waiting for a late
        subscriber), then stop the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2.0)
        deadline = time.monotonic() + CLOSE_WAIT_FOR_SUBSCRIBER
        while not self._check_subscription() and time.monotonic() < deadline:
            time.sleep(UNSUBSCRIBED_POLL)
        self._flush()
        self._send_now(self.heartbeat())
        self._sock.close()
