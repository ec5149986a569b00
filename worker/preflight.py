"""Config/model combinations that cannot train, refused at load with one line (exit 78).

Each is a mistake `mlx_lm lora` (0.32.2) only notices after the model is loaded, at the
first step, or never; here it is a ConfigError naming the key before training starts, so the
supervisor gives up at once with that line instead of restarting into the same failure.

What `mlx_lm lora` 0.32.2 does with each (measured on a tiny llama, tests/test_preflight.py):

- `fine_tune_type: full` on a quantized base: `[QuantizedMatmul::vjp] no gradient wrt the
  quantized weights` at the first step.
- `lora_parameters.keys` naming no module: `[grad] Must specify at least one argument` at the
  first step (nothing is trainable).
- a key naming a norm, an MLP or an attention block: `Can't convert layer of type RMSNorm to
  LoRA`, without the key.
- `fine_tune_type: dora` on a quantized embedding: `[broadcast_shapes] Shapes (1,7,64) and
  (1,7,8) cannot be broadcast` at the first step.
- a model without `layers`, or with none: AttributeError / IndexError (linear_to_lora_layers,
  grad_checkpoint).
- `num_layers` above the model's layer count: every layer trains, silently.
- `lr_schedule` arguments that do not compute (a quoted "1e-5"): TypeError at the first step.
- `optimizer_config` values of the wrong type: TypeError in the first optimizer update.

The checks read mlx_lm's own rules: which modules `linear_to_lora_layers` converts (the same
types and the `to_lora` hook), which layers it targets (`model.layers[-num_layers:]`, then
model-level names), and that gradients exist only for floating-point parameters.
"""

from __future__ import annotations

from typing import Any

from shared.config import Config
from shared.errors import ConfigError

MAX_LISTED = 12  # module names listed in a message


def layers_of(model: Any, c: Config) -> list[Any]:
    """The model's transformer blocks (`model.layers`, as mlx_lm uses them); ConfigError when
    there are none or `num_layers` asks for more than there are."""
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) == 0:
        what = "has no `layers`" if layers is None else "has an empty `layers` list"
        raise ConfigError(
            f"model: {c.model}: {type(model).__module__}.{type(model).__name__} {what}; "
            "mlx_lm's LoRA, DoRA, full fine-tuning and grad_checkpoint all work on model.layers"
        )
    if c.num_layers > len(layers):
        raise ConfigError(
            f"num_layers: {c.num_layers} requested but the model has "
            f"{len(layers)} layers (-1 trains all of them)"
        )
    return list(layers)


def _adaptable(module: Any) -> bool:
    """What mlx_lm's linear_to_lora_layers converts (tuner/utils.py, get_keys_for_lora)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (
        nn.Linear,
        nn.QuantizedLinear,
        SwitchLinear,
        QuantizedSwitchLinear,
        nn.Embedding,
        nn.QuantizedEmbedding,
    )
    return hasattr(module, "to_lora") or isinstance(module, kinds)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def check_lora_targets(model: Any, c: Config, layers: list[Any]) -> None:
    """Before linear_to_lora_layers: every `lora_parameters.keys` entry names a module LoRA can
    adapt, and DoRA is not asked to adapt a quantized embedding. ConfigError otherwise."""
    import mlx.nn as nn

    num = len(layers) if c.num_layers == -1 else c.num_layers
    targeted = layers[-num:]
    inside = {id(m) for layer in layers for _, m in layer.named_modules()}
    # mlx_lm matches keys against names inside each targeted layer, then against the whole
    # model's names (so "model.embed_tokens" or "lm_head" work too).
    found: dict[str, Any] = {}
    for layer in targeted:
        for name, module in layer.named_modules():
            found.setdefault(name, module)
    for name, module in model.named_modules():
        found.setdefault(name, module)
    in_layers = sorted({k for layer in targeted for k, m in layer.named_modules() if _adaptable(m)})
    top = sorted(k for k, m in model.named_modules() if _adaptable(m) and id(m) not in inside)
    choices = _listing([*in_layers, *top])
    keys = c.lora_parameters.keys
    for key in keys or []:
        module = found.get(key)
        if module is None:
            raise ConfigError(
                f"lora_parameters.keys: {key!r} names no module in the last {num} layers of "
                f"{c.model} (nothing would train); modules LoRA can adapt: {choices}"
            )
        if not _adaptable(module):
            raise ConfigError(
                f"lora_parameters.keys: {key!r} is a {type(module).__name__}, not a linear or "
                f"embedding layer; modules LoRA can adapt: {choices}"
            )
    if c.fine_tune_type == "dora":
        for key in keys or in_layers:
            if isinstance(found.get(key), nn.QuantizedEmbedding):
                raise ConfigError(
                    f"fine_tune_type: dora cannot adapt the quantized embedding {key!r} of "
                    f"{c.model} (mlx_lm's DoRAEmbedding has no quantized form and fails at the "
                    "first step): use fine_tune_type: lora, or leave it out of "
                    "lora_parameters.keys"
                )


def check_trainable(model: Any, c: Config) -> int:
    """After the model is made trainable: there is something to train and all of it is
    floating point (gradients do not flow into quantized weights). Returns the number of
    trainable values; ConfigError otherwise."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = tree_flatten(model.trainable_parameters())
    quantized = [name for name, v in params if not mx.issubdtype(v.dtype, mx.floating)]
    if quantized:
        owner = dict(model.named_modules()).get(quantized[0].rpartition(".")[0])
        bits = getattr(owner, "bits", None)
        what = f"{quantized[0]} is {bits}-bit" if bits else f"{quantized[0]} is quantized"
        if c.fine_tune_type == "full":
            raise ConfigError(
                f"fine_tune_type: full cannot train the quantized model {c.model} ({what}; "
                "gradients do not flow into quantized weights): use fine_tune_type: lora or "
                "dora (QLoRA), or a non-quantized model (a GGUF file: `overnight import-gguf "
                "FILE OUT_DIR --dequantize`)"
            )
        raise ConfigError(
            f"{c.fine_tune_type}: {len(quantized)} trainable parameters of "
            f"{c.model} are quantized ({what}); they cannot get gradients"
        )
    total = sum(v.size for _, v in params)
    if total == 0:
        raise ConfigError(
            f"fine_tune_type: {c.fine_tune_type} on {c.model} leaves no trainable "
            "parameters (check num_layers and lora_parameters.keys)"
        )
    return total


def probe_schedule(schedule: Any, c: Config) -> None:
    """Ask the learning-rate schedule for step 0 now, not at the first step."""
    import mlx.core as mx

    try:
        mx.eval(schedule(mx.array(0)))
    except Exception as e:  # the schedule is user arguments fed to mlx.optimizers
        where = "lr_schedule" if c.lr_schedule else "learning_rate"
        raise ConfigError(
            f"{where}: {c.lr_schedule or c.learning_rate!r} does not compute a "
            f"learning rate ({type(e).__name__}: {e})"
        ) from None


def probe_optimizer(make: Any, c: Config) -> None:
    """One update of a throwaway optimizer built like the real one, on two small arrays (a
    matrix and a vector), so a bad `optimizer_config` value fails at load, not at step 1."""
    import mlx.core as mx

    params = {"w": mx.ones((4, 4)), "b": mx.ones((4,))}
    grads = {"w": mx.full((4, 4), 0.1), "b": mx.full((4,), 0.1)}
    try:
        optimizer = make()
        optimizer.init(params)
        mx.eval(optimizer.apply_gradients(grads, params))
    except Exception as e:  # the optimizer's keyword arguments come straight from the config
        raise ConfigError(
            f"optimizer_config.{c.optimizer}: "
            f"{c.optimizer_config.get(c.optimizer)!r} does not work with "
            f"mlx.optimizers ({type(e).__name__}: {e})"
        ) from None
