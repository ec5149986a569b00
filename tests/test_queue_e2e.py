"""A night of three tiny real jobs (mlx_lm's tiny random model): the runner SIGKILLed in the
middle of job 2 and started again continues job 2 from its checkpoint — with adapters equal
to an uninterrupted run of the same job — never re-runs job 1, runs job 3; the morning
comparison names the best job and the commands to use its adapters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from shared import queue_file, run_record
from shared.queue_file import JobState
from tests.conftest import overnight, subprocess_env, write_config
from tests.supervisor_support import ROOT, wait_for

FAST = {"heartbeat_timeout": 20.0, "startup_timeout": 90.0, "stop_timeout": 20.0,
        "backoff_initial": 0.1, "backoff_max": 0.5, "caffeinate": False}


def _adapters(run: Path) -> dict[str, mx.array]:
    return mx.load(str(run / "adapters" / "adapters.safetensors"))  # type: ignore[return-value]


def _steps(run: Path) -> int:
    metrics = run / "logs" / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return max((json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()
                if x.strip().endswith("}")), default=0)


def test_a_killed_runner_resumes_job_2_exactly_then_runs_job_3_and_names_the_best(
        tmp_path, tiny_model, corpus):
    config = write_config(tmp_path / "base.yaml", tiny_model, corpus, iters=40,
                          save_every=10, steps_per_eval=10, supervisor=FAST)
    q = tmp_path / "q"
    for name, lr, iters in (("slow-lr", "1e-6", 10), ("good-lr", "1e-3", 40),
                            ("tiny-lr", "1e-6", 10)):
        done = overnight("queue", "add", str(config), "--name", name, "--queue", str(q),
                         "--set", f"learning_rate={lr}", "--set", f"iters={iters}")
        assert done.returncode == 0, done.stderr
    env = subprocess_env()
    argv = [sys.executable, "-m", "shared.cli", "run", "--queue", str(q)]
    runner = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    job2 = q / "runs" / "good-lr"
    try:
        wait_for(lambda: _steps(job2) >= 15, 180, 0.02)
        runner.send_signal(signal.SIGKILL)  # the runner dies, as in a crash
        runner.wait(10)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert queue_file.load(q).find("good-lr").state is JobState.RUNNING

    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    jobs = {j.name: j for j in queue_file.load(q).jobs}
    assert {n: j.state for n, j in jobs.items()} == {
        "slow-lr": JobState.FINISHED, "good-lr": JobState.FINISHED,
        "tiny-lr": JobState.FINISHED}
    assert jobs["slow-lr"].supervisor_starts == 1  # a finished job is never re-run
    assert jobs["good-lr"].supervisor_starts == 2
    record = run_record.load(job2 / "run.json")
    assert record is not None and record.state is run_record.State.FINISHED
    resumed = [a.resumed_from for a in record.attempts if a.resumed_from is not None]
    assert resumed and resumed[-1].step >= 10  # from its checkpoint, not from scratch

    # The same job, uninterrupted: the same adapters, bit for bit (exact resume).
    ref = overnight("run", jobs["good-lr"].config, "--run-dir", str(tmp_path / "ref"),
                    timeout=300, cwd=jobs["good-lr"].cwd)
    assert ref.returncode == 0, ref.stderr
    a, b = _adapters(job2), _adapters(tmp_path / "ref")
    assert a.keys() == b.keys()
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) == 0.0

    report = overnight("report", "--queue", str(q))
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert "**Best job: good-lr**" in text
    assert f"--adapter-path {job2 / 'adapters'}" in text
    for name in ("slow-lr", "good-lr", "tiny-lr"):
        assert f"- {name}: finished" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    header = rows.pop("job")
    settings = header[header.index("peak MB") + 1:]  # the settings that differ, and only they
    assert settings == ["iters", "learning_rate"]
    assert rows["good-lr"][-2:] == ["40", "0.001"] and rows["slow-lr"][-2:] == ["10", "1e-06"]
    assert rows["good-lr"][header.index("steps")] == "40/40"
    assert rows["good-lr"][header.index("restarts")] == "1"  # the attempt the runner's death ended
    assert (q / "report.png").stat().st_size > 10_000

    compare = overnight("compare", str(q / "runs" / "slow-lr"), str(job2),
                        "--output", str(tmp_path / "c.md"))
    assert compare.returncode == 0, compare.stderr
    assert "**Best job: good-lr**" in compare.stdout
