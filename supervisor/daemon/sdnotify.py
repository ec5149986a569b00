"""The systemd notify protocol (sd_notify(3)), without a dependency: one datagram per call.

Under `Type=notify` systemd sets NOTIFY_SOCKET to a Unix datagram socket: a path, or an
abstract-namespace name written with a leading "@". A message is newline-separated
assignments, e.g. b"READY=1" or b"STATUS=training step 120". With `WatchdogSec=` it also sets
WATCHDOG_USEC (and WATCHDOG_PID, the process meant): send WATCHDOG=1 at least every
WATCHDOG_USEC, sd_watchdog_enabled(3) recommends every half of it.

Everything is best effort and returns whether a datagram was sent: without NOTIFY_SOCKET
(launchd, a terminal, tests) every call is a no-op returning False, and a send error never
stops the supervisor. Typical use in the supervisor's loop:

    sdnotify.ready()
    interval = sdnotify.watchdog_interval()      # seconds, or None
    ... every interval / 2: sdnotify.watchdog()
    sdnotify.stopping()                          # when it starts a graceful stop

Children should not inherit the socket: spawn the worker with `child_environment()`.

The loop takes a `Notifier` (this module is one), like its clock, so tests hand it a fake.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Protocol

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
_INHERITED = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)


class Notifier(Protocol):
    """What the supervisor tells its service manager (this module's functions)."""

    def ready(self) -> bool: ...

    def watchdog(self) -> bool: ...

    def stopping(self) -> bool: ...

    def status(self, text: str) -> bool: ...

    def watchdog_interval(self) -> float | None: ...


def _address(env: Mapping[str, str]) -> str | None:
    raw = env.get(NOTIFY_SOCKET, "")
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]  # abstract namespace (Linux)
    if raw.startswith("/"):
        return raw
    return None  # unset, empty, or a transport we do not speak (vsock:...)


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one message (e.g. "READY=1\\nSTATUS=loading"); False if not sent."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def ready(env: Mapping[str, str] | None = None) -> bool:
    """Start-up is complete: systemctl start returns, dependents may start."""
    return notify("READY=1", env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    """Still alive: resets the WatchdogSec= timer."""
    return notify("WATCHDOG=1", env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    """A graceful stop has begun (the worker is saving a checkpoint)."""
    return notify("STOPPING=1", env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """Free-form status shown by `systemctl --user status` (one line)."""
    line = " ".join(text.splitlines())
    return notify(f"STATUS={line}", env)


def watchdog_interval(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog timeout in seconds if it applies to this process, else None.

    Like sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer, and when
    WATCHDOG_PID is set it must be this process's PID (or `pid`).
    """
    env = os.environ if env is None else env
    usec = env.get(WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wanted = env.get(WATCHDOG_PID)
    me = os.getpid() if pid is None else pid
    if wanted is not None and (not wanted.isdigit() or int(wanted) != me):
        return None
    return int(usec) / 1_000_000


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the notify variables, for child processes."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k not in _INHERITED}
