"""shared/checkpoint_tensors.py, table-tested on safetensors headers: what a checkpoint's
tensors must agree on (the optimizer state, the LoRA rank, the configs), and no false alarm
on layouts it does not know. Real checkpoints: tests/test_checkpoint_agreement.py."""

from __future__ import annotations

import pytest

from shared.checkpoint_tensors import problems

Q = "model.layers.0.self_attn.q_proj"


def lora(rank: int = 4, a: list[int] | None = None) -> dict[str, dict]:
    return {f"{Q}.lora_a": {"shape": a or [64, rank]}, f"{Q}.lora_b": {"shape": [rank, 32]}}


def adam(adapters: dict[str, dict], **override: list[int]) -> dict[str, dict]:
    out = {"learning_rate": {"shape": []}, "step": {"shape": []}}
    for name, info in adapters.items():
        for slot in "mv":
            out[f"{name}.{slot}"] = {"shape": override.get(f"{name}.{slot}", info["shape"])}
    return out


LORA_CONFIG = {"fine_tune_type": "lora", "num_layers": -1,
               "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
CONFIG = {"fine_tune_type": "lora", "num_layers": -1,
          "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": None}}


def test_a_consistent_lora_checkpoint_has_no_problem():
    a = lora()
    assert problems(a, adam(a), LORA_CONFIG, CONFIG) == []


@pytest.mark.parametrize("adapters,optimizer,adapter_config,config,says", [
    (lora(), {k: v for k, v in adam(lora()).items() if not k.startswith(f"{Q}.lora_b")},
     LORA_CONFIG, CONFIG, f"adapters.safetensors has {Q}.lora_b, optimizer.safetensors no "
                          "state for it"),
    ({f"{Q}.lora_a": {"shape": [64, 4]}}, adam(lora()), {}, {},
     f"optimizer.safetensors has {Q}.lora_b.m, adapters.safetensors no tensor {Q}.lora_b"),
    (lora(), adam(lora(), **{f"{Q}.lora_a.v": [64, 2]}), LORA_CONFIG, CONFIG,
     f"optimizer.safetensors {Q}.lora_a.v has shape [64, 2], expected [64, 4]"),
    (lora(rank=2), adam(lora(rank=2)), LORA_CONFIG, CONFIG,
     f"adapters.safetensors {Q}.lora_a has shape [64, 2]: rank 2, adapter_config.json says "
     "lora_parameters.rank 4"),
    ({f"{Q}.lora_a": {"shape": [64, 4]}}, {}, LORA_CONFIG, CONFIG,
     f"adapters.safetensors has {Q}.lora_a but not {Q}.lora_b"),
    ({"model.norm.weight": {"shape": [64]}}, {}, LORA_CONFIG, CONFIG,
     "fine_tune_type lora, adapters.safetensors holds no lora_a / lora_b tensor"),
    (lora(), {}, {"fine_tune_type": "full"}, {},
     "fine_tune_type full, adapters.safetensors holds LoRA tensors"),
    (lora(), adam(lora()), LORA_CONFIG, {**CONFIG, "num_layers": 8},
     "adapter_config.json num_layers is -1, trainer_state.json's config says 8"),
    (lora(), adam(lora()), LORA_CONFIG,
     {**CONFIG, "lora_parameters": {**CONFIG["lora_parameters"], "scale": 20.0}},
     "adapter_config.json lora_parameters.scale is 10.0, trainer_state.json's config says "
     "20.0"),
])
def test_each_disagreement_is_named(adapters, optimizer, adapter_config, config, says):
    found = problems(adapters, optimizer, adapter_config, config)
    assert any(says in p for p in found), found


def test_switch_layers_have_the_rank_in_their_own_dimension():
    """LoRASwitchLinear (mlx_lm/tuner/lora.py): lora_a (experts, r, in), lora_b (experts,
    out, r)."""
    e = "model.layers.0.mlp.switch_mlp.up_proj"
    ok = {f"{e}.lora_a": {"shape": [8, 4, 64]}, f"{e}.lora_b": {"shape": [8, 128, 4]}}
    assert problems(ok, adam(ok), LORA_CONFIG, CONFIG) == []
    bad = {f"{e}.lora_a": {"shape": [8, 4, 64]}, f"{e}.lora_b": {"shape": [8, 4, 128]}}
    assert "rank 128" in " ".join(problems(bad, adam(bad), LORA_CONFIG, CONFIG))


def test_adafactor_factored_moments_have_their_own_shapes():
    a = lora()
    state = {f"{n}.{slot}": {"shape": shape} for n, info in a.items()
             for slot, shape in (("exp_avg_sq_row", info["shape"][:-1]),
                                 ("exp_avg_sq_col", info["shape"][-1:]))}
    assert problems(a, state, LORA_CONFIG, CONFIG) == []
    state[f"{Q}.lora_a.exp_avg_sq_row"] = {"shape": [4]}
    assert problems(a, state, LORA_CONFIG, CONFIG) == [
        f"optimizer.safetensors {Q}.lora_a.exp_avg_sq_row has shape [4], expected [64] "
        f"(adapters.safetensors {Q}.lora_a: [64, 4])"]


@pytest.mark.parametrize("optimizer", [
    {"m": {"shape": [4]}},  # a flat layout (the fake worker's): not per parameter
    {f"states.0.{Q}.lora_a.m": {"shape": [64, 4]}},  # mlx MultiOptimizer: not this layout
    {"step": {"shape": []}},
])
def test_layouts_it_does_not_know_are_not_judged(optimizer):
    assert problems(lora(), optimizer, {}, {}) == []


def test_an_old_checkpoint_without_a_stored_config_is_judged_on_the_rest():
    a = lora()
    assert problems(a, adam(a), LORA_CONFIG, {}) == []
