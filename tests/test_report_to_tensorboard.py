"""`report_to: tensorboard` (ours; mlx_lm 0.32.2's SUPPORT_CALLBACK has wandb and swanlab only):
TensorBoard scalars in RUN_DIR/tensorboard only when the run asks, and tensorboardX (and
wandb) are not even imported by a worker whose run does not ask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared import config as cfg
from shared.errors import ConfigError
from tests.conftest import overnight, subprocess_env, write_config
from tests.test_worker_e2e import _tfrecord_events


def _train_importtime(config: Path, run: Path) -> subprocess.CompletedProcess:
    """`overnight train` under `python -X importtime`: every module the worker imported is
    a line on stderr."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "shared.cli", "train", str(config),
         "--run-dir", str(run)],
        capture_output=True, text=True, timeout=180, env=subprocess_env())


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def _scalars(run: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in _tfrecord_events(f):
            for v in event.summary.value:
                out.setdefault(v.tag, []).append(event.step)
    return out


def test_a_run_that_does_not_ask_imports_no_tensorboardx_and_writes_none(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    pytest.importorskip("tensorboardX", reason="the optional tensorboard extra is not installed")
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=4, steps_per_report=2,
                          steps_per_eval=4, save_every=4)
    run = tmp_path / "run"
    done = _train_importtime(config, run)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = _imported(done.stderr)
    assert "mlx_lm.utils" in modules  # the listing is real
    # A blocked or failed import attempt is listed too, as the package's name alone; a real
    # import lists its submodules.
    assert not {m for m in modules if "." in m and m.split(".")[0] in ("tensorboardX", "wandb")}
    assert not (run / "tensorboard").exists()


def test_report_to_tensorboard_writes_scalars_and_a_resumed_run_appends(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """Killed (injected crash) at step 5 after the step-4 checkpoint, then resumed: what was
    written up to the checkpoint is on disk (the writer flushes at each checkpoint, not only
    every 30 s), and the same tensorboard/ directory gets the second attempt's scalars beside
    the first's."""
    pytest.importorskip("tensorboardX", reason="the optional tensorboard extra is not installed")
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=8, steps_per_report=2,
                          steps_per_eval=4, save_every=2, report_to="tensorboard",
                          debug={"inject": "crash@5"})
    run = tmp_path / "run"
    first = overnight("train", str(config), "--run-dir", str(run))
    assert first.returncode != 0
    assert _scalars(run)["train/loss"] == [2, 4]
    second = overnight("train", str(config), "--run-dir", str(run))
    assert second.returncode == 0, second.stderr
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars = _scalars(run)
    assert sorted(scalars["train/loss"]) == [2, 4, 6, 8]
    assert sorted(scalars["val/loss"]) == [4, 8]


def test_a_tensorboard_directory_is_left_alone_when_the_config_no_longer_asks(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    """An existing run directory with tensorboard/ (from an earlier attempt or an earlier
    version, which wrote it whenever tensorboardX was installed) still trains; its files are
    untouched and the worker says once how to keep writing them."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=4, steps_per_report=2,
                          steps_per_eval=4, save_every=4)
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"earlier")
    done = overnight("train", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert [f.name for f in (run / "tensorboard").iterdir()] == ["events.out.tfevents.1.host"]
    assert (f"overnight train: {run / 'tensorboard'} is not written by this run: "
            "add report_to: tensorboard to the config to keep writing it") in done.stderr


def test_report_to_takes_tensorboard_beside_mlx_lms_services() -> None:
    c = cfg.resolve({"model": "m", "data": "d", "report_to": "TensorBoard, wandb"})
    assert c.report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError) as e:
        cfg.resolve({"model": "m", "data": "d", "report_to": "mlflow"})
    assert "report_to: expected wandb, swanlab and/or tensorboard" in str(e.value)
