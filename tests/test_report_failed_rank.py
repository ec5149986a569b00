"""The report's "Last output" of a group's failed attempt names the failed rank's log: the
output shown (run.json's stderr_tail) is that rank's, not rank 0's logs/worker-N.log."""

from __future__ import annotations

from shared.run_record import AttemptRecord, RankRecord
from supervisor.morning.runfacts import _attempt


def _record(failed_rank: int | None) -> AttemptRecord:
    ranks = (RankRecord(rank=0, host="localhost", pid=10, log="worker-1.log", returncode=1,
                        lost_peer=True),
             RankRecord(rank=1, host="localhost", pid=11, log="worker-1-rank-1.log",
                        returncode=-9))
    return AttemptRecord(attempt=1, pid=10, argv=("w",), log="logs/worker-1.log",
                         started="2025-01-01T00:00:00+00:00", ended=None,
                         start_reason="initial", resumed_from=None, skip_steps=0,
                         lr_scale=None, settings={}, start_step=0, end_step=0, steps_gained=0,
                         ranks=ranks if failed_rank is not None else (),
                         failed_rank=failed_rank)


def test_the_failed_ranks_log_is_named():
    assert _attempt(_record(1)).log == "logs/worker-1-rank-1.log"
    assert _attempt(_record(0)).log == "logs/worker-1.log"
    assert _attempt(_record(None)).log == "logs/worker-1.log"
