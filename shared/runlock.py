"""One writer per run directory: an exclusive, non-blocking flock on RUN_DIR/run.lock.

Every process that writes a run directory holds this lock: the supervisor (`overnight run`),
and the worker (`overnight train`) when it runs alone. A second one is refused with one line
naming the holder (RunDirLocked, exit 78):

    runs/x: run directory is in use by supervisor PID 4242 (`overnight stop runs/x` ...)
    runs/x: run directory is in use by worker PID 4343 (an `overnight train`; ...)

Read-only commands (`status`, `logs`, `report`, `checkpoints`) never take it.

**The supervisor's worker.** The supervisor holds the lock while its worker writes the same
directory, so it hands the lock down: the worker is spawned with the lock's descriptor
(`pass_fds`) and its number in OVERNIGHT_RUN_LOCK_FD. A flock belongs to an open file
description, so that inherited descriptor *is* the supervisor's lock (flock(2): "duplicate
file descriptors (created by fork(2) or dup(2)) refer to the same lock"). The worker accepts
it only if the descriptor is open on this run's lock file (same device and inode) and
`flock(LOCK_EX | LOCK_NB)` on it succeeds, which it can only do on the description that
already holds the lock: an `overnight train` started by hand, even with the variable copied
into its environment, has no such descriptor and is refused like any second writer.

**Release.** The kernel drops a flock when the last descriptor of its description closes,
however the processes end: no stale lock ever blocks a restart. A supervisor that dies
leaves the lock with its worker until the worker exits (it gets SIGTERM, saves and leaves);
the next supervisor sees the holder PID dead and stops that worker first (supervisor/daemon.py).

The file holds one line, "PID ROLE" (written by the process that took the lock), for the
refusal message and `overnight status`; liveness always comes from the flock itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import psutil

from shared.errors import RunDirError, RunDirLocked

LOCK_FD_ENV = "OVERNIGHT_RUN_LOCK_FD"
# A PID's process started this long after the lock file was written is not the writer
# (the PID was reused). Seconds; covers coarse file-system timestamps.
_CLOCK_SLACK = 2.0


class Role(str, Enum):
    SUPERVISOR = "supervisor"
    WORKER = "worker"


@dataclass(frozen=True)
class Holder:
    """Who wrote the lock file: its PID, its role, and whether that process still lives."""

    pid: int
    role: Role
    alive: bool


class RunLock:
    """The run directory's write lock, taken by `acquire()` or inherited from the supervisor."""

    def __init__(self, path: Path, role: Role) -> None:
        self.path = path
        self.role = role
        self._fd: int | None = None
        self.inherited = False

    @property
    def fd(self) -> int:
        """The locked descriptor (to pass to the worker); ValueError when not held."""
        if self._fd is None:
            raise ValueError(f"{self.path}: the lock is not held")
        return self._fd

    def acquire(self) -> None:
        """Take the lock; RunDirLocked naming the holder, RunDirError if the file cannot be
        opened (read-only file system, permissions)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise RunDirError(
                f"{self.path.parent}: cannot write the run directory "
                f"({e.strerror or e}: {self.path})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read(self.path)
            raise RunDirLocked(refusal(self.path, holder), holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.role.value}\n".encode())
        os.fsync(fd)
        self._fd = fd

    @classmethod
    def inherited_from_parent(
        cls, path: Path, environ: MutableMapping[str, str] | None = None
    ) -> RunLock | None:
        """The supervisor's lock handed down to this worker, or None when there is none (the
        variable is removed either way, so this process's own children never see it)."""
        env = os.environ if environ is None else environ
        value = env.pop(LOCK_FD_ENV, "")
        if not value.isdigit():
            return None
        fd = int(value)
        try:
            mine, theirs = os.fstat(fd), os.stat(path)
        except OSError:
            return None
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            return None
        try:
            # Succeeds only on the description that holds the lock (a no-op conversion).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        os.set_inheritable(fd, False)
        lock = cls(path, Role.WORKER)
        lock._fd, lock.inherited = fd, True
        return lock

    def child_environment(self) -> dict[str, str]:
        """What a child needs (with `pass_fds=(lock.fd,)`) to write under this lock."""
        return {LOCK_FD_ENV: str(self.fd)}

    def release(self) -> None:
        """Close our descriptor. Never LOCK_UN: on an inherited descriptor that would release
        the supervisor's lock too; the kernel releases it when the last descriptor closes."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def worker_lock(path: Path) -> RunLock:
    """The lock for `overnight train`: the supervisor's (inherited) or our own."""
    lock = RunLock.inherited_from_parent(path)
    if lock is None:
        lock = RunLock(path, Role.WORKER)
        lock.acquire()
    return lock


def read(path: Path) -> Holder | None:
    """The holder recorded in the lock file (check `is_locked` for whether the lock is held)."""
    try:
        text = path.read_text().strip()
        written = path.stat().st_mtime
    except OSError:
        return None
    pid_text, _, role_text = text.partition(" ")
    if not pid_text.isdigit():
        return None
    try:
        role = Role(role_text or Role.SUPERVISOR.value)  # a bare PID: an older supervisor
    except ValueError:
        return None
    pid = int(pid_text)
    return Holder(pid, role, _alive(pid, written))


def _alive(pid: int, written: float) -> bool:
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return False
    return started <= written + _CLOCK_SLACK


def read_holder(path: Path) -> int | None:
    """The PID written by the last holder (it may be gone: check with is_locked)."""
    holder = read(path)
    return holder.pid if holder is not None else None


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock (probe with a shared lock, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def refusal(path: Path, holder: Holder | None) -> str:
    """The one line for a refused writer."""
    root = path.parent
    if holder is None:
        return f"{root}: run directory is in use by another process (it holds {path})"
    if holder.role is Role.SUPERVISOR and holder.alive:
        return (f"{root}: run directory is in use by supervisor PID {holder.pid} "
                f"(`overnight stop {root}` stops it; or use another --run-dir)")
    if holder.role is Role.SUPERVISOR:
        return (f"{root}: run directory is in use by the worker of supervisor PID "
                f"{holder.pid}, which has exited (the worker stops after saving a "
                "checkpoint; `overnight run` stops it at once)")
    if holder.alive:
        return (f"{root}: run directory is in use by worker PID {holder.pid} (an `overnight "
                f"train`: stop it with Ctrl-C or `kill {holder.pid}`; or use another --run-dir)")
    return f"{root}: run directory is in use by a process left by worker PID {holder.pid}"
