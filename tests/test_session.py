"""worker/session.py: mlx_lm's test pass (`test: true`, `test_batches`) after training, its loss in
the log, COMPLETE and the morning report; a missing test.jsonl stops the run before it starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import overnight, write_config


def _events(run: Path, name: str) -> list[dict]:
    lines = (run / "logs" / "worker.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


@pytest.fixture()
def with_test_split(tmp_path: Path, corpus: Path) -> Path:
    """The corpus with test.jsonl = valid.jsonl (32 examples)."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    shutil.copy(data / "valid.jsonl", data / "test.jsonl")
    return data


def test_the_test_pass_runs_after_training_and_is_recorded(
        tmp_path: Path, tiny_model: Path, with_test_split: Path) -> None:
    """test.jsonl = valid.jsonl and both whole: the test loss is the last validation loss
    (the same final weights on the same examples)."""
    config = write_config(tmp_path / "t.yaml", tiny_model, with_test_split, iters=20,
                          steps_per_eval=10, val_batches=-1, test=True, test_batches=-1)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    [tested] = _events(run, "tested")
    last_val = _events(run, "evaluated")[-1]
    assert last_val["step"] == tested["step"] == 20
    assert tested["test_examples"] == 32
    assert tested["test_loss"] == pytest.approx(last_val["val_loss"], rel=1e-6)
    complete = json.loads((run / "COMPLETE").read_text())
    assert complete["test_loss"] == tested["test_loss"]
    assert complete["test_examples"] == 32
    line = f"overnight train: test loss {tested['test_loss']:.3f}"
    assert line in result.stderr

    report = overnight("report", str(run), "--quiet", timeout=60)
    assert report.returncode == 0, report.stderr
    assert f"test loss {tested['test_loss']:.3f}" in report.stdout.splitlines()[0]
    assert "| test (mlx_lm's test pass) | loss " in (run / "report.md").read_text()


def test_test_batches_takes_that_many_batches(tmp_path: Path, tiny_model: Path,
                                              with_test_split: Path) -> None:
    # also through the cache and wired-memory settings (honoured, not ignored; no-ops on CPU)
    config = write_config(tmp_path / "t.yaml", tiny_model, with_test_split, iters=5,
                          test=True, test_batches=3, clear_cache_threshold="1MB",
                          wired_limit="1GB")
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    [tested] = _events(tmp_path / "run", "tested")
    assert tested["test_examples"] == 3 * 4  # test_batches x batch_size


def test_a_missing_test_file_is_one_line_before_training(tmp_path: Path, tiny_model: Path,
                                                          corpus: Path) -> None:
    config = write_config(tmp_path / "t.yaml", tiny_model, corpus, test=True)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: test: true but {corpus}/test.jsonl not found (mlx_lm's test pass "
        "reads test.jsonl; add it or set test: false)")
    assert not (run / "logs" / "metrics.jsonl").exists()
    assert not _events(run, "data_loaded")  # nothing was loaded
