"""The resume handoff: where a worker resumes from, told after it has started.

Validating the newest checkpoint (sha256 of every file, every float finite:
shared/checkpoint.py) takes 20-50 ms for an adapter checkpoint and seconds for a multi-GB
full fine-tune; starting a worker (imports, the base model) takes seconds. The supervisor
does both at once: it starts the worker first and validates meanwhile (in its thread,
supervisor/daemon/checkpoint_choice.py); the worker imports and loads the base model, then
reads the choice — before anything needs it (worker/early_load.py).

    supervisor: r, w = os.pipe(); spawn `... train CONFIG ... --resume-fd R` (pass_fds=(r,))
    worker:     imports, loads the model, then reads one line from fd R
    supervisor: validates, quarantines what is invalid, writes the line, closes w

The line is strict JSON (shared/strictjson.py), at most 64 KiB, ending in a newline:

    {"v": 1, "resume": "/run/checkpoints/step-0000250", "validated": "<manifest sha256>",
     "skip_steps": 0, "skip_positions": [12, 40]}
    {"v": 1, "resume": "auto", "validated": null, "skip_steps": 0, "skip_positions": []}

the same facts the command line carries when the supervisor validates first
(`--resume PATH --validated SHA256 | --resume auto`, `--skip-steps`, `--skip-position`:
supervisor/daemon/worker_command.py). "auto" means no checkpoint is valid (every one was
quarantined): start from scratch.

**No hung worker.** Only the supervisor holds the write end (os.pipe() descriptors are not
inherited, PEP 446; the worker gets the read end alone). The kernel closes it the moment the
supervisor dies, however it dies, and a supervisor that decides not to start the attempt (a
stop while it validated) closes it too: the worker reads end-of-file without a line and
exits (GRACEFUL_STOP, nothing written). A worker asked to stop (SIGTERM) while it waits
leaves the same way; one that waits longer than `limit` seconds (the supervisor's
`startup_timeout`) gives up with an error. The supervisor's orphan guard
(supervisor/daemon/spawn.py) stops it anyway once the supervisor is gone.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared import strictjson
from shared.errors import OvernightError

VERSION = 1
MAX_BYTES = 64 * 1024
FLAG = "--resume-fd"  # the worker's flag: the read end's descriptor number


class HandoffError(OvernightError):
    """The line is not a valid handoff, or none came in time (the message says which)."""


@dataclass(frozen=True)
class Handoff:
    """Where the worker resumes from: a checkpoint directory (validated by the supervisor,
    `validated` = its manifest's sha256) or "auto" with nothing valid; then the data
    positions to skip (`skip_steps` after the resume point, `skip_positions` once each)."""

    resume: str
    validated: str | None
    skip_steps: int = 0
    skip_positions: tuple[int, ...] = ()

    def encode(self) -> bytes:
        """The line written to the pipe (module docstring)."""
        doc = {"v": VERSION, "resume": self.resume, "validated": self.validated,
               "skip_steps": self.skip_steps, "skip_positions": list(self.skip_positions)}
        return (strictjson.dumps(doc) + "\n").encode()

    @staticmethod
    def decode(line: bytes) -> Handoff:
        """The handoff in `line`; HandoffError naming what is wrong."""
        try:
            doc = strictjson.loads(line.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise HandoffError(f"resume handoff: not strict JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise HandoffError(f"resume handoff: expected an object with \"v\": {VERSION}")
        resume, validated = doc.get("resume"), doc.get("validated")
        steps, positions = doc.get("skip_steps"), doc.get("skip_positions")
        if set(doc) != {"v", "resume", "validated", "skip_steps", "skip_positions"}:
            raise HandoffError(f"resume handoff: unexpected keys {sorted(doc)}")
        if not isinstance(resume, str) or not resume:
            raise HandoffError(f"resume handoff: resume: expected a path or 'auto', got {resume!r}")
        if validated is not None and not isinstance(validated, str):
            raise HandoffError(f"resume handoff: validated: expected a sha256, got {validated!r}")
        if not _count(steps):
            raise HandoffError(f"resume handoff: skip_steps: expected an integer >= 0, got "
                               f"{steps!r}")
        if not isinstance(positions, list) or not all(_count(p) for p in positions):
            raise HandoffError("resume handoff: skip_positions: expected integers >= 0")
        assert isinstance(steps, int)
        return Handoff(resume, validated, steps, tuple(positions))


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def send(fd: int, handoff: Handoff | None) -> bool:
    """Write `handoff` (None: nothing, the worker is not to start) and close `fd`. False when
    the worker has already gone (EPIPE): its exit is what the supervisor will see."""
    try:
        if handoff is not None:
            data = handoff.encode()
            while data:
                data = data[os.write(fd, data):]
        return True
    except OSError:  # BrokenPipeError: the worker exited before it read the line
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def receive(fd: int, stop_requested: Callable[[], bool], limit: float,
            poll: float = 0.25, clock: Callable[[], float] = time.monotonic) -> Handoff | None:
    """Wait for the handoff on `fd` (closed afterwards). None when the supervisor closed the
    pipe without one or `stop_requested()` became true (checked every `poll` seconds);
    HandoffError for a bad line or none within `limit` seconds."""
    deadline = clock() + limit
    buf = b""
    try:
        while True:
            if stop_requested():
                return None
            left = deadline - clock()
            if left <= 0:
                raise HandoffError(f"resume handoff: no checkpoint choice from the supervisor "
                                   f"within {limit:g} s (supervisor.startup_timeout)")
            ready, _, _ = select.select([fd], [], [], min(poll, left))
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # end of file: the supervisor is gone or decided against this start
                return None
            buf += chunk
            if b"\n" in buf:
                return Handoff.decode(buf.split(b"\n", 1)[0])
            if len(buf) > MAX_BYTES:
                raise HandoffError(f"resume handoff: a line over {MAX_BYTES} bytes")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
