"""supervisor/logview.py: `overnight logs` merges both processes' logs (and their rotated
backups) in time order, survives cut-off lines, filters, follows, and picks the run."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from shared import cli
from supervisor.morning.logview import Style, parse_since, render
from supervisor.morning.runlogs import LogLine, Problems, Tail, parse_line, rotated_files
from tests.report_support import CRASH_AT, HANG_AT, copy_run, supervised_run

T0 = dt.datetime(2025, 1, 2, 3, 0, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, tiny_model, corpus) -> Path:
    return supervised_run(tmp_path_factory, tiny_model, corpus)


def line(seconds: float, event: str, source: str, level: str = "info", **fields) -> str:
    ts = (T0 + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    return json.dumps({**fields, "event": event, "source": source, "level": level,
                       "pid": 1, "run_id": "r", "timestamp": ts}) + "\n"


def make_run(tmp_path: Path, name: str = "run") -> Path:
    """tmp_path/name/logs: supervisor + worker logs with rotated backups, interleaved."""
    logs = tmp_path / name / "logs"
    logs.mkdir(parents=True)
    (logs / "supervisor.jsonl.1").write_text(
        line(0, "supervisor_started", "supervisor")
        + line(1, "worker_spawned", "supervisor", attempt=1))
    (logs / "supervisor.jsonl").write_text(
        line(5, "worker_exited", "supervisor", attempt=1, classification="crash")
        + line(5.1, "restart_scheduled", "supervisor", delay_s=1.0)
        + line(6, "worker_spawned", "supervisor", attempt=2)
        + line(20, "run_ended", "supervisor", state="finished"))
    (logs / "worker.jsonl.2").write_text(line(2, "worker_started", "worker", attempt=1))
    (logs / "worker.jsonl.1").write_text(line(3, "progress", "worker", attempt=1, step=10)
                                         + line(4, "evaluated", "worker", attempt=1, step=10))
    (logs / "worker.jsonl").write_text(
        line(7, "worker_started", "worker", attempt=2)
        + line(8, "data_lines_skipped", "worker", "warning", attempt=2, malformed=1)
        + line(9, "progress", "worker", attempt=2, step=20))
    return tmp_path / name


def logs(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(["logs", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def events(out: list[str]) -> list[str]:
    return [json.loads(s)["event"] for s in out]


def test_both_logs_and_their_backups_are_merged_in_time_order(tmp_path, capsys):
    run = make_run(tmp_path)
    code, out, _ = logs(capsys, str(run), "--json")
    assert code == 0
    assert events(out) == ["supervisor_started", "worker_spawned", "worker_started", "progress",
                           "evaluated", "worker_exited", "restart_scheduled", "worker_spawned",
                           "worker_started", "data_lines_skipped", "progress", "run_ended"]
    assert [p.name for p in rotated_files(run / "logs" / "worker.jsonl")] == [
        "worker.jsonl.2", "worker.jsonl.1", "worker.jsonl"]


def test_a_cut_off_last_line_and_a_glued_line_cost_only_themselves(tmp_path, capsys):
    run = make_run(tmp_path)
    worker = run / "logs" / "worker.jsonl"
    good = line(10, "checkpoint_saved", "worker", attempt=2, step=20)
    # A process killed mid-write, the next one appending to the cut-off line, another cut.
    worker.write_text(worker.read_text() + '{"step": 21, "ev' + good + '{"event": "progr')
    code, out, err = logs(capsys, str(run))
    assert code == 0
    assert any("checkpoint_saved" in s for s in out)  # recovered from the glued line
    assert "skipped 1 unreadable line" in err and "worker.jsonl:" in err
    assert parse_line('{"a": 1, "x": {"y": 2}}') == {"a": 1, "x": {"y": 2}}
    assert parse_line('{"a": 1, "x{"b": 2}') == {"b": 2}
    assert parse_line("not json at all") is None


def test_filters_level_event_attempt_source_and_last_lines(tmp_path, capsys):
    run = make_run(tmp_path)
    assert events(logs(capsys, str(run), "--json", "--level", "warning")[1]) == [
        "data_lines_skipped"]
    assert events(logs(capsys, str(run), "--json", "--event", "restart")[1]) == [
        "restart_scheduled"]
    assert events(logs(capsys, str(run), "--json", "--event", "worker_*")[1]) == [
        "worker_spawned", "worker_started", "worker_exited", "worker_spawned", "worker_started"]
    # Attempt 2: its own lines, and supervisor lines since it was spawned.
    assert events(logs(capsys, str(run), "--json", "--attempt", "2")[1]) == [
        "worker_spawned", "worker_started", "data_lines_skipped", "progress", "run_ended"]
    assert events(logs(capsys, str(run), "--json", "--source", "worker", "-n", "2")[1]) == [
        "data_lines_skipped", "progress"]


def test_since_takes_durations_and_times():
    now = T0.timestamp()
    assert parse_since("2h", now) == now - 7200
    assert parse_since("90s", now) == now - 90
    assert parse_since("2025-01-02T01:00:00Z", now) == now - 7200
    with pytest.raises(Exception, match="--since: expected a duration"):
        parse_since("yesterday", now)


def test_since_filters_by_time(tmp_path, capsys):
    logs_dir = tmp_path / "run" / "logs"
    logs_dir.mkdir(parents=True)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)
    new = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    (logs_dir / "supervisor.jsonl").write_text("".join(
        json.dumps({"event": e, "level": "info", "timestamp": t.isoformat()}) + "\n"
        for e, t in (("old_event", old), ("new_event", new))))
    assert events(logs(capsys, str(tmp_path / "run"), "--json", "--since", "1h")[1]) == [
        "new_event"]


def test_human_lines_are_aligned_and_coloured_only_when_asked(tmp_path):
    data = json.loads(line(5, "worker_exited", "supervisor", "warning", attempt=1,
                           detail="killed by SIGABRT", returncode=-6))
    plain = render(LogLine(T0.timestamp() + 5, data), Style(False), utc=True)
    assert plain.startswith("2025-01-02 03:00:05.000  WARNING  supervisor  worker_exited")
    assert 'attempt=1 detail="killed by SIGABRT" returncode=-6' in plain
    assert "\x1b[" not in plain
    worker = json.loads(line(5, "progress", "worker", attempt=3, step=10, loss=1.23456789))
    text = render(LogLine(T0.timestamp(), worker), Style(True), utc=True)
    assert "\x1b[" in text and "worker 3" in text and "1.235" in text


def test_follow_reads_new_lines_across_rotation_and_waits_for_a_whole_line(tmp_path):
    path = tmp_path / "worker.jsonl"
    path.write_text(line(0, "a", "worker"))
    tail = Tail(path, "worker", Problems())
    assert [ln.event for ln in tail.initial(final=False)] == ["a"]
    with open(path, "a") as f:
        f.write(line(1, "b", "worker") + '{"event": "c", "lev')
    assert [ln.event for ln in tail.new_lines()] == ["b"]  # "c" is still being written
    with open(path, "a") as f:
        f.write('el": "info"}\n' + line(2, "d", "worker"))
    os.replace(path, tmp_path / "worker.jsonl.1")  # rotation by the writer
    path.write_text(line(3, "e", "worker"))
    assert [ln.event for ln in tail.new_lines()] == ["c", "d", "e"]
    tail.close()


def test_a_missing_run_dir_is_one_line_and_exit_78(tmp_path, capsys):
    code, out, err = logs(capsys, str(tmp_path / "nope"))
    assert code == 78 and out == []
    assert err.strip() == f"overnight logs: {tmp_path / 'nope'}: no such run directory"
    (tmp_path / "empty").mkdir()
    code, _, err = logs(capsys, str(tmp_path / "empty"))
    assert code == 78 and "not a run directory" in err and len(err.strip().splitlines()) == 1


def test_without_run_dir_the_newest_run_under_runs_is_used_and_named(tmp_path, capsys,
                                                                     monkeypatch):
    for name, age in (("old", 100), ("new", 0)):
        run = make_run(tmp_path / "runs", name)
        for p in [run, *run.rglob("*")]:
            os.utime(p, (time.time() - age, time.time() - age))
    monkeypatch.chdir(tmp_path)
    code, out, err = logs(capsys, "--json", "-n", "1")
    assert code == 0 and events(out) == ["run_ended"]
    assert "runs/new" in err and "most recently modified" in err


# ---- a real supervised run: rotation in both processes, truncation, filters ---------------


def test_real_logs_rotate_in_both_processes_and_merge_completely(real_run, capsys):
    logs_dir = real_run / "logs"
    assert (logs_dir / "supervisor.jsonl.1").exists() and (logs_dir / "worker.jsonl.1").exists()
    total = sum(len([s for s in p.read_text().splitlines() if s.strip()])
                for name in ("supervisor.jsonl", "worker.jsonl")
                for p in rotated_files(logs_dir / name))
    code, out, _ = logs(capsys, str(real_run), "--json", "--relayed")
    assert code == 0 and len(out) == total
    lines = [json.loads(s) for s in out]
    assert lines[0]["event"] == "supervisor_started" and lines[-1]["event"] == "run_ended"
    stamps = [dt.datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")) for x in lines]
    assert stamps == sorted(stamps)
    assert {x["source"] for x in lines} == {"supervisor", "worker"}


def test_real_logs_filters(real_run, capsys):
    _, out, _ = logs(capsys, str(real_run), "--json", "--event", "restart")
    assert events(out) == ["restart_scheduled", "restart_scheduled"]
    _, out, _ = logs(capsys, str(real_run), "--json", "--level", "warning")
    warned = events(out)
    assert "worker_unhealthy" in warned and "data_lines_skipped" in warned
    assert all(json.loads(s)["level"] in ("warning", "error") for s in out)
    _, out, _ = logs(capsys, str(real_run), "--json", "--attempt", "2")
    got = [json.loads(s) for s in out]
    assert {g["attempt"] for g in got if g["source"] == "worker"} == {2}
    exited = [g for g in got if g["event"] == "worker_exited"]
    assert [(g["attempt"], g["classification"]) for g in exited] == [(2, "hang")]
    assert exited[0]["step"] >= HANG_AT - 1 > CRASH_AT


def test_real_logs_render_a_log_cut_off_by_a_killed_process(real_run, tmp_path, capsys):
    run = copy_run(real_run, tmp_path / "copy")
    worker = run / "logs" / "worker.jsonl"
    data = worker.read_bytes()
    worker.write_bytes(data[: len(data) - 40])  # the last line loses its end
    code, out, err = logs(capsys, str(run))
    assert code == 0 and len(out) > 50
    assert "skipped 1 unreadable line" in err
    assert all(s[:4].isdigit() for s in out if not s.startswith("    "))


def test_each_event_is_one_line_in_the_merged_view(real_run, capsys):
    """`overnight logs --json | jq .event` counted each checkpoint_saved and worker_stopping
    twice: the worker's line and the supervisor's relayed copy. The merged view shows the
    worker's; the copies are marked, shown with --relayed and in the supervisor's own log."""
    from collections import Counter

    _, out, _ = logs(capsys, str(real_run), "--json")
    merged = [json.loads(s) for s in out]
    relayed_names = ("checkpoint_saved", "worker_stopping")
    mine = Counter((x["event"], x["attempt"], x["step"]) for x in merged
                   if x["event"] in relayed_names)
    assert all(x["source"] == "worker" for x in merged if x["event"] in relayed_names)
    assert mine and max(mine.values()) == 1  # one line per checkpoint, per stop
    _, out, _ = logs(capsys, str(real_run), "--json", "--relayed")
    copies = [json.loads(s) for s in out]
    copies = [x for x in copies if x["source"] == "supervisor" and x["event"] in relayed_names]
    assert all(x["relayed_from"] == "worker" for x in copies)
    assert Counter((x["event"], x["attempt"], x["step"]) for x in copies) == mine
    _, out, _ = logs(capsys, str(real_run), "--json", "--source", "supervisor")
    assert sum(json.loads(s)["event"] in relayed_names for s in out) == len(copies)


def test_an_older_log_s_unmarked_copies_are_left_out_too(tmp_path, capsys):
    run = make_run(tmp_path)
    with open(run / "logs" / "supervisor.jsonl", "a") as f:  # as written before the mark
        f.write(line(21, "checkpoint_saved", "supervisor", step=20))
    with open(run / "logs" / "worker.jsonl", "a") as f:
        f.write(line(20.9, "checkpoint_saved", "worker", attempt=2, step=20))
    _, out, _ = logs(capsys, str(run), "--json", "--event", "checkpoint_saved")
    assert [json.loads(s)["source"] for s in out] == ["worker"]
    _, out, _ = logs(capsys, str(run), "--json", "--event", "checkpoint_saved", "--relayed")
    assert [json.loads(s)["source"] for s in out] == ["worker", "supervisor"]


def test_since_on_a_long_log_seeks_and_shows_exactly_what_a_full_read_shows(tmp_path, capsys):
    """`--since` bisects a long log by its timestamps instead of reading it whole (a 1M-step
    night: 0.5 s instead of 4.7 s, benchmarks/growth.py); it shows the same lines as reading
    everything and filtering, including lines up to SINCE_SLACK_S out of order and a rotated
    backup, and with nothing to show shows nothing."""
    from supervisor.morning import runlogs

    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker.jsonl.1").write_text(  # an old backup, entirely before --since
        "".join(line(i, "progress", "worker", step=i) for i in range(0, 2000)))
    body = [line(2000 + i, "progress", "worker", step=2000 + i, attempt=2)
            for i in range(20000)]
    # written out of order: before the --since point in the file, after it in time
    body[14800] = line(2000 + 14950, "late_line", "worker", attempt=2)
    (logs / "worker.jsonl").write_text("".join(body) + '{"torn": ')
    (logs / "supervisor.jsonl").write_text(line(21000, "state_changed", "supervisor"))
    since = (T0 + dt.timedelta(seconds=2000 + 14900)).isoformat()

    def shown(*args: str) -> list[str]:
        assert cli.main(["logs", str(tmp_path / "run"), "--json", *args]) == 0
        return capsys.readouterr().out.splitlines()

    everything = shown()
    t_since = runlogs.parse_time(since)
    expected = [x for x in everything
                if runlogs.parse_time(json.loads(x)["timestamp"]) >= t_since]
    assert shown("--since", since) == expected
    assert len(expected) == 5100 + 1 + 1  # steps 16900..21999, the late line, the supervisor
    assert any('"late_line"' in x for x in expected)
    # and it did not read the file from the top: the first worker line parsed is near since
    from supervisor.morning.runlogs import Tail, merged
    tail = Tail(logs / "worker.jsonl", "worker", Problems())
    first = next(merged([tail], since=t_since))
    tail.close()
    assert first.data["step"] > 2000 + 14900 - 1000  # slack + one bisection block (64 KiB)
    assert shown("--since", (T0 + dt.timedelta(seconds=99999)).isoformat()) == []


def test_a_skipped_line_is_named_by_its_true_line_number_with_since(tmp_path: Path) -> None:
    """`--since` seeks into the file; the line counter then started at -1, so a torn last
    line was "worker.jsonl:34" with --since and "worker.jsonl:35" without. A line number is
    given only when it is known."""
    from supervisor.morning import runlogs

    log = tmp_path / "worker.jsonl"
    lines = [json.dumps({"event": "e", "n": i, "timestamp": f"2026-11-30T20:{i // 60:02d}:"
                         f"{i % 60:02d}Z", "pad": "x" * 200}) for i in range(1200)]
    log.write_text("\n".join(lines) + "\n" + '{"event": "torn", "timestamp": "2026-11-30T2')
    for since, where in ((0.0, f"worker.jsonl:{len(lines) + 1}"),
                         (runlogs.parse_time("2026-11-30T20:19:00Z"), "worker.jsonl")):
        problems = Problems()
        got = list(Tail(log, "worker", problems).initial(since=since))
        assert got and problems.skipped == [where], (since, problems.skipped)
