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


# ---- adapter_path: mlx_lm's files written into it, nothing else touched -------------------


def test_adapter_path_gets_the_two_adapter_files_and_keeps_everything_else(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """mlx_lm lora writes adapters.safetensors and adapter_config.json into adapter_path and
    leaves the rest alone. Before: the directory was replaced whole (and the old one deleted),
    so `adapter_path: .` or a folder of earlier adapters lost everything in it."""
    dest = tmp_path / "mine"
    (dest / "older").mkdir(parents=True)
    (dest / "notes.txt").write_text("precious")
    (dest / "0000100_adapters.safetensors").write_bytes(b"an earlier mlx_lm run")
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=4, save_every=4,
                          steps_per_eval=4, adapter_path=str(dest))
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert (dest / "notes.txt").read_text() == "precious"
    assert (dest / "older").is_dir()
    assert (dest / "0000100_adapters.safetensors").read_bytes() == b"an earlier mlx_lm run"
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert (dest / name).read_bytes() == (run / "adapters" / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [
        "0000100_adapters.safetensors", "adapter_config.json", "adapters.safetensors",
        "notes.txt", "older"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "mine", "run"]


@pytest.mark.parametrize("case", ["a_file", "under_a_file"])
def test_an_adapter_path_that_cannot_be_a_directory_is_one_line_before_training(
        tmp_path: Path, tiny_model: Path, corpus: Path, case: str) -> None:
    """Before: a file was moved aside and replaced after training (exit 0); a path under a
    file was a FileExistsError traceback after the whole night, with no COMPLETE."""
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    target = blocker if case == "a_file" else blocker / "adapters"
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=4,
                          adapter_path=str(target))
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: adapter_path: {target}: cannot create the adapter directory: "
        f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "mine"
    assert not (run / "logs" / "metrics.jsonl").exists()  # nothing trained


# ---- a run whose final checkpoint was written but not its COMPLETE marker ------------------


def test_a_final_checkpoint_without_complete_finishes_the_run(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """Killed between the final checkpoint and COMPLETE: the next start finishes the run
    (COMPLETE, adapters). Before: an AssertionError traceback on every start, so the
    supervisor restarted it into the same crash until it gave up."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=6, save_every=3,
                          steps_per_eval=3)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    first = json.loads((run / "COMPLETE").read_text())
    weights = (run / "adapters" / "adapters.safetensors").read_bytes()
    (run / "COMPLETE").unlink()
    shutil.rmtree(run / "adapters")
    again = overnight("train", str(config), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    done = json.loads((run / "COMPLETE").read_text())
    assert (done["step"], done["best_step"], done["best_val_loss"], done["final_checkpoint"]) \
        == (6, first["best_step"], first["best_val_loss"], first["final_checkpoint"])
    assert (run / "adapters" / "adapters.safetensors").read_bytes() == weights

    # --resume of that final checkpoint into a new run directory: the same.
    other = tmp_path / "other"
    resumed = overnight("train", str(config), "--run-dir", str(other), "--resume",
                        first["final_checkpoint"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((other / "COMPLETE").read_text())["step"] == 6
    assert (other / "adapters" / "adapters.safetensors").read_bytes() == weights


def test_an_early_stop_checkpoint_without_complete_finishes_the_run_early_stopped(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """Killed between the early-stop checkpoint and COMPLETE: the next start finishes the run
    as early-stopped at that step. Before: it trained on to the next evaluation (step 6)
    and early-stopped there, with other adapters than the run's own."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=20, save_every=100,
                          steps_per_eval=2,
                          early_stopping={"patience": 1, "min_delta": 100.0, "warmup_steps": 0})
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 20
    first = json.loads((run / "COMPLETE").read_text())
    assert (first["status"], first["step"]) == ("early_stopped", 4)
    weights = (run / "adapters" / "adapters.safetensors").read_bytes()
    (run / "COMPLETE").unlink()
    shutil.rmtree(run / "adapters")
    again = overnight("train", str(config), "--run-dir", str(run))
    assert again.returncode == 20, again.stderr
    done = json.loads((run / "COMPLETE").read_text())
    assert (done["status"], done["step"], done["final_checkpoint"], done["best_step"]) == (
        "early_stopped", 4, first["final_checkpoint"], first["best_step"])
    assert (run / "adapters" / "adapters.safetensors").read_bytes() == weights
    steps = [json.loads(x)["step"] for x in (run / "logs" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing trained after the restart
    [resumed] = _events(run, "early_stop_resumed")
    assert resumed["step"] == 4


# ---- --resume PATH that is not a checkpoint ------------------------------------------------


def test_resume_of_a_path_that_is_no_checkpoint_says_what_it_is(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """Before: "no manifest.json (incomplete write)" for a missing path and a run directory."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=3, save_every=3)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    cases = {
        tmp_path / "nope": f"{tmp_path / 'nope'}: no such checkpoint directory",
        run: (f"{run} is a run directory, not a checkpoint: `--run-dir {run}` resumes from "
              f"its newest valid checkpoint, or name one: --resume "
              f"{run / 'checkpoints' / 'step-0000003'}"),
        run / "checkpoints": (f"{run / 'checkpoints'} is a checkpoints directory, not a "
                              "checkpoint: name one: --resume "
                              f"{run / 'checkpoints' / 'step-0000003'}"),
        run / "checkpoints" / "step-0000003" / "adapters.safetensors": (
            f"{run / 'checkpoints' / 'step-0000003' / 'adapters.safetensors'} is a file of the "
            f"checkpoint {run / 'checkpoints' / 'step-0000003'}: --resume "
            f"{run / 'checkpoints' / 'step-0000003'}"),
    }
    for path, said in cases.items():
        result = overnight("train", str(config), "--run-dir", str(tmp_path / "new"),
                           "--resume", str(path))
        assert result.returncode == 78, result.stderr
        assert result.stderr.strip().splitlines()[-1] == \
            f"overnight train: --resume {path}: {said}"


def test_data_naming_the_train_file_instead_of_its_directory_is_one_clear_line(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """Before: "data: .../train.jsonl/train.jsonl not found"."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus / "train.jsonl")
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: data: {corpus / 'train.jsonl'} is a file; expected the directory "
        f"that holds train.jsonl (valid.jsonl, test.jsonl), e.g. data: {corpus}")
