"""supervisor/daemon/early_start.py and shared/resume_handoff.py: the next worker starts (imports,
loads its model) while the supervisor validates the checkpoint; it learns where to resume from
over a pipe before it needs to, and a supervisor that dies or stops meanwhile leaves no worker
waiting. Real pipes, real processes (the scripted worker, tests/fake_worker.py, reads the same
handoff as the real one), a checkpoint large enough to take seconds to validate."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from shared.layout import RunDir
from shared.resume_handoff import Handoff, HandoffError, receive, send
from tests.supervisor_support import events, record, start_daemon, wait_for, write_config
from tests.test_checkpoint_choice import _epoch, large_checkpoint

# ---- the handoff over a real pipe ------------------------------------------------------------

def test_the_handoff_crosses_a_pipe_and_reads_as_the_command_line_would() -> None:
    r, w = os.pipe()
    sent = Handoff("/runs/a/checkpoints/step-0000250", "ab" * 32, 3, (12, 40))
    assert send(w, sent)
    assert receive(r, lambda: False, limit=5) == sent
    assert sent.encode() == (b'{"v": 1, "resume": "/runs/a/checkpoints/step-0000250", '
                             b'"validated": "' + b"ab" * 32 + b'", "skip_steps": 3, '
                             b'"skip_positions": [12, 40]}\n')


def test_end_of_file_or_a_stop_means_no_start_and_silence_is_bounded() -> None:
    r, w = os.pipe()
    os.close(w)  # the supervisor died (the kernel closes its end) or decided against it
    assert receive(r, lambda: False, limit=5) is None
    r, w = os.pipe()
    t0 = time.monotonic()
    assert receive(r, lambda: time.monotonic() - t0 > 0.3, limit=5, poll=0.05) is None
    r, w = os.pipe()  # the supervisor alive but silent: bounded by startup_timeout
    with pytest.raises(HandoffError, match=r"within 0\.3 s \(supervisor\.startup_timeout\)"):
        receive(r, lambda: False, limit=0.3, poll=0.05)
    os.close(w)


@pytest.mark.parametrize("line, message", [
    (b"not json\n", "not strict JSON"),
    (b'{"v": 2, "resume": "auto", "validated": null, "skip_steps": 0, "skip_positions": []}\n',
     '"v": 1'),
    (b'{"v": 1, "resume": "", "validated": null, "skip_steps": 0, "skip_positions": []}\n',
     "resume: expected a path or 'auto'"),
    (b'{"v": 1, "resume": "auto", "validated": null, "skip_steps": -1, "skip_positions": []}\n',
     "skip_steps: expected an integer >= 0"),
    (b'{"v": 1, "resume": "auto", "validated": null, "skip_steps": 0, "skip_positions": [1.5]}\n',
     "skip_positions: expected integers >= 0"),
    (b'{"v": 1, "resume": "auto", "validated": null, "skip_steps": 0, "skip_positions": [],'
     b' "x": 1}\n', "unexpected keys"),
])
def test_a_bad_line_is_one_error_naming_what_is_wrong(line: bytes, message: str) -> None:
    r, w = os.pipe()
    os.write(w, line)
    with pytest.raises(HandoffError, match=message):
        receive(r, lambda: False, limit=5)
    os.close(w)


# ---- the supervisor and its early worker -----------------------------------------------------

def _fake_log(run: RunDir) -> list[list[str]]:
    path = run.root / "fake.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _large_run(tmp_path: Path) -> tuple[Path, RunDir]:
    config = write_config(tmp_path, iters=20)
    run = RunDir(tmp_path / "run")
    run.create()
    large_checkpoint(run, 10, 20)
    return config, run


def test_the_worker_is_running_before_a_large_checkpoint_is_validated(tmp_path: Path) -> None:
    config, run = _large_run(tmp_path)
    sup = start_daemon(config, run.root, {"FAKE_STEP_SECONDS": "0.02"})
    try:
        assert sup.wait(90) == 0, sup.stderr.read().decode()[-2000:] if sup.stderr else ""
    finally:
        sup.kill()
    validated = events(run.root, "checkpoint_validated")
    assert len(validated) == 1 and validated[0]["step"] == 10
    assert validated[0]["seconds"] > 1.5, "validation was too quick: the test proves nothing"
    done_at = _epoch(validated[0]["timestamp"])
    fake = _fake_log(run)
    start = next(x for x in fake if x[0] == "start")
    awaiting = next(x for x in fake if x[0] == "awaiting")
    handoff = next(x for x in fake if x[0] == "handoff")
    # started and done loading (FAKE_LOAD_SECONDS) while the validation still ran ...
    assert float(start[2]) < float(awaiting[2]) < done_at - 1.0
    # ... and told where to resume once it was done: the checkpoint the supervisor validated,
    # which the worker then trusted (manifest hash) instead of hashing it again
    assert float(handoff[2]) >= done_at - 0.05
    assert handoff[3] == str(run.checkpoints / "step-0000010")
    assert any(x[0] == "validated" and x[3] == "trusted" for x in fake)
    attempt = record(run.root)["attempts"][0]
    assert attempt["pid"] == int(start[1]) and attempt["resumed_from"]["step"] == 10
    # run.json's argv is the command line that starts this attempt by hand
    assert "--resume-fd" not in attempt["argv"]
    assert attempt["argv"][attempt["argv"].index("--resume") + 1] == str(
        run.checkpoints / "step-0000010")
    early = events(run.root, "worker_started_early")
    assert early and "--resume-fd" in early[0]["argv"]
    # its heartbeats while it waited were expected, not counted as forged
    assert events(run.root, "telemetry_rejected") == []


def _wait_awaiting(run: RunDir) -> int:
    line = wait_for(lambda: next((x for x in _fake_log(run) if x[0] == "awaiting"), None), 60)
    return int(line[1])


def test_a_stop_while_validating_stops_the_early_worker_which_wrote_nothing(
        tmp_path: Path) -> None:
    config, run = _large_run(tmp_path)
    sup = start_daemon(config, run.root)
    try:
        pid = _wait_awaiting(run)
        assert not events(run.root, "checkpoint_validated")  # still validating
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
    finally:
        sup.kill()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    rec = record(run.root)
    assert rec["state"] == "stopped" and rec["attempts"] == []
    assert [x[0] for x in _fake_log(run)][-2:] == ["handoff_closed", "end"]
    # it reads the pipe's end-of-file and leaves ("gone"), or the SIGTERM sent right after
    # the close reaches it first ("terminated"): either way it stopped, nothing trained
    assert [e["how"] for e in events(run.root, "worker_start_abandoned")] in (
        ["terminated"], ["gone"])
    assert not (run.root / "logs" / "metrics.jsonl").exists()


def test_a_killed_supervisor_leaves_no_worker_waiting(tmp_path: Path) -> None:
    config, run = _large_run(tmp_path)
    sup = start_daemon(config, run.root)
    try:
        pid = _wait_awaiting(run)
        proc = psutil.Process(pid)
        sup.send_signal(signal.SIGKILL)
        sup.wait(10)
        t_kill = time.monotonic()
        proc.wait(10)  # the pipe's end-of-file: it leaves at once, nothing trained
        gone_after = time.monotonic() - t_kill
    finally:
        sup.kill()
    assert gone_after < 5.0
    assert "handoff_closed" in [x[0] for x in _fake_log(run)]
    assert not (run.root / "logs" / "metrics.jsonl").exists()


def _night_with(tmp_path: Path, inject: str, env: dict[str, str]) -> tuple[RunDir, dict]:
    """A 20-step run of the scripted worker with one injected fault and a 2 s backoff, to
    its end; its run directory and run.json."""
    config = write_config(tmp_path, iters=20, inject=inject,
                          supervisor={"backoff_initial": 2.0, "backoff_max": 2.0,
                                      "startup_timeout": 20.0})
    run = RunDir(tmp_path / "run")
    sup = start_daemon(config, run.root, {"FAKE_STEP_SECONDS": "0.02", **env})
    try:
        assert sup.wait(90) == 0, sup.stderr.read().decode()[-2000:] if sup.stderr else ""
    finally:
        sup.kill()
    return run, record(run.root)


def test_after_a_crash_the_next_worker_loads_during_the_backoff(tmp_path: Path) -> None:
    """The backoff's seconds hide the next worker's imports and model load: it starts when
    the restart is scheduled, not when the backoff ends, and is told where to resume once
    the backoff is over and the checkpoint validated."""
    run, rec = _night_with(tmp_path, "crash@15", {"FAKE_LOAD_SECONDS": "1"})
    assert [a["classification"] for a in rec["attempts"]] == ["crash", "completed"]
    scheduled = events(run.root, "restart_scheduled")
    assert len(scheduled) == 1 and scheduled[0]["delay_s"] >= 1.6  # 2 s +- 20 %
    backoff_from = _epoch(scheduled[0]["timestamp"])
    backoff_to = backoff_from + scheduled[0]["delay_s"]
    early = [e for e in events(run.root, "worker_started_early") if e["attempt"] == 2]
    assert len(early) == 1
    assert _epoch(early[0]["timestamp"]) < backoff_from + 0.5  # at the start of the backoff
    assert rec["attempts"][1]["pid"] == early[0]["worker_pid"]
    # it loaded meanwhile (FAKE_LOAD_SECONDS) and was told only after the backoff
    handoffs = [float(x[2]) for x in _fake_log(run) if x[0] == "handoff"]
    assert len(handoffs) == 2 and handoffs[1] >= backoff_to - 0.05


def test_after_an_oom_the_next_worker_waits_for_the_backoff_to_end(tmp_path: Path) -> None:
    """An OOM's backoff lets memory settle: no worker holds a model meanwhile."""
    run, rec = _night_with(tmp_path, "oom@15", {})
    assert [a["classification"] for a in rec["attempts"]] == ["oom", "completed"]
    scheduled = events(run.root, "restart_scheduled")
    assert len(scheduled) == 1
    backoff_to = _epoch(scheduled[0]["timestamp"]) + scheduled[0]["delay_s"]
    early = [e for e in events(run.root, "worker_started_early") if e["attempt"] == 2]
    assert len(early) == 1 and _epoch(early[0]["timestamp"]) >= backoff_to - 0.05
