"""supervisor/daemon/sockets.py and the control server's bounds: idle connections at macOS's
default soft open-file limit (256) no longer abort the supervisor (issue 12: 300 idle control
connections ended it in libzmq's ipc listener, "Too many open files
(src/ipc_listener.cpp:297)"); oversized messages, half-open connections and a request flood
are bounded."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog
import zmq

from shared.layout import RunDir
from shared.protocol import ControlRequest, decode
from supervisor.daemon.control import ControlServer
from tests.conftest import overnight, subprocess_env
from tests.supervisor_support import ROOT, events, record, wait_for, write_config
from tests.test_protocol_fuzz import Target

IDLE = 300
SOFT = 256  # macOS's default soft RLIMIT_NOFILE


@pytest.fixture
def many_files():
    """This test process holds hundreds of sockets itself: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 6 * IDLE + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"hard open-file limit {hard} < {want}")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soft_limit_256() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, hard))


def test_idle_connections_at_a_soft_limit_of_256(tmp_path: Path, many_files: None) -> None:
    """A real supervisor started with a soft limit of 256, 300 idle REQ connections and 300
    raw ones (connect() and silence) on its control socket, 100 idle PUB and 100 raw ones on
    its telemetry socket: it raises its limit, `overnight status` still gets a live answer,
    and the run finishes."""
    config = write_config(tmp_path, iters=80)  # ~5 s: status is asked while it trains
    run = RunDir(tmp_path / "run")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "supervisor.daemon", str(config), "--run-dir", str(run.root)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_soft_limit_256,
        env=subprocess_env(PYTHONPATH=str(ROOT), FAKE_STEP_SECONDS="0.06"))
    ctx = zmq.Context()
    held: list[zmq.Socket[bytes] | socket.socket] = []
    try:
        path = Path(run.control_endpoint.removeprefix("ipc://"))
        wait_for(path.exists)
        for _ in range(IDLE):
            req = ctx.socket(zmq.REQ)
            held.append(req)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(run.control_endpoint)
            raw = socket.socket(socket.AF_UNIX)
            held.append(raw)
            raw.connect(str(path))
        for _ in range(IDLE // 3):
            pub = ctx.socket(zmq.PUB)
            held.append(pub)
            pub.setsockopt(zmq.LINGER, 0)
            pub.connect(run.telemetry_endpoint)
            raw = socket.socket(socket.AF_UNIX)
            held.append(raw)
            raw.connect(run.telemetry_endpoint.removeprefix("ipc://"))
        time.sleep(1.0)  # let the supervisor accept them all
        assert daemon.poll() is None, daemon.stderr.read().decode()[-1500:]  # type: ignore[union-attr]
        status = overnight("status", str(run.root), "--json", "--timeout", "5", cwd=ROOT)
        assert status.returncode == 0, status.stderr
        live = json.loads(status.stdout)
        assert live["live"] is True and live["state"] in ("starting", "training")
        assert daemon.wait(timeout=60) == 0, daemon.stderr.read().decode()[-1500:]  # type: ignore[union-attr]
    finally:
        for s in held:
            s.close()
        ctx.destroy(linger=0)
        if daemon.poll() is None:
            daemon.kill()
    assert record(run.root)["state"] == "finished"
    limit = events(run.root, "open_files_limit")[0]
    assert limit["soft_before"] == SOFT and limit["soft"] == limit["hard"] > SOFT


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    code = ("import resource; from supervisor.daemon.sockets import raise_open_files_limit; "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, preexec_fn=_soft_limit_256).stdout
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    h = -1 if hard == resource.RLIM_INFINITY else hard
    if sys.platform == "darwin" and h == -1:
        h = 10240  # OPEN_MAX
    assert out.strip() == f"({SOFT}, {h}, {-1 if hard == resource.RLIM_INFINITY else hard}) " \
                          f"({h}, {hard})"


@pytest.fixture
def server(tmp_path: Path):
    ctx = zmq.Context()
    srv = ControlServer(ctx, f"ipc://{tmp_path}/control", Target())
    yield ctx, srv, f"ipc://{tmp_path}/control", tmp_path / "control"
    srv.close()
    ctx.destroy(linger=0)  # also the sockets a failed test left open


def _serve_until(srv: ControlServer, done, seconds: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        if srv.socket.poll(20):
            srv.serve_ready(structlog.get_logger())


def test_an_oversized_message_drops_its_connection_and_others_are_still_answered(server):
    ctx, srv, endpoint, _ = server
    big, ok, medium = (ctx.socket(zmq.REQ) for _ in range(3))
    for s in (big, ok, medium):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
    big.send(b"x" * (16 * 64 * 1024 + 1))  # over MAX_WIRE_BYTES (1 MiB): dropped unread
    medium.send(b"x" * (100 * 1024))  # over 64 KiB: answered with the reason
    ok.send(ControlRequest("status").to_json())
    _serve_until(srv, lambda: ok.poll(0) and medium.poll(0))
    assert decode(ok.recv()).ok  # type: ignore[union-attr]
    assert "message too large: 102400 bytes > 65536" in decode(medium.recv()).error  # type: ignore[union-attr]
    assert not big.poll(300)
    for s in (big, ok, medium):
        s.close()


def test_a_request_flood_is_answered_a_hundred_per_pass(server, monkeypatch):
    """A client flooding requests cannot keep the loop in serve_ready: one pass answers at
    most MAX_PER_PASS (100; shrunk to 5 here, as REP queues only CONTROL_HWM = 16 per peer)."""
    from supervisor.daemon import control

    assert control.MAX_PER_PASS == 100
    monkeypatch.setattr(control, "MAX_PER_PASS", 5)
    ctx, srv, endpoint, _ = server
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    for _ in range(40):  # a DEALER need not wait for replies: 40 requests at once
        dealer.send_multipart([b"", ControlRequest("status").to_json()])
    wait_for(lambda: srv.socket.poll(0), timeout=5)
    time.sleep(0.3)
    log = structlog.get_logger()
    passes = []
    while sum(passes) < 40:
        passes.append(srv.serve_ready(log))
        time.sleep(0.01)
    assert passes[0] == 5 and max(passes) == 5 and sum(passes) == 40
    dealer.close()


def test_a_silent_raw_connection_is_closed_after_the_handshake_timeout(server):
    """connect() and never speak ZMTP: closed after HANDSHAKE_SECONDS (5 s), so silent
    connections cannot pile up."""
    path = server[3]
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(path))
    raw.settimeout(10)
    t0 = time.monotonic()
    got = b""
    while True:
        chunk = raw.recv(4096)  # libzmq's greeting, then EOF when it gives up on us
        if not chunk:
            break
        got += chunk
    waited = time.monotonic() - t0
    raw.close()
    assert got[:1] == b"\xff" and 4.0 <= waited <= 8.0, (got[:10], waited)
