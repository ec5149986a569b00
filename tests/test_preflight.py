"""worker/preflight.py: config/model combinations that cannot train are one line at load.

Each case is one that `mlx_lm lora` 0.32.2 only notices at the first step (or never); here
it is a ConfigError naming the key before training, `overnight train` exits 78 with that one
line, and a supervisor gives up at once with it as the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared import config as config_mod
from shared.errors import ConfigError
from tests.conftest import overnight, write_config
from tests.supervisor_support import FAST, record


def make_config(model: Path, **values: Any) -> config_mod.Config:
    return config_mod.resolve({"model": str(model), "data": "unused", "num_layers": -1,
                               **values}, source="test")


def trainable(model_dir: Path, **values: Any) -> tuple[Any, config_mod.Config]:
    """Load the model with mlx_lm and make it trainable as the worker does."""
    from worker import model as models

    c = make_config(model_dir, **values)
    model, _ = models.load_base(c)
    models.make_trainable(model, c)
    return model, c


def test_full_fine_tuning_of_a_quantized_model_is_refused(tiny_model_q4):
    with pytest.raises(ConfigError) as e:
        trainable(tiny_model_q4, fine_tune_type="full")
    msg = str(e.value)
    assert msg.startswith(f"fine_tune_type: full cannot train the quantized model "
                          f"{tiny_model_q4} (model.layers.0.self_attn.q_proj.weight is 4-bit")
    assert "fine_tune_type: lora or dora" in msg
    assert "overnight import-gguf FILE OUT_DIR --dequantize" in msg
    assert "\n" not in msg


def test_what_does_train_is_still_allowed(tiny_model, tiny_model_q4):
    """Full on float weights, LoRA and DoRA on quantized ones (QLoRA), LoRA on a quantized
    embedding (mlx_lm's LoRAEmbedding has a quantized form)."""
    from worker import preflight

    cases = [
        (tiny_model, {"fine_tune_type": "full"}, 73984),
        (tiny_model_q4, {"fine_tune_type": "lora", "lora_parameters": {"rank": 4}}, 8192),
        (tiny_model_q4, {"fine_tune_type": "dora", "lora_parameters": {"rank": 4}}, 9216),
        (tiny_model_q4, {"lora_parameters": {"rank": 4, "keys": ["model.embed_tokens"]}},
         1680),
    ]
    for path, values, count in cases:
        model, c = trainable(path, **values)
        assert preflight.check_trainable(model, c) == count, values


def test_lora_keys_that_match_no_module_are_refused_with_the_keys_there(tiny_model):
    with pytest.raises(ConfigError) as e:
        trainable(tiny_model, lora_parameters={"keys": ["self_attn.q_proj", "self_attn.qproj"]})
    assert str(e.value) == (
        f"lora_parameters.keys: 'self_attn.qproj' names no module in the last 2 layers of "
        f"{tiny_model} (nothing would train); modules LoRA can adapt: mlp.down_proj, "
        "mlp.gate_proj, mlp.up_proj, self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, "
        "self_attn.v_proj, model.embed_tokens")


def test_a_tied_lm_head_is_no_module(tiny_model):
    """The tiny model ties its output to the embedding: `lm_head` does not exist."""
    with pytest.raises(ConfigError, match="'lm_head' names no module"):
        trainable(tiny_model, lora_parameters={"keys": ["lm_head"]})


@pytest.mark.parametrize(("key", "kind"), [("input_layernorm", "RMSNorm"), ("mlp", "MLP"),
                                           ("self_attn", "Attention")])
def test_a_key_naming_a_module_lora_cannot_adapt_is_named(tiny_model, key, kind):
    with pytest.raises(ConfigError) as e:
        trainable(tiny_model, lora_parameters={"keys": [key]})
    assert str(e.value).startswith(
        f"lora_parameters.keys: {key!r} is a {kind}, not a linear or embedding layer; ")


def test_dora_on_a_quantized_embedding_is_refused(tiny_model_q4, tiny_model):
    with pytest.raises(ConfigError) as e:
        trainable(tiny_model_q4, fine_tune_type="dora",
                  lora_parameters={"keys": ["model.embed_tokens", "self_attn.q_proj"]})
    assert str(e.value).startswith("fine_tune_type: dora cannot adapt the quantized embedding "
                                   f"'model.embed_tokens' of {tiny_model_q4} ")
    trainable(tiny_model, fine_tune_type="dora",  # a float embedding is fine
              lora_parameters={"keys": ["model.embed_tokens"]})


def test_num_layers_above_the_models_layer_count(tiny_model):
    with pytest.raises(ConfigError, match=r"^num_layers: 3 requested but the model has 2 layers"):
        trainable(tiny_model, num_layers=3)


class NoLayers:
    """A model as custom code (trust_remote_code) may give: no `layers`."""


class EmptyLayers:
    layers: list[Any] = []  # noqa: RUF012


@pytest.mark.parametrize(("model", "what"), [(NoLayers(), "has no `layers`"),
                                             (EmptyLayers(), "has an empty `layers` list")])
def test_a_model_without_layers_is_refused(model, what):
    from worker import model as models

    c = make_config(Path("/models/custom"), grad_checkpoint=True)
    with pytest.raises(ConfigError) as e:
        models.make_trainable(model, c)
    assert str(e.value).startswith(f"model: /models/custom: tests.test_preflight."
                                   f"{type(model).__name__} {what}; ")


def test_an_lr_schedule_that_does_not_compute_is_refused_at_load(tiny_model):
    from worker import model as models

    c = make_config(tiny_model, lr_schedule={"name": "cosine_decay",
                                             "arguments": ["1e-5", 1000]})  # quoted: a string
    with pytest.raises(ConfigError) as e:
        models.make_optimizer(c, 1.0)
    assert str(e.value).startswith("lr_schedule: {'name': 'cosine_decay', 'arguments': "
                                   "['1e-5', 1000]} does not compute a learning rate (TypeError")


def test_an_optimizer_config_value_that_fails_in_an_update_is_refused_at_load(tiny_model):
    from worker import model as models

    c = make_config(tiny_model, optimizer="adamw",
                    optimizer_config={"adamw": {"weight_decay": "0.01"}})
    with pytest.raises(ConfigError) as e:
        models.make_optimizer(c, 1.0)
    assert str(e.value).startswith("optimizer_config.adamw: {'weight_decay': '0.01'} does not "
                                   "work with mlx.optimizers (ValueError")
    c = make_config(tiny_model, optimizer="adamw", optimizer_config={"adamw": {
        "weight_decay": 0.01}})
    models.make_optimizer(c, 1.0)


# ---- the real worker, alone and supervised ----------------------------------------------------


def test_overnight_train_full_on_a_quantized_model_exits_78_with_one_line(
        tmp_path, tiny_model_q4, corpus):
    config = write_config(tmp_path / "full.yaml", tiny_model_q4, corpus, fine_tune_type="full")
    run_dir = tmp_path / "run"
    done = overnight("train", str(config), "--run-dir", str(run_dir))
    assert done.returncode == 78, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "QuantizedMatmul" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("overnight train: fine_tune_type: full cannot train the quantized "
                           f"model {tiny_model_q4} ")
    assert last.endswith("(a GGUF file: `overnight import-gguf FILE OUT_DIR --dequantize`)")
    assert not any((run_dir / "checkpoints").iterdir())


def test_the_supervisor_gives_up_at_once_with_the_workers_line(tmp_path, tiny_model_q4, corpus):
    config = write_config(tmp_path / "full.yaml", tiny_model_q4, corpus, fine_tune_type="full",
                          supervisor={**FAST, "startup_timeout": 60.0})
    run_dir = tmp_path / "run"
    done = overnight("run", str(config), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    rec = record(run_dir)
    assert rec["state"] == "gave_up"
    assert [a["classification"] for a in rec["attempts"]] == ["bad_config"]  # no restart
    assert rec["reason"].startswith("bad config or data: fine_tune_type: full cannot train the "
                                    f"quantized model {tiny_model_q4} ")
    assert "--dequantize" in rec["reason"] and "\n" not in rec["reason"]
    assert done.stderr.strip().splitlines()[-1] == f"overnight run: gave_up: {rec['reason']}"
