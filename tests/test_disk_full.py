"""A full disk (issue 12): the worker says so and leaves no half-written checkpoint, the
supervisor survives its own failing writes, waits for space without burning restarts, warns
early, and resumes by itself.

Real file systems: a small tmpfs filled with a ballast file (tests/tmpfs_support.py: skipped
where mounting is not allowed) — the worker's, the supervisor's and the logs' writes all get
a real ENOSPC, and MLX its real "[write] Unable to write". The injected fault `disk_full@N`
(worker/inject.py) runs the same recovery everywhere.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import checkpoint as ckpt
from shared import logsetup
from shared.config import SupervisorOptions
from shared.errors import DiskFull
from shared.exitcodes import ExitCode, FailureClass
from shared.run_record import State
from supervisor.daemon.classify import ExitFacts, classify
from supervisor.daemon.diskspace import SpaceWatch
from supervisor.daemon.policy import Outcome, Policy, Settings
from supervisor.daemon.record import RecordKeeper
from tests.conftest import overnight, subprocess_env, write_config
from tests.supervisor_support import ROOT, events, record, wait_for
from tests.test_checkpoint import write as write_checkpoint
from tests.tmpfs_support import fill, free_bytes, small_tmpfs

MIB = 2**20


# ---- the worker's checkpoint ----------------------------------------------------------------


def test_a_failed_checkpoint_write_leaves_no_temp_directory(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)

    def no_space(tmp: Path) -> None:
        (tmp / "adapters.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "adapters.safetensors"))

    with pytest.raises(OSError):
        ckpt.write_checkpoint(tmp_path, 20, no_space)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000010"]


def test_mlx_running_out_of_space_is_a_disk_full_naming_path_and_free_space(tmp_path):
    """On a real full file system MLX raises "[write] Unable to write"; the worker's writer
    turns it into DiskFull (exit 24), removes its temp dir, keeps the older checkpoints."""
    import mlx.core as mx

    from tests.checkpoint_support import trainer_state
    from worker.checkpointing import CheckpointWriter

    with small_tmpfs(tmp_path / "mnt", "1M") as mnt:
        checkpoints = mnt / "checkpoints"
        write_checkpoint(checkpoints, 10)
        fill(mnt / "ballast", leave=64 * 1024)
        writer = CheckpointWriter(checkpoints, keep_last=3, async_save=False)
        adapters = {"a.lora_a": mx.zeros((256, 256))}  # 256 KiB: more than is free
        with pytest.raises(DiskFull) as e:
            writer.save(20, adapters, {"m": mx.zeros((4,))}, {}, trainer_state(20), None,
                        lambda saved: None)
        message = str(e.value)
        assert message.startswith(f"disk full: {checkpoints}: [write] Unable to write"), message
        assert "step 20 checkpoint of 256.0 KiB" in message and "free of 1.0 MiB on " in message
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000010"]
        assert ckpt.validate(checkpoints / "step-0000010").ok


# ---- the supervisor's own writes ------------------------------------------------------------


def test_the_record_survives_a_full_disk_in_memory_and_is_written_when_space_returns(
        tmp_path, capsys):
    now = [100.0]
    with small_tmpfs(tmp_path / "mnt", "1M") as mnt:
        keeper, _ = RecordKeeper.open(mnt / "run.json", "r1", mnt, mnt / "c.yaml", {}, "h")
        keeper.clock = lambda: now[0]
        assert keeper.save()
        ballast = mnt / "ballast"
        fill(ballast)
        keeper.set_state(State.TRAINING, "training started")  # no exception: kept in memory
        assert keeper.unsaved and keeper.record.state is State.TRAINING
        assert json.loads((mnt / "run.json").read_text())["state"] == "starting"
        assert [p.name for p in mnt.iterdir() if ".tmp-" in p.name] == []  # no partial file
        err = capsys.readouterr().err
        assert err.count("cannot write") == 1 and "No space left on device" in err
        assert "0 B free of 1.0 MiB" in err
        keeper.set_state(State.BACKING_OFF, "disk full")  # within the backoff: not tried
        assert keeper.failed_writes == 1
        ballast.unlink()
        assert not keeper.retry()  # the 1 s backoff has not elapsed
        now[0] += 1.0
        assert keeper.retry() and not keeper.unsaved
        on_disk = json.loads((mnt / "run.json").read_text())
        assert on_disk == keeper.record.to_dict() and on_disk["state"] == "backing_off"
        assert "written again after 1 failed attempts" in capsys.readouterr().err


def test_log_lines_survive_a_full_disk_in_order_and_whole(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logsetup, "RETRY_FIRST", 0.0)  # try again at every line
    with small_tmpfs(tmp_path / "mnt", "1M") as mnt:
        path = mnt / "logs" / "supervisor.jsonl"
        logsetup.configure("supervisor", path, console=False)
        try:
            log = logsetup.get("supervisor")
            log.info("before", n=0)
            ballast = mnt / "ballast"
            fill(ballast)
            for n in range(1, 201):
                log.info("while_full", n=n, pad="x" * 200)  # ~80 KiB: more than a page
            ballast.unlink()
            log.info("after", n=201)
        finally:
            logsetup.configure("test", None, console=False)  # closes the file handler
        lines = [json.loads(line) for line in path.read_text().splitlines()]  # none torn
        assert [e["n"] for e in lines] == list(range(202))
        err = capsys.readouterr().err
        assert err.count("cannot write") == 1 and "Logging error" not in err
        assert "written again (" in err


# ---- classification, policy, the space watch ------------------------------------------------


def test_every_way_a_worker_meets_a_full_disk_is_classified_disk_full():
    told = classify(ExitFacts(returncode=24, stopping_reason="disk_full",
                              stopping_detail="disk full: /r/checkpoints: No space left"))
    assert told.failure is FailureClass.DISK_FULL and told.detail.endswith("No space left")
    assert ExitCode.DISK_FULL == 24
    mlx_tail = "Traceback (most recent call last):\n  ...\nRuntimeError: [write] Unable to " \
               "write 8 bytes to file."
    assert classify(ExitFacts(returncode=1, stderr_tail=mlx_tail)).failure \
        is FailureClass.DISK_FULL
    os_tail = "OSError: [Errno 28] No space left on device: '/r/logs/metrics.jsonl'"
    assert classify(ExitFacts(returncode=1, stderr_tail=os_tail)).failure \
        is FailureClass.DISK_FULL
    # its output is on the full disk too: nothing said, but no room for a checkpoint
    silent = classify(ExitFacts(returncode=1, disk_free=4096, disk_needed=117_000))
    assert silent.failure is FailureClass.DISK_FULL and "4.0 KiB free" in silent.detail
    roomy = classify(ExitFacts(returncode=1, disk_free=50 * MIB, disk_needed=117_000))
    assert roomy.failure is FailureClass.CRASH


def test_disk_full_waits_and_never_burns_a_budget():
    policy = Policy(SupervisorOptions(max_failures=2))
    s = Settings(4, 1, False)
    for i in range(5):  # the same ending again and again, without progress
        d = policy.decide(Outcome(FailureClass.DISK_FULL, "disk full: /r: x", 30, 40), s,
                          1000.0 + i)
        assert (d.action, d.verdict.value, d.counted) == ("wait_for_space", "restart", False)
        assert "waiting for free space" in d.reason
    assert policy.failures == [] and policy.streak == 0 and policy.last_failure is None
    crash = policy.decide(Outcome(FailureClass.CRASH, "boom", 40, 40), s, 2000.0)
    assert crash.counted and crash.action == "restart"  # the budgets start from nothing


def test_space_warning_once_per_crossing_and_the_wait(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "4M") as mnt:
        watch = SpaceWatch(mnt, keep_last=3)
        watch.checkpoint = 300 * 1024  # 3 x 300 KiB + margin (409.6 KiB) = 1.3 MiB
        assert watch.check() is None  # 4 MiB free
        ballast = mnt / "ballast"
        fill(ballast, leave=MIB)
        low = watch.check()
        assert low is not None and low.needed == 3 * 300 * 1024 + 4 * MIB // 10
        assert low.free <= MIB + 64 * 1024
        assert watch.check() is None and watch.check() is None  # once per crossing
        ballast.unlink()
        assert watch.check() is None  # above again: re-armed
        fill(ballast, leave=MIB)
        assert watch.check() is not None
        # waiting after a disk_full ending: one checkpoint + the margin
        assert watch.start_waiting(40) == 300 * 1024 + 4 * MIB // 10
        assert watch.ready() == (True, free_bytes(mnt))  # 1 MiB free is enough
        assert watch.start_waiting(40) == 2 * (300 * 1024 + 4 * MIB // 10)  # again: more
        fill(ballast)
        assert watch.ready()[0] is False
        ballast.unlink()
        assert watch.ready()[0] is True and watch.waiting_for == 0


# ---- end to end -----------------------------------------------------------------------------

FAST = {"heartbeat_timeout": 20.0, "startup_timeout": 120.0, "stop_timeout": 10.0,
        "backoff_initial": 0.2, "backoff_max": 1.0, "caffeinate": False}


def supervise(config: Path, run_dir: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir", str(run_dir)],
        cwd=ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def live_status(run_dir: Path) -> dict:
    out = overnight("status", str(run_dir), "--json", timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}


@pytest.mark.slow
def test_a_full_disk_is_waited_out_and_the_run_finishes(tmp_path, tiny_model, corpus):
    """The whole night on a 4 MiB tmpfs: the early warning while space runs short, the disk
    filled up under the running worker, the supervisor alive and waiting (no restarts),
    the ballast deleted, the run resumed by itself and finished; nothing half-written."""
    with small_tmpfs(tmp_path / "mnt", "4M") as mnt:
        run_dir = mnt / "run"
        config = write_config(tmp_path / "full.yaml", tiny_model, corpus, iters=200,
                              steps_per_eval=50, supervisor=FAST)
        sup = supervise(config, run_dir)
        try:
            wait_for(lambda: (run_dir / "run.json").exists()
                     and record(run_dir)["final_step"] >= 20, timeout=120)
            ballast = mnt / "ballast"
            fill(ballast, leave=600 * 1024)  # below 3 checkpoints + margin, above one
            wait_for(lambda: events(run_dir, "disk_space_low"), timeout=30)
            fill(ballast)  # now nothing is left: the next checkpoint cannot be written
            waiting = wait_for(lambda: (s := live_status(run_dir)).get("state") ==
                               "backing_off" and s, timeout=60)
            assert "disk full: " in waiting["reason"] and " free of 4.0 MiB on " in \
                waiting["reason"], waiting["reason"]
            time.sleep(6)  # longer than a poll: still waiting, no attempt burned
            assert sup.poll() is None, sup.stderr.read() if sup.stderr else ""
            still = live_status(run_dir)
            assert still["state"] == "backing_off" and still["attempts"] == 1
            checkpoints = run_dir / "checkpoints"
            assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []
            ballast.unlink()
            _, err = sup.communicate(timeout=180)
        finally:
            if sup.poll() is None:
                sup.send_signal(signal.SIGKILL)
                sup.wait()
        assert sup.returncode == 0, err[-3000:]
        rec = record(run_dir)
        assert rec["state"] == "finished" and rec["final_step"] == 200, rec["reason"]
        attempts = rec["attempts"]
        assert [(a["classification"], a["action"]) for a in attempts] == [
            ("disk_full", "wait_for_space"), ("completed", "finish")]
        assert attempts[0]["exit_code"] == 24
        assert attempts[1]["resumed_from"]["step"] >= 20
        assert len(events(run_dir, "disk_space_low")) == 1  # once per crossing
        assert events(run_dir, "disk_space_returned")
        assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())
        assert not list(run_dir.glob(".run.json.tmp-*"))
        assert all(ckpt.validate(c.path).ok for c in ckpt.list_checkpoints(run_dir /
                                                                           "checkpoints"))
        assert err.strip().splitlines()[-1] == "overnight run: finished: all steps done"


def test_an_injected_disk_full_is_waited_for_and_resumed(tmp_path, tiny_model, corpus):
    """Where no tmpfs can be mounted the same recovery runs on `disk_full@N` (real worker,
    real supervisor): exit 24 with the one line, wait_for_space, resumed, finished."""
    config = write_config(tmp_path / "inj.yaml", tiny_model, corpus, iters=30,
                          supervisor=FAST)
    run_dir = tmp_path / "run"
    sup = supervise(config, run_dir, OVERNIGHT_INJECT="disk_full@15")
    _, err = sup.communicate(timeout=240)
    assert sup.returncode == 0, err[-3000:]
    rec = record(run_dir)
    assert rec["state"] == "finished" and rec["final_step"] == 30
    first = rec["attempts"][0]
    assert (first["classification"], first["action"], first["exit_code"]) == (
        "disk_full", "wait_for_space", 24)
    assert first["detail"].startswith("disk full: ") and "step 20 checkpoint" in first["detail"]
    assert "overnight train: disk full: " in first["stderr_tail"]
    assert rec["totals"]["attempts"] == 2
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())
