"""The run configuration: one YAML file, mlx_lm's keys at the top, our own in sections.

An existing `mlx_lm lora` config runs unchanged. Precedence: command line > file > defaults
(`resolve()`). The resolved config is logged once and stored in every checkpoint.

    model: mlx-community/SmolLM2-135M-Instruct   # mlx_lm keys, same meaning as in mlx_lm
    data: data/
    iters: 2000
    ...
    training:        {warmup_steps: 50, max_grad_norm: 0.0, lambda_weight: 0.0, streaming: auto}
    early_stopping:  {enabled: true, patience: 5, min_delta: 0.01}
    grad_spike:      {threshold: 1000.0, patience: 3, robust_z: 50.0}
    checkpoints:     {keep_last: 3, async_save: false}
    logging:         {max_bytes: 50000000, backups: 5}
    debug:           {inject: "crash@120"}
    supervisor:      {heartbeat_timeout: 120, ...}

Longer than 400 lines: it is the one schema of every section (each key with its default and
help text) plus resolve(); split by section, a key's meaning and its checks would sit apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_type_hints

from shared import config_identity, distributed_config, records
from shared.distributed_config import DistributedOptions
from shared.errors import ConfigError
from shared.mlx_lm_keys import KEYS as MLX_LM_KEYS
from shared.yamlfile import load_yaml


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (dict, list)):
        return field(
            default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help}
        )
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LoraParameters:
    rank: int = _f(8, "LoRA rank (mlx_lm default 8)")
    scale: float = _f(20.0, "LoRA scale (mlx_lm default 20.0)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    keys: list[str] | None = _f(
        None, "module keys to adapt, e.g. [self_attn.q_proj]; default: all linear layers"
    )


@dataclass(frozen=True)
class TrainingOptions:
    warmup_steps: int = _f(50, "linear LR warmup steps when no lr_schedule is given")
    max_grad_norm: float = _f(0.0, "clip the gradient to this global norm; 0 disables")
    lambda_weight: float = _f(0.0, "weight of the per-example distrust term; 0 = plain CE")
    distrust_alpha: float = _f(2.7, "alpha in d = alpha * (ln(1 - auth_weight) + prov_entropy)^2")
    streaming: Literal["auto", "true", "false"] = _f(
        "auto", "stream the training file from disk; auto = when it is larger than 256 MB"
    )
    streaming_threshold_mb: int = _f(256, "file size above which streaming=auto streams")
    max_malformed_fraction: float = _f(0.5, "a data file with more malformed lines is an error")
    compile: bool = _f(True, "compile the training step with mx.compile")


@dataclass(frozen=True)
class EarlyStopping:
    enabled: bool = _f(True, "stop when validation (or smoothed training) loss stops improving")
    patience: int = _f(5, "evaluations without an improvement of min_delta before stopping")
    min_delta: float = _f(0.01, "smallest decrease of the loss that counts as an improvement")
    warmup_steps: int = _f(50, "evaluations at or before this step are ignored")


@dataclass(frozen=True)
class GradSpike:
    enabled: bool = _f(True, "stop the attempt (for a rollback) on a gradient spike")
    threshold: float = _f(1000.0, "abort when the gradient norm exceeds this ...")
    patience: int = _f(3, "... for this many consecutive steps")
    robust_z: float = _f(50.0, "or when it exceeds median + robust_z * MAD of recent norms")
    window: int = _f(100, "how many recent gradient norms the robust statistics use")
    min_history: int = _f(50, "robust test starts after this many steps")


@dataclass(frozen=True)
class Checkpoints:
    keep_last: int = _f(3, "keep this many newest checkpoints (plus the best)")
    async_save: bool = _f(False, "write checkpoint files in a background thread")


@dataclass(frozen=True)
class LoggingOptions:
    max_bytes: int = _f(50_000_000, "rotate a JSON log file when it grows past this size")
    backups: int = _f(5, "rotated log files kept per log")


@dataclass(frozen=True)
class Debug:
    inject: str = _f(
        "",
        "fault injection, e.g. 'crash@120', 'hang@50', 'nan@30', 'spike@40', 'oom@60', "
        "'checkpoint_crash@250'; comma-separated; add ':once' to fire only in attempt 1",
    )


@dataclass(frozen=True)
class SupervisorOptions:
    heartbeat_timeout: float = _f(120.0, "seconds without a heartbeat before the worker is hung")
    startup_timeout: float = _f(600.0, "heartbeat timeout while the model loads or compiles")
    stall_timeout: float = _f(1800.0, "seconds of heartbeats without a new step: stalled")
    stop_timeout: float = _f(120.0, "seconds a stopping worker gets to save before SIGKILL")
    backoff_initial: float = _f(5.0, "first restart delay in seconds")
    backoff_max: float = _f(300.0, "largest restart delay in seconds")
    max_failures: int = _f(5, "failures without progress within failure_window: give up")
    failure_window: float = _f(1800.0, "seconds over which max_failures is counted")
    progress_reset_steps: int = _f(50, "steps gained after a restart that reset the backoff")
    max_rollbacks: int = _f(3, "rollbacks after non-finite loss or gradient spikes: give up")
    lr_backoff: float = _f(0.5, "learning-rate factor applied at each rollback")
    memory_limit_mb: float = _f(0.0, "planned restart when worker memory exceeds this; 0 = off")
    memory_growth: float = _f(0.5, "planned restart when memory grows by this fraction; 0 = off")
    memory_growth_samples: int = _f(3, "... above the baseline for this many samples in a row")
    memory_warmup_steps: int = _f(20, "steps after a (re)start before the memory baseline is taken")
    min_available_mb: float = _f(
        0.0, "planned restart when system available memory falls below this; 0 = off"
    )
    on_exit: str = _f("", "shell command run when the supervisor reaches a final state")
    caffeinate: bool = _f(True, "macOS: keep the machine from idle sleep while training")
    openblas: Literal["auto", "true", "false"] = _f(
        "auto", "Linux: preload Debian's OpenBLAS for the worker when present"
    )
    sample_interval: float = _f(5.0, "seconds between memory samples of the worker")
    gpu_watchdog_mitigation: bool = _f(
        False, "macOS: against the GPU watchdog, give the worker AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1, "
        "put the display to sleep at start (pmset displaysleepnow) and wait "
        "gpu_watchdog_cooldown before a restart after a watchdog kill (README 'What the Mac "
        "does at night')")
    gpu_watchdog_cooldown: float = _f(
        300.0, "seconds a restart waits after a GPU watchdog kill with gpu_watchdog_mitigation")
    pause_below_charge: int = _f(
        20, "on battery below this charge (percent): checkpoint and pause until on AC; 0 = off")
    power_poll_interval: float = _f(
        30.0, "seconds between readings of the power source and the thermal state")
    worker_command: list[str] = _f(
        [], "command that starts the worker, before 'train'; default: this Python's "
        "-m worker (tests use a scripted fake worker)"
    )


@dataclass(frozen=True)
class Config:
    # --- mlx_lm lora keys (same names, same meaning) ---
    model: str = _f("", "model directory or Hugging Face repo, as for mlx_lm")
    data: str = _f("", "directory with train.jsonl and valid.jsonl (or val.jsonl)")
    fine_tune_type: Literal["lora", "dora", "full"] = _f("lora", "lora, dora or full")
    num_layers: int = _f(16, "layers to fine-tune from the top; -1 for all")
    batch_size: int = _f(4, "micro-batch size (examples per forward pass)")
    iters: int = _f(2000, "optimizer steps to train for")
    learning_rate: float = _f(1e-5, "peak learning rate")
    optimizer: Literal["adam", "adamw", "sgd", "adafactor", "muon"] = _f(
        "adam", "adam, adamw, sgd, adafactor or muon (mlx.optimizers)"
    )
    optimizer_config: dict[str, Any] = _f({}, "per-optimizer keyword arguments, as in mlx_lm")
    lora_parameters: LoraParameters = field(default_factory=LoraParameters)
    max_seq_length: int = _f(2048, "longer sequences are truncated")
    grad_checkpoint: bool = _f(False, "gradient checkpointing (less memory, more compute)")
    grad_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    val_batches: int = _f(50, "validation batches per evaluation (fixed subset); -1 = all")
    steps_per_report: int = _f(10, "steps between progress lines")
    steps_per_eval: int = _f(250, "steps between evaluations")
    save_every: int = _f(250, "steps between checkpoints")
    seed: int = _f(0, "seed for initialisation, data order and dropout")
    mask_prompt: bool = _f(False, "exclude the prompt from the loss (chat/completions data)")
    lr_schedule: dict[str, Any] | None = _f(None, "mlx_lm schedule {name, arguments, warmup}")
    adapter_path: str = _f("", "also copy the final adapters here (mlx_lm's key)")
    prompt_feature: str = _f("prompt", "key of the prompt in completions data")
    completion_feature: str = _f("completion", "key of the completion in completions data")
    text_feature: str = _f("text", "key of the text in text data")
    chat_feature: str = _f("messages", "key of the messages in chat data")
    trust_remote_code: bool = _f(False, "allow custom model code (mlx_lm's key)")
    resume_adapter_file: str | None = _f(
        None, "a fresh run starts from these adapter weights: an adapters.safetensors file or "
        "an adapter directory (mlx_lm's key; keys and shapes must match the LoRA layers)")
    test: bool = _f(False, "after training, evaluate test.jsonl (mlx_lm's test pass)")
    test_batches: int = _f(500, "test batches of batch_size examples; -1 = the whole test set")
    report_to: list[str] | None = _f(
        None, "also report to wandb and/or swanlab through mlx_lm's callbacks, and/or to "
        "TensorBoard (ours: RUN_DIR/tensorboard, needs tensorboardX) ('wandb,tensorboard')")
    project_name: str | None = _f(None, "project name for wandb/swanlab (mlx_lm's key)")
    clear_cache_threshold: int = _f(
        0, "clear MLX's allocator cache after a step when it holds more than this many bytes "
        "(e.g. 2GB); 0 = never")
    wired_limit: int = _f(
        0, "Metal wired memory limit in bytes (e.g. 8GB); 0 = the device's recommended size")
    train: bool = _f(True, "mlx_lm's --train; overnight always trains (false is refused)")
    config: str | None = _f(None, "mlx_lm's --config; inside a config file it does nothing")
    # --- our sections ---
    training: TrainingOptions = field(default_factory=TrainingOptions)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    grad_spike: GradSpike = field(default_factory=GradSpike)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    logging: LoggingOptions = field(default_factory=LoggingOptions)
    debug: Debug = field(default_factory=Debug)
    supervisor: SupervisorOptions = field(default_factory=SupervisorOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Identity of what is trained; supervisor/logging/debug/batch split changes are
        allowed. Which keys count: shared/config_identity.py."""
        return config_identity.config_hash(self.to_dict())


# Every mlx_lm key is honoured, refused or warned about: shared/mlx_lm_keys.py.
MLX_LM_REPORTERS = ("wandb", "swanlab")  # mlx_lm.tuner.callbacks.SUPPORT_CALLBACK (0.32.2)
REPORTERS = (*MLX_LM_REPORTERS, "tensorboard")  # tensorboard: ours (worker/reporting.py)
SIZE_KEYS = ("clear_cache_threshold", "wired_limit")
SCHEDULE_KEYS = ("name", "arguments", "warmup", "warmup_init")  # mlx_lm's build_schedule
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def parse_size(value: Any, key: str) -> Any:
    """"2GB" -> 2_000_000_000, as mlx_lm's `--clear-cache-threshold` reads sizes
    (mlx_lm.utils._parse_size: units M, MB, G, GB, decimal); other values pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    digits = re.match(r"[0-9.]*", text).group()  # type: ignore[union-attr]
    unit = text[len(digits):].strip().upper()
    units = {"M": 10**6, "G": 10**9, "MB": 10**6, "GB": 10**9, "": 1}
    try:
        if unit not in units:
            raise InvalidOperation
        return int(Decimal(digits) * units[unit])
    except InvalidOperation:
        raise ConfigError(f"{key}: expected a size in bytes like 2GB or 500MB, "
                          f"got {value!r}") from None


# Values from YAML and flags convert ("3" -> 3), numbers must be finite (a NaN would be
# stored as null and mean nothing), unknown keys get a did-you-mean.
_RULES = records.Rules(ConfigError, lenient=True, suggest=True, finite=True)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def resolve(
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "config",
) -> Config:
    """Merge command line > file > defaults, validate every key, return a frozen Config.

    `overrides` maps dotted keys ("lora_parameters.rank") to values from the command line
    (`--set` values already read as YAML: shared/overrides.py). A mistake in a key the
    command line set is said to come from there, not from the file.
    """
    try:
        return _resolve(file_values, overrides, source)
    except ConfigError as e:
        text, prefix = str(e), f"{source}: "
        rest = text[len(prefix):] if text.startswith(prefix) else ""
        if overrides and rest.split(":", 1)[0] in overrides:
            raise ConfigError(f"{source} (overridden on the command line): {rest}") from None
        raise


def _resolve(file_values: dict[str, Any] | None, overrides: dict[str, Any] | None,
             source: str) -> Config:
    merged: dict[str, Any] = json.loads(json.dumps(file_values or {}, default=str))
    for key in list(merged):
        if key in MLX_LM_KEYS and merged[key] is None:
            del merged[key]  # as mlx_lm lora: an mlx_lm key left empty takes its default
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)
    for key in merged:  # from the file or the command line (--set hf_dataset=...)
        handling = MLX_LM_KEYS.get(key)
        if handling is not None and handling.status == "refused":
            raise ConfigError(f"{source}: key {key!r} is not supported: {handling.note}")
    try:
        for key in SIZE_KEYS:
            if key in merged:
                merged[key] = parse_size(merged[key], key)
        if isinstance(merged.get("optimizer"), str):  # mlx_lm: args.optimizer.lower()
            merged["optimizer"] = merged["optimizer"].lower()
        if isinstance(merged.get("report_to"), str):  # mlx_lm: "wandb,swanlab", any case
            merged["report_to"] = [r.strip().lower() for r in merged["report_to"].split(",")
                                   if r.strip()]
        config = records.build(Config, merged, "", _RULES)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _check_ranges(config, source)
    # The global batch must split evenly over the ranks; a batch_size given on the command
    # line (an OOM's halved micro-batch, supervisor/daemon/policy.py) is split as evenly as
    # it goes instead (worker/distributed.py).
    batch = 0 if "batch_size" in (overrides or {}) else config.batch_size
    distributed_config.check(config.distributed, batch, source)
    return config


def _check_ranges(c: Config, source: str) -> None:
    def need(ok: bool, key: str, what: str, got: Any) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {what}, got {got!r}")

    need(bool(c.model), "model", "a model directory", c.model)
    need(bool(c.data), "data", "a data directory", c.data)
    if _HUB_ID.fullmatch(c.data) and not Path(c.data).expanduser().exists():
        raise ConfigError(
            f"{source}: data: {c.data!r} is not a local directory but looks like a Hugging Face "
            "dataset id; overnight trains from local JSONL only: export the splits once with "
            f"the datasets package (load_dataset({c.data!r})[split].to_json('DIR/train.jsonl'), "
            "likewise valid.jsonl and test.jsonl) and set data: DIR")
    need(c.train, "train", "true (overnight always trains; for a test-only pass run "
         "`mlx_lm lora --test`)", c.train)
    need(c.batch_size >= 1, "batch_size", "an integer >= 1", c.batch_size)
    need(c.grad_accumulation_steps >= 1, "grad_accumulation_steps", "an integer >= 1",
         c.grad_accumulation_steps)
    need(c.iters >= 1, "iters", "an integer >= 1", c.iters)
    # mlx_lm seeds numpy's legacy generator with it (np.random.seed: 0 <= seed < 2**32)
    need(0 <= c.seed < 2**32, "seed", "an integer 0 <= seed < 2**32", c.seed)
    need(c.learning_rate > 0, "learning_rate", "a number > 0", c.learning_rate)
    need(c.num_layers == -1 or c.num_layers >= 1, "num_layers", "-1 or >= 1", c.num_layers)
    need(c.lora_parameters.rank >= 1, "lora_parameters.rank", "an integer >= 1",
         c.lora_parameters.rank)
    need(0 <= c.lora_parameters.dropout < 1, "lora_parameters.dropout", "0 <= x < 1",
         c.lora_parameters.dropout)
    need(c.max_seq_length >= 2, "max_seq_length", "an integer >= 2", c.max_seq_length)
    need(c.val_batches == -1 or c.val_batches >= 0, "val_batches",
         "-1 (the whole set), 0 (no validation) or >= 1", c.val_batches)
    need(c.test_batches == -1 or c.test_batches >= 1 or not c.test, "test_batches",
         "-1 (the whole set) or >= 1 with test: true", c.test_batches)
    for name in c.report_to or []:
        need(name in REPORTERS, "report_to", f"{', '.join(REPORTERS[:-1])} and/or "
             f"{REPORTERS[-1]} "
             "(comma-separated, as mlx_lm)", name)
    for key in SIZE_KEYS:
        need(getattr(c, key) >= 0, key, "a size >= 0", getattr(c, key))
    for key in ("steps_per_report", "steps_per_eval", "save_every"):
        need(getattr(c, key) >= 1, key, "an integer >= 1", getattr(c, key))
    need(c.training.lambda_weight >= 0, "training.lambda_weight", "a number >= 0",
         c.training.lambda_weight)
    need(c.training.warmup_steps >= 0, "training.warmup_steps", "an integer >= 0",
         c.training.warmup_steps)
    need(c.checkpoints.keep_last >= 1, "checkpoints.keep_last", "an integer >= 1",
         c.checkpoints.keep_last)
    need(c.grad_spike.patience >= 1, "grad_spike.patience", "an integer >= 1",
         c.grad_spike.patience)
    need(0 < c.supervisor.lr_backoff <= 1, "supervisor.lr_backoff", "0 < x <= 1",
         c.supervisor.lr_backoff)
    # a negative or zero timeout would call every worker hung at once (a night of restarts
    # that ends "the same failure twice"), a negative budget would give up before trying
    s = c.supervisor
    for key in ("heartbeat_timeout", "startup_timeout", "stop_timeout", "failure_window",
                "sample_interval", "power_poll_interval"):
        need(getattr(s, key) > 0, f"supervisor.{key}", "a number > 0", getattr(s, key))
    need(s.stall_timeout >= 0, "supervisor.stall_timeout", "a number >= 0 (0 = off)",
         s.stall_timeout)
    for key in ("backoff_initial", "backoff_max", "memory_limit_mb", "memory_growth",
                "min_available_mb", "gpu_watchdog_cooldown"):
        need(getattr(s, key) >= 0, f"supervisor.{key}", "a number >= 0", getattr(s, key))
    for key in ("max_failures", "memory_growth_samples"):
        need(getattr(s, key) >= 1, f"supervisor.{key}", "an integer >= 1", getattr(s, key))
    for key in ("max_rollbacks", "progress_reset_steps", "memory_warmup_steps"):
        need(getattr(s, key) >= 0, f"supervisor.{key}", "an integer >= 0", getattr(s, key))
    need(0 <= s.pause_below_charge <= 100, "supervisor.pause_below_charge",
         "a percentage 0..100 (0 = off)", s.pause_below_charge)
    if c.lr_schedule is not None:
        need(isinstance(c.lr_schedule.get("name"), str), "lr_schedule.name",
             "a mlx.optimizers schedule name", c.lr_schedule.get("name"))
        need(isinstance(c.lr_schedule.get("arguments"), list), "lr_schedule.arguments",
             "a list", c.lr_schedule.get("arguments"))
        # mlx_lm's build_schedule reads only these and ignores any other key (a misspelt
        # `warmup_steps` would train with no warmup, without a word)
        for key in c.lr_schedule:
            if key not in SCHEDULE_KEYS:
                raise ConfigError(
                    f"{source}: lr_schedule.{key}: unknown key {key!r}; mlx_lm's schedule "
                    "has name, arguments, warmup (steps) and warmup_init")
        warmup = c.lr_schedule.get("warmup", 0)
        need(isinstance(warmup, (int, float)) and not isinstance(warmup, bool)
             and float(warmup).is_integer() and warmup >= 0,
             "lr_schedule.warmup", "an integer >= 0", warmup)
    optimizers = list(get_args(get_type_hints(Config)["optimizer"]))
    for name, kwargs in c.optimizer_config.items():
        if name not in optimizers:  # mlx_lm reads optimizer_config[optimizer] only
            close = difflib.get_close_matches(str(name), optimizers, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: optimizer_config.{name}: unknown key {name!r}{hint}")
        need(kwargs is None or isinstance(kwargs, dict), f"optimizer_config.{name}",
             "a mapping of keyword arguments", kwargs)


def load(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    return resolve(load_yaml(path), overrides, source=str(path))


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config stored in a checkpoint or run record."""
    return resolve(d, source="stored config")


def help_table() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key; `overnight train --help` shows the help of
    the keys that have a flag (worker/main.py)."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            if is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = (f.default if f.default is not dataclasses.MISSING
                       else cast(Callable[[], Any], f.default_factory)())
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))

    walk(Config, "")
    return rows
