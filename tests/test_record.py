"""run.json: the typed record (shared/run_record.py) and its one writer, the supervisor's
RecordKeeper (supervisor/daemon/record.py): created, continued, atomically rewritten, summed
up, decoded with errors that name the field, and old records still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared import run_record
from shared.errors import RecordError
from shared.exitcodes import FailureClass
from shared.run_record import SCHEMA_VERSION, Action, AttemptRecord, State, WorkerInfo
from supervisor.daemon.record import RecordKeeper, totals

OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "run-before-11" / "run.json"


def open_keeper(tmp_path: Path, run_id: str = "r1") -> RecordKeeper:
    keeper, note = RecordKeeper.open(tmp_path / "run.json", run_id, tmp_path,
                                     tmp_path / "c.yaml", {"iters": 10}, "abc")
    assert note == ""
    return keeper


def attempt(n: int = 1, **end: object) -> AttemptRecord:
    return AttemptRecord(attempt=n, pid=7, argv=("w",), log=f"logs/worker-{n}.log",
                         started="2025-01-01T00:00:00+00:00", ended=None,
                         start_reason="initial", resumed_from=None, skip_steps=0,
                         lr_scale=None, settings={}, start_step=0, end_step=0, steps_gained=0,
                         **end)  # type: ignore[arg-type]


def stored(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run.json").read_text())


def test_a_new_record_has_the_documented_top_level_keys(tmp_path):
    open_keeper(tmp_path).save()
    d = stored(tmp_path)
    for key in ("schema_version", "run_id", "config", "config_hash", "state", "reason",
                "supervisor", "worker", "overrides", "final_step", "total_steps",
                "best_checkpoint", "latest_checkpoint", "quarantined", "totals", "attempts"):
        assert key in d, key
    assert d["schema_version"] == 1 and d["supervisor"]["starts"] == 1
    assert d["state"] == "starting"


def test_a_restarted_supervisor_continues_the_record_and_keeps_the_run_id(tmp_path):
    keeper = open_keeper(tmp_path, "first")
    keeper.begin_attempt(attempt(), WorkerInfo(1, 1, "2025-01-01T00:00:00+00:00", ("w",)))
    keeper.update(overrides={"batch_size": 2})
    again = open_keeper(tmp_path, "second")
    assert again.run_id == "first"
    assert again.record.supervisor.starts == 2
    assert again.record.overrides == {"batch_size": 2}
    assert len(again.attempts) == 1


def test_end_attempt_and_final_state(tmp_path):
    keeper = open_keeper(tmp_path)
    keeper.begin_attempt(attempt(), WorkerInfo(7, 1, "2025-01-01T00:00:00+00:00", ("w",)))
    assert stored(tmp_path)["worker"]["pid"] == 7
    keeper.end_attempt(classification=FailureClass.CRASH, steps_gained=5, tokens=100,
                       action=Action.RESTART)
    keeper.set_state(State.GAVE_UP, "crash loop")
    d = stored(tmp_path)
    assert d["worker"] is None and d["attempts"][0]["ended"]
    assert d["attempts"][0]["classification"] == "crash" and d["attempts"][0]["action"] == "restart"
    assert (d["state"], d["reason"]) == ("gave_up", "crash loop") and d["ended"]
    assert d["totals"]["failures"] == 1 and d["totals"]["steps_trained"] == 5


def test_writes_are_atomic_no_temp_files_left(tmp_path):
    keeper = open_keeper(tmp_path)
    for i in range(5):
        keeper.set_state(State.TRAINING, str(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_totals_count_failures_restarts_and_downtime(tmp_path):
    keeper = open_keeper(tmp_path)
    for n, (cls, gained, downtime) in enumerate(
            [(FailureClass.CRASH, 10, None), (FailureClass.PLANNED_RESTART, 20, 1.5),
             (FailureClass.GRACEFUL_STOP, 0, 0.5), (FailureClass.COMPLETED, 30, 2.0)], 1):
        keeper.begin_attempt(attempt(n), WorkerInfo(n, n, "2025-01-01T00:00:00+00:00", ()))
        keeper.end_attempt(classification=cls, steps_gained=gained, tokens=5,
                           downtime_s=downtime)
    keeper.update(rollbacks=1)
    t = totals(keeper.record)
    assert (t.attempts, t.failures, t.planned_restarts, t.rollbacks, t.restarts) == (4, 1, 1, 1, 3)
    assert (t.steps_trained, t.tokens, t.downtime_seconds) == (60, 20, 4.0)


def test_a_record_written_before_the_typed_record_reads_and_round_trips():
    raw = json.loads(OLD_RUN.read_text())
    record = run_record.decode(raw)
    assert record.schema_version == SCHEMA_VERSION == 1 and record.state is State.FINISHED
    assert [a.classification for a in record.attempts] == [
        FailureClass.CRASH, FailureClass.HANG, FailureClass.COMPLETED]
    assert record.attempts[0].action is Action.RESTART
    back = record.to_dict()  # the same, and the fields added since (bad_data: issue 10)
    for a in back["attempts"]:
        assert a.pop("bad_data") is None
        assert a.pop("injected") == []  # issue 17: no fault injected on record
        assert a.pop("ranks") == [] and a.pop("failed_rank") is None  # issue 14: one process
    assert back["supervisor"].pop("boot_id") == ""  # issue 12: unknown in an old record
    assert back == raw


def test_load_is_none_without_a_file_and_names_the_problem_otherwise(tmp_path):
    assert run_record.load(tmp_path / "nope.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RecordError, match=r"bad.json: not valid JSON"):
        run_record.load(bad)
    raw = json.loads(OLD_RUN.read_text())
    raw["attempts"][1]["classification"] = "exploded"
    bad.write_text(json.dumps(raw))
    with pytest.raises(RecordError, match=r"bad.json.attempts\[1\].classification: expected "
                                          r"one of \['completed'"):
        run_record.load(bad)
    raw["schema_version"] = 2
    bad.write_text(json.dumps(raw))
    with pytest.raises(RecordError, match=r"expected schema_version 1, got 2"):
        run_record.load(bad)


def test_an_unreadable_record_is_moved_aside_and_a_newer_one_is_left_alone(tmp_path):
    (tmp_path / "run.json").write_text('{"schema_version": 1, "run_id": 3}')
    keeper, note = RecordKeeper.open(tmp_path / "run.json", "r2", tmp_path, tmp_path / "c.yaml",
                                     {}, "h")
    assert "moved aside" in note and keeper.run_id == "r2"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.json.unreadable-")]
    assert len(aside) == 1 and json.loads(aside[0].read_text())["run_id"] == 3
    (tmp_path / "run.json").write_text('{"schema_version": 99}')
    with pytest.raises(RecordError, match="schema_version"):
        RecordKeeper.open(tmp_path / "run.json", "r3", tmp_path, tmp_path / "c.yaml", {}, "h")
    assert json.loads((tmp_path / "run.json").read_text()) == {"schema_version": 99}


def test_a_record_with_bytes_that_are_not_utf8_is_a_record_error(tmp_path: Path) -> None:
    """A run.json damaged on disk (a power cut mid-write, garbage bytes): `overnight status`
    and `report` ended in a UnicodeDecodeError traceback instead of one line."""
    bad = tmp_path / "run.json"
    bad.write_bytes(b'\xff\xfe{"schema_version": 1}')
    with pytest.raises(RecordError, match=r"run.json: not valid JSON \(not UTF-8"):
        run_record.load(bad)
