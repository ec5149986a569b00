"""logs/metrics.jsonl parsed on two cores (supervisor/morning/metrics_split.py): the summary
is the one process's, to the last bit, whether the helper parses its part, dies before it
writes anything, or leaves a torn record; the helper's temporary file is always removed.

The file is made here: ~6 MB of lines as the worker writes them (shared.protocol's keys),
two attempts with a redone stretch, a few lines that are not JSON, one with a NaN token and
one without `tokens` — every path of metrics_table's parser crosses the split.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from supervisor.morning import metrics_split
from supervisor.morning.metrics_summary import Plan, summarize
from supervisor.morning.metrics_table import CHUNK_BYTES, pieces

ROOT = Path(__file__).resolve().parents[1]
LINES = 15_000
PLAN = Plan(redo_after={1: 9_000}, evals=frozenset(range(0, LINES, 500)),
            periods=((1_800_000_100.0, 1_800_000_900.0),))


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("split") / "metrics.jsonl"
    t = 1_800_000_000.0
    with open(path, "w") as f:
        for i in range(LINES):
            attempt = 1 if i < 10_000 else 2
            step = i + 1 if attempt == 1 else 9_000 + (i - 10_000) + 1
            t += rng.uniform(0.05, 0.15)
            line: dict[str, Any] = {
                "run_id": "split-test", "attempt": attempt, "step": step, "time": t,
                "loss": rng.uniform(1, 7), "grad_norm": rng.uniform(0, 9), "lr": 1e-4,
                "tokens": rng.randrange(20, 40), "tokens_per_sec": rng.uniform(400, 700),
                "step_seconds": rng.uniform(0.04, 0.06), "active_mb": rng.uniform(0.4, 0.5),
                "peak_mb": rng.uniform(3, 4), "rss_mb": rng.uniform(120, 130),
                "data_position": i, "type": "metrics", "v": 1,
                "note": "x" * rng.randrange(0, 200),  # lines of varied length
            }
            if i % 4001 == 17:
                del line["tokens"]
            text = json.dumps(line)
            if i % 5003 == 11:
                text = text.replace(f'"loss": {line["loss"]}', '"loss": NaN')
            f.write(text + "\n")
            if i % 3001 == 5:
                f.write('{"torn": tr\n')
    assert path.stat().st_size > 5 * CHUNK_BYTES
    return path


def one_process(path: Path) -> Any:
    return summarize(path, PLAN)


def same(a: Any, b: Any, where: str = "summary") -> None:
    """a and b equal to the last bit, arrays and NaN included."""
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        same(vars(a), vars(b), where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def test_two_processes_sum_up_exactly_what_one_does(metrics: Path) -> None:
    expected = one_process(metrics)
    assert expected.n == LINES and expected.unreadable == 5
    with metrics_split.start(metrics, min_bytes=0) as split:
        assert 0 < split.split < metrics.stat().st_size
        got = summarize(metrics, PLAN, split.pieces())
        assert split.from_helper > 0, "the helper parsed nothing: the test tests nothing"
        assert split.helper is not None and split.helper.wait() == 0
        out = split.out
    same(expected, got)
    assert out is not None and not out.exists()


def test_the_split_falls_where_one_process_ends_a_piece(metrics: Path) -> None:
    """Sums are added piece by piece: the helper's first piece must start where one process's
    does, whatever byte the balance asked for."""
    ends = {0} | {p.upto for p in pieces(metrics)}
    for at in (1, CHUNK_BYTES // 3, 2 * CHUNK_BYTES + 5, 3 * CHUNK_BYTES - 5):
        assert metrics_split._piece_start(metrics, at) in ends, at


def test_a_helper_that_dies_first_costs_time_not_lines(metrics: Path) -> None:
    expected = one_process(metrics)
    with metrics_split.start(metrics, min_bytes=0) as split:
        assert split.helper is not None
        split.helper.kill()
        split.helper.wait()
        got = summarize(metrics, PLAN, split.pieces())
    same(expected, got)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.99])
def test_a_torn_record_is_parsed_again_from_the_last_whole_one(metrics: Path, tmp_path: Path,
                                                               cut: float) -> None:
    expected = one_process(metrics)
    split_at = metrics_split._piece_start(metrics, 2 * CHUNK_BYTES)
    out = tmp_path / "helper.bin"
    helper = subprocess.Popen([sys.executable, "-m", "supervisor.morning.metrics_split",
                               str(metrics), str(split_at), str(out)], cwd=ROOT)
    assert helper.wait() == 0
    whole = out.read_bytes()
    out.write_bytes(whole[:int(len(whole) * cut)])
    with metrics_split.Split(metrics, split_at, helper, out) as split:
        got = summarize(metrics, PLAN, split.pieces())
        assert split.from_helper > 0 or cut < 0.5
    same(expected, got)
    assert not out.exists()


def test_small_files_and_one_core_stay_in_one_process(metrics: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert metrics_split.start(metrics).helper is None  # ~6 MB < MIN_SPLIT_BYTES
    monkeypatch.setenv("OVERNIGHT_METRICS_SPLIT", "0")
    assert metrics_split.start(metrics, min_bytes=0).helper is None
    monkeypatch.delenv("OVERNIGHT_METRICS_SPLIT")
    monkeypatch.setattr(metrics_split.os, "cpu_count", lambda: 1)
    assert metrics_split.start(metrics, min_bytes=0).helper is None
    assert metrics_split.start(metrics.with_name("absent.jsonl"), min_bytes=0).helper is None


def test_one_core_by_affinity_stays_in_one_process(metrics: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`taskset -c 0`, a container's cpuset: os.cpu_count() still says 2 (it ignores the
    affinity), and the helper competed with this process for the one core (slower)."""
    monkeypatch.delenv("OVERNIGHT_METRICS_SPLIT", raising=False)
    monkeypatch.setattr(metrics_split.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(metrics_split.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert metrics_split.start(metrics, min_bytes=0).helper is None


def test_a_helper_that_hangs_is_stopped_and_its_part_parsed_here(
        metrics: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = one_process(metrics)
    monkeypatch.setattr(metrics_split, "HELPER_STALL_S", 0.5)
    out = tmp_path / "helper.bin"
    out.write_bytes(b"")
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    split_at = metrics_split._piece_start(metrics, 2 * CHUNK_BYTES)
    with metrics_split.Split(metrics, split_at, hung, out) as split:
        got = summarize(metrics, PLAN, split.pieces())
        assert hung.poll() is not None, "the hung helper was left running"
    same(expected, got)


def test_the_busier_this_process_the_more_the_helper_parses(metrics: Path) -> None:
    """The split balances the two sides: work this process does meanwhile (the worker log,
    matplotlib's import) moves it towards the start; with enough, the helper takes it all
    and the summary is still the one process's."""
    size = metrics.stat().st_size
    with metrics_split.start(metrics, min_bytes=0) as idle, \
            metrics_split.start(metrics, other_bytes=size, min_bytes=0) as busy, \
            metrics_split.start(metrics, other_seconds=60.0, min_bytes=0) as swamped:
        assert idle.split > busy.split > 0 and swamped.split == 0
        got = summarize(metrics, PLAN, swamped.pieces())
        assert swamped.from_helper > 0
    same(one_process(metrics), got)


def test_a_metrics_path_that_is_a_fifo_is_no_metrics_not_a_hang(tmp_path: Path) -> None:
    """`overnight report` opened logs/metrics.jsonl for reading; a FIFO there (no writer)
    blocked it forever. A path that is not a regular file holds no metrics."""
    import threading

    from supervisor.morning.metrics_table import pieces
    from supervisor.morning.report_numbers import _no_metrics

    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(
        (list(pieces(fifo)), _no_metrics(fifo))), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so that the test process can end
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert got[0][0] == [] and "not a file" in got[0][1]
