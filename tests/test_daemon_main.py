"""supervisor/daemon/main.py: `overnight run` on a run that `overnight train` already finished
records what the run did (its final step, total and best), not "finished 0/10 steps"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import overnight, write_config
from tests.supervisor_support import record


@pytest.mark.parametrize("early", [False, True])
def test_a_run_finished_by_overnight_train_is_recorded_with_its_steps_and_best(
        tmp_path: Path, tiny_model: Path, corpus: Path, early: bool) -> None:
    """Before: run.json said "step 0 / 0" (the report: "finished 0/10 steps"), no best
    checkpoint, and an early-stopped run became "finished"."""
    stop = {"patience": 1, "min_delta": 100.0, "warmup_steps": 0} if early else {}
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=10, steps_per_eval=2,
                          save_every=100, early_stopping=stop,
                          supervisor={"caffeinate": False})
    run = tmp_path / "run"
    trained = overnight("train", str(config), "--run-dir", str(run))
    assert trained.returncode == (20 if early else 0), trained.stderr
    done = json.loads((run / "COMPLETE").read_text())
    step = 4 if early else 10
    assert done["step"] == step

    sup = overnight("run", str(config), "--run-dir", str(run))
    assert sup.returncode == 0, sup.stderr
    how = "early_stopped" if early else "finished"
    said = "early-stopped" if early else "finished"
    assert sup.stderr.strip().splitlines()[-1] == (
        f"overnight run: {how}: the run was already complete ({said} at step {step} of 10)")
    rec = record(run)
    assert (rec["state"], rec["final_step"], rec["total_steps"], rec["high_water_step"]) == (
        how, step, 10, step)
    assert rec["attempts"] == []  # no worker was started
    best = rec["best_checkpoint"]
    assert (best["step"], best["val_loss"]) == (done["best_step"], done["best_val_loss"])
    assert best["path"] == str(run / "checkpoints" / f"step-{done['best_step']:07d}")
    assert rec["latest_checkpoint"]["step"] == step

    status = overnight("status", str(run))
    assert status.returncode == 0, status.stderr
    assert f"step     {step} / 10" in status.stdout
    assert status.stdout.splitlines()[0].startswith(
        f"early-stopped at step {step}/10" if early else "finished 10/10 steps")


def test_raising_iters_of_a_finished_run_says_how_to_train_on(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """`iters` raised after the night: `train` and `run` say the finished run is not extended
    and how to go on (before: "already complete; nothing to do" / "finished at step 10 of
    10", the new iters unmentioned), and the way they name works: a new run directory with
    resume_adapter_file starts from the finished adapters."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=10, save_every=100,
                          supervisor={"caffeinate": False})
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    more = write_config(tmp_path / "more.yaml", tiny_model, corpus, iters=25, save_every=100,
                        supervisor={"caffeinate": False})
    said = (f"the config now asks for iters: 25, the run finished its 10; a finished run is "
            "not extended in place (its learning-rate schedule and data order were for 10 "
            "steps): to train on, start a new run directory with resume_adapter_file: "
            f"{run / 'adapters'}, or add --fresh to start this one over")
    trained = overnight("train", str(more), "--run-dir", str(run))
    assert trained.returncode == 0, trained.stderr
    assert [ln for ln in trained.stderr.splitlines() if ln.startswith("overnight train:")] == [
        f"overnight train: run in {run} is already complete; {said}"]
    sup = overnight("run", str(more), "--run-dir", str(run))
    assert sup.returncode == 0, sup.stderr
    assert sup.stderr.strip().splitlines()[-1] == (
        f"overnight run: finished: the run was already complete (finished at step 10 of 10); "
        f"{said}")
    same = overnight("run", str(config), "--run-dir", str(run))  # same iters: nothing more
    assert same.stderr.strip().splitlines()[-1].endswith("(finished at step 10 of 10)")

    on = write_config(tmp_path / "on.yaml", tiny_model, corpus, iters=3, save_every=100,
                      resume_adapter_file=str(run / "adapters"),
                      supervisor={"caffeinate": False})
    went_on = overnight("train", str(on), "--run-dir", str(tmp_path / "run2"))
    assert went_on.returncode == 0, went_on.stderr
    assert f"adapter_weights_loaded         path={run / 'adapters' / 'adapters.safetensors'}" \
        in went_on.stderr
