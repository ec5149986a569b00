"""shared/runlock.py: one writer per run directory, with real processes.

A live supervisor refuses a hand-started `overnight train` (and `--fresh`) on its run
directory; two `overnight train` on one directory: the second is refused; the supervisor's
own worker inherits the lock (it cannot be faked by an environment variable); a supervisor
that died leaves the lock with its worker, which the next supervisor stops first.
Read-only commands never take the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shared.errors import RunDirError, RunDirLocked
from shared.runlock import LOCK_FD_ENV, Role, RunLock, is_locked, read
from tests.conftest import overnight, subprocess_env
from tests.conftest import write_config as write_real_config
from tests.supervisor_support import (
    FAKE,
    ROOT,
    events,
    record,
    start_daemon,
    wait_for,
    write_config,
)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- the lock itself -------------------------------------------------------------------------


def test_a_second_lock_on_the_same_file_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path, Role.SUPERVISOR):
        assert is_locked(path)
        assert path.read_text() == f"{os.getpid()} supervisor\n"
        with pytest.raises(RunDirLocked) as e:
            RunLock(path, Role.WORKER).acquire()
        assert str(e.value).startswith(
            f"{tmp_path}: run directory is in use by supervisor PID {os.getpid()} (")
        assert e.value.holder is not None and e.value.holder.alive
    assert not is_locked(path)
    with RunLock(path, Role.WORKER), pytest.raises(RunDirLocked) as e:
        RunLock(path, Role.SUPERVISOR).acquire()
    assert f"run directory is in use by worker PID {os.getpid()} (" in str(e.value)


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    """The lock file was written an hour before this process started: not its writer."""
    path = tmp_path / "run.lock"
    path.write_text(f"{os.getpid()} supervisor\n")
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    holder = read(path)
    assert holder is not None and holder.pid == os.getpid() and not holder.alive
    path.write_text(f"{os.getpid()}\n")  # an older supervisor's file: a bare PID
    holder = read(path)
    assert holder is not None and holder.role is Role.SUPERVISOR and holder.alive
    assert read(tmp_path / "missing.lock") is None


def test_a_lock_file_that_cannot_be_opened_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match=r"cannot write the run directory \(Not a directory"):
        RunLock(blocker / "run.lock", Role.WORKER).acquire()


CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from shared.runlock import LOCK_FD_ENV, RunLock
    lock = RunLock.inherited_from_parent(Path(sys.argv[1]))
    print("inherited" if lock else "refused", LOCK_FD_ENV in os.environ)
""")


def _child(path: Path, env_fd: str | None, pass_fds: tuple[int, ...] = ()) -> str:
    env = subprocess_env(PYTHONPATH=str(ROOT))
    if env_fd is not None:
        env[LOCK_FD_ENV] = env_fd
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, cwd=ROOT,
                          pass_fds=pass_fds, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_only_the_locked_descriptor_itself_is_accepted_as_inherited(tmp_path):
    path = tmp_path / "run.lock"
    other = tmp_path / "other.lock"
    with RunLock(path, Role.SUPERVISOR) as lock, RunLock(other, Role.SUPERVISOR) as wrong:
        # the supervisor's way: the descriptor itself; the variable is not passed further
        assert _child(path, str(lock.fd), (lock.fd,)) == "inherited False"
        # the variable copied by hand, without the descriptor
        assert _child(path, str(lock.fd)) == "refused False"
        # a descriptor of another locked file
        assert _child(path, str(wrong.fd), (wrong.fd,)) == "refused False"
        # the same file opened anew: another open file description, so flock refuses it
        fd = os.open(path, os.O_RDONLY)
        try:
            assert _child(path, str(fd), (fd,)) == "refused False"
        finally:
            os.close(fd)
        assert _child(path, "not-a-number") == "refused False"


# ---- real processes ----------------------------------------------------------------------------


def slow_env() -> dict[str, str]:
    return {"FAKE_STEP_SECONDS": "0.05", "FAKE_HEARTBEAT": "0.2"}


def test_overnight_train_on_a_live_supervisors_run_dir_is_refused(tmp_path):
    config = write_config(tmp_path, iters=400, save_every=5)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, slow_env())
    try:
        wait_for(lambda: (run_dir / "run.json").exists()
                 and record(run_dir)["state"] == "training"
                 and any((run_dir / "checkpoints").glob("step-*")))
        for extra in ([], ["--fresh"]):
            done = overnight("train", str(config), "--run-dir", str(run_dir), *extra,
                             timeout=60)
            assert done.returncode == 78, done.stderr
            line = one_line(done.stderr)
            assert line.startswith(f"overnight train: {run_dir}: run directory is in use by "
                                   f"supervisor PID {sup.pid} ("), line
        assert not (run_dir / "previous").exists()  # --fresh moved nothing aside
        assert not (run_dir / "logs" / "worker.jsonl").exists()  # nor logged anything
        # read-only commands work meanwhile and take no lock
        for argv in (["status"], ["checkpoints", "--verify"], ["logs"], ["report", "--quiet"]):
            done = overnight(*argv, str(run_dir), timeout=60)
            assert done.returncode == 0, (argv, done.stderr)
        assert record(run_dir)["state"] == "training"
        assert len(record(run_dir)["attempts"]) == 1
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(30)
    assert record(run_dir)["state"] == "stopped"


def test_two_overnight_train_on_one_run_dir_the_second_is_refused(tmp_path, tiny_model,
                                                                   corpus):
    config = write_real_config(tmp_path / "c.yaml", tiny_model, corpus, iters=40)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "train", str(config), "--run-dir",
         str(run_dir)], cwd=ROOT, env=subprocess_env(OVERNIGHT_INJECT="hang@3"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # hang@3: the worker stops itself (SIGSTOP) at step 3, holding the run directory
        wait_for(lambda: psutil.Process(first.pid).status() == psutil.STATUS_STOPPED, 120)
        steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        for extra in ([], ["--fresh"]):
            done = overnight("train", str(config), "--run-dir", str(run_dir), *extra,
                             timeout=60)
            assert done.returncode == 78, done.stderr
            line = one_line(done.stderr)
            assert line.startswith(f"overnight train: {run_dir}: run directory is in use by "
                                   f"worker PID {first.pid} ("), line
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == steps
        assert not (run_dir / "previous").exists()
        # a supervisor is refused the same way, before it starts anything
        done = overnight("run", str(config), "--run-dir", str(run_dir), timeout=60)
        assert done.returncode == 78
        assert f"run directory is in use by worker PID {first.pid} (" in one_line(done.stderr)
        assert not (run_dir / "run.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # the kernel released the flock with the process: no stale lock
    with RunLock(run_dir / "run.lock", Role.WORKER):
        pass


HOLD_AND_DIE = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from shared.runlock import Role, RunLock
    fake, config, run_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir / "run.lock", Role.SUPERVISOR)
    lock.acquire()
    child = subprocess.Popen(
        [sys.executable, fake, "train", config, "--run-dir", str(run_dir),
         "--telemetry", "ipc://" + str(run_dir / "nobody"), "--attempt", "1"],
        pass_fds=(lock.fd,), env={**os.environ, **lock.child_environment()},
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(child.pid, flush=True)
    os._exit(0)  # a supervisor dying without a word
""")


def test_a_dead_supervisors_worker_keeps_the_lock_until_the_next_supervisor_stops_it(
        tmp_path):
    config = write_config(tmp_path, iters=200)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", HOLD_AND_DIE, str(FAKE), str(config), str(run_dir)],
        cwd=ROOT, env={**subprocess_env(PYTHONPATH=str(ROOT)), **slow_env()},
        capture_output=True, text=True, timeout=30, check=True,
    )
    orphan = int(done.stdout)
    try:
        wait_for(lambda: (run_dir / "fake.log").exists())
        holder = read(run_dir / "run.lock")
        assert holder is not None and holder.role is Role.SUPERVISOR and not holder.alive
        assert is_locked(run_dir / "run.lock")  # held by the orphan's inherited descriptor
        refused = overnight("train", str(config), "--run-dir", str(run_dir), timeout=60)
        assert refused.returncode == 78
        assert (f"in use by the worker of supervisor PID {holder.pid}, which has exited"
                in one_line(refused.stderr))

        sup = start_daemon(config, run_dir)
        _, err = sup.communicate(timeout=60)
        assert sup.returncode == 0, err.decode()[-2000:]
    finally:
        if psutil.pid_exists(orphan):
            os.kill(orphan, signal.SIGKILL)
    assert [e["worker_pid"] for e in events(run_dir, "orphan_holds_lock")] == [orphan]
    stopped = events(run_dir, "orphan_stopped")
    assert stopped[0]["worker_pid"] == orphan and stopped[0]["how"] == "terminated"
    rec = record(run_dir)
    assert rec["state"] == "finished" and rec["final_step"] == 200
    assert rec["attempts"][0]["resumed_from"] is not None  # it resumed the orphan's save
