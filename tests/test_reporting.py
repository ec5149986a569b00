"""worker/reporting.py: `report_to` goes through mlx_lm's own reporting callbacks with the fields
mlx_lm's trainer gives them (checked in wandb's offline run directory); the packages are
imported only when asked; a service whose package is missing is one line at start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared import config as cfg
from shared import protocol as p
from tests.conftest import overnight, subprocess_env, write_config
from worker.reporting import CallbackReporter

# mlx_lm/tuner/trainer.py (0.32.2): the dicts its train() hands to the callbacks
MLX_LM_TRAIN_KEYS = {"iteration", "train_loss", "learning_rate", "iterations_per_second",
                     "tokens_per_second", "trained_tokens", "peak_memory"}
MLX_LM_VAL_KEYS = {"iteration", "val_loss", "val_time"}


class _Recorder:
    def __init__(self) -> None:
        self.train: list[dict] = []
        self.val: list[dict] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.train.append(info)

    def on_val_loss_report(self, info: dict) -> None:
        self.val.append(info)


def _step(step: int, loss: float, tokens: int = 100, seconds: float = 0.5) -> p.StepMetrics:
    return p.StepMetrics(run_id="r", attempt=1, step=step, time=0.0, loss=loss, grad_norm=1.0,
                         lr=1e-4, tokens=tokens, tokens_per_sec=tokens / seconds,
                         step_seconds=seconds, active_mb=10.0, peak_mb=1000.0, rss_mb=20.0)


def test_the_callbacks_get_mlx_lms_fields_every_steps_per_report() -> None:
    rec = _Recorder()
    reporter = CallbackReporter(rec, every=2, total_steps=5, names=[], trained_tokens=1000)
    for step, loss in ((1, 4.0), (2, 2.0), (3, 3.0), (4, 1.0), (5, 6.0)):
        reporter.step(_step(step, loss))
    reporter.evaluation(p.EvalResult(run_id="r", attempt=1, step=4, val_loss=2.5,
                                     best_val_loss=2.5, best_step=4, seconds=0.25))
    assert [set(t) for t in rec.train] == [MLX_LM_TRAIN_KEYS] * 3
    assert [t["iteration"] for t in rec.train] == [2, 4, 5]  # and the last step, as mlx_lm
    assert [t["train_loss"] for t in rec.train] == [3.0, 2.0, 6.0]  # window means
    assert rec.train[0]["iterations_per_second"] == 2.0  # 2 steps in 1 s
    assert rec.train[0]["tokens_per_second"] == 200.0
    assert [t["trained_tokens"] for t in rec.train] == [1200, 1400, 1500]  # run total
    assert rec.train[0]["peak_memory"] == 1000 * 2**20 / 1e9  # GB, as mlx_lm
    assert rec.val == [{"iteration": 4, "val_loss": 2.5, "val_time": 0.25}]


def test_a_failing_service_is_logged_once_and_training_goes_on() -> None:
    class Broken:
        calls = 0

        def on_train_loss_report(self, info: dict) -> None:
            Broken.calls += 1
            raise RuntimeError("network down")

    reporter = CallbackReporter(Broken(), every=1, total_steps=3, names=[])
    for step in (1, 2, 3):
        reporter.step(_step(step, 1.0))
    assert Broken.calls == 1


def test_reporting_packages_are_imported_only_when_asked() -> None:
    """mlx_lm.tuner imports wandb at import time whenever it is installed (~1 s)."""
    code = """
import sys
from shared import config as cfg
from worker.reporting import skip_unrequested_reporters
import importlib.util
assert importlib.util.find_spec("wandb") is not None  # installed (the test extra)
skip_unrequested_reporters(cfg.resolve({"model": "m", "data": "d"}))
import mlx_lm.tuner.utils
from mlx_lm.tuner import callbacks
print(sys.modules.get("wandb") is not None, callbacks.wandb is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"  # asked for: see the wandb run test below


def test_report_to_wandb_writes_our_metrics_to_its_offline_run(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    config = write_config(tmp_path / "w.yaml", tiny_model, corpus, iters=10, steps_per_report=5,
                          steps_per_eval=5, report_to="wandb", project_name="overnight-test")
    run = tmp_path / "run"
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true",
                         WANDB_CONFIG_DIR=str(tmp_path / "wb-config"),
                         WANDB_CACHE_DIR=str(tmp_path / "wb-cache"),
                         WANDB_DATA_DIR=str(tmp_path / "wb-data"))
    result = overnight("train", str(config), "--run-dir", str(run), env=env)
    assert result.returncode == 0, result.stderr
    [offline] = list((run / "wandb").glob("offline-run-*"))
    inspect = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect",
                              "--json", str(offline)], capture_output=True, text=True,
                             timeout=120, env=env)
    assert inspect.returncode == 0, inspect.stderr
    records = [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    [meta] = [r["run"] for r in records if r.get("type") == "run"]
    assert meta["project"] == "overnight-test" and meta["display_name"] == "run"

    losses = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        losses[m["step"]] = m["loss"]
    evals = {}
    for line in (run / "logs" / "worker.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "evaluated":
            evals[e["step"]] = e["val_loss"]
    by_step = {h["iteration"]: h for h in history}
    assert sorted(by_step) == [5, 10]
    for step in (5, 10):
        h = by_step[step]
        assert set(h) >= MLX_LM_TRAIN_KEYS | MLX_LM_VAL_KEYS
        window = [losses[s] for s in range(step - 4, step + 1)]
        assert abs(h["train_loss"] - sum(window) / 5) < 1e-6
        assert abs(h["val_loss"] - evals[step]) < 1e-6


def test_a_service_that_is_not_installed_is_one_line_at_start(tmp_path: Path, tiny_model: Path,
                                                                corpus: Path) -> None:
    config = write_config(tmp_path / "s.yaml", tiny_model, corpus, report_to="wandb,swanlab")
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: report_to: swanlab is not installed in this Python ({sys.executable})"
        ": pip install swanlab, or remove it from report_to")
    assert not (tmp_path / "run" / "logs" / "metrics.jsonl").exists()


def test_report_to_accepts_mlx_lms_spellings() -> None:
    c = cfg.resolve({"model": "m", "data": "d", "report_to": "WandB, swanlab"})
    assert c.report_to == ["wandb", "swanlab"]
    assert cfg.resolve({"model": "m", "data": "d", "report_to": None}).report_to is None


def test_the_progress_line_at_an_evaluation_step_shows_that_evaluation(tmp_path) -> None:
    """Issue 17: the line was printed when the step's metrics came in, before the evaluation
    of that step: `val=` showed the evaluation before."""
    import io

    from shared.progress import Progress
    from worker.reporting import RunReporter

    out = io.StringIO()
    reporter = RunReporter(Progress(20), tmp_path / "metrics.jsonl", 10, out)
    for step in range(1, 21):
        reporter.step(_step(step, 3.0))
        if step % 10 == 0:
            val = 4.0 - step / 10
            reporter.evaluation(p.EvalResult(run_id="r", attempt=1, step=step, val_loss=val,
                                             best_val_loss=val, best_step=step, seconds=0.1))
        reporter.step_done(step)
    reporter.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[1] for ln in lines] == ["step 10/20", "step 20/20"]
    assert "val=3.00 (best 3.00)" in lines[0] and "val=2.00 (best 2.00)" in lines[1]
