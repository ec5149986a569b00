"""supervisor/morning/metrics_table.py: logs/metrics.jsonl as columns (issue 15, cost as the
night grows) — the same numbers a line-by-line reading gives, whatever the file holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from supervisor.morning import metrics_table as mt


def metrics_line(attempt: int, step: int, **extra: object) -> dict:
    return {"run_id": "r1", "attempt": attempt, "step": step, "time": 1.7e9 + step,
            "loss": 2.0 + step / 100, "grad_norm": 0.5, "lr": 1e-4, "tokens": 100 + step,
            "tokens_per_sec": 800.0, "step_seconds": 0.125, "active_mb": 10.0 + step,
            "peak_mb": 20.0, "rss_mb": 300.0, "type": "metrics", "v": 1, **extra}


@pytest.fixture(params=[8 << 20, 700], ids=["one piece", "many pieces"])
def chunk(request, monkeypatch) -> int:
    monkeypatch.setattr(mt, "CHUNK_BYTES", request.param)  # pieces cut inside lines too
    return request.param


def test_columns_equal_a_plain_reading_of_a_messy_file(tmp_path: Path, chunk: int) -> None:
    lines = [json.dumps(metrics_line(1, s)) for s in range(1, 31)]
    nan_line = json.dumps(metrics_line(1, 19))
    lines[18] = nan_line.replace(f'"loss": {2.19}', '"loss": NaN')  # an old file's NaN
    assert lines[18] != nan_line
    lines[5] = lines[4][:40] + lines[5]  # step 5's writer killed mid-line, step 6 glued on
    del lines[4]
    lines[10:10] = ["", "[1, 2]", "{" * 70000]  # blank, not an object, hostile nesting
    lines.append(json.dumps({"attempt": 2, "step": 31, "time": 1.7e9 + 31}))  # few fields
    lines.append(json.dumps(metrics_line(2, 25, loss=None)))  # redone after a restart
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n" + json.dumps(metrics_line(2, 26))[:30])
    table = mt.read(path)
    assert table.unreadable == 3  # [1, 2], the hostile line, the torn tail
    assert list(table.steps) == [1, 2, 3, 4, *range(6, 31), 31, 25]
    assert list(table.attempts) == [1] * 29 + [2, 2]
    loss = table.col("loss")
    assert loss[0] == 2.01 and math.isnan(loss[-1]) and math.isnan(loss[-2])
    assert np.isnan(loss).sum() == 3  # the NaN token, the short line, the null
    assert table.col("tokens")[28] == 130 and math.isnan(table.col("tokens")[29])
    assert table.run_id == "r1"
    first = {k: v for k, v in metrics_line(1, 1).items() if k in mt.COLUMNS}
    said = {k: v[0] for k, v in table.columns.items() if not np.isnan(v[0])}  # NaN: absent
    assert said == first  # the first line's numbers read back; strings are not kept


def test_the_step_that_counts_is_the_last_line_written_for_it(tmp_path: Path) -> None:
    lines = [metrics_line(1, s) for s in range(1, 11)]
    lines += [metrics_line(2, s, loss=9.0) for s in range(6, 13)]  # resumed from step 5
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = mt.read(path)
    eff = table.effective()
    assert list(table.steps[eff]) == list(range(1, 13))
    assert list(table.attempts[eff]) == [1] * 5 + [2] * 7
    assert list(table.col("loss")[eff][5:]) == [9.0] * 7


def test_no_file_and_an_empty_file_give_an_empty_table(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    for table in (mt.read(tmp_path / "absent.jsonl"), mt.read(tmp_path / "empty.jsonl")):
        assert len(table) == 0 and not table and table.unreadable == 0
        assert len(table.effective()) == 0 and len(table.col("loss")) == 0


def test_a_column_the_first_line_of_a_piece_lacks_is_kept_from_the_others(
        tmp_path: Path) -> None:
    """A run resumed by a newer version: its first line (older, no cache_mb) decided the
    piece's columns in the one-pass path, and every later line's cache_mb became NaN."""
    from supervisor.morning.metrics_table import read

    path = tmp_path / "metrics.jsonl"
    old = {"step": 1, "attempt": 1, "time": 1.0, "loss": 2.0}
    new = [{"step": s, "attempt": 2, "time": float(s), "loss": 2.0, "cache_mb": 5.0}
           for s in range(2, 6)]
    path.write_text("".join(json.dumps(o) + "\n" for o in [old, *new]))
    cache = read(path).col("cache_mb")
    assert math.isnan(cache[0]) and list(cache[1:]) == [5.0] * 4
