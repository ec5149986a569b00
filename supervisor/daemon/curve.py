"""Telemetry across the network: ZeroMQ CURVE, both ends authenticated, keys in the run directory.

Only when a group has ranks on other hosts (`distributed.hosts`, shared/distributed_config.py)
does telemetry leave this machine; then the telemetry socket is also bound to
`tcp://<this host's address>:<port>` and nothing reaches it unauthenticated:

- **Keys.** `RUN_DIR/keys/` (mode 0700) holds a server and a client key pair in
  libzmq's certificate format (`zmq.auth.create_certificates`: `server.key`,
  `server.key_secret`, `client.key`, `client.key_secret`), each file mode 0600, made once
  per run and reused by every attempt. `keys/allowed/` holds the one public key a client
  may present. An existing key file that is not ours alone (a mode other than 0600, a
  symlink) is refused: one line, exit 78 (RunDirError), like the socket directory.
- **Server.** The telemetry SUB socket is a CURVE server (`curve_server`, its secret key);
  a ZAP handler (pyzmq's ThreadAuthenticator, `configure_curve`) admits only clients
  whose public key is in `keys/allowed/`. A peer without the keys never completes the
  handshake (the socket's 5 s handshake limit closes it: supervisor/daemon/sockets.py).
  CURVE applies to the whole socket, so local ranks use it too (they get the same keys).
- **Client.** Each rank gets the server's public key and the client key pair in its
  environment (`OVERNIGHT_CURVE_*`; for a remote rank through ssh's environment, never a
  command line: supervisor/daemon/group_remote.py); worker/telemetry.py sets them on its
  socket before it connects.

A group on one machine keeps `ipc://` alone (the socket directory is 0700: only this user
can connect) and needs none of this.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared.distributed_config import CURVE_PUBLIC_ENV, CURVE_SECRET_ENV, CURVE_SERVER_ENV
from shared.errors import RunDirError
from supervisor.daemon.sockets import TELEMETRY_HWM, bound


@dataclass(frozen=True)
class CurveKeys:
    """The run's key pairs (z85 bytes) and where they are."""

    dir: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def worker_env(self) -> dict[str, str]:
        """What a rank needs to connect (module docstring)."""
        return {CURVE_SERVER_ENV: self.server_public.decode(),
                CURVE_PUBLIC_ENV: self.client_public.decode(),
                CURVE_SECRET_ENV: self.client_secret.decode()}


def _check_private(path: Path, directory: bool = False) -> None:
    st = path.lstat()
    what = "directory" if directory else "file"
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() \
            or stat.S_IMODE(st.st_mode) & 0o077:
        raise RunDirError(f"{path}: a CURVE key {what} must be a real {what} of this user "
                          f"with mode {'0700' if directory else '0600'}, got mode "
                          f"{stat.S_IMODE(st.st_mode):o}; remove the keys directory to "
                          "make new keys")


def ensure_keys(run_root: Path) -> CurveKeys:
    """The run's keys, made on first use (module docstring); RunDirError for key files
    that are not ours alone."""
    keys = run_root / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    _check_private(keys, directory=True)
    names = ("server.key", "server.key_secret", "client.key", "client.key_secret")
    if not all((keys / n).exists() for n in names):
        old = os.umask(0o077)
        try:
            for who in ("server", "client"):
                zmq.auth.create_certificates(str(keys), who)
        finally:
            os.umask(old)
    for n in names:
        _check_private(keys / n)
    allowed = keys / "allowed"
    if allowed.exists():
        shutil.rmtree(allowed)
    allowed.mkdir(mode=0o700)
    shutil.copyfile(keys / "client.key", allowed / "client.key")
    os.chmod(allowed / "client.key", 0o600)
    server_public, server_secret = zmq.auth.load_certificate(str(keys / "server.key_secret"))
    client_public, client_secret = zmq.auth.load_certificate(str(keys / "client.key_secret"))
    assert server_secret is not None and client_secret is not None
    return CurveKeys(keys, server_public, server_secret, client_public, client_secret)


def bind_secure_telemetry(ctx: zmq.Context[Any], endpoints: list[str], keys: CurveKeys
                          ) -> tuple[zmq.Socket[Any], ThreadAuthenticator]:
    """The telemetry SUB socket as a CURVE server admitting only the run's client key,
    bound to every endpoint (ipc:// and tcp://); the authenticator must be stopped at the
    end (`.stop()`)."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.dir / "allowed"))
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    bound(sock, hwm=TELEMETRY_HWM, heartbeat=False)
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    for endpoint in endpoints:
        sock.bind(endpoint)
    return sock, auth



@dataclass
class SecureTelemetry:
    """The telemetry socket of a group with remote ranks (module docstring)."""

    sock: zmq.Socket[Any]
    auth: ThreadAuthenticator
    endpoint: str  # tcp://ip:port, what remote ranks connect to
    env: dict[str, str]  # every rank's CURVE keys

    def close(self) -> None:
        self.auth.stop()


def setup(ctx: zmq.Context[Any], distributed: Any, run_root: Path, ipc_endpoint: str,
          log: Any) -> SecureTelemetry | None:
    """None for one process or a group on this machine (ipc:// alone); else the keys, the
    CURVE telemetry socket on ipc:// and on tcp://<rank 0's address>:<a free port>.
    RunDirError (exit 78) for key files that are not ours alone; ConfigError when rank 0's
    host does not resolve."""
    if not distributed.enabled or not distributed.remote:
        return None
    from supervisor.daemon.group_remote import resolve_ip

    host = distributed.host(0)
    ip = resolve_ip(host) if host.split("@")[-1] not in ("", "localhost") else "127.0.0.1"
    keys = ensure_keys(run_root)
    sock, auth = bind_secure_telemetry(ctx, [ipc_endpoint, f"tcp://{ip}:*"], keys)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    log.info("telemetry_curve", endpoint=endpoint, keys=str(keys.dir))
    return SecureTelemetry(sock, auth, endpoint, keys.worker_env())
