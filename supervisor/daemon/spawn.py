"""Starting and stopping worker processes; orphans; caffeinate; the OpenBLAS preload.

The worker runs in its own session (so a terminal's Ctrl-C reaches only the supervisor, and
the supervisor can signal the worker's whole group). How a worker is stopped (SIGTERM,
SIGCONT, a grace period, SIGKILL) is supervisor/daemon/stopping.py.

**No worker outlives its supervisor by more than a few seconds, in any state.** However the
supervisor dies (SIGKILL, the OOM killer, a crash), its worker must not train on alone:
nobody would watch it, and the next supervisor would find the run directory locked.

- A running worker leaves within one step plus a checkpoint write (SIGTERM: it saves and
  exits 23); measured here 0.1-0.4 s (tests/test_orphans.py; it allows 5 s).
- A worker that cannot act on SIGTERM (stopped, stuck in a step) is SIGKILLed
  `orphan_grace` seconds after the supervisor died: min(supervisor.stop_timeout, 10 s)
  (`ORPHAN_GRACE`). 10 s is enough for a LoRA step and an adapter save; a longer save (a
  full fine-tune) is cut, which costs that checkpoint only: checkpoints are atomic and the
  previous one stays valid.

The parent-death signal alone (Linux prctl PR_SET_PDEATHSIG, set between fork and exec)
does not keep that promise: the kernel delivers SIGTERM, but a worker stopped with SIGSTOP
(a hang, a debugger, `kill -STOP`) keeps it pending and lives on stopped forever; and a
SIGKILL as the parent-death signal would cost every orphan its checkpoint (and a killed MLX
process can strand wired GPU memory). macOS has no parent-death signal at all; the worker polls
OVERNIGHT_PARENT_PID there (worker/signals.py), which a stopped or stuck worker cannot do.
So each attempt gets an **orphan guard** (supervisor/daemon/orphan_guard.py): a tiny
stdlib-only process started right after the worker, its sibling in a session of its own,
that blocks reading a pipe whose only write end the supervisor holds. The kernel closes
that end the instant the supervisor dies, any way it dies, on Linux and macOS alike — no
polling, no platform call. The guard then sends SIGCONT to the worker's group and SIGTERM
to the worker, and SIGKILL to the group after `orphan_grace`. When the supervisor reaps
the worker itself, it writes one byte first and the guard leaves without signalling
anything (the pid may be reused after that; the guard signals through a pidfd on Linux
anyway). A worker is not started without its guard: if the guard cannot be started, the
worker is killed and spawn() raises OSError.

Defence in depth, for a guard that was itself killed: the parent-death SIGTERM stays (a
running worker hears of its supervisor's death at once, on Linux), and the worker's parent
watch (worker/signals.py), having asked the loop to stop, exits the process after
OVERNIGHT_ORPHAN_GRACE seconds (its `orphan_grace`, passed in the environment) if the save
has not finished by then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import psutil

from shared import blas

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "OVERNIGHT_PARENT_PID"
ORPHAN_GRACE_ENV = "OVERNIGHT_ORPHAN_GRACE"
ORPHAN_GRACE = 10.0  # seconds: the longest a worker outlives its supervisor (docstring)
ORPHAN_GUARD = Path(__file__).with_name("orphan_guard.py")
GUARD_EXIT_WAIT = 2.0  # seconds to reap a guard told to leave (it leaves in milliseconds)


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def signal(self, sig: int) -> None: ...

    def signal_group(self, sig: int) -> None: ...


class Spawner(Protocol):
    def spawn(self, argv: Sequence[str], env: dict[str, str], output: Path) -> WorkerProcess: ...


@dataclass
class OrphanGuard:
    """The running orphan guard of one worker (module docstring) and the write end of its
    pipe, which only this process holds."""

    popen: subprocess.Popen[bytes]
    pipe: int  # the write end; -1 once released

    def release(self) -> None:
        """The worker has been reaped: tell the guard (one byte), so it leaves without
        signalling anything, and reap it."""
        if self.pipe < 0:
            return
        with contextlib.suppress(OSError):  # a guard killed by someone: EPIPE
            os.write(self.pipe, b"x")
        os.close(self.pipe)
        self.pipe = -1
        try:
            self.popen.wait(GUARD_EXIT_WAIT)
        except subprocess.TimeoutExpired:  # stopped or stuck: it must not act later
            self.popen.kill()
            self.popen.wait()


def start_guard(worker_pid: int, grace: float, output: IO[bytes]) -> OrphanGuard:
    """Start the orphan guard of `worker_pid` (module docstring); OSError if it cannot be.
    Its messages go to `output` (the attempt's log)."""
    read_end, write_end = os.pipe()  # neither inheritable (PEP 446): the guard's stdin only
    try:
        popen = subprocess.Popen(
            [sys.executable, "-I", "-S", str(ORPHAN_GUARD), str(worker_pid), f"{grace:g}"],
            stdin=read_end, stdout=output, stderr=subprocess.STDOUT, env={},
            start_new_session=True, close_fds=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return OrphanGuard(popen, write_end)


@dataclass
class PopenWorker:
    popen: subprocess.Popen[bytes]
    output_file: IO[bytes]
    guard: OrphanGuard | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        rc = self.popen.poll()
        if rc is not None:
            if self.guard is not None:
                self.guard.release()  # reaped: from now on its pid may be reused
            if not self.output_file.closed:
                self.output_file.close()
        return rc

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        # The worker leads its own group (start_new_session); while it has not been reaped
        # its pid cannot be reused, so the group id is still ours.
        if self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def _set_parent_death_signal() -> None:
    """In the child, before exec: SIGTERM me when my parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class PopenSpawner:
    """Starts real processes: own session, output appended to a file, parent-death signal,
    an orphan guard each (module docstring). `pass_fds` stay open in the child (the run
    directory's lock, shared/runlock.py); `stop_timeout` (supervisor.stop_timeout) bounds
    the orphan grace, at most ORPHAN_GRACE."""

    def __init__(self, pass_fds: Sequence[int] = (), stop_timeout: float = ORPHAN_GRACE,
                 ) -> None:
        self.pass_fds = tuple(pass_fds)
        self.orphan_grace = max(0.0, min(stop_timeout, ORPHAN_GRACE))

    def spawn(self, argv: Sequence[str], env: dict[str, str], output: Path,
              extra_fds: Sequence[int] = ()) -> WorkerProcess:
        """Start `argv`; `extra_fds` stay open in it too (the resume handoff's read end:
        supervisor/daemon/early_start.py)."""
        output.parent.mkdir(parents=True, exist_ok=True)
        out = open(output, "ab")  # noqa: SIM115 - closed by PopenWorker.poll
        preexec: Callable[[], None] | None = (
            _set_parent_death_signal if sys.platform.startswith("linux") else None
        )
        env = {**env, ORPHAN_GRACE_ENV: f"{self.orphan_grace:g}"}  # worker/signals.py
        try:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=preexec, close_fds=True,
                pass_fds=(*self.pass_fds, *extra_fds),
            )
        except BaseException:
            out.close()
            raise
        try:
            guard = start_guard(popen.pid, self.orphan_grace, out)
        except BaseException:  # no worker without its guard
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            out.close()
            raise
        return PopenWorker(popen, out, guard)


def worker_env(base: dict[str, str], openblas: str, log: Any) -> dict[str, str]:
    """The worker's environment: ours, plus the parent pid, plus (maybe) the OpenBLAS preload
    (shared/blas.py: the same choice `overnight train` makes for itself)."""
    env, done = blas.preload_env(base, openblas)
    env[PARENT_PID_ENV] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if done == "preloaded":
        log.info("openblas_preload", library=str(blas.OPENBLAS), setting=openblas)
    elif done == "disabled":
        log.info("openblas_preload_skipped", reason="supervisor.openblas is false")
    elif done == "missing" and openblas == "true":
        log.warning("openblas_missing", library=str(blas.OPENBLAS),
                    hint="apt-get install libopenblas0-pthread")
    elif done == "missing":
        log.info("openblas_preload_skipped", reason="library not found",
                 library=str(blas.OPENBLAS))
    return env


def start_caffeinate(enabled: bool, log: Any) -> subprocess.Popen[bytes] | None:
    """macOS: keep the machine from idle sleep while this supervisor lives (`-i`, never `-d`:
    the display must be allowed to sleep, see the GPU watchdog)."""
    if not enabled:
        log.info("caffeinate_skipped", reason="supervisor.caffeinate is false")
        return None
    exe = shutil.which("caffeinate") if sys.platform == "darwin" else None
    if exe is None:
        log.info("caffeinate_skipped", reason="not macOS", platform=sys.platform)
        return None
    proc = subprocess.Popen([exe, "-i", "-w", str(os.getpid())], stdin=subprocess.DEVNULL)
    log.info("caffeinate_started", pid=proc.pid, flags="-i")
    return proc


# ---- orphans -------------------------------------------------------------------------------


def _cmdline_run_dir(cmdline: list[str]) -> str | None:
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "--run-dir":
            return cmdline[i + 1]
    return None


def find_orphans(run_dir: Path) -> list[psutil.Process]:
    """Worker processes of this run left behind by a previous supervisor: a `train` command
    line naming this run directory (resolved), not us and not our ancestors."""
    target = run_dir.resolve()
    skip = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        skip.update(p.pid for p in psutil.Process().parents())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid in skip or "train" not in cmdline:
                continue
            arg = _cmdline_run_dir(cmdline)
            if arg is None:
                continue
            path = Path(arg)
            if not path.is_absolute():
                path = Path(proc.info["cwd"] or "/") / path
            if path.resolve() == target:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found
