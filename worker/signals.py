"""How a worker is asked to stop or to save: signals and the parent watch.

SIGTERM / SIGINT: finish the step, save a checkpoint, exit 23 (shared/exitcodes.py).
SIGUSR1: save a checkpoint at the end of the step and go on. The parent watch stops the
worker when its supervisor is gone (macOS has no parent-death signal; Linux gets SIGTERM
from the kernel as well, and every worker has an orphan guard: supervisor/daemon/spawn.py).
Handlers only set flags in `worker.train.Controls`; the training loop reads them between
steps.

The parent watch is also the worker's own backstop for the promise that no worker outlives
its supervisor by more than a few seconds (should its orphan guard have been killed too):
once it has asked the loop to stop, it gives the step and the checkpoint
OVERNIGHT_ORPHAN_GRACE seconds (the supervisor sets it: min(stop_timeout, 10 s)) and then
ends the process (exit 1; nobody is left to read it).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any

from shared.exitcodes import ExitCode

PARENT_PID_ENV = "OVERNIGHT_PARENT_PID"  # supervisor/daemon/spawn.py sets both
ORPHAN_GRACE_ENV = "OVERNIGHT_ORPHAN_GRACE"
ORPHAN_GRACE = 10.0  # seconds, when the variable is missing or not a number
PARENT_POLL_S = 1.0


class Stopper:
    """Signal handlers and the parent watch: flags read by the loop between steps."""

    def __init__(self, controls: Any):
        self.controls = controls

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._on_usr1)
        parent = os.environ.get(PARENT_PID_ENV, "")
        if parent.isdigit():
            threading.Thread(target=self._watch_parent, args=(int(parent), orphan_grace()),
                             daemon=True, name="parent-watch").start()

    def _on_term(self, signum: int, _frame: Any) -> None:
        self.controls.stop_requested = True
        self.controls.stop_reason = f"signal {signal.Signals(signum).name}"

    def _on_usr1(self, _signum: int, _frame: Any) -> None:
        self.controls.checkpoint_requested = True

    def _watch_parent(self, pid: int, grace: float) -> None:
        # Linux also gets a parent-death signal from the supervisor; macOS has none, so poll.
        while os.getppid() == pid:
            time.sleep(PARENT_POLL_S)
        self.controls.stop_requested = True
        self.controls.stop_reason = "supervisor went away"
        time.sleep(grace)  # the loop finishes its step, saves and exits: this thread dies
        print(f"overnight train: the supervisor (PID {pid}) is gone and this worker did not "
              f"stop within {grace:g} s of noticing: exiting without a checkpoint",
              file=sys.stderr, flush=True)
        os._exit(int(ExitCode.CRASH))


def orphan_grace() -> float:
    """OVERNIGHT_ORPHAN_GRACE in seconds (ORPHAN_GRACE when unset or not a number >= 0)."""
    try:
        grace = float(os.environ.get(ORPHAN_GRACE_ENV, ""))
    except ValueError:
        return ORPHAN_GRACE
    return grace if math.isfinite(grace) and grace >= 0 else ORPHAN_GRACE
