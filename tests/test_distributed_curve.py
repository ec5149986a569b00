"""Telemetry across the network for a group with remote ranks: ZeroMQ CURVE with the run's
keys (supervisor/daemon/curve.py), here on 127.0.0.1 with the real worker sender."""

from __future__ import annotations

import os
import stat
import time

import pytest
import zmq

from shared.errors import RunDirError
from shared.protocol import Heartbeat, decode
from supervisor.daemon.curve import bind_secure_telemetry, ensure_keys
from worker.telemetry import LiveStatus, Telemetry


def test_the_keys_are_made_once_mode_0600_in_a_0700_directory(tmp_path) -> None:
    keys = ensure_keys(tmp_path)
    assert stat.S_IMODE(keys.dir.stat().st_mode) == 0o700
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
        assert stat.S_IMODE((keys.dir / name).stat().st_mode) == 0o600, name
    assert ensure_keys(tmp_path) == keys  # reused by every attempt
    env = keys.worker_env()
    assert env["OVERNIGHT_CURVE_SECRET"] == keys.client_secret.decode()
    assert len(env["OVERNIGHT_CURVE_SERVER"]) == 40  # z85 of 32 bytes


def test_a_key_file_others_can_read_is_refused(tmp_path) -> None:
    keys = ensure_keys(tmp_path)
    os.chmod(keys.dir / "client.key_secret", 0o644)
    with pytest.raises(RunDirError, match=r"client\.key_secret: a CURVE key file must be"):
        ensure_keys(tmp_path)


def _received(sock: zmq.Socket, seconds: float) -> list[bytes]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            got.append(sock.recv())
    return got


def test_only_a_client_with_the_runs_keys_is_heard(tmp_path, monkeypatch) -> None:
    ctx = zmq.Context()
    keys = ensure_keys(tmp_path)
    sock, auth = bind_secure_telemetry(ctx, ["tcp://127.0.0.1:*"], keys)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        # a publisher without keys, and one with a key pair of its own
        plain = ctx.socket(zmq.PUB)
        plain.connect(endpoint)
        stranger = ctx.socket(zmq.PUB)
        public, secret = zmq.curve_keypair()
        stranger.curve_serverkey, stranger.curve_publickey = keys.server_public, public
        stranger.curve_secretkey = secret
        stranger.connect(endpoint)
        for _ in range(10):
            plain.send(b'{"forged": 1}')
            stranger.send(b'{"forged": 2}')
            time.sleep(0.05)
        assert _received(sock, 1.0) == []
        # the real worker sender with the run's keys in its environment
        for k, v in keys.worker_env().items():
            monkeypatch.setenv(k, v)
        sender = Telemetry(endpoint, LiveStatus("r", 1, 10), interval=0.1, token="")
        try:
            got = _received(sock, 3.0)
        finally:
            sender.close()
        assert got and all(isinstance(decode(m), Heartbeat) for m in got)
        plain.close(0)
        stranger.close(0)
    finally:
        sock.close(0)
        auth.stop()
        ctx.term()
