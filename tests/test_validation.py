"""Validation settings: `val_batches: 0` is no validation (early stopping on the smoothed
training loss, as without a validation file), `-1` the whole set as in mlx_lm; a NaN is never
a best value and never triggers early stopping."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shared import config as cfg
from shared import protocol as p
from tests.conftest import overnight, write_config
from worker.monitors import EarlyStopper
from worker.train import Trainer, TrainState


def _events(run: Path, name: str) -> list[dict]:
    lines = (run / "logs" / "worker.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def _strict(text: str) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_val_batches_0_is_no_validation(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """Before: every evaluation was NaN, early stopping ended the run at step 10 "best inf at
    step -1", COMPLETE held a bare NaN and the report a green tick with "best val nan"."""
    config = write_config(tmp_path / "v.yaml", tiny_model, corpus, iters=30, steps_per_eval=5,
                          val_batches=0, early_stopping={"warmup_steps": 0, "patience": 2})
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert not _events(run, "evaluated")
    assert [e["reason"] for e in _events(run, "validation_skipped")] == ["val_batches: 0"]
    complete = _strict((run / "COMPLETE").read_text())
    assert complete["status"] == "completed" and complete["step"] == 30  # not early-stopped
    assert complete["best_val_loss"] is None and complete["best_step"] == -1
    report = overnight("report", str(run), "--quiet", timeout=60)
    verdict = report.stdout.splitlines()[0]
    assert "no validation loss" in verdict and "nan" not in verdict.lower()
    assert "validation: none (val_batches: 0)" in result.stderr  # the start-up block


def test_val_batches_minus_1_is_the_whole_set(tmp_path: Path, tiny_model: Path,
                                              corpus: Path) -> None:
    config = write_config(tmp_path / "v.yaml", tiny_model, corpus, iters=5, steps_per_eval=5,
                          save_every=5, val_batches=-1)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    state = _strict((run / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())
    assert state["val_examples"] == 32  # every line of valid.jsonl


def test_a_nan_is_never_a_best_value_nor_a_reason_to_stop() -> None:
    options = cfg.resolve({"model": "m", "data": "d",
                           "early_stopping": {"warmup_steps": 0, "patience": 2}}).early_stopping
    stopper = EarlyStopper(options)
    assert not stopper.observe(10, math.nan) and not stopper.observe(20, math.nan)
    assert not stopper.observe(30, math.inf)
    assert (stopper.best, stopper.best_step, stopper.bad_evals) == (math.inf, -1, 0)
    assert not stopper.observe(40, 2.0) and (stopper.best, stopper.best_step) == (2.0, 40)


class _Reporter:
    def __init__(self) -> None:
        self.evals: list[p.EvalResult] = []

    def phase(self, phase: p.Phase, step: int) -> None:
        pass

    def evaluation(self, e: p.EvalResult) -> None:
        self.evals.append(e)


def test_a_nan_validation_loss_does_not_become_the_best_checkpoint() -> None:
    c = cfg.resolve({"model": "m", "data": "d",
                     "early_stopping": {"warmup_steps": 0, "patience": 1}})
    reporter = _Reporter()
    trainer = Trainer(
        config=c, run_id="r", attempt=1, model=None, optimizer=None, train_set=None,
        valid_set=object(), val_subset=None, plan=None, state=TrainState(),
        stopper=EarlyStopper(c.early_stopping), spikes=None, writer=None, reporter=reporter,
        progress=None, controls=None, injector=None, adapter_config={}, lr_schedule=None,
        state_extra={})  # type: ignore[arg-type]
    values = iter([math.nan, 3.0, math.nan])
    trainer.evaluate = lambda *a, **k: next(values)  # type: ignore[method-assign]
    assert trainer._evaluate_and_watch(10) == (False, False)
    assert trainer.state.best_val is None and trainer.state.best_step == -1
    assert trainer._evaluate_and_watch(20) == (False, True)
    assert trainer._evaluate_and_watch(30) == (False, False)  # NaN: no stop at patience 1
    assert (trainer.state.best_val, trainer.state.best_step) == (3.0, 20)
    assert [e.best_step for e in reporter.evals] == [-1, 20, 20]
