"""The supervisor's listening sockets and the resources they need: bounds on what a peer can
make it hold, and an open-file limit high enough for the peers it may have.

Both sockets (telemetry SUB, control REP) are bound on `ipc://` paths in a 0700 directory
(shared/layout.py), so only the user's own processes can connect. Still, what a peer sends
or leaves open must not end the supervisor:

- **Size**: ZMQ_MAXMSGSIZE drops a connection that sends a message over the bound instead of
  buffering it (decode refuses anything over shared.protocol.MAX_MESSAGE_BYTES with a reason;
  up to MAX_WIRE_BYTES a sender still gets that reason).
- **Queues**: receive/send high-water marks bound what is queued per peer.
- **Idle connections**: a connection that never completes the ZeroMQ handshake (a raw
  `connect()` on the socket file) is closed after HANDSHAKE_SECONDS; on the control socket
  ZeroMQ heartbeats close a connection whose peer stopped answering (a frozen client).
- **Log volume**: what peers send wrong is counted and logged at most once per LOG_EVERY
  seconds (`Every`), so a flood of garbage cannot fill the disk with log lines.
- **Open files**: every connection costs the supervisor one file descriptor, and libzmq's
  ipc listener aborts the process when accept() fails with EMFILE (libzmq 4.3.5,
  src/ipc_listener.cpp:297) — with macOS's default soft limit of 256, 300 idle connections
  were enough. `raise_open_files_limit()` raises the soft limit to the hard one at start
  (macOS: at most OPEN_MAX, 10240, when the hard limit is unlimited); the worker inherits it.
  What remains: libzmq has no per-socket connection limit, so connections that complete the
  handshake and stay alive (idle REQ clients) are bounded by that limit alone — thousands
  (shared/openfile_limit.py refuses hard limits below 4096), where 256 used to be the end.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import zmq

from shared.protocol import MAX_MESSAGE_BYTES

MAX_WIRE_BYTES = 16 * MAX_MESSAGE_BYTES  # over this a connection is dropped, not answered
HANDSHAKE_SECONDS = 5.0  # a connection that has not said hello by then is closed
HEARTBEAT_SECONDS = 10.0  # control: ping each peer this often...
HEARTBEAT_TIMEOUT_SECONDS = 30.0  # ...and close the connection after this long without pong
CONTROL_HWM = 16  # messages queued per control peer (a REQ client has one in flight)
TELEMETRY_HWM = 10_000  # messages queued from the worker (the loop drains 1000 per pass)
MACOS_OPEN_MAX = 10240  # <sys/syslimits.h> OPEN_MAX: setrlimit's ceiling with RLIM_INFINITY
LOG_EVERY = 60.0  # seconds between log lines about what peers send wrong (with a count)


def bound(sock: zmq.Socket[Any], *, hwm: int, heartbeat: bool) -> None:
    """The bounds above, on a socket before it binds."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_BYTES)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_SECONDS * 1000))
    if heartbeat:
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_SECONDS * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_SECONDS * 1000))


def bind_telemetry(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """The telemetry SUB socket, bound and subscribed to everything; workers connect to it."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    bound(sock, hwm=TELEMETRY_HWM, heartbeat=False)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(endpoint)
    return sock


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now, hard),
    RLIM_INFINITY as -1. Never raises: a limit that cannot be raised is left as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = [hard]
    if sys.platform == "darwin" or hard == resource.RLIM_INFINITY:
        # macOS refuses RLIM_INFINITY (and anything over kern.maxfilesperproc) for the soft
        # limit; OPEN_MAX is what it always accepts.
        targets = [t for t in (hard, MACOS_OPEN_MAX) if t != resource.RLIM_INFINITY] or [
            MACOS_OPEN_MAX]
    new = soft
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        new = target
        break
    return _n(soft), _n(new), _n(hard)


def _n(limit: int) -> int:
    return -1 if limit == resource.RLIM_INFINITY else int(limit)


class Every:
    """Rate-limited reporting of a growing count: `due(count, now)` says how many are new
    when a line is due — the first at once, then at most one per `seconds` — else 0."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reported = 0
        self.next_at = float("-inf")

    def due(self, count: int, now: float) -> int:
        if count <= self.reported or now < self.next_at:
            return 0
        new, self.reported, self.next_at = count - self.reported, count, now + self.seconds
        return new
