"""`overnight demo --queue`: a two-job queue added with --sweep, listed, run (each job with an
injected crash its supervisor survives) and compared — the real commands as processes.
(The default, 60 steps a job, took 19-43 s on this shared 2-core machine; here 20 steps.)"""

from __future__ import annotations

import pytest

from shared import queue_file
from shared.queue_file import JobState
from tests.conftest import overnight


@pytest.mark.slow
def test_the_queue_demo_runs_two_jobs_and_compares_them(tmp_path):
    done = overnight("demo", "--queue", "--keep", str(tmp_path), "--iters", "20", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "queued demo-learning_rate1e-3 (learning_rate=1e-3)" in out
    assert "queued demo-learning_rate3e-3 (learning_rate=3e-3)" in out
    assert "$ overnight run --queue queue" in out and "night ended (done): 2 finished" in out
    assert "1 restart (injected crash at" in out
    assert "**Best job: demo-learning_rate" in out and "--adapter-path" in out
    jobs = queue_file.load(tmp_path / "queue").jobs
    assert [j.state for j in jobs] == [JobState.FINISHED, JobState.FINISHED]
    assert (tmp_path / "queue" / "report.png").exists()
