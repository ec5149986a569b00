"""Disk space where the run writes: an early warning, and waiting for space after a full disk.

A full file system ends every attempt at its next write (shared/fsutil.py says what a full
disk looks like); restarting into it only burns the night's budgets. So the supervisor

- **warns early**: after every checkpoint and every couple of seconds while the worker
  trains, it compares the free space (`shutil.disk_usage`, what an unprivileged writer may
  use) with what the next checkpoints need at the current size: checkpoint size ×
  `checkpoints.keep_last` + a margin for the logs and the final adapters (`margin()`:
  16 MiB, or a tenth of a smaller file system). Below it, one `disk_space_low` warning;
  the next one only after the free space was above it again (once per crossing);
- **waits for space** after an attempt that ended `disk_full` (shared/exitcodes.py): no
  restart until the free space holds one more checkpoint and the margin, polled every
  `POLL_SECONDS`, not counted against any budget (supervisor/daemon/policy.py). A second
  disk_full in a row without progress doubles what it waits for (the estimate was short:
  another writer fills the disk too, or there was no checkpoint to measure yet).

Retention never makes room by deleting checkpoints (shared/checkpoint.py keeps the newest
valid one whatever else happens): what to delete is the user's call, and the warning names
the file system early enough to make it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint import list_checkpoints
from shared.fsutil import free_space

POLL_SECONDS = 5.0  # how often the free space is checked while waiting for it
WAITING_LOG_EVERY = 300.0  # seconds between "still waiting" log lines
MARGIN_MAX = 16 * 2**20  # bytes kept free for the logs and the final adapters
MIN_CHECKPOINT = 2**20  # what a checkpoint is taken to need before one was measured


def margin(total: int) -> int:
    """Bytes kept free beside the checkpoints: 16 MiB, or a tenth of a smaller file system."""
    return min(MARGIN_MAX, total // 10)


def checkpoint_bytes(checkpoints_dir: Path) -> int:
    """The size of the newest complete checkpoint (its files), 0 when there is none."""
    for info in list_checkpoints(checkpoints_dir):
        if not info.has_manifest:
            continue
        try:
            return sum(f.stat().st_size for f in info.path.iterdir() if f.is_file())
        except OSError:
            continue  # deleted by retention meanwhile: the next one
    return 0


def low_threshold(checkpoint: int, keep_last: int, total: int) -> int:
    """Free bytes below which the next checkpoints may not fit (module docstring)."""
    return checkpoint * keep_last + margin(total)


@dataclass(frozen=True)
class LowSpace:
    """Free space fell below what the next checkpoints need (a `disk_space_low` warning)."""

    path: Path
    free: int
    total: int
    needed: int
    checkpoint: int
    keep_last: int


class SpaceWatch:
    """The run directory's file system, watched for the two purposes above."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last
        self.checkpoint = 0  # bytes of the newest checkpoint (CheckpointSaved, or on disk)
        self.low = False  # below the warning threshold at the last check
        self.waiting_for = 0  # bytes free a restart waits for (0: not waiting)
        self.full_at_step = -1  # the step of the last disk_full ending
        self.last_need = 0  # what the last wait waited for
        self.next_waiting_log = 0.0  # monotonic time of the next "still waiting" line

    def checkpoint_size(self) -> int:
        """Bytes of the newest checkpoint: as the worker reported it, else as on disk."""
        return self.checkpoint or checkpoint_bytes(self.root / "checkpoints")

    def check(self) -> LowSpace | None:
        """A LowSpace when the free space has just crossed below the threshold (once per
        crossing), else None."""
        free, total = free_space(self.root)
        if total <= 0:
            return None
        checkpoint = self.checkpoint_size()
        needed = low_threshold(checkpoint, self.keep_last, total)
        was_low, self.low = self.low, free < needed
        if self.low and not was_low:
            return LowSpace(self.root, free, total, needed, checkpoint, self.keep_last)
        return None

    def start_waiting(self, end_step: int) -> int:
        """An attempt ended disk_full at `end_step`: the free bytes to wait for."""
        _, total = free_space(self.root)
        need = (self.checkpoint_size() or MIN_CHECKPOINT) + margin(total)
        if 0 <= end_step <= self.full_at_step:  # full again without progress: ask for more
            need = max(need, 2 * self.last_need)
        self.full_at_step = max(self.full_at_step, end_step)
        self.waiting_for = self.last_need = need
        return need

    def ready(self) -> tuple[bool, int]:
        """(whether a restart may go ahead, the free bytes now)."""
        free, _ = free_space(self.root)
        if self.waiting_for and free < self.waiting_for:
            return False, free
        self.waiting_for = 0
        return True, free
