"""Starting and stopping worker processes; orphans; caffeinate; the OpenBLAS preload.

The worker runs in its own session (so a terminal's Ctrl-C reaches only the supervisor, and
the supervisor can signal the worker's whole group) and never outlives the supervisor:
on Linux the kernel sends it SIGTERM when the supervisor dies (prctl PR_SET_PDEATHSIG, set
in the child between fork and exec); on macOS the worker polls OVERNIGHT_PARENT_PID.
How a worker is stopped (SIGTERM, SIGCONT, a grace period, SIGKILL) is
supervisor/daemon/stopping.py.
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

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "OVERNIGHT_PARENT_PID"


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def signal(self, sig: int) -> None: ...

    def signal_group(self, sig: int) -> None: ...


class Spawner(Protocol):
    def spawn(self, argv: Sequence[str], env: dict[str, str], output: Path) -> WorkerProcess: ...


@dataclass
class PopenWorker:
    popen: subprocess.Popen[bytes]
    output_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        rc = self.popen.poll()
        if rc is not None and not self.output_file.closed:
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
    """Starts real processes: own session, output appended to a file, parent-death signal.
    `pass_fds` stay open in the child (the run directory's lock, shared/runlock.py)."""

    def __init__(self, pass_fds: Sequence[int] = ()) -> None:
        self.pass_fds = tuple(pass_fds)

    def spawn(self, argv: Sequence[str], env: dict[str, str], output: Path) -> WorkerProcess:
        output.parent.mkdir(parents=True, exist_ok=True)
        out = open(output, "ab")  # noqa: SIM115 - closed by PopenWorker.poll
        preexec: Callable[[], None] | None = (
            _set_parent_death_signal if sys.platform.startswith("linux") else None
        )
        try:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=preexec, close_fds=True,
                pass_fds=self.pass_fds,
            )
        except BaseException:
            out.close()
            raise
        return PopenWorker(popen, out)


def worker_env(base: dict[str, str], openblas: str, log: Any) -> dict[str, str]:
    """The worker's environment: ours, plus the parent pid, plus (maybe) the OpenBLAS preload."""
    env = dict(base)
    env[PARENT_PID_ENV] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not sys.platform.startswith("linux"):
        return env
    if openblas == "false":
        log.info("openblas_preload_skipped", reason="supervisor.openblas is false")
    elif OPENBLAS.exists():
        preload = env.get("LD_PRELOAD", "")
        if str(OPENBLAS) not in preload.split(":"):
            env["LD_PRELOAD"] = f"{OPENBLAS}:{preload}" if preload else str(OPENBLAS)
        log.info("openblas_preload", library=str(OPENBLAS), setting=openblas)
    elif openblas == "true":
        log.warning("openblas_missing", library=str(OPENBLAS),
                    hint="apt-get install libopenblas0-pthread")
    else:
        log.info("openblas_preload_skipped", reason="library not found", library=str(OPENBLAS))
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
