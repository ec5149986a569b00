"""Load a model with mlx_lm and make it trainable: LoRA, DoRA or full fine-tuning.

Everything here is mlx_lm's own machinery (`mlx_lm.utils.load`, `linear_to_lora_layers`,
`build_schedule`); a quantized base model gives QLoRA. `resume_adapter_file` loads adapter
weights (mlx_lm's `adapters.safetensors`, or a directory holding one) as the starting point
of a fresh run, as `mlx_lm lora` does, but strictly: the file must hold exactly the
trainable tensors, with their shapes, that this config builds.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared.config import Config
from shared.errors import CheckpointError, ConfigError
from shared.safetensors_check import check_finite, read_header

ADAPTERS_FILE = "adapters.safetensors"  # mlx_lm's name, and our checkpoints'
ADAPTER_CONFIG_FILE = "adapter_config.json"

MLX_LM_ADAPTER_KEYS = (
    "model",
    "fine_tune_type",
    "num_layers",
    "batch_size",
    "iters",
    "learning_rate",
    "optimizer",
    "max_seq_length",
    "grad_checkpoint",
    "grad_accumulation_steps",
    "seed",
    "mask_prompt",
    "lr_schedule",
    "data",
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
        msg = _hub_problem(e, c.model) or (str(e).splitlines()[0] if str(e)
                                           else type(e).__name__)
        raise ConfigError(f"model: cannot load {c.model!r}: {msg}") from None


def _hub_problem(e: Exception, model: str) -> str | None:
    """What a Hugging Face Hub failure of mlx_lm's `load` means, in one line (the exception's
    own first line is e.g. "Got: ConnectError: [Errno -2] Name or service not known"), or
    None for any other error. Classes from huggingface_hub.errors (mlx_lm downloads with
    `snapshot_download`)."""
    from huggingface_hub import errors as hub

    if isinstance(e, hub.GatedRepoError):
        return (f"a gated model: accept its terms on https://huggingface.co/{model} and log in "
                "(`hf auth login`)")
    if isinstance(e, hub.RepositoryNotFoundError):
        return ("no such model on the Hugging Face Hub, or a private one (log in: "
                "`hf auth login`); a local model is a directory path")
    if isinstance(e, hub.LocalEntryNotFoundError):
        cause = e.__cause__ or e.__context__
        why = ("HF_HUB_OFFLINE is set" if isinstance(cause, hub.OfflineModeIsEnabled)
               else f"{type(cause).__name__}: {cause}" if cause is not None
               else "the Hub could not be reached")
        return (f"not in the Hugging Face cache, and it cannot be downloaded ({why}); "
                f"download it where there is a network (`hf download {model}`), or give "
                "a local model directory")
    return None


def make_trainable(model: Any, c: Config) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from worker import preflight

    # Combinations that cannot train are one line here, not an error at the first step.
    n_layers = len(preflight.layers_of(model, c))
    model.freeze()
    if c.fine_tune_type == "full":
        for layer in model.layers[-max(c.num_layers, 0) if c.num_layers != -1 else 0 :]:
            layer.unfreeze()
    else:
        preflight.check_lora_targets(model, c, list(model.layers))
        params = {k: v for k, v in asdict(c.lora_parameters).items() if v is not None}
        num = n_layers if c.num_layers == -1 else c.num_layers
        try:
            linear_to_lora_layers(model, num, params, use_dora=c.fine_tune_type == "dora")
        except (ValueError, KeyError) as e:
            raise ConfigError(f"lora_parameters: {e}") from None
    preflight.check_trainable(model, c)


def adapter_config(c: Config) -> dict[str, Any]:
    """adapter_config.json as mlx_lm writes it: `mlx_lm generate/fuse --adapter-path` read it."""
    d: dict[str, Any] = {k: getattr(c, k) for k in MLX_LM_ADAPTER_KEYS}
    if c.num_layers == -1:
        d["num_layers"] = -1
    d["lora_parameters"] = (
        None
        if c.fine_tune_type == "full"
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

    classes = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "sgd": optim.SGD,
        "adafactor": optim.Adafactor,
        "muon": optim.Muon,
    }
    from worker import preflight

    kwargs = dict(c.optimizer_config.get(c.optimizer, {}) or {})
    schedule = learning_rate_schedule(c, lr_scale)
    preflight.probe_schedule(schedule, c)
    try:
        optimizer = classes[c.optimizer](learning_rate=schedule, **kwargs)
    except TypeError as e:
        raise ConfigError(f"optimizer_config.{c.optimizer}: {e}") from None
    preflight.probe_optimizer(lambda: classes[c.optimizer](learning_rate=schedule, **kwargs), c)
    return optimizer, schedule


def adapter_weights_file(given: str) -> Path:
    """The adapters.safetensors that `resume_adapter_file: GIVEN` names: the file itself or,
    for a directory (mlx_lm's --adapter-path, our adapters/ or a checkpoint), the one in it.

    Raises ConfigError (one line) when there is none.
    """
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / ADAPTERS_FILE
    if not path.is_file():
        raise ConfigError(
            f"resume_adapter_file: {given!r}: no such file or adapter directory "
            f"(expected {ADAPTERS_FILE} or a directory holding it)"
        )
    return path


def is_mlx_lm_adapter(path: Path) -> bool:
    """An mlx_lm adapter (`adapters.safetensors`, or a directory with it and
    adapter_config.json) rather than one of our checkpoints (which add a trainer state)."""
    if path.is_file():
        return path.suffix == ".safetensors"
    return (
        (path / ADAPTERS_FILE).is_file()
        and (path / ADAPTER_CONFIG_FILE).is_file()
        and not (path / "trainer_state.json").exists()
    )


def load_adapter_weights(model: Any, given: str) -> tuple[Path, int]:
    """Load `resume_adapter_file` into the trainable parameters; (file, tensors loaded).

    The file must hold exactly the trainable parameters of the model as this config built it
    (same names, same shapes) and only finite values; anything else is one ConfigError line
    naming the first differences (mlx_lm's `load_weights(strict=False)` would silently keep
    the fresh initialisation for missing tensors).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = adapter_weights_file(given)
    where = f"resume_adapter_file: {path}"
    try:
        header, _ = read_header(path)
        bad = check_finite(path)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"{where}: not a readable safetensors file ({e})") from None
    if bad:
        raise ConfigError(f"{where}: non-finite values in {len(bad)} tensors, e.g. {bad[0]}")
    params = dict(tree_flatten(model.trainable_parameters()))
    expected = {k: tuple(v.shape) for k, v in params.items()}
    got = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [
        f"{k} {got[k]} != {expected[k]}"
        for k in sorted(set(got) & set(expected))
        if got[k] != expected[k]
    ]
    if missing or extra or shapes:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors, e.g. {missing[0]}")
        if extra:
            problems.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
        if shapes:
            problems.append(f"{len(shapes)} of another shape, e.g. {shapes[0]}")
        raise ConfigError(
            f"{where}: does not match the layers this config trains ({'; '.join(problems)}): "
            "fine_tune_type, num_layers and lora_parameters must be those it was trained with"
        )
    weights = mx.load(str(path))
    # In the dtype the model trains in (an fp16 file into fp32 LoRA layers stays fp32).
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return path, len(weights)
