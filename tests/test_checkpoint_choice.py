"""supervisor/daemon/checkpoint_choice.py: which checkpoint the next attempt resumes from —
chosen without moving anything, validated once per start off the loop thread (the control
socket and the systemd watchdog stay live while a large checkpoint hashes), and handed to the
worker by manifest hash."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
from pathlib import Path

from shared import checkpoint as ckpt
from shared.layout import RunDir
from supervisor.daemon.checkpoint_choice import ThreadJob, choose
from supervisor.morning import status as control_client
from tests.checkpoint_support import trainer_state
from tests.supervisor_support import events, record, start_daemon, wait_for, write_config
from tests.test_checkpoint import write

VALIDATION_SECONDS = 2.5  # how long the large checkpoint should take to validate here


def test_choose_only_reads_and_says_what_to_move_aside(tmp_path):
    for step in (10, 20, 30, 40):
        write(tmp_path, step)
    (tmp_path / "step-0000020" / ckpt.MANIFEST).unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    plain = choose(tmp_path, None)
    assert plain.found is not None and plain.found[0].step == 40 and plain.found[1].ok
    assert plain.invalid == () and plain.set_aside == ()
    rollback = choose(tmp_path, 35)  # resume before step 35: 30 is newest; 40 goes aside
    assert rollback.found is not None and rollback.found[0].step == 30
    assert [i.step for i, _ in rollback.set_aside] == [40]
    assert "first bad step 35" in rollback.set_aside[0][1]
    assert [i.step for i, _ in choose(tmp_path, 25).invalid] == [20]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing moved


def test_a_thread_job_wakes_the_loop_and_hands_over_the_choice_or_the_error(tmp_path):
    woken: list[float] = []
    write(tmp_path, 10)
    job = ThreadJob(lambda: choose(tmp_path, None), lambda: woken.append(time.monotonic()))
    wait_for(job.done, timeout=10)
    assert woken and job.result().found is not None

    def fails():
        raise OSError("disk gone")

    failing = ThreadJob(fails, lambda: None)  # type: ignore[arg-type]
    wait_for(failing.done, timeout=10)
    try:
        failing.result()
    except OSError as e:
        assert str(e) == "disk gone"
    else:
        raise AssertionError("the job's error was swallowed")


def floats_to_hash_for(seconds: float) -> int:
    """How many float32s this machine hashes in about `seconds` (measured on 64 MB)."""
    block = bytes(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(block).digest()
    rate = len(block) / (time.perf_counter() - t0)
    return min(int(rate * seconds) // 4, 1 << 30)  # at most 4 GB (sparse: no disk used)


def large_checkpoint(run: RunDir, step: int, total: int) -> Path:
    """A valid checkpoint whose adapters file is zeros, big enough for validation (hashes and
    the finite check) to take a few seconds here; 0.5-4 GB, written sparse."""
    n = max(floats_to_hash_for(VALIDATION_SECONDS), 128 << 20)

    def files(tmp: Path) -> None:
        header = json.dumps({"lora_a": {"dtype": "F32", "shape": [n],
                                        "data_offsets": [0, 4 * n]}}).encode()
        with open(tmp / ckpt.ADAPTERS, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + 4 * n)
        small = json.dumps({"m": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
        (tmp / ckpt.OPTIMIZER).write_bytes(struct.pack("<Q", len(small)) + small.encode()
                                           + b"\0" * 4)
        (tmp / ckpt.ADAPTER_CONFIG).write_text("{}")
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state(step, total).to_dict()))

    return ckpt.write_checkpoint(run.checkpoints, step, files)


def test_the_loop_stays_live_while_a_large_checkpoint_is_validated(tmp_path):
    config = write_config(tmp_path, iters=20)
    run = RunDir(tmp_path / "run")
    run.create()
    large_checkpoint(run, 10, 20)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.05)
    sup = start_daemon(config, run.root, {"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                          "WATCHDOG_USEC": "1000000",  # pings every 0.5 s
                                          "FAKE_STEP_SECONDS": "0.02"})
    pings: list[float] = []
    replies: list[tuple[float, float, str, int | None]] = []  # (asked, answered, state, pid)
    try:
        deadline = time.monotonic() + 60
        while sup.poll() is None and time.monotonic() < deadline:
            try:
                msg = notify.recv(4096)
                if msg == b"WATCHDOG=1":
                    pings.append(time.time())
            except TimeoutError:
                pass
            if not replies and (run.root / "logs" / "supervisor.jsonl").exists() \
                    and events(run.root, "checkpoint_validation_started") \
                    and not events(run.root, "checkpoint_validated"):
                asked = time.time()
                try:
                    data = control_client.request(run, "status", timeout=1.0).data
                    replies.append((asked, time.time(), data["state"], data["worker_pid"]))
                except control_client.NoSupervisor:
                    replies.append((asked, time.time(), "no answer", None))
        assert sup.wait(30) == 0, sup.stderr.read().decode()[-2000:] if sup.stderr else ""
    finally:
        sup.kill()
        notify.close()
    validated = events(run.root, "checkpoint_validated")
    assert len(validated) == 1 and validated[0]["step"] == 10  # once for this start
    seconds = validated[0]["seconds"]
    done_at = _epoch(validated[0]["timestamp"])
    # from the event the test waited for (the thread's own `seconds` starts a little later,
    # and the loop logs `checkpoint_validated` when it picks the result up: under load the
    # difference is milliseconds either way)
    began_at = _epoch(events(run.root, "checkpoint_validation_started")[0]["timestamp"])
    assert seconds > 1.5, f"validation took only {seconds} s: the test proves nothing"
    # a control request made while it hashed was answered at once (state: starting, no worker)
    assert replies, "no status request was made during the validation"
    asked, answered, state, pid = replies[0]
    assert began_at <= asked < done_at and answered - asked < 0.5, replies
    assert (state, pid) == ("starting", None)
    # the watchdog was sent every half interval all along
    during = [t for t in pings if began_at <= t <= done_at]
    gaps = [b - a for a, b in zip([began_at, *during], [*during, done_at], strict=True)]
    assert max(gaps) < 0.9, gaps
    # the worker trusted the supervisor's validation (manifest hash), it did not redo it
    fake = (run.root / "fake.log").read_text()
    assert " trusted" in fake and " full" not in fake
    assert record(run.root)["attempts"][0]["resumed_from"]["step"] == 10


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
