"""What a checkpoint's tensors must agree on, judged from safetensors headers (names and
shapes, no values, no MLX) — part of the validator (shared/checkpoint.py), so the supervisor
refuses before a start what the worker would refuse at load.

A checkpoint can pass every hash and still be unusable: the manifest is rewritten after a
tensor was dropped or reshaped, or two files come from different runs. The worker finds out
only when it loads it into the model (worker/checkpointing.py `restore`), after seconds of
start-up, and before this check every restart did the same. What can be judged without the
model is judged here, each against what the checkpoint itself says:

- **adapters against the optimizer state.** mlx.optimizers keep one state entry per
  trainable parameter, keyed `<parameter>.<slot>` (`optimizer.state` flattened with
  mlx.utils.tree_flatten, as worker/checkpointing.py saves it; `step` and `learning_rate`
  at the top). Every adapter tensor has its entries, every entry its adapter tensor, and
  the slots mlx creates with `zeros_like(parameter)` (`MIRRORED_SLOTS`: Adam/AdamW/Adamax
  m and v, SGD/RMSprop/Adagrad/Muon v, AdaDelta v and u, Lion m, Adafactor exp_avg and
  exp_avg_sq) have the parameter's shape; Adafactor's factored row/column moments
  (`exp_avg_sq_row`: shape[:-1], `exp_avg_sq_col`: shape[:-2] + shape[-1:]) theirs.
  Checked only when the state is laid out that way (some entry names an adapter tensor).
- **adapters against adapter_config.json.** For `fine_tune_type` lora and dora: LoRA
  tensors exist, each `lora_a` has its `lora_b`, and their rank dimension is
  `lora_parameters.rank` (mlx_lm/tuner/lora.py, dora.py: LoRALinear / LoRAEmbedding
  lora_a (in, r), lora_b (r, out); LoRASwitchLinear lora_a (experts, r, in), lora_b
  (experts, out, r)). For full: no LoRA tensors.
- **adapter_config.json against the config in trainer_state.json** (when it has one):
  fine_tune_type, num_layers and every lora_parameters key they both name
  (worker/model.py `adapter_config` writes the one from the other).

What needs the model (a tensor missing from adapters and optimizer alike, an input
dimension the model does not have) is left to the worker, which refuses the checkpoint by
name (exit 25, checkpoint_refused) and the supervisor quarantines it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Header = Mapping[str, Mapping[str, Any]]  # shared/safetensors_check.read_header: name -> info

MIRRORED_SLOTS = frozenset({"m", "v", "u", "exp_avg", "exp_avg_sq"})
FACTORED_SLOTS: dict[str, Callable[[list[int]], list[int]]] = {
    "exp_avg_sq_row": lambda shape: shape[:-1],
    "exp_avg_sq_col": lambda shape: shape[:-2] + shape[-1:],
}
LORA_FINE_TUNE_TYPES = ("lora", "dora")
ADAPTER_KEYS = ("fine_tune_type", "num_layers")


def problems(adapters: Header, optimizer: Header, adapter_config: Mapping[str, Any],
             config: Mapping[str, Any]) -> list[str]:
    """Every disagreement found (module docstring), each naming the file and the tensor or
    key; [] when there is none. `config`: trainer_state.json's "config" ({} when absent)."""
    return [*against_optimizer(adapters, optimizer), *against_rank(adapters, adapter_config),
            *against_config(adapter_config, config)]


def _shape(info: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in info["shape"]]


def _parameter_of(key: str, adapters: Header) -> str | None:
    """The adapter tensor an optimizer entry belongs to: its longest dotted prefix that names
    one (None: a top-level entry such as step, or a layout this check does not know)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in adapters:
            return prefix
    return None


def against_optimizer(adapters: Header, optimizer: Header) -> list[str]:
    owners = {key: _parameter_of(key, adapters) for key in optimizer}
    if not any(owners.values()):
        return []  # not laid out per parameter: nothing to compare
    found = []
    with_state = {p for p in owners.values() if p is not None}
    for name in sorted(set(adapters) - with_state):
        found.append(f"adapters.safetensors has {name}, optimizer.safetensors no state for it")
    for key, owner in sorted(owners.items()):
        slot = key.rsplit(".", 1)[-1]
        if owner is None:
            if "." in key and (slot in MIRRORED_SLOTS or slot in FACTORED_SLOTS):
                found.append(f"optimizer.safetensors has {key}, adapters.safetensors no "
                             f"tensor {key.rsplit('.', 1)[0]}")
            continue
        if key != f"{owner}.{slot}":
            continue  # nested deeper than a slot: a layout this check does not know
        shape = _shape(adapters[owner])
        if slot in MIRRORED_SLOTS:
            expected = shape
        elif slot in FACTORED_SLOTS and len(shape) >= 2:
            expected = FACTORED_SLOTS[slot](shape)
        else:
            continue
        got = _shape(optimizer[key])
        if got != expected:
            found.append(f"optimizer.safetensors {key} has shape {got}, expected {expected} "
                         f"(adapters.safetensors {owner}: {shape})")
    return found


def against_rank(adapters: Header, adapter_config: Mapping[str, Any]) -> list[str]:
    kind = adapter_config.get("fine_tune_type")
    lora = sorted(k for k in adapters if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
    if kind == "full":
        return [f"adapter_config.json says fine_tune_type full, adapters.safetensors holds "
                f"LoRA tensors ({lora[0]}, ...)"] if lora else []
    if kind not in LORA_FINE_TUNE_TYPES:
        return []
    if not lora:
        return [f"adapter_config.json says fine_tune_type {kind}, adapters.safetensors holds "
                "no lora_a / lora_b tensor"]
    found = []
    for name in lora:
        module, part = name.rsplit(".", 1) if "." in name else ("", name)
        other = f"{module}.{'lora_b' if part == 'lora_a' else 'lora_a'}" if module else ""
        if module and other not in adapters:
            found.append(f"adapters.safetensors has {name} but not {other}")
    params = adapter_config.get("lora_parameters")
    rank = params.get("rank") if isinstance(params, Mapping) else None
    if not isinstance(rank, int) or isinstance(rank, bool):
        return found
    for name in lora:
        shape = _shape(adapters[name])
        part = name.rsplit(".", 1)[-1]
        if len(shape) == 2:  # LoRALinear, LoRAEmbedding, DoRA*: a (in, r), b (r, out)
            got = shape[1] if part == "lora_a" else shape[0]
        elif len(shape) == 3:  # LoRASwitchLinear: a (experts, r, in), b (experts, out, r)
            got = shape[1] if part == "lora_a" else shape[2]
        else:
            continue
        if got != rank:
            found.append(f"adapters.safetensors {name} has shape {shape}: rank {got}, "
                         f"adapter_config.json says lora_parameters.rank {rank}")
    return found


def against_config(adapter_config: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    if not config:
        return []  # an old checkpoint that does not store its config
    found = []
    for key in ADAPTER_KEYS:
        if key in adapter_config and key in config and adapter_config[key] != config[key]:
            found.append(f"adapter_config.json {key} is {adapter_config[key]!r}, "
                         f"trainer_state.json's config says {config[key]!r}")
    mine, theirs = adapter_config.get("lora_parameters"), config.get("lora_parameters")
    if isinstance(mine, Mapping) and isinstance(theirs, Mapping):
        for key in sorted(set(mine) & set(theirs)):
            if mine[key] != theirs[key] and theirs[key] is not None:
                found.append(f"adapter_config.json lora_parameters.{key} is {mine[key]!r}, "
                             f"trainer_state.json's config says {theirs[key]!r}")
    return found
