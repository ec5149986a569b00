"""shared/mlx_lm_keys.py: every key of mlx_lm's CONFIG_DEFAULTS is honoured, refused or warned
about (never silently dropped); the start-up block lists how a run differs from `mlx_lm lora`;
mlx-lm's own example config runs through `overnight train` and `mlx_lm lora` alike."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx_lm.lora import CONFIG_DEFAULTS

from shared import config as cfg
from shared import mlx_lm_keys
from shared.errors import ConfigError
from tests.conftest import overnight, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mlx_lm_keys.md"


def _value_of(c: cfg.Config, key: str) -> object:
    value = getattr(c, key)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


@pytest.mark.parametrize("key", sorted(CONFIG_DEFAULTS))
def test_every_config_defaults_key_is_honoured_refused_or_warned(key: str) -> None:
    """Read from the installed mlx_lm: a key missing from shared/mlx_lm_keys.KEYS, or listed as
    honoured without a Config field, or whose mlx_lm default is accepted and then dropped,
    fails here."""
    assert key in mlx_lm_keys.KEYS, f"mlx_lm key {key!r} is neither handled nor listed"
    status = mlx_lm_keys.KEYS[key].status
    value = CONFIG_DEFAULTS[key]
    if status in ("same", "different"):
        assert key in {f.name for f in dataclasses.fields(cfg.Config)}
    try:
        c = cfg.resolve({"model": "m", "data": "d", key: value}, source="lora.yaml")
    except ConfigError as e:  # refused, in one line naming the key
        assert f"lora.yaml: {key}" in str(e) or f"key {key!r}" in str(e), e
        assert "\n" not in str(e)
        return
    if status == "warned":
        assert value is None or mlx_lm_keys.warnings({key: value})
        assert mlx_lm_keys.warnings({key: "x.yaml"}) == [
            f"{key}: 'x.yaml' does nothing here: {mlx_lm_keys.KEYS[key].note}"]
        return
    got = _value_of(c, key)
    if isinstance(value, dict) and isinstance(got, dict):
        assert {k: got[k] for k in value} == value  # lora_parameters, optimizer_config
    else:
        assert got == value


def test_refused_values_of_mlx_lm_keys_are_one_line() -> None:
    cases = {
        "data": ({"data": "mlx-community/WikiSQL"}, "looks like a Hugging Face dataset id"),
        "train": ({"train": False}, "train: expected true (overnight always trains"),
        "hf_dataset": ({"hf_dataset": {"path": "billsum"}}, "key 'hf_dataset' is not supported"),
        "test_batches": ({"test": True, "test_batches": 0}, "test_batches: expected -1"),
        "report_to": ({"report_to": "mlflow"},
                      "report_to: expected wandb, swanlab and/or tensorboard"),
    }
    for key, (values, message) in cases.items():
        with pytest.raises(ConfigError) as e:
            cfg.resolve({"model": "m", "data": "d", **values}, source="lora.yaml")
        assert message in str(e.value), key
        assert "\n" not in str(e.value)


def test_our_notes_of_mlx_lm_defaults_match_the_installed_mlx_lm() -> None:
    for key, value in mlx_lm_keys.MLX_LM_DEFAULTS.items():
        assert CONFIG_DEFAULTS[key] == value, key


def test_the_docs_table_has_a_row_for_every_key_and_the_readme_links_it() -> None:
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", text, re.M))
    for key in set(CONFIG_DEFAULTS) | set(mlx_lm_keys.KEYS):
        assert rows.get(key) == mlx_lm_keys.KEYS[key].status, key
    assert "docs/mlx_lm_keys.md" in (ROOT / "README.md").read_text()


# ---- the start-up block -----------------------------------------------------------------


def _parse_setting(setting: str) -> dict[str, str]:
    key, _, value = setting.partition(": ")
    return {key: value}


def test_each_difference_names_the_setting_that_gives_mlx_lms_behaviour() -> None:
    """Defaults (no lr_schedule, early stopping and spike abort on): the block lists each,
    and applying the setting it names makes that line disappear."""
    c = cfg.resolve({"model": "m", "data": "d", "iters": 1000, "grad_accumulation_steps": 2})
    diffs = {d.what: d for d in mlx_lm_keys.differences(c, {"model", "data", "iters"})}
    assert diffs["learning rate"].line() == (
        "learning rate: linear warmup over 50 steps to 1e-05 (mlx_lm: 1e-05 from the first "
        "step) [as mlx_lm: training.warmup_steps: 0]")
    assert diffs["early stopping"].as_mlx_lm == "early_stopping.enabled: false"
    assert diffs["gradient spikes"].as_mlx_lm == "grad_spike.enabled: false"
    assert diffs["val_batches"].line() == \
        "val_batches: 50 (our default) (mlx_lm: 25) [as mlx_lm: val_batches: 25]"
    assert diffs["iters"].as_mlx_lm == "iters: 500"  # 1000 micro-batches at accumulation 2
    assert "padding never counted" in diffs["loss"].ours
    for what, d in diffs.items():
        if not d.as_mlx_lm or what == "iters":
            continue
        fixed = cfg.resolve({"model": "m", "data": "d", "iters": 1000,
                             "grad_accumulation_steps": 2}, _parse_setting(d.as_mlx_lm))
        given = {"model", "data", "iters", d.as_mlx_lm.split(".")[0].split(":")[0]}
        still = [x for x in mlx_lm_keys.differences(fixed, given) if x.what == what
                 and x.ours == d.ours]
        assert not still, (what, d.as_mlx_lm)


def test_a_config_with_its_own_lr_schedule_gets_no_extra_warmup() -> None:
    from mlx_lm.tuner.utils import build_schedule

    from worker.model import learning_rate_schedule

    schedule = {"name": "cosine_decay", "warmup": 3, "warmup_init": 1e-7,
                "arguments": [1e-5, 100, 1e-7]}
    own = cfg.resolve({"model": "m", "data": "d", "lr_schedule": schedule})
    ours, theirs = learning_rate_schedule(own, 1.0), build_schedule(schedule)
    for step in range(0, 60, 7):
        s = mx.array(step)
        assert ours(s).item() == theirs(s).item()
    assert "learning rate" not in {d.what for d in mlx_lm_keys.differences(own)}
    plain = cfg.resolve({"model": "m", "data": "d"})
    assert learning_rate_schedule(plain, 1.0)(mx.array(0)).item() == pytest.approx(1e-5 / 50)


def test_a_hugging_face_dataset_id_is_one_line_at_load(tmp_path: Path) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text("model: m\ndata: mlx-community/wikisql\n")
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"), timeout=60)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"overnight train: {config}: data: 'mlx-community/wikisql' is "
                               "not a local directory but looks like a Hugging Face dataset id")
    assert "to_json('DIR/train.jsonl')" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was created


# ---- done when: mlx-lm's example config -------------------------------------------------

# The keys and values of mlx-lm's mlx_lm/examples/lora_config.yaml (ml-explore/mlx-lm at
# d78bf58e, the CONFIG_DEFAULTS era of 0.32; the file is not in the wheel): comments dropped,
# commented-out keys left out, nothing else changed here. The test changes only the paths
# (model, data, adapter_path) and num_layers (the tiny model has 2 layers).
MLX_LM_EXAMPLE_CONFIG = """\
model: "mlx-community/Llama-3.2-1B-Instruct-bf16"
train: true
fine_tune_type: lora
optimizer: adamw
data: "mlx-community/WikiSQL"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
grad_accumulation_steps: 1
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
"""


def test_mlx_lms_example_config_runs_in_overnight_and_mlx_lm(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    text = (MLX_LM_EXAMPLE_CONFIG
            .replace('"mlx-community/Llama-3.2-1B-Instruct-bf16"', f'"{tiny_model}"')
            .replace('"mlx-community/WikiSQL"', f'"{corpus}"')
            .replace("num_layers: 16", "num_layers: 2"))
    ours_yaml, theirs_yaml = tmp_path / "ours.yaml", tmp_path / "theirs.yaml"
    ours_yaml.write_text(text.replace('"adapters"', f'"{tmp_path / "ours-adapters"}"'))
    theirs_yaml.write_text(text.replace('"adapters"', f'"{tmp_path / "theirs-adapters"}"'))
    assert yaml.safe_load(ours_yaml.read_text())["num_layers"] == 2

    theirs = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--config", str(theirs_yaml), "--iters", "6"],
        capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours = overnight("train", str(ours_yaml), "--run-dir", str(tmp_path / "run"),
                     "--iters", "6", timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]

    # The same LoRA layers (keys and shapes) as mlx_lm's, in its adapter layout.
    a = mx.load(str(tmp_path / "ours-adapters" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "theirs-adapters" / "adapters.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert len(a) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (lora_a, lora_b)

    block = ours.stderr[ours.stderr.index("overnight train: "):].splitlines()
    assert block[0] == ("overnight train: 6 differences from `mlx_lm lora` with this config "
                        "(docs/mlx_lm_keys.md):")
    listed = [line for line in block[1:7]]
    assert all(line.startswith("  - ") for line in listed), listed
    assert [line[4:].split(":")[0] for line in listed] == [
        "learning rate", "early stopping", "gradient spikes", "NaN/Inf loss or gradient",
        "validation", "loss"]
    assert "linear warmup over 50 steps to 1e-05" in listed[0]
    assert "the same 25 x 4 examples every evaluation" in listed[4]


def test_clear_cache_threshold_is_honoured() -> None:
    """After a step, MLX's buffer cache is cleared when it holds more than the threshold."""
    from worker.train import Trainer

    def cached() -> int:
        a = mx.ones((500, 500))
        mx.eval(a)
        del a
        return mx.get_cache_memory()

    for threshold, cleared in ((0, False), (10**9, False), (1000, True)):
        c = cfg.resolve({"model": "m", "data": "d", "clear_cache_threshold": threshold})
        trainer = Trainer(*([None] * 20))  # type: ignore[arg-type]
        trainer.config = c
        before = cached()
        assert before >= 10**6
        trainer._clear_cache()
        assert (mx.get_cache_memory() == 0) is cleared, threshold


def test_optimizer_config_for_another_optimizer_is_warned() -> None:
    """mlx_lm reads only optimizer_config[optimizer]: weight decay given for adamw while the
    optimizer is adam does nothing, in mlx_lm and here; here it is said at start."""
    c = cfg.resolve({"model": "m", "data": "d", "optimizer": "adam",
                     "optimizer_config": {"adam": {}, "adamw": {"weight_decay": 0.01}}})
    assert mlx_lm_keys.warnings({}, c) == [
        "optimizer_config.adamw: {'weight_decay': 0.01} does nothing here: the optimizer is "
        "adam (only optimizer_config.adam is used, as in mlx_lm)"]
    same = cfg.resolve({"model": "m", "data": "d", "optimizer": "adamw",
                        "optimizer_config": {"adamw": {"weight_decay": 0.01}, "sgd": {}}})
    assert mlx_lm_keys.warnings({}, same) == []
