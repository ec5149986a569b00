"""How `overnight` treats each key of an `mlx_lm lora` config, and where a run differs from it.

`KEYS` covers every key of mlx_lm 0.32.2's `CONFIG_DEFAULTS` (mlx_lm/lora.py) plus the data
keys its dataset loader reads (mlx_lm/tuner/datasets.py). Each is

    same       honoured, with mlx_lm's meaning
    different  honoured, but a run differs from `mlx_lm lora` in the way the note says
    refused    one line naming the key, exit 78, before anything starts
    warned     accepted, does nothing here (as in mlx_lm), and a warning says so at start

No key is accepted and silently ignored; tests/test_mlx_lm_keys.py reads CONFIG_DEFAULTS from
the installed mlx_lm and fails on a key missing here. docs/mlx_lm_keys.md is the same table.

`differences(config, given)` lists what this run will do differently from `mlx_lm lora`
with the same file — our defaults (warmup, early stopping, spike abort, ...) and the
differences of kind (validation subset, loss over target tokens only, ...) — each with the
setting that gives mlx_lm's behaviour. The worker prints them in one block at start.
Plain Python: the supervisor imports this without MLX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shared.config import Config

Status = Literal["same", "different", "refused", "warned"]


@dataclass(frozen=True)
class KeyHandling:
    status: Status
    note: str


KEYS: dict[str, KeyHandling] = {
    "model": KeyHandling("same", "a local model directory (a Hugging Face repo id needs the "
                                 "network at load, as in mlx_lm)"),
    "train": KeyHandling("different", "true: same. false (mlx_lm: test only, no training) is "
                                      "refused: use `mlx_lm lora --test`. Absent: we train "
                                      "(mlx_lm's default false needs --train)"),
    "fine_tune_type": KeyHandling("same", "lora, dora or full"),
    "optimizer": KeyHandling("same", "adam, adamw, sgd, adafactor, muon (mlx.optimizers), "
                                     "in any case, as mlx_lm lowercases it"),
    "optimizer_config": KeyHandling("same", "keyword arguments per optimizer; an entry for an "
                                            "optimizer not in use is warned at start"),
    "data": KeyHandling("different", "a local directory with train.jsonl, valid.jsonl (or "
                                     "val.jsonl) and test.jsonl: same. A Hugging Face dataset "
                                     "id is refused with how to export it to JSONL"),
    "seed": KeyHandling("different", "same LoRA initialisation as mlx_lm for the same seed; "
                                     "the data order and dropout masks are drawn differently "
                                     "(from (seed, epoch) and (seed, step), for exact resume); "
                                     "0 <= seed < 2**32"),
    "num_layers": KeyHandling("same", "-1 for all layers"),
    "batch_size": KeyHandling("different", "examples per forward pass (micro-batch); when "
                                           "batch_size x grad_accumulation_steps does not divide "
                                           "the data, an epoch ends with a smaller batch (mlx_lm "
                                           "never trains on the leftover, the longest examples)"),
    "iters": KeyHandling("different", "counts optimizer steps; mlx_lm counts micro-batches, so "
                                      "with grad_accumulation_steps N mlx_lm makes iters / N "
                                      "updates. Default 2000 (mlx_lm 1000)"),
    "val_batches": KeyHandling("different", "the same val_batches x batch_size examples at "
                                            "every evaluation (mlx_lm: new random batches each "
                                            "time); -1 = every example (mlx_lm drops the last "
                                            "partial batch); 0 = no validation (mlx_lm: a NaN "
                                            "loss). Default 50 (mlx_lm 25)"),
    "learning_rate": KeyHandling("different", "without lr_schedule: reached after a linear "
                                              "warmup of training.warmup_steps (50); mlx_lm "
                                              "uses it from the first step"),
    "steps_per_report": KeyHandling("same", "steps between progress lines"),
    "steps_per_eval": KeyHandling("different", "no evaluation before the first step (mlx_lm "
                                               "evaluates at step 1 too); early stopping "
                                               "watches these evaluations. Default 250 (mlx_lm "
                                               "200)"),
    "resume_adapter_file": KeyHandling("same", "a fresh run starts from these adapter weights "
                                               "(adapters.safetensors or an adapter directory); "
                                               "keys and shapes must match exactly (mlx_lm loads "
                                               "them non-strictly). Once the run has a "
                                               "checkpoint it resumes from that"),
    "adapter_path": KeyHandling("different", "created at start; the final adapters' two files "
                                             "are written into it (nothing else touched); "
                                             "they are always in RUN_DIR/adapters, checkpoints "
                                             "in RUN_DIR/checkpoints (mlx_lm: ./adapters with "
                                             "NNNNNNN_adapters.safetensors files)"),
    "save_every": KeyHandling("different", "full checkpoints (adapters, optimizer, data "
                                           "position) in RUN_DIR/checkpoints, the newest "
                                           "checkpoints.keep_last kept. Default 250 (mlx_lm "
                                           "100)"),
    "test": KeyHandling("same", "after training, the loss on test.jsonl: logged, in COMPLETE "
                                "and in the report; a missing test.jsonl is an error at start"),
    "test_batches": KeyHandling("different", "a fixed subset of test_batches x batch_size "
                                             "examples; -1 = every example (mlx_lm drops the "
                                             "last partial batch); 0 with test: true is refused "
                                             "(mlx_lm: a NaN loss)"),
    "max_seq_length": KeyHandling("same", "longer sequences are truncated"),
    "config": KeyHandling("warned", "mlx_lm's --config option; inside a config file it does "
                                    "nothing, in mlx_lm too"),
    "grad_checkpoint": KeyHandling("same", "gradient checkpointing"),
    "grad_accumulation_steps": KeyHandling("different", "one optimizer step = batch_size x N "
                                                        "examples, the loss a token mean over "
                                                        "all of them (mlx_lm: the mean of the "
                                                        "micro-batch means); see iters"),
    "clear_cache_threshold": KeyHandling("different", "bytes ('2GB' works): MLX's cache is "
                                                      "cleared after a step when it holds more; "
                                                      "0 = never. mlx_lm 0.32.2 parses the key "
                                                      "but never passes it to its trainer, which "
                                                      "then clears the cache after every step"),
    "lr_schedule": KeyHandling("same", "mlx_lm's build_schedule; no extra warmup is added; "
                                       "a key it does not read is refused"),
    "lora_parameters": KeyHandling("same", "rank, scale, dropout, keys"),
    "mask_prompt": KeyHandling("same", "the prompt is not in the loss"),
    "report_to": KeyHandling("same", "wandb and/or swanlab through mlx_lm's own reporting "
                                     "callbacks, with mlx_lm's train and validation fields; "
                                     "ours too: tensorboard (scalars in RUN_DIR/tensorboard); "
                                     "a package that is not installed is an error at start"),
    "project_name": KeyHandling("same", "the project for report_to's wandb/swanlab"),
    "trust_remote_code": KeyHandling("same", "allow custom model code"),
    # read by mlx_lm's dataset loader, not in CONFIG_DEFAULTS
    "hf_dataset": KeyHandling("refused", "Hugging Face datasets need the network at run time: "
                                         "export them to JSONL"),
    "prompt_feature": KeyHandling("same", "completions data: the prompt's key"),
    "completion_feature": KeyHandling("same", "completions data: the completion's key"),
    "text_feature": KeyHandling("same", "text data: the text's key"),
    "chat_feature": KeyHandling("same", "chat data: the messages' key"),
}

# mlx_lm 0.32.2's CONFIG_DEFAULTS for the keys whose default differs from ours and changes
# training (tests/test_mlx_lm_keys.py checks them against the installed mlx_lm).
MLX_LM_DEFAULTS = {"iters": 1000, "val_batches": 25, "steps_per_eval": 200}


@dataclass(frozen=True)
class Difference:
    """One way this run differs from `mlx_lm lora` with the same config.

    `as_mlx_lm` is the setting that gives mlx_lm's behaviour, "" when none does."""

    what: str
    ours: str
    mlx_lm: str
    as_mlx_lm: str

    def line(self) -> str:
        fix = f"[as mlx_lm: {self.as_mlx_lm}]" if self.as_mlx_lm else "[always]"
        return f"{self.what}: {self.ours} (mlx_lm: {self.mlx_lm}) {fix}"


def differences(c: Config, given: set[str] | None = None,
                validating: bool = True) -> list[Difference]:
    """What this run does differently from `mlx_lm lora` with the same config.

    `given`: the top-level keys set by the config file or command line (None: unknown, and
    then our defaults that differ from mlx_lm's are not listed). `validating`: there is a
    validation file and val_batches is not 0.
    """
    out: list[Difference] = []
    validating = validating and c.val_batches != 0
    if given is not None:
        for key, theirs in MLX_LM_DEFAULTS.items():
            ours = getattr(c, key)
            if key not in given and ours != theirs and (validating or key == "iters"):
                out.append(Difference(key, f"{ours} (our default)", f"{theirs}",
                                      f"{key}: {theirs}"))
    if c.lr_schedule is None and c.training.warmup_steps > 0:
        out.append(Difference(
            "learning rate", f"linear warmup over {c.training.warmup_steps} steps to "
            f"{c.learning_rate:g}", f"{c.learning_rate:g} from the first step",
            "training.warmup_steps: 0"))
    if c.grad_accumulation_steps > 1:
        n = c.grad_accumulation_steps
        out.append(Difference(
            "iters", f"{c.iters} optimizer steps of {n} micro-batches",
            f"{c.iters} micro-batches = {c.iters // n} optimizer steps; steps_per_eval and "
            "save_every count micro-batches too", f"iters: {max(c.iters // n, 1)}"))
    es = c.early_stopping
    if es.enabled:
        watched = "validation loss" if validating else "smoothed training loss"
        out.append(Difference(
            "early stopping", f"stops after {es.patience} evaluations without a "
            f"{es.min_delta:g} improvement of the {watched}", "trains all iters",
            "early_stopping.enabled: false"))
    gs = c.grad_spike
    if gs.enabled:
        out.append(Difference(
            "gradient spikes", f"the attempt stops (for a rollback) after {gs.patience} steps "
            f"with a gradient norm > {gs.threshold:g} or > median + {gs.robust_z:g} x MAD",
            "keeps training", "grad_spike.enabled: false"))
    out.append(Difference("NaN/Inf loss or gradient", "the attempt stops before the update "
                          "(for a rollback)", "keeps training", ""))
    if validating and c.val_batches > 0:
        out.append(Difference(
            "validation", f"the same {c.val_batches} x {c.batch_size} examples every "
            "evaluation, none before step 1",
            f"{c.val_batches} random batches, new each evaluation, also before step 1",
            "val_batches: -1"))
    elif c.val_batches == 0:
        out.append(Difference("validation", "none (val_batches: 0)",
                              "a NaN validation loss every evaluation", ""))
    accum = c.grad_accumulation_steps > 1
    out.append(Difference(
        "loss", "token mean over target tokens, padding never counted"
        + (", over the whole effective batch" if accum else ""),
        "counts one padding target per sequence" + (", mean of micro-batch means" if accum
                                                      else ""), ""))
    if c.training.lambda_weight > 0:
        out.append(Difference(
            "loss weights", f"per-example distrust weights (lambda_weight "
            f"{c.training.lambda_weight:g})", "every example weighs the same",
            "training.lambda_weight: 0"))
    if c.training.max_grad_norm > 0:
        out.append(Difference(
            "gradient clipping", f"to a global norm of {c.training.max_grad_norm:g}",
            "none", "training.max_grad_norm: 0"))
    return out


def warnings(file_values: dict[str, object], c: Config | None = None) -> list[str]:
    """Keys that are accepted but do nothing here (status "warned"), one line each; with the
    resolved config `c`, also optimizer_config entries for an optimizer not in use (mlx_lm
    reads only optimizer_config[optimizer]: weight decay set for adamw does nothing to adam)."""
    out = []
    for key, h in KEYS.items():
        if h.status == "warned" and file_values.get(key) is not None:
            out.append(f"{key}: {file_values[key]!r} does nothing here: {h.note}")
    if c is not None:
        for name, kwargs in c.optimizer_config.items():
            if name != c.optimizer and kwargs:
                out.append(f"optimizer_config.{name}: {kwargs!r} does nothing here: the "
                           f"optimizer is {c.optimizer} (only optimizer_config.{c.optimizer} "
                           "is used, as in mlx_lm)")
    return out


def render(diffs: list[Difference]) -> str:
    """The start-up block: a header and one indented line per difference."""
    head = (f"overnight train: {len(diffs)} differences from `mlx_lm lora` with this config "
            "(docs/mlx_lm_keys.md):")
    return "\n".join([head, *(f"  - {d.line()}" for d in diffs)])
