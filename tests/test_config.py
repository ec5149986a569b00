"""shared/config.py: mlx_lm configs run unchanged; mistakes get one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared import config as cfg
from shared import yamlfile
from shared.errors import ConfigError
from tests.conftest import overnight

MLX_LM_CONFIG = """
model: mlx-community/SmolLM2-135M-Instruct
train: true
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw: {weight_decay: 0.01}
data: data/
seed: 0
num_layers: 8
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: adapters
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
grad_accumulation_steps: 2
mask_prompt: true
lr_schedule:
  name: cosine_decay
  warmup: 100
  warmup_init: 1e-7
  arguments: [1e-5, 1000, 1e-7]
lora_parameters:
  keys: [self_attn.q_proj, self_attn.v_proj]
  rank: 8
  scale: 20.0
  dropout: 0.0
"""


def test_an_mlx_lm_lora_config_runs_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "lora.yaml"
    path.write_text(MLX_LM_CONFIG)
    c = cfg.load(path)
    assert c.learning_rate == 1e-5  # mlx_lm reads 1e-5 as a float; so do we
    assert c.optimizer == "adamw" and c.optimizer_config["adamw"]["weight_decay"] == 0.01
    assert c.lora_parameters.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert c.effective_batch == 8
    assert c.lr_schedule is not None and c.lr_schedule["name"] == "cosine_decay"


def test_defaults_come_from_the_earlier_trainer() -> None:
    c = cfg.resolve({"model": "m", "data": "d"})
    assert (c.iters, c.training.warmup_steps, c.save_every, c.steps_per_eval, c.val_batches) \
        == (2000, 50, 250, 250, 50)
    assert (c.lora_parameters.rank, c.lora_parameters.scale) == (8, 20.0)  # mlx_lm's
    assert (c.early_stopping.patience, c.early_stopping.min_delta) == (5, 0.01)
    assert (c.grad_spike.threshold, c.grad_spike.patience) == (1000.0, 3)


def test_command_line_beats_file_beats_defaults() -> None:
    c = cfg.resolve({"model": "m", "data": "d", "batch_size": 8, "lora_parameters": {"rank": 4}},
                    {"batch_size": "2"})
    assert c.batch_size == 2 and c.lora_parameters.rank == 4 and c.iters == 2000


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lerning_rate": 1e-4}, "lerning_rate: unknown key 'lerning_rate'; did you mean "
                                 "'learning_rate'?"),
        ({"early_stopping": {"patiense": 3}}, "early_stopping.patiense: unknown key 'patiense';"
                                              " did you mean 'patience'?"),
        ({"batch_size": "four"}, "batch_size: expected an integer, got 'four'"),
        ({"batch_size": 0}, "batch_size: expected an integer >= 1, got 0"),
        ({"fine_tune_type": "qlora"}, "fine_tune_type: expected one of ['lora', 'dora', "
                                      "'full'], got 'qlora'"),
        ({"hf_dataset": {"path": "x"}}, "key 'hf_dataset' is not supported"),
        ({"supervisor": {"lr_backoff": 2}}, "supervisor.lr_backoff: expected 0 < x <= 1"),
        ({"supervisor": {"heartbeat_timeout": -3}},
         "supervisor.heartbeat_timeout: expected a number > 0, got -3"),
        ({"supervisor": {"stall_timeout": -1}},
         "supervisor.stall_timeout: expected a number >= 0 (0 = off), got -1"),
        ({"supervisor": {"max_failures": 0}},
         "supervisor.max_failures: expected an integer >= 1, got 0"),
        ({"supervisor": {"backoff_initial": -5}},
         "supervisor.backoff_initial: expected a number >= 0, got -5"),
    ],
)
def test_bad_values_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.resolve({"model": "m", "data": "d", **values}, source="run.yaml")
    assert str(e.value).startswith("run.yaml: ")
    assert message in str(e.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        cfg.load(path)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A config saved as UTF-16 or Latin-1: before, a UnicodeDecodeError traceback (exit 1)."""
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"model: m\ndata: d\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:3: not UTF-8 text"):
        cfg.load(path)


def test_a_key_given_twice_is_one_line_naming_its_line(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys without a word: `iters: 5` then `iters: 6`
    trained 6 steps ("none is silently ignored")."""
    path = tmp_path / "twice.yaml"
    path.write_text("model: m\ndata: d\niters: 5\nsupervisor: {backoff_max: 1}\niters: 6\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:5: iters: given twice"):
        cfg.load(path)
    path.write_text("model: m\ndata: d\nsupervisor:\n  backoff_max: 1\n  backoff_max: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:5: backoff_max: given twice"):
        cfg.load(path)
    path.write_text("base: &b {rank: 8}\nmodel: m\ndata: d\n"
                    "lora_parameters: {<<: *b, rank: 4}\n")
    assert yamlfile.load_yaml(path)["lora_parameters"] == {"rank": 4}  # a merge overridden


def test_a_bad_value_from_the_command_line_is_not_blamed_on_the_file() -> None:
    """`overnight train run.yaml --set iters=abc` said "run.yaml: iters: expected an
    integer" (and --set lerning_rate=1 "run.yaml: lerning_rate: unknown key"): the user
    looked in a file that does not hold the key."""
    for overrides, key in (({"iters": "abc"}, "iters"), ({"lerning_rate": 1}, "lerning_rate"),
                           ({"iters": -3}, "iters"), ({"lora_parameters.rank": "x"},
                                                      "lora_parameters.rank")):
        with pytest.raises(ConfigError) as e:
            cfg.resolve({"model": "m", "data": "d"}, overrides, source="run.yaml")
        assert str(e.value).startswith(f"run.yaml (overridden on the command line): {key}:"), \
            str(e.value)
    with pytest.raises(ConfigError, match=r"^run.yaml: iters: expected"):  # the file's own
        cfg.resolve({"model": "m", "data": "d", "iters": "x"}, {"seed": 1}, source="run.yaml")


def test_config_hash_ignores_what_may_change_between_attempts() -> None:
    a = cfg.resolve({"model": "m", "data": "d"})
    b = cfg.resolve({"model": "m", "data": "d", "batch_size": 1, "grad_accumulation_steps": 4,
                     "supervisor": {"heartbeat_timeout": 5}})
    c = cfg.resolve({"model": "m", "data": "d", "lora_parameters": {"rank": 16}})
    assert a.hash() == b.hash() != c.hash()


def test_cli_bad_config_is_one_line_and_exit_78(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("model: m\ndata: d\nbatch_szie: 4\n")
    result = overnight("train", str(path), "--run-dir", str(tmp_path / "run"), timeout=60)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert lines == [f"overnight train: {path}: batch_szie: unknown key 'batch_szie'; "
                     "did you mean 'batch_size'?"]


def test_cli_bad_argument_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("model: m\ndata: d\n")
    result = overnight("train", str(path), "--set", "nonsense", timeout=60)
    assert result.returncode == 78
    assert result.stderr.strip() == "overnight train: --set: expected KEY=VALUE, got 'nonsense'"


def test_cli_argument_errors_are_one_line_and_exit_78() -> None:
    result = overnight("train", "x.yaml", "--batch-size", "four", timeout=60)
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        "overnight train: argument --batch-size: invalid int value: 'four' "
        "(see overnight train --help)"]


def test_sizes_are_read_as_mlx_lm_reads_them() -> None:
    """clear_cache_threshold (mlx_lm's --clear-cache-threshold) and wired_limit: bytes, or a
    size with M, MB, G or GB (decimal units, as mlx_lm.utils._parse_size)."""
    def size(value: object) -> int:
        return cfg.resolve({"model": "m", "data": "d", "clear_cache_threshold": value,
                            "wired_limit": value}).clear_cache_threshold

    assert size("2GB") == 2_000_000_000
    assert size("500MB") == 500_000_000
    assert size("1.5G") == 1_500_000_000
    assert size(123) == 123
    with pytest.raises(ConfigError, match=r"^x.yaml: clear_cache_threshold: expected a size in "
                                          r"bytes like 2GB or 500MB, got 'lots'$"):
        cfg.resolve({"model": "m", "data": "d", "clear_cache_threshold": "lots"},
                    source="x.yaml")


def test_configs_without_the_new_keys_keep_their_hash() -> None:
    """Checkpoints written before test/report_to/resume_adapter_file existed still resume:
    the hash of a plain config is the one the earlier code computed."""
    plain = {"model": "m", "data": "d"}
    assert cfg.resolve(plain).hash() == "9879df303cad6775"
    assert cfg.resolve({**plain, "test": True, "report_to": "wandb", "project_name": "p",
                        "clear_cache_threshold": "1GB"}).hash() == "9879df303cad6775"
    # the starting weights are part of what is trained
    assert cfg.resolve({**plain, "resume_adapter_file": "a"}).hash() != "9879df303cad6775"


def test_mlx_lm_lora_flags_work_on_overnight_train() -> None:
    import argparse

    from worker.main import add_arguments, overrides_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["c.yaml", "--train", "--test", "--test-batches", "7",
                              "--resume-adapter-file", "adapters", "--report-to", "wandb",
                              "--project-name", "p", "--clear-cache-threshold", "2GB",
                              "--trust-remote-code"])
    c = cfg.resolve({"model": "m", "data": "d"}, overrides_from(args))
    assert (c.train, c.test, c.test_batches, c.resume_adapter_file, c.report_to,
            c.project_name, c.clear_cache_threshold, c.trust_remote_code) == (
        True, True, 7, "adapters", ["wandb"], "p", 2_000_000_000, True)


def test_non_finite_numbers_are_refused() -> None:
    """A NaN or Inf setting would be written as null in every JSON file (strict JSON)."""
    for text, shown in ((".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")):
        with pytest.raises(ConfigError, match=rf"^x.yaml: grad_spike.threshold: expected a finite "
                                              rf"number, got {shown}$"):
            cfg.resolve({"model": "m", "data": "d",
                         "grad_spike": {"threshold": yaml.load(text, yamlfile._Loader)}},
                        source="x.yaml")


def test_an_mlx_lm_key_left_empty_means_its_default_as_in_mlx_lm() -> None:
    """mlx_lm lora fills every CONFIG_DEFAULTS key whose value is None (`seed:` left empty in
    YAML) with its default; before, each was refused ("expected an integer, got None")."""
    empty = ["train", "fine_tune_type", "optimizer", "optimizer_config", "seed", "num_layers",
             "batch_size", "iters", "val_batches", "learning_rate", "steps_per_report",
             "steps_per_eval", "resume_adapter_file", "adapter_path", "save_every", "test",
             "test_batches", "max_seq_length", "config", "grad_checkpoint",
             "grad_accumulation_steps", "clear_cache_threshold", "lr_schedule",
             "lora_parameters", "mask_prompt", "report_to", "project_name",
             "trust_remote_code"]
    c = cfg.resolve({"model": "m", "data": "d", **dict.fromkeys(empty)})
    assert c == cfg.resolve({"model": "m", "data": "d"})
    with pytest.raises(ConfigError, match="model: expected a model directory"):
        cfg.resolve({"model": None, "data": "d"})
    with pytest.raises(ConfigError, match=r"early_stopping\.patience: expected an integer"):
        cfg.resolve({"model": "m", "data": "d", "early_stopping": {"patience": None}})


def test_the_optimizer_name_is_read_in_any_case_as_mlx_lm_reads_it() -> None:
    """mlx_lm lora: `optimizer_name = args.optimizer.lower()`; a YAML `optimizer: AdamW`
    trains with AdamW there, and was refused here."""
    assert cfg.resolve({"model": "m", "data": "d", "optimizer": "AdamW"}).optimizer == "adamw"
    assert cfg.resolve({"model": "m", "data": "d"}, {"optimizer": "SGD"}).optimizer == "sgd"


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64 + 1])
def test_a_seed_numpy_and_mlx_cannot_take_is_one_line(seed: int) -> None:
    """mlx_lm seeds numpy's legacy generator (0 <= seed < 2**32); before, -1 or 2**64 + 1 was
    a TypeError traceback from mx.random.seed after the model had loaded (exit 1, and the
    supervisor restarted it into the same crash)."""
    with pytest.raises(ConfigError) as e:
        cfg.resolve({"model": "m", "data": "d", "seed": seed}, source="run.yaml")
    assert str(e.value) == f"run.yaml: seed: expected an integer 0 <= seed < 2**32, got {seed}"
    assert cfg.resolve({"model": "m", "data": "d", "seed": 2**32 - 1}).seed == 2**32 - 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-5, 100],
                          "warmup_steps": 100}},
         "lr_schedule.warmup_steps: unknown key 'warmup_steps'; mlx_lm's schedule has name, "
         "arguments, warmup (steps) and warmup_init"),
        ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-5, 100], "warmup": -5}},
         "lr_schedule.warmup: expected an integer >= 0, got -5"),
        ({"optimizer_config": {"adamw ": {"weight_decay": 0.1}}},
         "optimizer_config.adamw : unknown key 'adamw '; did you mean 'adamw'?"),
        ({"optimizer_config": {"adam": [0.9, 0.99]}},
         "optimizer_config.adam: expected a mapping of keyword arguments, got [0.9, 0.99]"),
    ],
)
def test_keys_inside_lr_schedule_and_optimizer_config_are_checked(values: dict,
                                                                   message: str) -> None:
    """mlx_lm's build_schedule reads name, arguments, warmup and warmup_init, and ignores any
    other key: `warmup_steps: 100` under lr_schedule trained with no warmup, without a word."""
    with pytest.raises(ConfigError) as e:
        cfg.resolve({"model": "m", "data": "d", **values}, source="run.yaml")
    assert str(e.value) == f"run.yaml: {message}"


def test_a_refused_mlx_lm_key_is_refused_from_the_command_line_too() -> None:
    """Before: `--set hf_dataset=...` said "unknown key 'hf_dataset'", as if mlx_lm had none."""
    with pytest.raises(ConfigError) as e:
        cfg.resolve({"model": "m", "data": "d"}, {"hf_dataset.path": "billsum"}, source="x")
    assert str(e.value).startswith("x: key 'hf_dataset' is not supported: Hugging Face")


# ---- --set values are read as YAML, as the file's values are ------------------------------


def _set(*items: str) -> cfg.Config:
    import argparse

    from worker.main import add_arguments, overrides_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["c.yaml", *(a for item in items for a in ("--set", item))])
    return cfg.resolve({"model": "m", "data": "d"}, overrides_from(args))


def test_set_values_are_yaml_so_keys_inside_mappings_get_numbers_and_lists() -> None:
    """Before: `--set optimizer_config.sgd.momentum=0.9` reached mlx.optimizers as the string
    "0.9" and the run was refused; a flow list became a one-item list of its text."""
    c = _set("optimizer=sgd", "optimizer_config.sgd.momentum=0.9",
             "optimizer_config.sgd.nesterov=true",
             "lora_parameters.keys=[self_attn.q_proj, self_attn.v_proj]",
             "lr_schedule={name: cosine_decay, arguments: [1e-5, 100], warmup: 5}",
             "learning_rate=2e-5", "early_stopping.enabled=no", "report_to=wandb,swanlab")
    assert c.optimizer_config == {"sgd": {"momentum": 0.9, "nesterov": True}}
    assert c.lora_parameters.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert c.lr_schedule == {"name": "cosine_decay", "arguments": [1e-5, 100], "warmup": 5}
    assert (c.learning_rate, c.early_stopping.enabled) == (2e-5, False)
    assert c.report_to == ["wandb", "swanlab"]

    from worker.model import make_optimizer  # the point where "0.9" was refused

    optimizer, _ = make_optimizer(c, 1.0)
    assert (type(optimizer).__name__, optimizer.momentum, optimizer.nesterov) == (
        "SGD", 0.9, True)


def test_set_values_of_string_keys_are_taken_as_they_are() -> None:
    """A path, a name or a shell command is text, whatever YAML would make of it."""
    c = _set("adapter_path=1e-5", "resume_adapter_file=0.9", "debug.inject=nan@3",
             "supervisor.on_exit=echo done: $OVERNIGHT_STATE", "training.streaming=false",
             "fine_tune_type=dora", "project_name=null")
    assert (c.adapter_path, c.resume_adapter_file, c.debug.inject) == ("1e-5", "0.9", "nan@3")
    assert c.supervisor.on_exit == "echo done: $OVERNIGHT_STATE"
    assert (c.training.streaming, c.fine_tune_type, c.project_name) == ("false", "dora", "null")


def test_a_set_value_that_is_not_yaml_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^--set lr_schedule: '\{name: \[' is not a YAML "
                                          r"value \(.+\)$"):
        _set("lr_schedule={name: [")
    with pytest.raises(ConfigError, match=r"^--set: expected KEY=VALUE, got 'momentum'$"):
        _set("momentum")


# ---- the docs name only commands that exist -----------------------------------------------


def test_every_overnight_command_the_code_and_docs_name_exists() -> None:
    """shared/config.py's docstring sent readers to `overnight config --help`, which does not
    exist. Every `overnight WORD` in backquotes in the code and docs is a real command."""
    import re

    from shared.cli import COMMANDS

    root = Path(__file__).resolve().parents[1]
    commands = {name for name, _, _ in COMMANDS}
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for package in ("shared", "supervisor", "worker"):
        files += sorted((root / package).rglob("*.py"))
    named = {(m.group(1), f.relative_to(root).as_posix())
             for f in files for m in re.finditer(r"`overnight ([a-z][a-z-]*)", f.read_text())}
    assert named and {word for word, _ in named} >= {"train", "run", "status", "report"}
    assert sorted((word, where) for word, where in named if word not in commands) == []
