"""Load a model with mlx_lm and make it trainable: LoRA, DoRA or full fine-tuning.

Everything here is mlx_lm's own machinery (`mlx_lm.utils.load`, `linear_to_lora_layers`,
`build_schedule`); a quantized base model gives QLoRA.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared.config import Config
from shared.errors import ConfigError

MLX_LM_ADAPTER_KEYS = (
    "model", "fine_tune_type", "num_layers", "batch_size", "iters", "learning_rate",
    "optimizer", "max_seq_length", "grad_checkpoint", "grad_accumulation_steps", "seed",
    "mask_prompt", "lr_schedule", "data",
)


def load_base(c: Config) -> tuple[Any, Any]:
    from mlx_lm.utils import load

    path = Path(c.model).expanduser()
    looks_local = c.model.startswith(("/", ".", "~")) or c.model.count("/") > 1
    if looks_local and not path.is_dir():
        raise ConfigError(f"model: {c.model!r} is not a directory")
    try:
        return load(
            str(path) if path.exists() else c.model,
            tokenizer_config={"trust_remote_code": c.trust_remote_code},
            trust_remote_code=c.trust_remote_code,
        )
    except Exception as e:  # mlx_lm raises many kinds; the user needs one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model: cannot load {c.model!r}: {msg}") from None


def make_trainable(model: Any, c: Config) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    if c.num_layers > n_layers:
        raise ConfigError(f"num_layers: {c.num_layers} requested but the model has {n_layers}")
    model.freeze()
    if c.fine_tune_type == "full":
        for layer in model.layers[-max(c.num_layers, 0) if c.num_layers != -1 else 0 :]:
            layer.unfreeze()
        return
    params = {k: v for k, v in asdict(c.lora_parameters).items() if v is not None}
    num = n_layers if c.num_layers == -1 else c.num_layers
    try:
        linear_to_lora_layers(model, num, params, use_dora=c.fine_tune_type == "dora")
    except (ValueError, KeyError) as e:
        raise ConfigError(f"lora_parameters: {e}") from None


def adapter_config(c: Config) -> dict[str, Any]:
    """adapter_config.json as mlx_lm writes it: `mlx_lm generate/fuse --adapter-path` read it."""
    d: dict[str, Any] = {k: getattr(c, k) for k in MLX_LM_ADAPTER_KEYS}
    if c.num_layers == -1:
        d["num_layers"] = -1
    d["lora_parameters"] = (
        None if c.fine_tune_type == "full"
        else {k: v for k, v in asdict(c.lora_parameters).items() if v is not None}
    )
    return d


def learning_rate_schedule(c: Config, lr_scale: float) -> Any:
    """mlx_lm's `lr_schedule` if given, else linear warmup to `learning_rate`; times lr_scale."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import build_schedule

    if c.lr_schedule:
        try:
            base = build_schedule(c.lr_schedule)
        except (AttributeError, TypeError, KeyError) as e:
            raise ConfigError(f"lr_schedule: {e}") from None
    else:
        lr, warmup = c.learning_rate, max(c.training.warmup_steps, 1)

        def base(step: Any) -> Any:
            return lr * mx.minimum(1.0, (step.astype(mx.float32) + 1.0) / warmup)

    if lr_scale == 1.0:
        return base
    return lambda step: lr_scale * base(step)


def make_optimizer(c: Config, lr_scale: float) -> tuple[Any, Any]:
    """(optimizer, its learning-rate schedule)."""
    import mlx.optimizers as optim

    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
               "adafactor": optim.Adafactor, "muon": optim.Muon}
    kwargs = dict(c.optimizer_config.get(c.optimizer, {}) or {})
    schedule = learning_rate_schedule(c, lr_scale)
    try:
        return classes[c.optimizer](learning_rate=schedule, **kwargs), schedule
    except TypeError as e:
        raise ConfigError(f"optimizer_config.{c.optimizer}: {e}") from None
