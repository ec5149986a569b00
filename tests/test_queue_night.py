"""`overnight run --queue`: the jobs one at a time, each under its own real supervisor (the
fake worker: fast); a give-up does not stop the night; the deadline; skipping a job that
cannot finish; a stopped runner's job resumes; notifications per ended job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

from shared import queue_file, run_record
from shared.queue_file import JobState
from shared.runlock import read as read_lock
from supervisor.queue import commands
from tests.conftest import overnight, subprocess_env
from tests.supervisor_support import ROOT, wait_for, write_config
from tests.test_queue_notify import Receiver


def _queue(tmp: Path, jobs: list[tuple[str, list[str]]], iters: int = 20) -> Path:
    """A queue of fake-worker jobs, added in this process (`overnight queue add` is tested
    as a command in test_queue_file.py)."""
    config = write_config(tmp, iters=iters)
    q = tmp / "q"
    for name, sets in jobs:
        assert commands.main(argparse.Namespace(
            queue=q, action="add", config=config, name=name, set=sets, sweep=[])) == 0
    return q


def _run(q: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return overnight("run", "--queue", str(q), *args, timeout=timeout,
                     env=subprocess_env(**(env or {})))


def _states(q: Path) -> dict[str, JobState]:
    return {j.name: j.state for j in queue_file.load(q).jobs}


def test_three_jobs_one_gives_up_all_run_and_each_end_is_notified(tmp_path):
    q = _queue(tmp_path, [("a", []), ("b", ["debug.inject=crash@5", "supervisor.max_failures=1"]),
                          ("c", [])])
    hook = Receiver()
    try:
        (q / "queue.yaml").write_text(f"notify:\n  events: [job, queue, failure]\n"
                                      f"  targets:\n    - webhook: {{url: '{hook.url}/night'}}\n")
        done = _run(q)
        assert done.returncode == 0, done.stderr
        assert _states(q) == {"a": JobState.FINISHED, "b": JobState.GAVE_UP,
                              "c": JobState.FINISHED}
        jobs = queue_file.load(q).jobs
        assert jobs[0].ended <= jobs[1].started and jobs[1].ended <= jobs[2].started
        assert "crash loop" in jobs[1].reason
        assert queue_file.load(q).night is None
        sent = [json.loads(body) for _, _, body in hook.got]
        assert sorted(m["job"] for m in sent if m["event"] == "job") == ["a", "b", "c"]
        assert [m["state"] for m in sent if m["event"] == "job"] == [
            "finished", "gave_up", "finished"]
        assert [m["event"] for m in sent].count("queue") == 1
        failures = [m for m in sent if m["event"] == "failure"]  # asked for: each failed attempt
        assert [(m["job"], m["attempt"]) for m in failures] == [("b", 1)]
    finally:
        hook.close()
    for job in jobs:  # each a normal supervised run in its own directory
        record = run_record.load(Path(job.run_dir) / "run.json")
        assert record is not None and record.supervisor.starts == 1


def test_on_failure_stop_ends_the_night_and_leaves_the_rest_queued(tmp_path):
    q = _queue(tmp_path, [("a", ["debug.inject=crash@5", "supervisor.max_failures=1"]),
                          ("b", [])])
    done = _run(q, "--on-failure", "stop")
    assert done.returncode == 0, done.stderr
    assert _states(q) == {"a": JobState.GAVE_UP, "b": JobState.QUEUED}
    assert not (q / "runs" / "b").exists()


def test_the_deadline_stops_job_2_cleanly_leaves_job_3_queued_and_next_night_resumes(
        tmp_path):
    q = _queue(tmp_path, [("a", ["iters=5"]), ("b", ["iters=1000"]), ("c", [])])
    until = (datetime.now() + timedelta(seconds=15)).isoformat(timespec="seconds")
    done = _run(q, "--until", until, "--no-skip", env={"FAKE_STEP_SECONDS": "0.03"})
    assert done.returncode == 0, done.stderr
    assert _states(q) == {"a": JobState.FINISHED, "b": JobState.DEADLINE, "c": JobState.QUEUED}
    assert "the deadline" in done.stderr and not (q / "runs" / "c").exists()
    record = run_record.load(q / "runs" / "b" / "run.json")
    assert record is not None and record.state is run_record.State.STOPPED
    assert 0 < record.final_step < 1000
    assert record.totals.failures == 0  # a deadline is no failure
    assert record.latest_checkpoint is not None  # saved on the way out: nothing lost
    assert record.latest_checkpoint.step == record.final_step
    # asked over its control socket, saying why: the job's own record and report say it
    at = datetime.fromisoformat(until)
    deadline = f"the queue's deadline {at:%H:%M:%S} came" if at.second else \
        f"the queue's deadline {at:%H:%M} came"
    assert record.reason.startswith(f"stopped on request: {deadline} (")
    assert record.attempts[-1].action == "stop"
    report = overnight("report", str(q / "runs" / "b"), "--quiet")
    assert report.returncode == 0, report.stderr
    planned = (q / "runs" / "b" / "report.md").read_text().split("## Planned ends")[1]
    assert f"The supervisor chose **stop**: stopped on request: {deadline}." in planned
    stopped_at = record.final_step
    assert queue_file.load(q).night is None

    again = _run(q, env={"FAKE_STEP_SECONDS": "0.001"})  # the next night: b first, then c
    assert again.returncode == 0, again.stderr
    assert _states(q) == {"a": JobState.FINISHED, "b": JobState.FINISHED,
                          "c": JobState.FINISHED}
    record = run_record.load(q / "runs" / "b" / "run.json")
    assert record is not None and record.final_step == 1000
    assert record.attempts[-1].resumed_from is not None
    assert record.attempts[-1].resumed_from.step == stopped_at
    a = queue_file.load(q).find("a")
    assert a.supervisor_starts == 1  # a finished job is never run again


def test_a_job_that_cannot_finish_before_the_deadline_is_skipped_and_says_so(tmp_path):
    q = _queue(tmp_path, [("a", []), ("b", ["iters=3000"]), ("c", [])])
    until = (datetime.now() + timedelta(seconds=40)).isoformat(timespec="seconds")
    done = _run(q, "--until", until, env={"FAKE_STEP_SECONDS": "0.03"})
    assert done.returncode == 0, done.stderr
    assert _states(q) == {"a": JobState.FINISHED, "b": JobState.QUEUED,
                          "c": JobState.FINISHED}
    note = queue_file.load(q).find("b").note
    assert note.startswith("skipped tonight: 3000 steps need") and "measured on a" in note
    assert "b: skipped tonight" in done.stderr
    assert not (q / "runs" / "b").exists()

    # The listing the morning after: b's ETA is for a start now (no runner holds the queue);
    # during a night (left open by a stopped runner) it is "not tonight" past the deadline.
    lines = overnight("queue", "--queue", str(q)).stdout.splitlines()
    assert lines[0] == f"{q}; no runner: the ETAs are for a start now"
    row_b = lines[3].split()
    assert row_b[:4] == ["2", "b", "queued", "0/3000"] and ":" in row_b[5]
    now = datetime.now()
    queue_file.update(q, lambda old: (dataclasses.replace(old, night=queue_file.Night(
        started=now.isoformat(), until=(now + timedelta(seconds=60)).astimezone().isoformat(
            timespec="seconds"))), None))
    tonight = commands.listing(q, now=now.timestamp()).splitlines()
    assert tonight[0] == (f"{q}; tonight until {(now + timedelta(seconds=60)):%a %H:%M}; no "
                          "runner: the ETAs are for a start now")
    assert "  not tonight  skipped tonight" in tonight[3]  # ~1.5 min of steps in 60 s
    later = commands.listing(q, now=now.timestamp() + 120).splitlines()
    assert later[0].startswith(f"{q}; tonight until {(now + timedelta(seconds=60)):%a %H:%M} "
                               "(over); no runner")


def test_a_stopped_runner_leaves_its_job_running_and_the_next_one_resumes_it(tmp_path):
    q = _queue(tmp_path, [("a", ["iters=300"])])
    env = subprocess_env(FAKE_STEP_SECONDS="0.03")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--queue", str(q)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = q / "runs" / "a" / "logs" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 10, 60)
    second = _run(q)  # one runner per queue
    assert second.returncode == 78
    assert f"already being run by PID {proc.pid}" in second.stderr
    proc.send_signal(signal.SIGTERM)  # a service stop
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    job = queue_file.load(q).find("a")
    assert job.state is JobState.RUNNING and "runner was stopped" in job.reason
    assert queue_file.load(q).night is not None  # the night goes on at the next start
    done = _run(q, env={"FAKE_STEP_SECONDS": "0.002"})
    assert done.returncode == 0, done.stderr
    job = queue_file.load(q).find("a")
    assert job.state is JobState.FINISHED and job.supervisor_starts == 2
    assert "resuming" in done.stderr


def test_a_killed_job_supervisor_is_started_again_and_its_job_goes_on(tmp_path):
    """SIGKILL to the job's own supervisor (not the runner): the runner starts it again, it
    resumes the job from its checkpoint; the job finishes and the queue goes on."""
    q = _queue(tmp_path, [("a", ["iters=300"]), ("b", [])])
    env = subprocess_env(FAKE_STEP_SECONDS="0.01")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--queue", str(q)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run = q / "runs" / "a"
    wait_for(lambda: (run / "checkpoints" / "step-0000020").is_dir(), 60)
    holder = read_lock(run / "run.lock")
    assert holder is not None and holder.role.value == "supervisor"
    os.kill(holder.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _states(q) == {"a": JobState.FINISHED, "b": JobState.FINISHED}
    assert queue_file.load(q).find("a").supervisor_starts == 2
    record = run_record.load(run / "run.json")
    assert record is not None and record.supervisor.starts == 2
    assert record.attempts[-1].resumed_from is not None
    assert record.attempts[-1].resumed_from.step >= 20


def test_a_paused_queue_starts_nothing_until_resumed_run_as_the_service_runs_it(tmp_path):
    """`overnight install --queue Q` writes `run Q --run-dir Q`: that command runs the queue;
    paused, it starts no job and says so; `overnight queue resume` lets it go on."""
    q = _queue(tmp_path, [("a", [])])
    assert overnight("queue", "pause", "--queue", str(q)).returncode == 0
    unit = overnight("install", "--queue", str(q), "--dry-run", "--platform", "systemd")
    assert unit.returncode == 0, unit.stderr
    assert f"run {q} --run-dir {q}" in unit.stdout
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", str(q),
                             "--run-dir", str(q)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "queue_paused_waiting" in _log(q), 30)
        assert _states(q) == {"a": JobState.QUEUED} and not (q / "runs" / "a").exists()
        assert overnight("queue", "resume", "--queue", str(q)).returncode == 0
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "the queue is paused" in err
    assert _states(q) == {"a": JobState.FINISHED}


def _log(q: Path) -> str:
    path = q / "logs" / "queue.jsonl"
    return path.read_text() if path.exists() else ""


def test_after_a_power_cut_the_running_job_resumes_from_its_checkpoint(tmp_path):
    """Every process of the night SIGKILLed at once (the runner, its guards, the job's
    supervisor and worker: a reboot or power cut, nothing saves): the next runner resumes
    the job from its newest checkpoint and goes on."""
    import psutil

    q = _queue(tmp_path, [("a", ["iters=300"]), ("b", [])])
    env = subprocess_env(FAKE_STEP_SECONDS="0.01")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--queue", str(q)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = q / "runs" / "a"
    wait_for(lambda: (run / "checkpoints" / "step-0000020").is_dir(), 60)
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in tree), 10)
    done = _run(q, env={"FAKE_STEP_SECONDS": "0.002"})
    assert done.returncode == 0, done.stderr
    assert _states(q) == {"a": JobState.FINISHED, "b": JobState.FINISHED}
    record = run_record.load(run / "run.json")
    assert record is not None and record.final_step == 300
    assert record.attempts[0].classification is None  # abandoned: its supervisor died
    assert record.attempts[-1].resumed_from is not None
    assert record.attempts[-1].resumed_from.step >= 20


def test_a_job_whose_config_is_gone_gives_up_in_one_line_and_the_night_goes_on(tmp_path):
    q = _queue(tmp_path, [("gone", []), ("b", [])])
    Path(queue_file.load(q).find("gone").config).unlink()
    done = _run(q)
    assert done.returncode == 0, done.stderr
    assert _states(q) == {"gone": JobState.GAVE_UP, "b": JobState.FINISHED}
    reason = queue_file.load(q).find("gone").reason
    assert reason.startswith("refused to start: overnight run: ") and "not found" in reason
    assert queue_file.load(q).find("gone").supervisor_starts == 1  # not retried


def test_a_night_left_open_keeps_its_deadline_for_an_hour_then_a_new_night_begins(tmp_path):
    """A runner restarted (by the service manager, after a reboot) 10 minutes after the dead
    runner's deadline starts nothing; one started the next evening begins a new night."""
    from dataclasses import replace

    from shared.queue_file import Night

    q = _queue(tmp_path, [("a", [])])

    def open_night(minutes_ago: int) -> None:
        until = (datetime.now() - timedelta(minutes=minutes_ago)).astimezone()
        night = Night(started="2026-11-29T22:00:00+00:00", until=until.isoformat(), pid=1)
        queue_file.update(q, lambda qu: (replace(qu, night=night), None))

    open_night(10)
    done = _run(q)
    assert done.returncode == 0, done.stderr
    assert "night ended (deadline)" in done.stderr
    assert _states(q) == {"a": JobState.QUEUED} and queue_file.load(q).night is None
    open_night(120)
    done = _run(q)
    assert done.returncode == 0, done.stderr
    assert _states(q) == {"a": JobState.FINISHED}
