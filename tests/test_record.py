"""supervisor/record.py: run.json is created, continued, atomically rewritten, and summed up."""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.daemon.record import SCHEMA_VERSION, RunRecord, load, totals


def open_record(tmp_path: Path, run_id: str = "r1") -> RunRecord:
    return RunRecord.open(tmp_path / "run.json", run_id, tmp_path, tmp_path / "c.yaml",
                          {"iters": 10}, "abc")


def test_a_new_record_has_the_documented_top_level_keys(tmp_path):
    rec = open_record(tmp_path)
    rec.save()
    d = json.loads((tmp_path / "run.json").read_text())
    for key in ("schema_version", "run_id", "config", "config_hash", "state", "reason",
                "supervisor", "worker", "overrides", "final_step", "total_steps",
                "best_checkpoint", "latest_checkpoint", "quarantined", "totals", "attempts"):
        assert key in d, key
    assert d["schema_version"] == SCHEMA_VERSION and d["supervisor"]["starts"] == 1


def test_a_restarted_supervisor_continues_the_record_and_keeps_the_run_id(tmp_path):
    rec = open_record(tmp_path, "first")
    rec.begin_attempt({"attempt": 1, "started": "2025-01-01T00:00:00+00:00"}, {"pid": 1})
    rec.data["overrides"] = {"batch_size": 2}
    rec.save()
    again = open_record(tmp_path, "second")
    assert again.run_id == "first"
    assert again.data["supervisor"]["starts"] == 2
    assert again.data["overrides"] == {"batch_size": 2}
    assert len(again.attempts) == 1


def test_end_attempt_and_final_state(tmp_path):
    rec = open_record(tmp_path)
    rec.begin_attempt({"attempt": 1, "started": "2025-01-01T00:00:00+00:00"}, {"pid": 7})
    assert load(rec.path)["worker"]["pid"] == 7
    rec.end_attempt({"classification": "crash", "steps_gained": 5, "tokens": 100})
    rec.set_state("gave_up", "crash loop")
    d = load(rec.path)
    assert d["worker"] is None and d["attempts"][0]["ended"]
    assert (d["state"], d["reason"]) == ("gave_up", "crash loop") and d["ended"]
    assert d["totals"]["failures"] == 1 and d["totals"]["steps_trained"] == 5


def test_writes_are_atomic_no_temp_files_left(tmp_path):
    rec = open_record(tmp_path)
    for i in range(5):
        rec.set_state("training", str(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_load_tolerates_missing_or_broken_files(tmp_path):
    assert load(tmp_path / "nope.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert load(tmp_path / "bad.json") is None


def test_totals_count_failures_restarts_and_downtime():
    attempts = [
        {"classification": "crash", "steps_gained": 10, "tokens": 5, "downtime_s": None},
        {"classification": "planned_restart", "steps_gained": 20, "tokens": 5,
         "downtime_s": 1.5},
        {"classification": "completed", "steps_gained": 30, "tokens": 5, "downtime_s": 2.0},
    ]
    t = totals({"attempts": attempts, "rollbacks": 1})
    assert t == {"attempts": 3, "failures": 1, "planned_restarts": 1, "rollbacks": 1,
                 "restarts": 2, "steps_trained": 60, "tokens": 15, "train_seconds": 0.0,
                 "downtime_seconds": 3.5}


def test_last_logged_step_reads_this_attempts_last_line(tmp_path) -> None:
    from supervisor.daemon.attempt import last_logged_step

    log = tmp_path / "metrics.jsonl"
    assert last_logged_step(log, 1) == 0  # no file yet
    lines = [json.dumps({"attempt": a, "step": s}) for a, s in [(1, 1), (1, 2), (2, 3)]]
    log.write_text("\n".join(lines) + '\n{"attempt": 2, "st')  # a half-written last line
    assert last_logged_step(log, 1) == 2
    assert last_logged_step(log, 2) == 3
    assert last_logged_step(log, 3) == 0
