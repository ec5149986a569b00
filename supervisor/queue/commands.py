"""`overnight queue`: add, list, remove, move, pause and resume the jobs of a night.

    overnight queue add configs/mini.yaml --name lr-low --set learning_rate=1e-5
    overnight queue add configs/mini.yaml --sweep learning_rate=1e-5,3e-5,1e-4
    overnight queue                         # list: each job's state, progress and ETA
    overnight queue move mini-learning_rate1e-4 --to 1
    overnight queue remove 3                # by name or by number in the list
    overnight queue pause | resume          # start no new job / go on

Every command takes `--queue DIR` (default ./queue). Each change is one locked, atomic
read-modify-write of DIR/queue.json (shared/queue_file.py), safe while `overnight run
--queue DIR` runs. A running job cannot be removed or moved (stop it with `overnight stop
RUN_DIR`; it is then recorded `stopped` and the night goes on); a finished job can be
removed from the list — its run directory stays.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from shared import queue_file, runlock
from shared.errors import OvernightError
from shared.queue_file import Job, JobState, Queue, QueueError
from supervisor.morning.facts import whole
from supervisor.queue import estimate, jobs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--queue", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help="the queue's directory (default: ./queue)")
    parser.add_argument("--queue", type=Path, default=jobs.DEFAULT_QUEUE, metavar="DIR",
                        help="the queue's directory (default: ./queue)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("add", parents=[common], help="add a job (or a sweep of jobs)")
    p.add_argument("config", type=Path, help="the job's YAML config")
    p.add_argument("--name", help="the job's name (default: the config's name); with "
                                  "--sweep, the names' prefix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for this job (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one job per value; several --sweep: every combination")
    sub.add_parser("list", parents=[common], help="list the jobs (the default)")
    p = sub.add_parser("remove", parents=[common], help="remove a job that is not running")
    p.add_argument("job", help="its name or number")
    p = sub.add_parser("move", parents=[common], help="move a job to another place")
    p.add_argument("job", help="its name or number")
    p.add_argument("--to", type=int, required=True, metavar="K", help="its new place (1 = next)")
    sub.add_parser("pause", parents=[common], help="start no new job until resume")
    sub.add_parser("resume", parents=[common], help="start jobs again")


def main(args: argparse.Namespace) -> int:
    queue_dir = Path(args.queue).resolve()
    action = args.action or "list"
    if action == "add":
        new = jobs.make_jobs(queue_dir, args.config, args.name, args.set, args.sweep,
                             Path.cwd())
        added = queue_file.update(queue_dir, lambda q: jobs.add(q, new))
        for job in added:
            shown = " ".join(job.settings)
            print(f"queued {job.name}" + (f" ({shown})" if shown else ""))
        return 0
    if action == "remove":
        removed = queue_file.update(queue_dir, lambda q: _remove(q, args.job))
        print(f"removed {removed.name}" + (f" (its run directory stays: {removed.run_dir})"
                                           if Path(removed.run_dir).exists() else ""))
        return 0
    if action == "move":
        moved = queue_file.update(queue_dir, lambda q: _move(q, args.job, args.to))
        print(f"moved {moved.name} to place {args.to}")
        return 0
    if action in ("pause", "resume"):
        paused = action == "pause"
        queue_file.update(queue_dir, lambda q: (replace(q, paused=paused), None))
        print("paused: no new job starts (the running one goes on)" if paused else
              "resumed")
        return 0
    print(listing(queue_dir))
    return 0


def _remove(q: Queue, name: str) -> tuple[Queue, Job]:
    job = q.find(name)
    if job.state is JobState.RUNNING:
        raise QueueError(f"{job.name} is running; stop it with `overnight stop {job.run_dir}` "
                         "(it is then recorded stopped), then remove it")
    return replace(q, jobs=[j for j in q.jobs if j.name != job.name]), job


def _move(q: Queue, name: str, to: int) -> tuple[Queue, Job]:
    job = q.find(name)
    if not 1 <= to <= len(q.jobs):
        raise QueueError(f"--to: expected a place from 1 to {len(q.jobs)}, got {to}")
    rest = [j for j in q.jobs if j.name != job.name]
    rest.insert(to - 1, job)
    return replace(q, jobs=rest), job


def listing(queue_dir: Path, now: float | None = None) -> str:
    """The queue as a table: place, name, state, progress, ETA (the end's clock time for a
    running or waiting job, from the speed measured tonight: supervisor/queue/estimate.py;
    "not tonight" when it would end after the night's `until`), and the reason or note. With
    no runner (`overnight run --queue`) holding the queue, the header says the ETAs are for a
    start now."""
    from supervisor.morning.runfacts import gather

    now = time.time() if now is None else now
    q = queue_file.load(queue_dir)
    if not q.jobs:
        return f"{queue_dir}: no jobs (add one with `overnight queue add CONFIG.yaml`)"
    until = queue_file.parse_iso(q.night.until) if q.night is not None else None
    rows = [["#", "job", "state", "progress", "ETA", "note"]]
    latest: estimate.Speed | None = None
    at = now
    for i, job in enumerate(q.jobs, 1):
        run_dir = Path(job.run_dir)
        facts = None
        if (run_dir / "run.json").exists():
            try:
                facts = gather(run_dir, light=True)
            except (OvernightError, OSError, ValueError):  # a listing shows what it can
                facts = None
        config = _config(job)
        total = (facts.total_steps if facts else 0) or whole(config.get("iters"))
        step = facts.final_step if facts else 0
        progress = f"{step}/{total}" + (f" ({100 * step / total:.0f}%)" if total else "")
        own = estimate.speed_of(run_dir, job.name) if facts else None
        latest = own or latest
        eta = ""
        if not job.state.is_done:
            guess = estimate.estimate(own, latest, config, max(0, total - step))
            if guess is not None and math.isfinite(guess[0]):
                at += guess[0]
                eta = ("not tonight" if until is not None and at > until
                       else datetime.fromtimestamp(at).strftime("%H:%M"))
        note = job.note or job.reason
        rows.append([str(i), job.name, job.state.value, progress, eta, note])
    header = f"{queue_dir}" + (" (paused)" if q.paused else "")
    if until is not None:
        header += (f"; tonight until {datetime.fromtimestamp(until).strftime('%a %H:%M')}"
                   + (" (over)" if now > until else ""))
    if any(row[4] for row in rows[1:]) and not runlock.is_locked(queue_dir / "runner.lock"):
        header += "; no runner: the ETAs are for a start now"
    return header + "\n" + _table(rows)


def summary(queue_dir: Path) -> str:
    """"queue: 2 finished, 1 running" (`overnight services`); "unknown" when unreadable."""
    try:
        q = queue_file.load(queue_dir)
    except QueueError:
        return "unknown"
    counts: dict[str, int] = {}
    for job in q.jobs:
        counts[job.state.value] = counts.get(job.state.value, 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no jobs"
    return f"queue: {states}" + (" (paused)" if q.paused else "")


def stop_timeout(queue_dir: Path) -> float:
    """`overnight install --queue`: the service must wait for the runner to stop the running
    job: the longest stop_timeout of the jobs (seconds; the default when there is none yet),
    to which the service adds its margin. QueueError when there is no queue yet."""
    from shared import config as config_mod

    if not (queue_dir / "queue.json").exists():
        raise QueueError(f"--queue: {queue_dir} holds no queue yet (add a job with "
                         "`overnight queue add CONFIG.yaml --queue DIR` first)")

    timeouts = [config_mod.Config().supervisor.stop_timeout]
    for job in queue_file.load(queue_dir).jobs:
        try:
            timeouts.append(config_mod.load(Path(job.config)).supervisor.stop_timeout)
        except (OvernightError, OSError):
            continue
    return max(timeouts)


def _config(job: Job) -> dict[str, object]:
    from shared import config as config_mod

    try:
        return config_mod.load(Path(job.config)).to_dict()
    except (OvernightError, OSError):
        return {}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
