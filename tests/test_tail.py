"""shared/tail.py: the end of a file another process may still be writing."""

from __future__ import annotations

import json

from shared.tail import tail_lines
from supervisor.daemon.ending import last_logged_step, stderr_tail


def test_a_line_cut_by_the_window_is_dropped_a_last_line_being_written_is_kept(tmp_path):
    f = tmp_path / "log"
    f.write_bytes(b"first line\nsecond\nthird")  # "third": no newline yet
    assert tail_lines(f, 1000) == [b"first line", b"second", b"third"]
    assert tail_lines(f, 12) == [b"second", b"third"]  # the window starts at "second"
    assert tail_lines(f, 13) == [b"second", b"third"]  # ... at the newline before it
    assert tail_lines(f, 14) == [b"second", b"third"]  # ... inside "first line": cut, dropped
    assert tail_lines(f, 4) == []  # only a piece of "third"


def test_a_trailing_newline_makes_no_empty_line(tmp_path):
    f = tmp_path / "log"
    f.write_bytes(b"aaaa\nbbbb\ncccc\n")
    assert tail_lines(f, 10) == [b"bbbb", b"cccc"]
    assert tail_lines(f, 9) == [b"cccc"]


def test_a_missing_file_has_no_lines(tmp_path):
    assert tail_lines(tmp_path / "nope", 100) == []
    assert stderr_tail(tmp_path / "nope") == ""


def test_last_logged_step_reads_this_attempts_last_line(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    assert last_logged_step(log, 1) == 0  # no file yet
    lines = [json.dumps({"attempt": a, "step": s}) for a, s in [(1, 1), (1, 2), (2, 3)]]
    log.write_text("\n".join(lines) + '\n{"attempt": 2, "st')  # a half-written last line
    assert last_logged_step(log, 1) == 2
    assert last_logged_step(log, 2) == 3
    assert last_logged_step(log, 3) == 0


def test_the_stderr_tail_is_the_last_40_whole_lines(tmp_path):
    out = tmp_path / "worker-1.log"
    out.write_text("".join(f"line {i:05d} " + "x" * 100 + "\n" for i in range(500)))
    tail = stderr_tail(out).splitlines()
    assert len(tail) == 40 and tail[-1].startswith("line 00499 ")
    assert all(len(line) == len(tail[-1]) for line in tail)  # no line cut by the window
