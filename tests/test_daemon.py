"""supervisor/daemon.py end to end with the scripted fake worker (tests/fake_worker.py):
real processes, real ZeroMQ over ipc://, real signals, fast timeouts."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared.errors import ConfigError
from shared.layout import RunDir
from supervisor.morning import status as control_client
from tests.supervisor_support import (
    FAKE,
    events,
    record,
    run_inprocess,
    start_daemon,
    wait_for,
    worker_intervals,
    write_config,
)

ITERS = 40


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.02")
    monkeypatch.setenv("FAKE_HEARTBEAT", "0.2")
    monkeypatch.delenv("OVERNIGHT_INJECT", raising=False)
    return monkeypatch


def run_fake(tmp_path, inject="", **kw):
    config = write_config(tmp_path, inject=inject, iters=ITERS, **kw)
    run_dir = tmp_path / "run"
    assert run_inprocess(config, run_dir) == 0
    return record(run_dir), run_dir


def argv_of(run_dir, attempt):
    return json.loads((run_dir / "logs" / f"fake-argv-{attempt}.json").read_text())


def assert_finished(rec, classes):
    assert rec["state"] == "finished", rec["reason"]
    assert rec["final_step"] == ITERS and rec["total_steps"] == ITERS
    assert [a["classification"] for a in rec["attempts"]] == classes
    assert rec["latest_checkpoint"]["step"] == ITERS


def test_crash_is_detected_at_once_and_resumes_from_the_newest_checkpoint(tmp_path, env):
    rec, run_dir = run_fake(tmp_path, "crash@15")
    assert_finished(rec, ["crash", "completed"])
    crash, second = rec["attempts"]
    assert (crash["signal_name"], crash["detected_by"]) == ("SIGABRT", "exit")
    assert crash["detection_latency_s"] < 0.5
    assert "Command buffer" in crash["stderr_tail"] and "command buffer" in crash["detail"]
    assert crash["action"] == "restart" and crash["steps_gained"] >= 14
    assert second["resumed_from"]["step"] == 10 and second["start_reason"].startswith("crash")
    assert "--resume" in argv_of(run_dir, 2) and second["downtime_s"] is not None
    # every transition is one structured event
    moves = [(e["from_state"], e["to_state"]) for e in events(run_dir, "state_changed")]
    assert moves == [("starting", "training"), ("training", "backing_off"),
                     ("backing_off", "restarting"), ("restarting", "starting"),
                     ("starting", "training"), ("training", "finished")]
    assert all(e["run_id"] == rec["run_id"] for e in events(run_dir))


def test_oom_halves_the_micro_batch_and_persists_it(tmp_path, env):
    env.setenv("FAKE_OOM_ABOVE", "2")
    rec, run_dir = run_fake(tmp_path, "oom@15")
    assert_finished(rec, ["oom", "completed"])
    assert rec["attempts"][0]["settings_changed"] == {
        "batch_size": [4, 2], "grad_accumulation_steps": [1, 2]}
    assert rec["overrides"]["batch_size"] == 2
    argv = " ".join(argv_of(run_dir, 2))
    assert "--set batch_size=2" in argv and "--set grad_accumulation_steps=2" in argv


def test_gpu_watchdog_has_its_own_class_and_advice(tmp_path, env):
    rec, _ = run_fake(tmp_path, "gpu_watchdog@15")
    assert_finished(rec, ["gpu_watchdog", "completed"])
    assert "display" in rec["attempts"][0]["action_reason"]


def test_hang_is_detected_by_the_heartbeat_timeout(tmp_path, env):
    rec, _ = run_fake(tmp_path, "hang@15")
    assert_finished(rec, ["hang", "completed"])
    hang = rec["attempts"][0]
    assert hang["detected_by"] == "heartbeat_timeout"
    assert 1.5 <= hang["detection_latency_s"] < 2.2
    # SIGTERM + SIGCONT woke the stopped worker: it saved and exited without SIGKILL
    assert not hang["killed_after_stop_timeout"]


def test_stall_is_detected_and_killed_after_stop_timeout(tmp_path, env):
    rec, _ = run_fake(tmp_path, "stall@15",
                      supervisor={"stall_timeout": 1.0, "stop_timeout": 1.0})
    assert_finished(rec, ["stall", "completed"])
    stall = rec["attempts"][0]
    assert stall["detected_by"] == "stall_timeout" and stall["killed_after_stop_timeout"]
    assert stall["signal_name"] == "SIGKILL"


@pytest.mark.parametrize("inject,cls", [("nan@15", "non_finite"), ("spike@15", "grad_spike")])
def test_nan_and_spike_roll_back_lower_the_lr_and_skip_the_window(tmp_path, env, inject, cls):
    rec, run_dir = run_fake(tmp_path, inject)
    assert_finished(rec, [cls, "completed"])
    first, second = rec["attempts"]
    assert first["action"] == "rollback" and rec["rollbacks"] == 1
    assert second["resumed_from"]["step"] == 10
    assert second["lr_scale"] == 0.5 and second["skip_steps"] == 5
    argv = argv_of(run_dir, 2)
    assert argv[argv.index("--lr-scale") + 1] == "0.5"
    assert argv[argv.index("--skip-steps") + 1] == "5"
    if cls == "grad_spike":  # the checkpoint saved at the spike was set aside, not deleted
        assert [q["checkpoint"] for q in rec["quarantined"]] == ["step-0000015"]
        assert list((run_dir / "checkpoints" / "quarantine").iterdir())


def test_a_killed_checkpoint_write_restarts_from_the_previous_one(tmp_path, env):
    rec, _ = run_fake(tmp_path, "checkpoint_crash@20")
    assert_finished(rec, ["crash", "completed"])
    assert rec["attempts"][0]["signal_name"] == "SIGKILL"
    assert rec["attempts"][1]["resumed_from"]["step"] == 10


def test_a_checkpoint_killed_before_its_rename_is_put_in_place_before_the_next_start(
        tmp_path, env):
    """A kill between the manifest and the rename leaves a complete `.tmp-step-N-PID`: the
    supervisor puts it in place when the worker has ended, so the next attempt's checkpoint
    choice sees step N (the fake worker, unlike the real one, never cleans up itself; the
    chaos campaign's corrupt_bitflip damaged step 20 while a race made step 30 appear)."""
    env.setenv("OVERNIGHT_INJECT", "checkpoint_unrenamed@20")
    rec, run_dir = run_fake(tmp_path)
    assert_finished(rec, ["crash", "completed"])
    assert rec["attempts"][0]["signal_name"] == "SIGKILL"
    assert rec["attempts"][1]["resumed_from"]["step"] == 20
    restored = [e["names"] for e in events(run_dir, "checkpoint_leftovers_removed")]
    assert restored == [[next(n for n in restored[0] if n.endswith("-> step-0000020"))]]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_invalid_checkpoints_are_quarantined_never_deleted(tmp_path, env):
    run_dir = tmp_path / "run"
    bad = RunDir(run_dir).checkpoint_dir(30)
    bad.mkdir(parents=True)
    (bad / "adapters.safetensors").write_bytes(b"half")
    rec, _ = run_fake(tmp_path)
    assert_finished(rec, ["completed"])
    assert rec["attempts"][0]["resumed_from"] is None
    q = rec["quarantined"][0]
    assert q["checkpoint"] == "step-0000030" and "manifest" in q["reason"]
    assert (run_dir / "checkpoints" / "quarantine").is_dir()
    assert any(p.name.startswith("step-0000030") for p in
               (run_dir / "checkpoints" / "quarantine").iterdir())


def test_memory_limit_causes_planned_restarts_not_failures(tmp_path, env):
    env.setenv("FAKE_LEAK_MB", "5")
    rec, _ = run_fake(tmp_path, supervisor={"memory_limit_mb": 150, "memory_growth": 0,
                                            "sample_interval": 0.1})
    classes = [a["classification"] for a in rec["attempts"]]
    assert rec["state"] == "finished" and rec["final_step"] == ITERS
    assert classes[-1] == "completed" and set(classes[:-1]) == {"planned_restart"}
    assert rec["totals"]["failures"] == 0 and rec["totals"]["planned_restarts"] >= 1
    assert "memory_limit_mb" in rec["attempts"][0]["detail"]


def test_early_stopping_ends_the_run_and_on_exit_is_told(tmp_path, env):
    env.setenv("FAKE_EARLY_STOP_AT", "25")
    out = tmp_path / "on_exit.txt"
    rec, _ = run_fake(tmp_path, supervisor={
        "on_exit": f'echo "$OVERNIGHT_STATE|$OVERNIGHT_FINAL_STEP|$OVERNIGHT_REASON" > {out}'})
    assert rec["state"] == "early_stopped" and rec["final_step"] == 25
    assert [a["classification"] for a in rec["attempts"]] == ["early_stopped"]
    assert out.read_text().strip() == (
        "early_stopped|25|early stopping: no improvement for 5 evals")


def test_bad_config_gives_up_at_once_with_one_clear_line(tmp_path, env, capsys):
    config = write_config(tmp_path, data=str(tmp_path / "missing"))
    assert run_inprocess(config, tmp_path / "run") == 0
    rec = record(tmp_path / "run")
    assert rec["state"] == "gave_up" and len(rec["attempts"]) == 1
    assert rec["attempts"][0]["classification"] == "bad_config"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("overnight run: gave_up: bad config or data: data:"), last
    assert "directory not found" in last


def test_the_same_crash_twice_without_progress_gives_up(tmp_path, env):
    config = write_config(tmp_path, supervisor={
        "worker_command": [sys.executable, "-c", "import sys; sys.exit(3)"]})
    assert run_inprocess(config, tmp_path / "run") == 0
    rec = record(tmp_path / "run")
    assert rec["state"] == "gave_up" and "twice" in rec["reason"]
    assert [a["classification"] for a in rec["attempts"]] == ["crash", "crash"]


def test_an_unreadable_config_fails_before_anything_starts(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("iters: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        run_inprocess(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_completed_run_is_not_run_again(tmp_path, env):
    rec, run_dir = run_fake(tmp_path)
    assert_finished(rec, ["completed"])
    config = write_config(tmp_path, iters=ITERS)
    assert run_inprocess(config, run_dir) == 0
    again = record(run_dir)
    assert again["state"] == "finished" and len(again["attempts"]) == 1
    assert again["supervisor"]["starts"] == 2


def test_an_orphaned_worker_is_stopped_before_the_run_resumes(tmp_path, env):
    config = write_config(tmp_path, iters=ITERS)
    run_dir = tmp_path / "run"
    RunDir(run_dir).create()
    orphan = subprocess.Popen(
        [sys.executable, str(FAKE), "train", str(config), "--run-dir", str(run_dir),
         "--telemetry", f"ipc://{tmp_path}/nobody", "--attempt", "1", "--fresh"],
        env={**os.environ, "FAKE_STEP_SECONDS": "0.1"}, start_new_session=True)
    wait_for(lambda: (run_dir / "fake.log").exists())
    assert run_inprocess(config, run_dir) == 0
    orphan.wait(5)  # (psutil already reaped it: it is our child here, not in real life)
    ends = [line for line in (run_dir / "fake.log").read_text().splitlines()
            if line.startswith(f"end {orphan.pid} ")]
    assert ends[0].endswith(" 23")  # SIGTERM: it saved a checkpoint and left
    assert [e["worker_pid"] for e in events(run_dir, "orphan_found")] == [orphan.pid]
    assert record(run_dir)["state"] == "finished"
    spans = sorted(worker_intervals(run_dir), key=lambda s: s[1])
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(spans)), spans


# ---- the supervisor as its own process -----------------------------------------------------


def slow_env() -> dict[str, str]:
    return {"FAKE_STEP_SECONDS": "0.05", "FAKE_HEARTBEAT": "0.2"}


def test_live_control_status_checkpoint_stop_and_a_second_supervisor_refused(tmp_path, capsys):
    config = write_config(tmp_path, iters=400, save_every=1000)  # only requested checkpoints
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, slow_env())
    try:
        wait_for(lambda: (run_dir / "run.json").exists() and record(run_dir)["state"]
                 == "training")
        second = start_daemon(config, run_dir)
        _, err = second.communicate(timeout=20)
        assert second.returncode == 78
        assert f"run directory is in use by supervisor PID {sup.pid}" in err.decode()

        run = RunDir(run_dir)
        status = control_client.request(run, "status").data
        assert status["state"] == "training" and status["supervisor_pid"] == sup.pid
        reply = control_client.request(run, "checkpoint")
        assert reply.ok
        wait_for(lambda: events(run_dir, "checkpoint_saved"))
        reply = control_client.request(run, "stop")
        assert reply.ok and reply.data["state"] == "stopping"
        assert sup.wait(20) == 0
    finally:
        sup.kill()
    rec = record(run_dir)
    assert rec["state"] == "stopped" and rec["attempts"][-1]["classification"] == (
        "graceful_stop")
    assert rec["latest_checkpoint"]["step"] == rec["final_step"]
    args = type("A", (), {"run_dir": run_dir, "json": False, "timeout": 0.5})()
    control_client.main_status(args)
    assert "stopped" in capsys.readouterr().out


def test_sigterm_to_the_supervisor_is_a_graceful_stop(tmp_path):
    config = write_config(tmp_path, iters=400)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, slow_env())
    try:
        wait_for(lambda: (run_dir / "run.json").exists() and record(run_dir)["state"]
                 == "training")
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) == 0
    finally:
        sup.kill()
    rec = record(run_dir)
    assert rec["state"] == "stopped" and rec["worker"] is None
    assert rec["attempts"][-1]["classification"] == "graceful_stop"
    assert rec["latest_checkpoint"]["step"] == rec["final_step"]


def test_a_killed_supervisor_restarted_resumes_without_a_second_worker(tmp_path):
    config = write_config(tmp_path, iters=100)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, {"FAKE_STEP_SECONDS": "0.03"})
    wait_for(lambda: (run_dir / "run.json").exists() and record(run_dir)["final_step"] >= 20)
    sup.kill()  # SIGKILL: no cleanup; the worker gets SIGTERM from the kernel (PDEATHSIG)
    sup.wait()
    t0 = time.monotonic()
    again = start_daemon(config, run_dir, {"FAKE_STEP_SECONDS": "0.03"})
    try:
        assert again.wait(60) == 0
    finally:
        again.kill()
    assert time.monotonic() - t0 < 30
    rec = record(run_dir)
    assert rec["state"] == "finished" and rec["final_step"] == 100
    assert rec["supervisor"]["starts"] == 2
    assert rec["attempts"][0]["action"] == "abandoned"
    assert rec["attempts"][1]["resumed_from"]["step"] >= 20
    spans = sorted(worker_intervals(run_dir), key=lambda s: s[1])
    assert len(spans) == 2 and spans[0][2] <= spans[1][1], spans


def test_the_report_of_a_finished_run_without_its_adapters_names_the_newest_checkpoint(
        tmp_path, env):
    """The fake worker writes checkpoints but no adapters/ (like a run whose adapters/ was
    deleted): the report said "The run did not finish" under "finished 40/40 steps"."""
    from tests.conftest import overnight

    rec, run_dir = run_fake(tmp_path)
    assert_finished(rec, ["completed"])
    done = overnight("report", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    use = (run_dir / "report.md").read_text().split("## Use the result")[1].split("```")[0]
    assert use.strip().startswith(
        f"No final adapters in `{run_dir / 'adapters'}`: the newest checkpoint (step 40) has "
        f"usable adapters: `{run_dir / 'checkpoints' / 'step-0000040'}`.")
