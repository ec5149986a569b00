"""The orphan guard: a tiny process per worker attempt that ends the worker when its
supervisor is gone, whatever state the worker is in (why: supervisor/daemon/spawn.py).

    python -I -S orphan_guard.py WORKER_PID GRACE_SECONDS   < the supervisor's pipe

The supervisor starts it right after the worker, as the worker's sibling, in a session of
its own (a terminal's signals do not reach it), with its output appended to the attempt's
log. Its stdin is the read end of a pipe whose only write end the supervisor holds:

- one byte arrives: the supervisor has reaped the worker. The guard exits 0 and signals
  nothing (the pid may be reused from now on).
- end of file: the supervisor is gone. However it died — SIGKILL included — the kernel
  closed its end of the pipe, at once. The guard sends SIGCONT to the worker's process group
  (a stopped worker cannot act on SIGTERM; the kernel's parent-death SIGTERM stays pending
  in it) and SIGTERM to the worker, which finishes its step, saves a checkpoint and exits 23
  (worker/signals.py). If the worker is still there after GRACE_SECONDS, SIGKILL to its
  group.
- the worker ends first (Linux: its pidfd becomes readable): the guard exits 0.

Signals go through a pidfd where the platform has one (Linux >= 5.3): a pid reused by
another process is never signalled. Stdlib only, and run isolated without site-packages
(`-I -S`): it starts in tens of milliseconds and holds a few MB while it waits.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

POLL_S = 0.05


class Worker:
    """The worker process as the guard knows it: its pid, a pidfd when there is one, and
    whether it leads its own process group (the supervisor starts it in its own session)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            self.pidfd = None
        try:
            self.leads_group = os.getpgid(pid) == pid
        except OSError:
            self.leads_group = False

    def alive(self) -> bool:
        if self.pidfd is not None:
            return not select.select([self.pidfd], [], [], 0)[0]
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)  # type: ignore[attr-defined,unused-ignore]
            else:
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Its whole group while it lives (a group it leads cannot be another's), else it."""
        if not self.leads_group or not self.alive():
            self.signal(sig)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def say(text: str) -> None:
    print(f"orphan guard {os.getpid()}: {text}", file=sys.stderr, flush=True)


def wait_for_supervisor(worker: Worker) -> bool:
    """Block until the supervisor says the worker is done (False), the worker ends (False),
    or the supervisor is gone (True)."""
    watched = [0] + ([worker.pidfd] if worker.pidfd is not None else [])
    while True:
        try:
            ready = select.select(watched, [], [])[0]
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            continue
        if 0 in ready:
            try:
                return os.read(0, 1) == b""
            except OSError:
                return True  # a broken pipe is a gone supervisor too
        if worker.pidfd is not None and worker.pidfd in ready:
            return False


def guard(pid: int, grace: float) -> int:
    worker = Worker(pid)
    if not wait_for_supervisor(worker) or not worker.alive():
        return 0
    say(f"the supervisor is gone: SIGCONT + SIGTERM to worker {pid}, SIGKILL after "
        f"{grace:g} s")
    worker.signal_group(signal.SIGCONT)
    worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while worker.alive() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if worker.alive():
        say(f"worker {pid} still there after {grace:g} s: SIGKILL to its group")
        worker.signal_group(signal.SIGKILL)
    return 0


def main(argv: list[str]) -> int:
    try:
        pid, grace = int(argv[1]), float(argv[2])
        if pid <= 1 or pid == os.getpid() or not grace >= 0:
            raise ValueError
    except (IndexError, ValueError):
        say(f"usage: orphan_guard.py WORKER_PID GRACE_SECONDS (a worker's pid, seconds "
            f">= 0), got {argv[1:]}")
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe tells it the supervisor died
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return guard(pid, grace)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
