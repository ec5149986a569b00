"""The queue file and `overnight queue`: add (with --set and --sweep), list, remove, move,
pause, resume; one locked atomic change at a time; bad input is one line, exit 78."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from shared import queue_file
from shared.queue_file import Job, JobState, Queue
from supervisor.queue.settings import deadline
from tests.conftest import overnight
from tests.supervisor_support import write_config


def _add_many(queue_dir: str, prefix: str, n: int) -> None:
    for i in range(n):
        job = Job(name=f"{prefix}{i}", config="c.yaml", source="c.yaml", cwd="/", run_dir="r")

        def change(q: Queue, job: Job = job) -> tuple[Queue, None]:
            return Queue(jobs=[*q.jobs, job], paused=q.paused, night=q.night), None

        queue_file.update(Path(queue_dir), change)


def test_concurrent_writers_lose_no_job(tmp_path):
    """Three processes add 30 jobs each at the same time: all 90 are in queue.json (a
    read-modify-write without the lock loses some)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), p, 30)) for p in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = [j.name for j in queue_file.load(tmp_path).jobs]
    assert len(names) == 90 and len(set(names)) == 90


def test_add_sweep_list_move_remove_pause_resume(tmp_path):
    config = write_config(tmp_path, iters=30)
    q = str(tmp_path / "q")
    done = overnight("queue", "add", str(config), "--queue", q, "--set", "save_every=5",
                     "--sweep", "learning_rate=1e-5,1e-4,1e-3",
                     "--sweep", "lora_parameters.rank=4,8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = queue_file.load(Path(q)).jobs
    assert [j.name for j in jobs] == [
        "mini-learning_rate1e-5-rank4", "mini-learning_rate1e-5-rank8",
        "mini-learning_rate1e-4-rank4", "mini-learning_rate1e-4-rank8",
        "mini-learning_rate1e-3-rank4", "mini-learning_rate1e-3-rank8"]
    assert all(j.state is JobState.QUEUED for j in jobs)
    written = yaml.safe_load(Path(jobs[3].config).read_text())
    assert written["learning_rate"] == 1e-4 and written["lora_parameters"]["rank"] == 8
    assert written["save_every"] == 5 and written["iters"] == 30
    assert jobs[3].run_dir == str(Path(q).resolve() / "runs" / jobs[3].name)

    listing = overnight("queue", "--queue", q)
    assert listing.returncode == 0
    assert "mini-learning_rate1e-4-rank8  queued  0/30 (0%)" in listing.stdout

    assert overnight("queue", "move", "mini-learning_rate1e-3-rank8", "--to", "1",
                     "--queue", q).returncode == 0
    assert overnight("queue", "remove", "2", "--queue", q).returncode == 0  # by number
    names = [j.name for j in queue_file.load(Path(q)).jobs]
    assert names[0] == "mini-learning_rate1e-3-rank8"
    assert "mini-learning_rate1e-5-rank4" not in names and len(names) == 5

    assert overnight("queue", "pause", "--queue", q).returncode == 0
    assert queue_file.load(Path(q)).paused
    assert "(paused)" in overnight("queue", "list", "--queue", q).stdout
    assert overnight("queue", "resume", "--queue", q).returncode == 0
    assert not queue_file.load(Path(q)).paused


def test_the_default_queue_is_dot_queue(tmp_path):
    config = write_config(tmp_path)
    assert overnight("queue", "add", str(config), cwd=tmp_path).returncode == 0
    assert (tmp_path / "queue" / "queue.json").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "learning_rat=1e-4"], "learning_rat"),
    (["--set", "iters=many"], "iters"),
    (["--sweep", "learning_rate="], "--sweep"),
    (["--name", "../x"], "--name"),
])
def test_bad_jobs_are_one_line_and_nothing_is_queued(tmp_path, args, expected):
    config = write_config(tmp_path)
    done = overnight("queue", "add", str(config), "--queue", str(tmp_path / "q"), *args)
    assert done.returncode == 78
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert queue_file.load(tmp_path / "q").jobs == []


def test_a_name_in_use_a_running_job_and_a_broken_file_are_refused(tmp_path):
    config = write_config(tmp_path)
    q = tmp_path / "q"
    assert overnight("queue", "add", str(config), "--queue", str(q)).returncode == 0
    again = overnight("queue", "add", str(config), "--queue", str(q))
    assert again.returncode == 78 and "already in the queue" in again.stderr
    queue_file.update(q, lambda qu: (qu.with_job(
        Job(**{**queue_file.records.to_dict(qu.jobs[0]), "state": JobState.RUNNING})), None))
    busy = overnight("queue", "remove", "mini", "--queue", str(q))
    assert busy.returncode == 78 and "is running" in busy.stderr
    (q / "queue.json").write_text(json.dumps({"version": 1, "jobs": [{"name": 3}]}))
    broken = overnight("queue", "--queue", str(q))
    assert broken.returncode == 78 and "queue.json" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_until_means_the_next_such_clock_time():
    evening = datetime(2026, 11, 30, 22, 15)
    assert deadline("07:00", evening) == datetime(2026, 12, 1, 7, 0)
    assert deadline("23:30", evening) == datetime(2026, 11, 30, 23, 30)
    assert deadline("2026-12-01T06:30:00", evening) == datetime(2026, 12, 1, 6, 30)
    with pytest.raises(Exception, match="HH:MM"):
        deadline("7am", evening)


def test_running_a_queue_that_is_not_there_is_one_line(tmp_path):
    done = overnight("run", "--queue", str(tmp_path / "qeueu"))
    assert done.returncode == 78 and "no queue here" in done.stderr
    assert not (tmp_path / "qeueu").exists()
    both = overnight("run", str(tmp_path / "x.yaml"), "--queue", str(tmp_path))
    assert both.returncode == 78 and "not both" in both.stderr
    alone = overnight("run", str(tmp_path / "x.yaml"), "--until", "07:00")
    assert alone.returncode == 78 and "--until: only with --queue" in alone.stderr


def test_overnight_services_shows_an_installed_queue_by_its_jobs(tmp_path):
    from supervisor.service.commands import run_state

    config = write_config(tmp_path)
    q = tmp_path / "q"
    assert overnight("queue", "add", str(config), "--queue", str(q)).returncode == 0
    assert run_state(q) == "queue: 1 queued"


def test_a_deadline_in_the_past_is_one_line_not_an_empty_night(tmp_path):
    """`--until 2026-11-29T07:00` (yesterday's date by mistake) used to start a night that
    ended at once, every job still queued, exit 0."""
    config = write_config(tmp_path)
    q = tmp_path / "q"
    assert overnight("queue", "add", str(config), "--queue", str(q)).returncode == 0
    done = overnight("run", "--queue", str(q), "--until", "2020-01-01T00:00")
    assert done.returncode == 78, done.stderr
    assert done.stderr.splitlines() == [
        "overnight run: --until: 2020-01-01T00:00 is in the past; nothing would run "
        "(give a later date and time, or a clock time HH:MM: the next one)"]
    assert queue_file.load(q).night is None


def test_a_key_swept_twice_or_also_set_is_one_line():
    """`--sweep lr=1e-5 --sweep lr=2e-5` made ONE job with both settings (the last won), and
    `--sweep k=8 --set k=4` a job whose --set was silently overridden."""
    from shared.errors import ConfigError
    from supervisor.queue.jobs import expand

    with pytest.raises(ConfigError, match=r"^--sweep learning_rate: swept twice; give its "
                                          r"values in one --sweep \(KEY=V1,V2,\.\.\.\)$"):
        expand([], ["learning_rate=1e-5", "learning_rate=2e-5"])
    with pytest.raises(ConfigError, match=r"^--sweep lora_parameters.rank: also given with "
                                          r"--set; one of them$"):
        expand(["lora_parameters.rank=4"], ["lora_parameters.rank=8,16"])
    assert len(expand([], ["learning_rate=1e-5,2e-5", "seed=1,2"])) == 4
