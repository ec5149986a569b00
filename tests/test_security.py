"""Security (issue 12), each property checked on the real thing: the sockets of a live run are
ipc:// in a 0700 directory and nothing listens on a network port; the socket directory under
the shared temp dir is used only when it is ours alone; no pickle, eval or exec in the code;
every message is size-limited and schema-checked; `on_exit` gets run data only through its
environment; run files follow the umask and are never world-writable."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from shared import protocol as p
from shared.errors import ProtocolError, RunDirError
from shared.layout import RunDir
from shared.runlock import Role, RunLock
from supervisor.daemon import sockets
from supervisor.daemon.control import ControlServer
from tests.conftest import subprocess_env
from tests.conftest import write_config as write_real_config
from tests.supervisor_support import ROOT, record, wait_for, write_config
from tests.test_protocol_fuzz import VALID, Target

# ---- a live run: private sockets, no network port, private files --------------------------


def _daemon(config: Path, run_dir: Path, umask: int, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.daemon", str(config), "--run-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(PYTHONPATH=str(ROOT), **env), preexec_fn=lambda: os.umask(umask))


def _inet(pid: int) -> list[str]:
    return [f"{c.laddr} {c.status}" for c in psutil.Process(pid).net_connections(kind="inet")]


def _walk(root: Path) -> Iterator[tuple[Path, int]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            yield path, stat.S_IMODE(os.lstat(path).st_mode)


def test_a_live_run_is_private_and_listens_on_no_port(tmp_path, tiny_model, corpus):
    """The real worker, a real supervisor started under umask 077: while it trains, its
    socket directory is 0700 and holds both endpoints, and neither process has an internet
    socket; when it has finished, nothing it wrote has a group or other permission bit."""
    config = write_real_config(tmp_path / "sec.yaml", tiny_model, corpus, iters=20,
                               supervisor={"caffeinate": False})
    run = RunDir(tmp_path / "run")
    daemon = _daemon(config, run.root, 0o077)
    try:
        worker = wait_for(lambda: _training_worker(run), timeout=120)
        sock_dir = run.sockets
        assert stat.S_IMODE(os.lstat(sock_dir).st_mode) == 0o700
        assert sorted(os.listdir(sock_dir)) == ["control", "telemetry"]
        assert run.telemetry_endpoint.startswith("ipc://")
        assert run.control_endpoint.startswith("ipc://")
        assert _inet(daemon.pid) == [] and _inet(worker) == []
        assert daemon.wait(timeout=180) == 0, daemon.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert record(run.root)["state"] == "finished"
    written = list(_walk(run.root))
    assert len(written) > 20  # checkpoints, adapters, logs, records
    assert [(str(path), oct(mode)) for path, mode in written if mode & 0o077] == []


def _training_worker(run: RunDir) -> int | None:
    try:
        rec = record(run.root)
    except (OSError, ValueError):
        return None
    pid = (rec.get("worker") or {}).get("pid")
    return pid if pid and rec["final_step"] >= 2 else None


def test_files_are_never_world_writable_even_under_umask_0(tmp_path):
    config = write_config(tmp_path, iters=20)
    run = RunDir(tmp_path / "run")
    daemon = _daemon(config, run.root, 0o000)
    assert daemon.wait(timeout=60) == 0, daemon.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    written = list(_walk(run.root))
    assert len(written) > 10
    assert [(str(path), oct(mode)) for path, mode in written if mode & 0o002] == []
    assert any(mode & 0o020 for _, mode in written)  # the umask is otherwise followed


# ---- the socket directory of a deep run directory ---------------------------------------


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[RunDir]:
    """A run directory too deep for a socket path: its sockets go to the temp dir."""
    run = RunDir(tmp_path / ("d" * 60) / ("e" * 60) / "run")
    assert run.sockets.parent == Path(tempfile.gettempdir())
    assert run.sockets.name.startswith(f"overnight-{os.getuid()}-")
    yield run
    if run.sockets.is_symlink() or run.sockets.is_file():
        run.sockets.unlink()
    elif run.sockets.exists():
        shutil.rmtree(run.sockets)


def test_the_fallback_socket_directory_is_created_private(deep: RunDir) -> None:
    old = os.umask(0o022)
    try:
        deep.create_socket_dir()
        deep.create_socket_dir()  # ours already: used again
    finally:
        os.umask(old)
    st = os.lstat(deep.sockets)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize(("prepare", "problem"), [
    (lambda path, tmp: path.mkdir(mode=0o755), "its mode is 0755, expected 0700"),
    (lambda path, tmp: (path.mkdir(), path.chmod(0o777)), "its mode is 0777, expected 0700"),
    (lambda path, tmp: ((tmp / "elsewhere").mkdir(mode=0o700), path.symlink_to(tmp / "elsewhere")),
     "it is a symbolic link"),
    (lambda path, tmp: path.write_text("x"), "it is not a directory"),
])
def test_an_existing_fallback_directory_not_ours_alone_is_refused(
        deep: RunDir, tmp_path: Path, prepare, problem: str) -> None:
    prepare(deep.sockets, tmp_path)
    with pytest.raises(RunDirError) as e:
        deep.create_socket_dir()
    assert str(e.value) == f"{deep.sockets}: refusing to use the socket directory: {problem}" \
        or str(e.value).startswith(f"{deep.sockets}: refusing to use the socket directory: "
                                   f"{problem}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_fallback_directory_of_another_user_is_refused(deep: RunDir) -> None:
    deep.sockets.mkdir(mode=0o700)
    os.chown(deep.sockets, 12345, 12345)
    with pytest.raises(RunDirError, match="owned by uid 12345, not by this user"):
        deep.create_socket_dir()


def test_the_supervisor_refuses_a_planted_socket_directory_with_one_line(tmp_path, deep):
    deep.sockets.mkdir(mode=0o700)
    deep.sockets.chmod(0o777)  # another user could have put anything in it
    config = write_config(tmp_path, iters=5)
    daemon = _daemon(config, deep.root, 0o022)
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 78
    lines = err.decode().strip().splitlines()
    assert lines[-1] == (f"overnight run: {deep.sockets}: refusing to use the socket "
                         f"directory: its mode is 0777, expected 0700 (chmod 700 it, or "
                         f"remove it)")
    assert not (deep.root / "logs" / "worker-1.log").exists()  # no worker was started
    assert stat.S_IMODE(os.lstat(deep.sockets).st_mode) == 0o777  # and nothing was bound


def test_status_refuses_to_talk_through_a_planted_socket_directory(deep: RunDir) -> None:
    """Another user pre-creates the fallback directory (here: mode 0777), binds a control
    socket in it and answers `status` with a forged "all is well": the client refuses to
    connect, with one line naming the directory, and the impostor hears nothing."""
    deep.create()
    deep.sockets.mkdir(mode=0o700)
    deep.sockets.chmod(0o777)
    impostor = zmq.Context.instance().socket(zmq.REP)
    impostor.bind(deep.control_endpoint)
    lock = RunLock(deep.lock, Role.SUPERVISOR)
    lock.acquire()  # a live supervisor holds the run (as far as the client can tell)
    try:
        done = subprocess.run([sys.executable, "-m", "shared.cli", "status", str(deep.root)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env=subprocess_env())
        heard = impostor.poll(200, zmq.POLLIN)
    finally:
        lock.release()
        impostor.close(linger=0)
    assert done.returncode == 78, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"overnight status: {deep.sockets}: refusing to talk to the supervisor through this "
        f"socket directory: its mode is 0777, expected 0700 (chmod 700 it, or remove it)"]
    assert not heard


# ---- the code: no pickle, eval or exec --------------------------------------------------

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
                  "joblib", "torch"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__", "execfile", "input"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_Loader"}


def _sources() -> list[Path]:
    files = [f for d in ("shared", "supervisor", "worker") for f in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    return files


def test_no_pickle_eval_or_exec_in_the_code() -> None:
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [f"{where} import {a.name}" for a in node.names
                          if a.name.split(".")[0] in BANNED_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.split(".")[0] in BANNED_MODULES:
                found.append(f"{where} from {node.module} import")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in BANNED_CALLS:
                    found.append(f"{where} {f.id}()")
                elif isinstance(f, ast.Attribute) and f.attr in (
                        "unsafe_load", "full_load", "load_all", "loads") \
                        and isinstance(f.value, ast.Name) and f.value.id in ("yaml", "pickle"):
                    found.append(f"{where} {f.value.id}.{f.attr}()")
                elif isinstance(f, ast.Attribute) and f.attr == "load" \
                        and isinstance(f.value, ast.Name) and f.value.id == "yaml":
                    loader = {k.arg: k.value for k in node.keywords}.get("Loader")
                    name = getattr(loader, "id", None) or getattr(loader, "attr", None)
                    if name not in SAFE_YAML_LOADERS:
                        found.append(f"{where} yaml.load(Loader={name})")
                for k in node.keywords:
                    if k.arg == "allow_pickle" and not (
                            isinstance(k.value, ast.Constant) and k.value.value is False):
                        found.append(f"{where} allow_pickle=")
    assert found == []


def test_the_yaml_loader_is_a_safe_loader() -> None:
    import yaml

    from shared import yamlfile

    assert issubclass(yamlfile._Loader, yaml.SafeLoader)
    with pytest.raises(Exception, match="could not determine a constructor"):
        yamlfile.parse_value("!!python/object/apply:os.system ['true']", "x")


def test_the_only_shell_is_the_users_own_on_exit_command() -> None:
    shells = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                    k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                              and k.value.value is False)
                    for k in node.keywords):
                shells.append(str(path.relative_to(ROOT)))
    assert shells == ["supervisor/daemon/main.py"]  # _on_exit: run data only in its env


# ---- messages: size-limited and schema-checked ------------------------------------------


@pytest.mark.parametrize("message", VALID, ids=lambda m: type(m).__name__)
def test_every_message_type_is_size_limited_and_schema_checked(message) -> None:
    import json

    good = json.loads(message.to_json())
    with pytest.raises(ProtocolError, match="unexpected fields"):
        p.decode(json.dumps({**good, "extra": 1}))
    key = next(k for k in good if k not in ("type", "v"))
    with pytest.raises(ProtocolError, match=f"{key}: expected"):
        p.decode(json.dumps({**good, key: [1]}))
    padded = json.dumps(good)[:-1] + " " * p.MAX_MESSAGE_BYTES + "}"
    with pytest.raises(ProtocolError, match="too large"):
        p.decode(padded)


def test_both_sockets_drop_connections_sending_more_than_a_megabyte(tmp_path) -> None:
    ctx = zmq.Context()
    try:
        sub = sockets.bind_telemetry(ctx, f"ipc://{tmp_path}/t")
        ctl = ControlServer(ctx, f"ipc://{tmp_path}/c", Target())
        for sock in (sub, ctl.socket):
            assert sock.getsockopt(zmq.MAXMSGSIZE) == 16 * 64 * 1024
            assert sock.getsockopt(zmq.HANDSHAKE_IVL) == 5000
        # a frozen control client is dropped: pinged every 10 s, closed after 30 s silent
        assert ctl.socket.getsockopt(zmq.HEARTBEAT_IVL) == 10_000
        assert ctl.socket.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 30_000
    finally:
        ctx.destroy(linger=0)


# ---- on_exit: run data only through the environment -------------------------------------


def test_on_exit_gets_run_data_only_through_its_environment(tmp_path) -> None:
    """A reason carrying shell syntax (here: the path of a missing data directory, which
    the reason quotes) reaches the command as data, never as code."""
    evil = tmp_path / "$(touch PWNED); touch PWNED2 ;`touch PWNED3`"
    out = tmp_path / "out.txt"
    config = write_config(tmp_path, iters=5, data=str(evil), supervisor={
        "on_exit": f'cd {tmp_path} && printf "%s|%s" "$OVERNIGHT_STATE" "$OVERNIGHT_REASON" '
                   f'> {out}'})
    daemon = _daemon(config, tmp_path / "run", 0o022)
    assert daemon.wait(timeout=60) == 0, daemon.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    text = out.read_text()
    assert text.startswith("gave_up|") and "$(touch PWNED); touch PWNED2 ;`touch PWNED3`" in text
    assert sorted(f.name for f in tmp_path.glob("PWNED*")) == []
    assert not Path("PWNED").exists() and not (ROOT / "PWNED").exists()
