"""Which checkpoint the next attempt resumes from, validated off the supervisor's loop thread.

`choose()` validates the run's checkpoints newest first (shared.checkpoint.validate reads
every byte: hashes and tensor values, seconds for a large checkpoint) and returns a `Choice`.
It only reads; the loop applies the choice (supervisor/daemon/runner.py): it quarantines the
invalid checkpoints and, after a rollback, sets aside those after the resume point.
Before it, when a worker has ended, `clean_up_after()` puts in place or removes what that
worker left half-written, so the choice sees the directory as no one is writing it.

`ThreadJob` runs it in a thread, so the loop goes on answering control requests, reading
telemetry and sending the systemd watchdog while a large checkpoint hashes; it calls `wake`
when done, so the loop does not wait for its poll timeout. `InlineJob` runs it at once (the
loop's replay tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.checkpoint import (
    CheckpointInfo,
    Validation,
    clean_leftovers,
    list_checkpoints,
    newest_valid,
)


@dataclass(frozen=True)
class Choice:
    """The checkpoint to resume from (None: start from scratch) and what to move aside."""

    found: tuple[CheckpointInfo, Validation] | None
    invalid: tuple[tuple[CheckpointInfo, str], ...]  # quarantine: failed validation
    set_aside: tuple[tuple[CheckpointInfo, str], ...]  # quarantine: after a rollback's point
    seconds: float  # how long the validation took


def choose(checkpoints: Path, rollback_before: int | None) -> Choice:
    """The newest valid checkpoint (with a step below `rollback_before` after a rollback)."""
    started = time.monotonic()
    invalid: list[tuple[CheckpointInfo, str]] = []
    found = newest_valid(checkpoints, lambda info, reason: invalid.append((info, reason)),
                         before_step=rollback_before)
    set_aside = []
    if rollback_before is not None:
        keep = found[0].step if found is not None else -1
        bad = {info.path for info, _ in invalid}
        for info in list_checkpoints(checkpoints):
            if info.step > keep and info.path not in bad:
                set_aside.append((info, f"set aside by a rollback: after the resume point "
                                        f"(step {keep}) and at or after the first bad step "
                                        f"{rollback_before}"))
    return Choice(found, tuple(invalid), tuple(set_aside), time.monotonic() - started)


def clean_up_after(checkpoints: Path, log: Any) -> None:
    """A worker has exited and the next one has not started: what it left half-done in
    `checkpoints` is dealt with now, by the supervisor (shared.checkpoint.clean_leftovers:
    a temp checkpoint complete but for its rename is put in place, other temp and
    half-deleted directories are removed). Left to the next worker, that raced the choice
    (which starts while the early worker loads): the choice could pass over a complete newer
    checkpoint, or see it appear half-way. An OSError (a full disk) is logged; the next
    worker tries again."""
    try:
        cleaned = clean_leftovers(checkpoints)
    except OSError as e:
        log.warning("checkpoint_leftovers_failed", error=str(e))
        return
    if cleaned:
        log.info("checkpoint_leftovers_removed", names=cleaned)


class Job(Protocol):
    def done(self) -> bool: ...

    def result(self) -> Choice: ...


Background = Callable[[Callable[[], Choice], Callable[[], None]], Job]


class ThreadJob:
    """`work()` in a daemon thread; `wake()` when it has finished (or failed)."""

    def __init__(self, work: Callable[[], Choice], wake: Callable[[], None]) -> None:
        self._work, self._wake = work, wake
        self._result: Choice | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-validation",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as e:  # handed to the loop by result()
            self._error = e
        finally:
            self._wake()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Choice:
        """The choice; the work's exception if it raised one. Call once done()."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class InlineJob:
    """`work()` at once, on the caller's thread."""

    def __init__(self, work: Callable[[], Choice], wake: Callable[[], None]) -> None:
        self._result = work()

    def done(self) -> bool:
        return True

    def result(self) -> Choice:
        return self._result
