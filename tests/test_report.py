"""supervisor/report.py, verdict.py, runfacts.py: the morning report of a real supervised run
(a crash and a hang), of the same run without its run.json (`overnight train` alone), and
verdicts for recorded situations (OOM with a smaller micro-batch, rollback, giving up)."""

from __future__ import annotations

import base64
import json
import re
import struct
import sys
from pathlib import Path

import pytest

from shared import cli, run_record
from shared.protocol import Phase
from shared.run_record import RunRecord, State
from supervisor.daemon.control import RunStatus
from supervisor.morning.report_doc import Table, to_markdown
from supervisor.morning.runfacts import gather
from supervisor.morning.verdict import describe, duration, progress_line, verdict
from tests.report_support import CRASH_AT, HANG_AT, ITERS, copy_run, supervised_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, tiny_model, corpus) -> Path:
    return supervised_run(tmp_path_factory, tiny_model, corpus)


@pytest.fixture(scope="module")
def reported(real_run, tmp_path_factory) -> tuple[Path, str, str]:
    """A copy of the real run with `overnight report` run on it: (run, stdout, stderr)."""
    run = copy_run(real_run, tmp_path_factory.mktemp("reported") / "run")
    out, err = _report(run)
    return run, out, err


def _report(*argv: object) -> tuple[str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["report", *map(str, argv)])
    assert code == 0, err.getvalue()
    return out.getvalue(), err.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def crash_step(run: Path) -> int:
    rec = json.loads((run / "run.json").read_text())
    return rec["attempts"][0]["end_step"]


# ---- the real run ------------------------------------------------------------------------


def test_the_report_starts_with_the_verdict(reported):
    run, out, _ = reported
    first = out.splitlines()[0]
    crash = crash_step(run)
    assert re.fullmatch(
        rf"# ✅ finished {ITERS}/{ITERS} steps in \S+; 2 restarts \(injected crash at {crash}; "
        rf"injected hang at {HANG_AT}\); best val \d\.\d{{3}} at step \d+", first), first
    assert CRASH_AT - 1 <= crash <= CRASH_AT
    assert (run / "report.md").read_text() == out


def test_the_picture_is_a_real_png_of_sensible_size(reported):
    run, out, err = reported
    data = (run / "report.png").read_bytes()
    assert png_size(data) == (1200, 800)
    assert 30_000 < len(data) < 1_000_000
    from PIL import Image

    with Image.open(run / "report.png") as im:
        im.verify()
    assert "![loss, progress and memory](report.png)" in out
    assert f"picture: {run / 'report.png'}" in err


def test_the_timeline_tells_each_attempt_and_what_the_supervisor_did(reported):
    _, out, _ = reported
    table = out.split("## What happened")[1].split("##")[0]
    rows = [r for r in table.splitlines() if re.match(r"\|\s+\d+ \|", r)]
    assert len(rows) == 3
    assert f"**crash** (injected: `crash@{CRASH_AT}`): killed by SIGABRT" in rows[0]
    assert "restart after" in rows[0]
    assert "from checkpoint 20" in rows[1]
    assert f"**hang** (injected: `hang@{HANG_AT}`): no heartbeat" in rows[1]
    assert "(noticed after 3.0s)" in rows[1]
    assert f"from checkpoint {HANG_AT}" in rows[2] and "**completed**" in rows[2]
    assert rows[2].rstrip(" |").endswith("finish")


def test_failures_numbers_and_commands(reported, tiny_model):
    run, out, _ = reported
    assert "**Attempt 1: injected crash at step" in out
    assert "Command buffer execution failed" in out
    assert "**Attempt 2: injected hang at step" in out
    assert re.search(r"time lost to failures \| \S+ \(\d+% of the wall time\): noticing 3\.0s, "
                     r"restarting \S+, redoing \d+ steps", out)
    assert re.search(r"throughput +\| [\d,]+ / [\d,]+ / [\d,]+ tokens/s by attempt", out)
    assert "1 malformed in `train.jsonl`" in out
    assert "no growth within an attempt" in out
    assert f"mlx_lm generate --model {tiny_model} --adapter-path {run / 'adapters'}" in out
    assert f"mlx_lm fuse --model {tiny_model} --adapter-path {run / 'adapters'}" in out
    assert "### ETA accuracy" in out


def test_html_is_one_file_with_the_picture_inside(real_run, tmp_path):
    run = copy_run(real_run, tmp_path / "run")
    out, _ = _report(run, "--format", "html", "--quiet")
    assert out.startswith(f"finished {ITERS}/{ITERS} steps")
    page = (run / "report.html").read_text()
    assert not (run / "report.png").exists()
    src = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert src is not None and png_size(base64.b64decode(src.group(1))) == (1200, 800)
    assert "<table>" in page and "<h1>✅ finished" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing outside the file


def test_without_matplotlib_the_report_is_text_only_and_says_why(real_run, tmp_path,
                                                                 monkeypatch):
    run = copy_run(real_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out, err = _report(run)
    assert out.startswith("# ✅ finished")
    assert "matplotlib is not installed" in err and "mlx-overnight[report]" in err
    assert "matplotlib is not installed" in out and "](report.png)" not in out
    assert not (run / "report.png").exists() and (run / "report.md").exists()


def test_a_run_without_run_json_is_reported_from_its_logs(real_run, tmp_path):
    run = copy_run(real_run, tmp_path / "run")
    (run / "run.json").unlink()
    out, _ = _report(run)
    first = out.splitlines()[0]
    assert f"finished {ITERS}/{ITERS} steps" in first
    assert "(overnight train, no supervisor)" in first
    # attempt 1 aborted without a word after saying it would (an injected crash); attempt 2
    # was stopped (SIGTERM) after its hang: from the logs alone, a stop on request
    assert re.search(rf"2 restarts by hand: 1 after a failure \(injected crash at \d+\), 1 "
                     rf"planned \(stop on request at {HANG_AT}\)", first), first
    assert "`overnight train` alone (no run.json)" in out
    assert "1 malformed in `train.jsonl`" in out
    assert png_size((run / "report.png").read_bytes()) == (1200, 800)


def test_status_api_verdict_and_progress_line(real_run):
    record = run_record.load(real_run / "run.json")
    assert record is not None
    assert verdict(real_run, record) == describe(gather(real_run))
    assert verdict(real_run, None).startswith(f"finished {ITERS}/{ITERS}")  # from the logs
    live = RunStatus(
        run_id=record.run_id, run_dir=str(real_run), state=State.TRAINING, reason="",
        supervisor_pid=1, worker_pid=2, attempt=3, phase=Phase.TRAINING, step=42,
        total_steps=ITERS, last_heartbeat_s=0.1, tokens_per_sec=None, rss_mb=None,
        mlx_mb=None, overrides={}, latest_checkpoint=None, best_checkpoint=None,
        restart_in_s=None, attempts=3, failures=2)
    text = verdict(real_run, record, live)
    assert text.startswith(f"training: step 42/{ITERS} (70%), running for")
    assert "2 restarts (injected crash at" in text  # attempts from run.json
    line = progress_line(real_run, record.total_steps, record.latest_checkpoint,
                         record.best_checkpoint)
    assert line is not None and line.startswith(f"Training: 100% | step {ITERS}/{ITERS} | loss=")
    assert "ckpt=-0" in line and "val=" in line


def test_a_missing_run_dir_is_one_line_and_exit_78(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 78
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"overnight report: {tmp_path / 'nope'}: no such run " \
                                        "directory"


# ---- recorded situations -----------------------------------------------------------------


def attempt(n: int, cls: str | None, start: int, end: int, action: str | None, **extra):
    base = {"attempt": n, "pid": 100 + n, "argv": [], "log": f"logs/worker-{n}.log",
            "started": f"2025-01-02T0{n}:00:00.000+00:00",
            "ended": None if cls is None else f"2025-01-02T0{n}:30:00.000+00:00",
            "start_reason": "", "skip_steps": 0, "lr_scale": None, "settings": {},
            "steps_gained": end - start,
            "classification": cls, "start_step": start, "end_step": end, "action": action,
            "detail": f"{cls} detail",
            "resumed_from": {"step": start, "path": f"step-{start}"} if start else None}
    return {**base, **extra}


def record(attempts: list[dict], state: str = "finished", **extra) -> RunRecord:
    return run_record.decode({
        "schema_version": 1, "run_id": "night", "run_dir": "/runs/night",
        "config_path": "/night.yaml", "config": {}, "config_hash": "h",
        "supervisor": {"pid": 1, "host": "h", "started": "2025-01-02T01:00:00.000+00:00",
                       "starts": 1},
        "state": state, "reason": "",
        "created": "2025-01-02T01:00:00.000+00:00",
        "ended": "2025-01-02T08:42:00.000+00:00" if state != "training" else None,
        "final_step": attempts[-1]["end_step"] if attempts else 0, "total_steps": 2000,
        "best_checkpoint": {"step": 1750, "val_loss": 1.8412, "path": None},
        "attempts": attempts, **extra})


def test_verdict_names_oom_with_the_smaller_micro_batch_and_the_hang(tmp_path):
    rec = record([
        attempt(1, "oom", 0, 812, "reduce_memory",
                settings_changed={"batch_size": [8, 4], "grad_accumulation_steps": [1, 2]}),
        attempt(2, "hang", 800, 1530, "restart"),
        attempt(3, "completed", 1500, 2000, "finish"),
    ])
    assert verdict(tmp_path, rec) == (
        "finished 2000/2000 steps in 7h42m; 2 restarts (OOM at 812 → micro-batch 8→4, "
        "accumulation 1→2; hang at 1530); best val 1.841 at step 1750")


def test_verdict_names_a_rollback_and_a_lower_learning_rate(tmp_path):
    rec = record([attempt(1, "non_finite", 0, 512, "rollback"),
                  attempt(2, "completed", 500, 2000, "finish", lr_scale=0.5)])
    assert "NaN loss at 512 → rolled back to 500, lr ×0.5" in verdict(tmp_path, rec)


def test_verdict_of_a_run_that_gave_up_or_is_still_training(tmp_path):
    rec = record([attempt(1, "crash", 0, 40, "restart"), attempt(2, "crash", 0, 40, "give_up")],
                 state="gave_up", reason="crash twice at step 40 without progress")
    text = verdict(tmp_path, rec)
    assert text.startswith("GAVE UP at step 40/2000 after 7h42m: crash twice at step 40")
    assert "1 restart (crash at 40)" in text
    live = record([attempt(1, None, 0, 900, None)], state="training")
    assert verdict(tmp_path, live).startswith("training: step 900/2000 (45%), running for ")


def test_many_restarts_are_counted_by_kind(tmp_path):
    attempts = [attempt(i, "crash" if i % 2 else "hang", 0, 10 * i, "restart")
                for i in range(1, 8)] + [attempt(8, "completed", 70, 2000, "finish")]
    assert "7 restarts (crash ×4, hang ×3)" in verdict(tmp_path, record(attempts))


def test_a_sparse_record_gives_a_verdict_and_a_broken_one_names_its_field(tmp_path, capsys):
    sparse = record([], state="starting", best_checkpoint=None, ended=None)
    assert verdict(tmp_path, sparse).startswith("training: step 0/2000 (0%), running for")
    assert verdict(tmp_path, record([attempt(1, "crash", 0, 5, "restart", ended="garbage")],
                                    state="backing_off")).startswith("restarting at step 5")
    (tmp_path / "run.json").write_text(json.dumps(
        {"schema_version": 1, "run_id": "x", "attempts": [{"attempt": "one"}]}))
    assert cli.main(["report", str(tmp_path)]) == 78
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"overnight report: {tmp_path / 'run.json'}: missing field"), err
    (tmp_path / "run.json").unlink()
    (tmp_path / "logs").mkdir()
    facts = gather(tmp_path)
    assert describe(facts).startswith("INCOMPLETE at step 0/?")


def test_durations_and_tables_read_well():
    assert [duration(x) for x in (0.004, 1.5, 17, 125, 7 * 3600 + 42 * 60, 2 * 86400 + 3600)
            ] == ["4ms", "1.5s", "17s", "2m05s", "7h42m", "2d01h"]
    text = to_markdown([Table(["a", "bb"], [["x|y", "1"], ["long cell", "22"]], "lr")])
    assert text.splitlines() == ["| a         |  bb |", "|-----------|----:|",
                                 "| x\\|y      |   1 |", "| long cell |  22 |"]


def test_a_stop_on_request_is_not_a_failure_in_the_report(tmp_path):
    """One definition of a normal end (shared.exitcodes.NORMAL_ENDS) for the logs, the budgets
    and the report: the attempt a person stopped is not listed among the failures."""
    from supervisor.morning.report import build, to_markdown

    rec = record([attempt(1, "crash", 0, 40, "restart"),
                  attempt(2, "graceful_stop", 30, 90, "stop")], state="stopped",
                 reason="stopped on request (worker exit code 23)")
    text = to_markdown(build(gather(tmp_path, record=rec), None))
    failures = text.split("## Failures in detail")[1].split("\n## ")[0]
    assert "Attempt 1: crash at step 40" in failures and "Attempt 2" not in failures


# ---- what the report says about data, and an early stop without validation ---------------


def _worker_log(run: Path, *events: dict) -> Path:
    (run / "logs").mkdir(parents=True, exist_ok=True)
    base = {"source": "worker", "run_id": "night", "pid": 7, "attempt": 1, "level": "info"}
    lines = [{**base, "event": "worker_started", "timestamp": "2025-01-02T01:00:00Z"}]
    lines += [{**base, "timestamp": "2025-01-02T01:00:01Z", **e} for e in events]
    (run / "logs" / "worker.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_skipped_data_lines_are_named_by_file_and_line(tmp_path):
    """Before: "4 malformed in `train.jsonl`", with no word of which lines."""
    run = _worker_log(tmp_path / "run", {
        "event": "data_lines_skipped", "level": "warning", "path": "/d/train.jsonl",
        "examples": 38, "malformed": 4, "no_targets": 0, "truncated": 0,
        "lengths_known": True, "first_problems": [
            "line 34: 'messages' must be a non-empty list of messages",
            "line 38: cannot be tokenised (TypeError: ...)",
            "line 39: cannot be tokenised: a string holds the lone UTF-16 surrogate \\ud83e",
            "line 40: cannot be tokenised: ..."]}, {
        "event": "data_lines_skipped", "level": "warning", "path": "/d/valid.jsonl",
        "examples": 30, "malformed": 9, "no_targets": 3, "truncated": 0,
        "lengths_known": True, "first_problems": [
            "line 2: invalid JSON", "line 5: no target tokens: ...", "line 6: invalid JSON",
            "line 7: invalid JSON", "line 11: invalid JSON"]})
    out, _ = _report(run)
    [row] = [line for line in out.splitlines() if line.startswith("| data lines skipped")]
    assert row.split("|")[2].strip() == (
        "4 malformed in `train.jsonl` at train.jsonl:34,38-40; "
        "9 malformed in `valid.jsonl`; 3 with no target tokens in `valid.jsonl` (prompt "
        "fills max_seq_length) at valid.jsonl:2,5-7,11 and 7 more lines")


def test_an_early_stop_without_validation_says_training_loss(tmp_path):
    """val_batches: 0 (or no valid.jsonl): early stopping watches the smoothed training loss;
    the verdict said "validation loss stopped improving; ... no validation loss"."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "COMPLETE").write_text(json.dumps(
        {"status": "early_stopped", "step": 15, "total_steps": 60, "best_step": -1,
         "best_val_loss": None}))
    text = describe(gather(tmp_path))
    assert text.startswith("early-stopped at step 15/60 after ")
    assert "(smoothed training loss stopped improving)" in text
    assert "validation loss stopped" not in text


def test_a_run_with_nothing_to_plot_draws_without_warnings(tmp_path):
    """A run that gave up before its first step: before, matplotlib warned "No artists with
    labels found to put in legend" on the report's stderr."""
    import warnings

    from supervisor.morning.report import render_png

    (tmp_path / "logs").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = render_png(gather(tmp_path))
    assert png is None or png[:8] == PNG_MAGIC


def test_an_early_stop_with_validation_says_validation_loss_from_the_record_alone(tmp_path):
    """`overnight status` reads only run.json (no logs): its best checkpoint has a val loss."""
    rec = record([attempt(1, "early_stopped", 0, 900, "finish")], state="early_stopped")
    assert "(validation loss stopped improving)" in verdict(tmp_path, rec)


# ---- one story: best, planned ends, injected faults (issue 17) --------------------------


def _live(rec: RunRecord, **extra) -> RunStatus:
    base = dict(
        run_id=rec.run_id, run_dir="/runs/night", state=State.TRAINING, reason="",
        supervisor_pid=1, worker_pid=2, attempt=1, phase=Phase.TRAINING, step=537,
        total_steps=2000, last_heartbeat_s=0.1, tokens_per_sec=None, rss_mb=None, mlx_mb=None,
        overrides={}, latest_checkpoint=None, best_checkpoint=None, restart_in_s=None,
        attempts=1, failures=0)
    return RunStatus(**{**base, **extra})  # type: ignore[arg-type]


def test_a_live_status_has_one_best_the_newer_one(tmp_path, capsys):
    """run.json is rewritten at most every 2 s while only the best changes: status printed
    "best val 2.914 at step 530" (the record) over a table saying "step 535 val_loss 2.898"
    (the live reply). The live reply is newer; both lines say it."""
    from shared.run_record import BestCheckpoint
    from supervisor.morning.status import format_live

    rec = record([attempt(1, None, 0, 537, None)], state="training",
                 best_checkpoint={"step": 530, "val_loss": 2.9141, "path": None})
    live = _live(rec, best_checkpoint=BestCheckpoint(535, None, 2.8983))
    first = verdict(tmp_path, rec, live)
    assert first.endswith("best val 2.898 at step 535"), first
    assert "best     step 535  val_loss 2.898" in format_live(live)
    assert verdict(tmp_path, rec, _live(rec)).endswith("best val 2.914 at step 530")


def _planned_night() -> RunRecord:
    return record([
        attempt(1, "crash", 0, 40, "restart", downtime_s=None, restart_delay_s=5.0,
                detected_by="exit"),
        attempt(2, "planned_restart", 30, 90, "planned_restart", downtime_s=60.0,
                detail="worker memory 900 MB above memory_limit_mb 800; exit code 23",
                detected_by="memory"),
        attempt(3, "graceful_stop", 90, 120, "stop", downtime_s=120.0,
                detail="worker exit code 23", detected_by="stop_request",
                action_reason="stopped on request (worker exit code 23)"),
        attempt(4, "completed", 120, 2000, "finish", downtime_s=600.0),
    ])


def test_planned_ends_are_not_failures_anywhere_in_the_report(tmp_path):
    """A planned restart for memory and a stop on request (resumed later) are restarts, but
    not failures: not in "Failures in detail", not in "time lost to failures"; they have
    their own section. Before: both were listed as failures and their restart time (660 s)
    was lost to failures."""
    from supervisor.morning.report import build, to_markdown

    facts = gather(tmp_path, record=_planned_night())
    text = to_markdown(build(facts, None))
    assert text.splitlines()[0].endswith(
        "3 restarts: 1 after a failure (crash at 40), 2 planned (memory restart at 90; stop "
        "on request at 120); best val 1.841 at step 1750")
    failures = text.split("## Failures in detail")[1].split("\n## ")[0]
    assert re.findall(r"\*\*Attempt (\d)", failures) == ["1"]
    planned = text.split("## Planned ends")[1].split("\n## ")[0]
    assert re.findall(r"\*\*Attempt (\d)", planned) == ["2", "3"]
    assert "**Attempt 2: memory restart at step 90.** worker memory 900 MB" in planned
    assert "Attempt 3 went on at" in planned and "from checkpoint 90, 2m00s after it ended" \
        in planned
    rows = dict(re.findall(r"^\| ([a-z ]+?) +\| (.*?) +\|$", text, re.M))
    assert rows["attempts"] == "4 (3 restarts); 1 failure, 2 planned ends"
    # the crash: attempt 2 started training 60 s after it, 10 steps redone; nothing of the
    # 2 + 10 minutes the planned ends took (before: 13m00s lost to failures)
    assert rows["time lost to failures"] == ("1m00s (0% of the wall time): restarting 1m00s, "
                                             "redoing 10 steps")
    assert rows["planned ends"] == ("memory restart ×1, stop on request ×1; 12m00s restarting "
                                    "(not failures)")


def test_an_injected_fault_is_called_injected_and_a_real_one_is_not(tmp_path):
    from supervisor.morning.report import build, to_markdown

    rec = record([
        attempt(1, "crash", 0, 40, "restart", injected=["crash@41"],
                detail="killed by SIGABRT: Metal command buffer abort: [METAL] Command buffer "
                       "execution failed"),
        attempt(2, "crash", 30, 90, "restart", injected=["leak@60"]),  # a leak, then a crash
        attempt(3, "completed", 80, 2000, "finish"),
    ])
    text = to_markdown(build(gather(tmp_path, record=rec), None))
    assert "2 restarts (injected crash at 40; crash at 90)" in text.splitlines()[0]
    assert "**Attempt 1: injected crash at step 40.** Injected on purpose (`debug.inject` " \
           "crash@41): it emulates a Metal command-buffer abort" in text
    assert "What the supervisor saw: killed by SIGABRT: Metal command buffer abort" in text
    assert "**Attempt 2: crash at step 90.** crash detail." in text
    assert "| **crash** (injected: `crash@41`): killed by SIGABRT" in text


def test_a_run_with_evaluations_but_no_training_loss_draws(tmp_path):
    """metrics.jsonl absent, empty, every loss NaN, or a directory, while the worker log has
    evaluations: before, `overnight report` ended in a traceback ("zero-size array to
    reduction operation minimum") from the loss panel's y range."""
    from supervisor.morning.report import render_png

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "worker.jsonl").write_text(json.dumps(
        {"step": 20, "val_loss": 4.0, "best_val_loss": 4.0, "best_step": 20,
         "event": "evaluated", "source": "worker", "run_id": "r", "attempt": 1,
         "level": "info", "timestamp": "2026-11-30T20:56:32.501067Z"}) + "\n")
    (tmp_path / "logs" / "metrics.jsonl").write_text(json.dumps(
        {"run_id": "r", "attempt": 1, "step": 1, "time": 1.0, "loss": None}) + "\n")
    facts = gather(tmp_path)
    assert facts.evals == [(20, 4.0)]
    png = render_png(facts)
    assert png is None or png[:8] == PNG_MAGIC


def test_the_eta_table_names_the_end_it_measured_against_without_metrics(tmp_path):
    """Without metrics.jsonl the ETA table measures against the record's end; its heading
    said "against the actual end (00:00:00)" (the epoch, from `last_time() or 0.0`)."""
    from supervisor.morning.report import build

    fixture = Path(__file__).resolve().parent / "fixtures" / "run-before-11"
    run = copy_run(fixture, tmp_path / "run")
    (run / "logs" / "metrics.jsonl").unlink()
    text = to_markdown(build(gather(run), None))
    assert "### ETA accuracy" in text
    assert "actual end (00:00:00)" not in text


def test_a_live_status_between_attempts_has_no_none_in_it():
    """While the supervisor restarts the worker there is no worker: status printed
    "worker   pid None  attempt 1  phase None  heartbeat None s ago  - tok/s  rss - MB"."""
    from supervisor.morning.status import format_live

    rec = record([attempt(1, "hang", 0, 40, "restart")], state="restarting")
    text = format_live(_live(rec, state=State.RESTARTING, worker_pid=None, phase=None,
                             last_heartbeat_s=None, failures=1))
    assert "None" not in text, text
    assert "worker   none: between attempts (attempt 1 ended)" in text


@pytest.mark.parametrize("damage", ["absent", "directory", "empty"])
def test_a_run_whose_metrics_cannot_be_read_says_so(tmp_path, damage):
    """The report of a run that trained but whose logs/metrics.jsonl is absent, a directory
    or empty dropped throughput and step times without a word."""
    from supervisor.morning.report import build

    fixture = Path(__file__).resolve().parent / "fixtures" / "run-before-11"
    run = copy_run(fixture, tmp_path / "run")
    metrics = run / "logs" / "metrics.jsonl"
    metrics.unlink()
    if damage == "directory":
        metrics.mkdir()
    elif damage == "empty":
        metrics.write_bytes(b"")
    text = to_markdown(build(gather(run), None))
    row = next(r for r in text.splitlines() if r.startswith("| metrics"))
    want = {"absent": "absent", "directory": "not a file", "empty": "empty"}[damage]
    assert f"logs/metrics.jsonl {want}: no throughput" in row, row


def test_a_live_status_shows_no_progress_line_of_an_attempt_that_ended(tmp_path):
    """Right after a restart, status printed the killed attempt's "Training: 41% | step
    116/280" under the new attempt's "step 101 / 280": the progress line is the live
    attempt's or none."""
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "metrics.jsonl", "w") as f:
        for step in range(1, 117):
            f.write(json.dumps({"attempt": 1, "step": step, "loss": 2.0, "lr": 1e-3,
                                "tokens": 100, "step_seconds": 0.1, "active_mb": 1.0}) + "\n")
    assert "step 116/280" in (progress_line(tmp_path, 280, attempt=1) or "")
    assert progress_line(tmp_path, 280, attempt=2) is None
    assert "step 116/280" in (progress_line(tmp_path, 280) or "")  # the report's: the newest
