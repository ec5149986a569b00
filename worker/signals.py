"""How a worker is asked to stop or to save: signals and the parent watch.

SIGTERM / SIGINT: finish the step, save a checkpoint, exit 23 (shared/exitcodes.py).
SIGUSR1: save a checkpoint at the end of the step and go on. The parent watch stops the
worker when its supervisor is gone (macOS has no parent-death signal; Linux gets SIGTERM
from the kernel as well, see supervisor/daemon/spawn.py). Handlers only set flags in
`worker.train.Controls`; the training loop reads them between steps.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any


class Stopper:
    """Signal handlers and the parent watch: flags read by the loop between steps."""

    def __init__(self, controls: Any):
        self.controls = controls

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._on_usr1)
        parent = os.environ.get("OVERNIGHT_PARENT_PID", "")
        if parent.isdigit():
            threading.Thread(target=self._watch_parent, args=(int(parent),), daemon=True,
                             name="parent-watch").start()

    def _on_term(self, signum: int, _frame: Any) -> None:
        self.controls.stop_requested = True
        self.controls.stop_reason = f"signal {signal.Signals(signum).name}"

    def _on_usr1(self, _signum: int, _frame: Any) -> None:
        self.controls.checkpoint_requested = True

    def _watch_parent(self, pid: int) -> None:
        # Linux also gets a parent-death signal from the supervisor; macOS has none, so poll.
        while True:
            time.sleep(1.0)
            if os.getppid() != pid:
                self.controls.stop_requested = True
                self.controls.stop_reason = "supervisor went away"
                return
