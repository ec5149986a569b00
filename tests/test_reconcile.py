"""Whatever kills the supervisor, the next one reconciles the record it left (issue 12,
supervisor/daemon/reconcile.py), and `overnight status` never shows a dead run as training."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from shared.layout import RunDir
from shared.run_record import AttemptRecord, State, WorkerInfo
from shared.runlock import is_locked
from supervisor.daemon.reconcile import NO_RECORD, reconcile
from supervisor.daemon.record import RecordKeeper, boot_id
from tests.conftest import overnight
from tests.supervisor_support import record, start_daemon, wait_for, write_config

DEAD_PID = 2_000_000_000  # above any pid_max: no such process


def left_training(root: Path, boot: str = "", worker_pid: int = 4343) -> RunDir:
    """A run.json as a supervisor that was killed while its worker trained leaves it."""
    run = RunDir(root)
    run.create()
    keeper, _ = RecordKeeper.open(run.record, "r1", root, root / "c.yaml", {}, "h")
    entry = AttemptRecord(attempt=1, pid=worker_pid, argv=("w",), log="logs/worker-1.log",
                          started="2025-01-02T01:00:00+00:00", ended=None,
                          start_reason="initial", resumed_from=None, skip_steps=0,
                          lr_scale=None, settings={}, start_step=0, end_step=30,
                          steps_gained=30)
    keeper.begin_attempt(entry, WorkerInfo(worker_pid, 1, entry.started, ("w",)))
    keeper.update(supervisor=dataclasses.replace(keeper.record.supervisor, pid=DEAD_PID,
                                                 boot_id=boot))
    keeper.set_state(State.TRAINING, "training started (step 1)")
    return run


def next_supervisor(run: RunDir) -> RecordKeeper:
    keeper, _ = RecordKeeper.open(run.record, "r1", run.root, run.root / "c.yaml", {}, "h")
    return keeper


def log_lines(path: Path, *events: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"torn": ')


def test_a_killed_supervisor_leaves_no_record_of_how_and_the_attempt_is_abandoned(tmp_path):
    run = left_training(tmp_path, boot=boot_id())
    keeper = next_supervisor(run)
    assert keeper.previous is not None and keeper.previous.pid == DEAD_PID
    found = reconcile(keeper, run)
    assert found is not None and found.previous_state is State.TRAINING and found.attempt == 1
    a = keeper.record.attempts[0]
    assert a.action is not None and a.action.value == "abandoned" and a.ended is not None
    assert a.action_reason.startswith(NO_RECORD)
    assert "its worker's end is not recorded" in a.action_reason
    assert keeper.record.state is State.STARTING and keeper.record.worker is None
    on_disk = record(tmp_path)
    assert on_disk["state"] == "starting" and on_disk["attempts"][0]["action"] == "abandoned"
    assert on_disk["reason"].startswith(f"previous supervisor (pid {DEAD_PID}): supervisor "
                                        "died (no record of how")
    assert on_disk["supervisor"]["boot_id"] == boot_id() != ""


def test_a_machine_restart_is_told_by_the_boot_id(tmp_path):
    run = left_training(tmp_path, boot="0ld-boot-0000")
    found = reconcile(next_supervisor(run), run, this_boot="new-boot-1111")
    assert found is not None
    assert found.reason.startswith("the machine restarted at ")  # this boot's start
    assert "(boot id 0ld-boot… is now new-boot…)" in found.reason


def test_the_supervisors_own_failure_and_the_workers_end_are_found_in_the_logs(tmp_path):
    run = left_training(tmp_path, boot=boot_id(), worker_pid=4343)
    log_lines(run.supervisor_log,
              {"event": "supervisor_failed", "pid": DEAD_PID,
               "exception": [{"exc_type": "OSError", "exc_value": "[Errno 5] I/O error"}]},
              {"event": "worker_stopped_on_failure", "pid": DEAD_PID})
    log_lines(run.worker_log,
              {"event": "progress", "pid": 4343, "step": 30},
              {"event": "worker_stopping", "pid": 4343, "reason": "graceful_stop",
               "exit_code": 23, "step": 34, "detail": "SIGTERM"},
              {"event": "worker_stopping", "pid": 999, "reason": "crash", "exit_code": 1})
    keeper = next_supervisor(run)
    found = reconcile(keeper, run)
    assert found is not None
    assert found.reason == (
        "the supervisor failed: OSError: [Errno 5] I/O error; attempt 1 (worker pid 4343): "
        "its worker then ended: graceful_stop (exit code 23) at step 34: SIGTERM")
    assert keeper.record.attempts[0].detail.startswith("its worker then ended: graceful_stop")


def test_a_run_that_ended_is_left_alone(tmp_path):
    run = left_training(tmp_path)
    keeper = next_supervisor(run)
    keeper.end_attempt(classification=None)
    keeper.set_state(State.FINISHED, "all steps done")
    assert reconcile(next_supervisor(run), run) is None


def test_status_never_shows_a_dead_run_as_training_and_the_next_supervisor_reconciles(
        tmp_path):
    config = write_config(tmp_path, iters=300)
    run_dir = tmp_path / "run"
    env = {"FAKE_STEP_SECONDS": "0.03"}
    sup = start_daemon(config, run_dir, env)
    wait_for(lambda: (run_dir / "run.json").exists() and record(run_dir)["final_step"] >= 20)
    dead_pid = sup.pid
    sup.kill()  # SIGKILL: nothing is written; its worker saves and leaves (PDEATHSIG)
    sup.wait()
    wait_for(lambda: not is_locked(run_dir / "run.lock"), timeout=30)
    assert record(run_dir)["state"] == "training"  # what the dead supervisor left
    shown = overnight("status", str(run_dir))
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[0]
    assert first.startswith("not running: last recorded state training ("), first
    assert f"supervisor gone (pid {dead_pid} on " in first
    assert "training:" not in shown.stdout
    assert "state    training (last recorded; the supervisor is gone)" in shown.stdout
    as_json = json.loads(overnight("status", str(run_dir), "--json").stdout)
    assert as_json["live"] is False and as_json["supervisor_gone"] is True

    t0 = time.monotonic()
    again = start_daemon(config, run_dir, env)
    try:
        assert again.wait(90) == 0
    finally:
        again.kill()
    rec = record(run_dir)
    assert rec["state"] == "finished" and rec["final_step"] == 300
    first_attempt = rec["attempts"][0]
    assert first_attempt["action"] == "abandoned"
    assert first_attempt["action_reason"].startswith(NO_RECORD), first_attempt["action_reason"]
    assert rec["supervisor"]["starts"] == 2 and rec["supervisor"]["boot_id"] == boot_id()
    assert time.monotonic() - t0 < 90
    assert overnight("status", str(run_dir)).stdout.startswith("finished 300/300 steps")


def test_the_abandoned_attempt_ends_at_the_last_step_its_worker_logged(tmp_path):
    """run.json said step 30 when the supervisor was killed; the worker went on to step 47
    (logs/metrics.jsonl) before it ended: the attempt is closed at 47, 47 steps gained."""
    run = left_training(tmp_path, boot=boot_id(), worker_pid=4343)
    log_lines(run.metrics_log,
              *({"attempt": 1, "step": s, "loss": 2.0} for s in range(31, 48)),
              {"attempt": 2, "step": 99, "loss": 2.0})  # not this attempt's
    log_lines(run.worker_log, {"event": "worker_stopping", "pid": 4343, "reason": "crash",
                               "exit_code": 1, "step": 40})
    keeper = next_supervisor(run)
    reconcile(keeper, run)
    a = keeper.record.attempts[0]
    assert (a.end_step, a.steps_gained) == (47, 47)
    assert record(tmp_path)["attempts"][0]["end_step"] == 47


def test_a_worker_stopping_step_past_the_metrics_counts(tmp_path):
    run = left_training(tmp_path, boot=boot_id(), worker_pid=4343)
    log_lines(run.worker_log, {"event": "worker_stopping", "pid": 4343, "reason": "crash",
                               "exit_code": 1, "step": 36})
    keeper = next_supervisor(run)
    reconcile(keeper, run)
    assert keeper.record.attempts[0].end_step == 36


def test_a_hostile_log_line_does_not_stop_the_next_supervisor(tmp_path):
    run = left_training(tmp_path, boot=boot_id(), worker_pid=4343)
    run.worker_log.parent.mkdir(parents=True, exist_ok=True)
    run.worker_log.write_text("[" * 60000 + "\n" + '{"event": "worker_stopping", "pid": 4343, '
                              '"reason": "crash", "exit_code": 1, "step": 33}\n')
    keeper = next_supervisor(run)
    found = reconcile(keeper, run)
    assert found is not None and "its worker then ended: crash (exit code 1) at step 33" \
        in found.reason
