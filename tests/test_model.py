"""worker/model.py: mlx_lm's `resume_adapter_file` is the starting point of a fresh run (checked
against the layers the config builds); our own checkpoints still resume exactly; `--resume` on
an mlx_lm adapter directory says what it is."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from shared import config as cfg
from shared.errors import ConfigError
from tests.conftest import overnight, subprocess_env, write_config


def _metrics(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m
    return out


def _events(run: Path, name: str) -> list[dict]:
    lines = (run / "logs" / "worker.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def _adapters(path: Path) -> dict[str, mx.array]:
    return mx.load(str(path / "adapters.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, corpus: Path) -> Path:
    """A run trained well below the fresh model's loss: its adapters are the starting point."""
    base = tmp_path_factory.mktemp("trained")
    config = write_config(base / "a.yaml", tiny_model, corpus, iters=30, steps_per_eval=30,
                          save_every=30)
    done = overnight("train", str(config), "--run-dir", str(base / "run"))
    assert done.returncode == 0, done.stderr
    return base / "run"


def test_resume_adapter_file_is_the_start_of_a_fresh_run(
        tmp_path: Path, tiny_model: Path, corpus: Path, trained: Path) -> None:
    """Before: the key was dropped without a word and the run began at the fresh loss."""
    fresh_first = _metrics(trained)[1]["loss"]  # same config and seed: the same first batch
    trained_last = _metrics(trained)[30]["loss"]
    assert fresh_first - trained_last > 1.5  # the adapters learned something
    config = write_config(tmp_path / "b.yaml", tiny_model, corpus, iters=3,
                          resume_adapter_file=str(trained / "adapters" /
                                                  "adapters.safetensors"))
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    first = _metrics(tmp_path / "run")[1]["loss"]
    assert first < fresh_first - 1.5  # where the trained run was, not where a fresh one starts
    [loaded] = _events(tmp_path / "run", "adapter_weights_loaded")
    assert loaded["tensors"] == len(_adapters(trained / "adapters")) == 2 * 7 * 2


def test_loaded_weights_are_exactly_the_files(tmp_path: Path, tiny_model: Path,
                                              trained: Path) -> None:
    from worker import model as models

    c = cfg.resolve({"model": str(tiny_model), "data": "d", "num_layers": -1,
                     "lora_parameters": {"rank": 4, "scale": 10.0}})
    model, _ = models.load_base(c)
    models.make_trainable(model, c)
    path, n = models.load_adapter_weights(model, str(trained / "adapters"))  # a directory
    assert path == trained / "adapters" / "adapters.safetensors"
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.trainable_parameters()))
    saved = _adapters(trained / "adapters")
    assert n == len(saved) and set(params) == set(saved)
    assert all(mx.array_equal(params[k], saved[k]).item() for k in saved)


@pytest.mark.parametrize(("change", "message"), [
    ({"lora_parameters": {"rank": 8, "scale": 10.0}},
     "28 of another shape, e.g. model.layers.0.mlp.down_proj.lora_a (128, 4) != (128, 8)"),
    ({"num_layers": 1}, "14 unexpected, e.g. model.layers.0.mlp.down_proj.lora_a"),
    ({"lora_parameters": {"rank": 4, "scale": 10.0, "keys": ["self_attn.q_proj"]}},
     "24 unexpected, e.g. model.layers.0.mlp.down_proj.lora_a"),
    ({"fine_tune_type": "dora"}, "missing 14 tensors, e.g. model.layers.0.mlp.down_proj.m"),
])
def test_an_adapter_that_does_not_fit_the_layers_is_refused(
        tiny_model: Path, trained: Path, change: dict, message: str) -> None:
    from worker import model as models

    c = cfg.resolve({"model": str(tiny_model), "data": "d", "num_layers": -1,
                     "lora_parameters": {"rank": 4, "scale": 10.0}, **change})
    model, _ = models.load_base(c)
    models.make_trainable(model, c)
    with pytest.raises(ConfigError) as e:
        models.load_adapter_weights(model, str(trained / "adapters"))
    assert str(e.value).startswith(f"resume_adapter_file: {trained}/adapters/"
                                   "adapters.safetensors: does not match the layers this "
                                   "config trains (")
    assert message in str(e.value)


def test_a_mismatch_ends_the_worker_in_one_line_exit_78(
        tmp_path: Path, tiny_model: Path, corpus: Path, trained: Path) -> None:
    config = write_config(tmp_path / "b.yaml", tiny_model, corpus, iters=3,
                          resume_adapter_file=str(trained / "adapters"),
                          lora_parameters={"rank": 8})
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 78
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"overnight train: resume_adapter_file: {trained}/adapters/"
                    "adapters.safetensors: does not match the layers this config trains (28 of "
                    "another shape, e.g. model.layers.0.mlp.down_proj.lora_a (128, 4) != "
                    "(128, 8)): fine_tune_type, num_layers and lora_parameters must be those it "
                    "was trained with")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "step-0000001").exists()


def test_a_missing_adapter_file_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    from worker import model as models

    with pytest.raises(ConfigError, match=r"resume_adapter_file: '/nowhere': no such file or "
                                          r"adapter directory"):
        models.adapter_weights_file("/nowhere")


def test_a_run_with_its_own_checkpoint_resumes_from_it_not_from_the_adapter_file(
        tmp_path: Path, tiny_model: Path, corpus: Path, trained: Path) -> None:
    """Exact resume is unchanged: crashed at step 8 and restarted, the run continues from its
    step-5 checkpoint and ends with the adapters of an uninterrupted run."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=10, save_every=5,
                          steps_per_eval=5, resume_adapter_file=str(trained / "adapters"))
    whole = overnight("train", str(config), "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "crashed"
    first = overnight("train", str(config), "--run-dir", str(run),
                      env=subprocess_env(OVERNIGHT_INJECT="crash@8"))
    assert first.returncode != 0
    second = overnight("train", str(config), "--run-dir", str(run))
    assert second.returncode == 0, second.stderr
    assert [e["step"] for e in _events(run, "resumed")] == [5]
    assert len(_events(run, "adapter_weights_loaded")) == 1  # the first attempt only
    a, b = _adapters(tmp_path / "whole" / "adapters"), _adapters(run / "adapters")
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) == 0.0


def test_resume_on_an_mlx_lm_adapter_directory_says_what_it_is(
        tmp_path: Path, tiny_model: Path, corpus: Path, trained: Path) -> None:
    """Before: "adapters: no manifest.json (incomplete write)"."""
    config = write_config(tmp_path / "d.yaml", tiny_model, corpus)
    for given in (trained / "adapters", trained / "adapters" / "adapters.safetensors"):
        result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"),
                           "--resume", str(given))
        assert result.returncode == 78
        assert result.stderr.strip().splitlines()[-1] == (
            f"overnight train: --resume {given}: an mlx_lm adapter, not a checkpoint: use "
            f"resume_adapter_file: {given} in the config (or --resume-adapter-file) to start "
            "a fresh run from its weights")
