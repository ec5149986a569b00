"""sd_notify over real AF_UNIX datagram sockets: a path in tmp and an abstract name."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.daemon import sdnotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket standing in for systemd, and the environment pointing at it."""
    path = tmp_path / "notify"
    if len(str(path)) > 100:  # sun_path limit; pytest's tmp dirs are usually far shorter
        path = Path("/tmp") / f"overnight-notify-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def test_without_notify_socket_every_call_is_a_no_op_returning_false() -> None:
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.ready(env={}) is False
    assert sdnotify.watchdog(env={"NOTIFY_SOCKET": ""}) is False
    assert sdnotify.stopping(env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert sdnotify.status("x", env={"NOTIFY_SOCKET": "@"}) is False


def test_defaults_to_the_process_environment(
    listener: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = listener
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.ready() is True
    assert sock.recv(4096) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.ready() is False


def test_each_helper_sends_its_message_to_a_path_socket(
    listener: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = listener
    assert sdnotify.ready(env) is True
    assert sdnotify.watchdog(env) is True
    assert sdnotify.stopping(env) is True
    assert sdnotify.status("training\nstep 120", env) is True
    assert sdnotify.notify("READY=1\nSTATUS=resumed", env) is True
    received = [sock.recv(4096) for _ in range(5)]
    assert received == [
        b"READY=1", b"WATCHDOG=1", b"STOPPING=1", b"STATUS=training step 120",
        b"READY=1\nSTATUS=resumed",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_namespace_socket_written_with_at_sign() -> None:
    name = f"overnight-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        assert sdnotify.ready({"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_a_socket_nobody_listens_on_returns_false_without_raising(tmp_path: Path) -> None:
    assert sdnotify.ready({"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "300000000"}, 300.0),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "4242"}, 1.5),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    env: dict[str, str], expected: float | None
) -> None:
    assert sdnotify.watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 2.0


def test_child_environment_drops_the_notify_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin"}
    assert sdnotify.child_environment(env) == {"PATH": "/bin"}
