"""`overnight train CONFIG.yaml`: one worker attempt, in the foreground.

    overnight train config.yaml --run-dir runs/my-run            # resumes if it can
    overnight train config.yaml --fresh                          # start over
    overnight train config.yaml --resume runs/x/checkpoints/step-0000250
    overnight train --demo                                       # tiny built-in model

The supervisor runs this same entry point as its child, adding --telemetry, --attempt,
--run-id and (after failures) --set/--lr-scale/--skip-position/--skip-steps/--skip-batch.
Command line > YAML > defaults; a `--set KEY=VALUE` value is read as YAML, as the file's
values are (shared/overrides.py).
Exit codes: shared/exitcodes.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from shared import blas, logsetup, runlock
from shared import config as cfg
from shared.errors import ConfigError
from shared.layout import RunDir
from shared.overrides import parse_set

# --flag -> dotted config key; the flags of mlx_lm lora and of the trainer we grew from.
FLAG_KEYS: dict[str, tuple[str, type]] = {
    "model": ("model", str),
    "data": ("data", str),
    "fine_tune_type": ("fine_tune_type", str),
    "optimizer": ("optimizer", str),
    "num_layers": ("num_layers", int),
    "lora_layers": ("num_layers", int),
    "batch_size": ("batch_size", int),
    "iters": ("iters", int),
    "max_steps": ("iters", int),
    "learning_rate": ("learning_rate", float),
    "lora_rank": ("lora_parameters.rank", int),
    "val_batches": ("val_batches", int),
    "steps_per_report": ("steps_per_report", int),
    "steps_per_eval": ("steps_per_eval", int),
    "save_every": ("save_every", int),
    "grad_accumulation_steps": ("grad_accumulation_steps", int),
    "max_seq_length": ("max_seq_length", int),
    "seed": ("seed", int),
    "adapter_path": ("adapter_path", str),
    "resume_adapter_file": ("resume_adapter_file", str),
    "test_batches": ("test_batches", int),
    "report_to": ("report_to", str),
    "project_name": ("project_name", str),
    "clear_cache_threshold": ("clear_cache_threshold", str),
    "lambda_weight": ("training.lambda_weight", float),
}
# mlx_lm lora's on/off flags (--train is accepted: training is what this command does).
SWITCHES = ("grad_checkpoint", "mask_prompt", "test", "train", "trust_remote_code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path, help="YAML config (mlx_lm lora keys work)")
    parser.add_argument("--run-dir", type=Path, help="default: runs/<config name>")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="train the built-in tiny model on a built-in corpus (no config)",
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        default="auto",
        metavar="auto|PATH",
        help="auto (default): newest valid checkpoint; or a checkpoint dir",
    )
    resume.add_argument(
        "--auto-resume",
        dest="resume",
        action="store_const",
        const="auto",
        help="alias of --resume auto",
    )
    resume.add_argument(
        "--fresh",
        action="store_true",
        help="start over (existing checkpoints are moved aside, not deleted)",
    )
    helps = {key: text for key, _, text in cfg.help_table()}
    for flag, (key, typ) in FLAG_KEYS.items():
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            dest=f"opt_{flag}",
            type=typ,
            metavar=typ.__name__.upper(),
            help=f"{key}: {helps[key]}",
        )
    parser.add_argument(
        "--grad-checkpoint",
        dest="opt_grad_checkpoint",
        action="store_const",
        const=True,
        help=f"grad_checkpoint: {helps['grad_checkpoint']}",
    )
    parser.add_argument(
        "--mask-prompt",
        dest="opt_mask_prompt",
        action="store_const",
        const=True,
        help=f"mask_prompt: {helps['mask_prompt']}",
    )
    for flag in ("test", "train", "trust_remote_code"):
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            dest=f"opt_{flag}",
            action="store_const",
            const=True,
            help=f"{flag}: {helps[flag]}",
        )
    parser.add_argument(
        "--no-streaming", action="store_true", help="load the whole training set into memory"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set early_stopping.patience=3 or "
        "--set optimizer_config.sgd.momentum=0.9 (the value is read as YAML, as in the file)",
    )
    sup = parser.add_argument_group("used by the supervisor")
    sup.add_argument("--telemetry", metavar="ENDPOINT", help="ZeroMQ endpoint to publish to")
    sup.add_argument("--attempt", type=int, default=1)
    sup.add_argument("--run-id", help="default: RUN_DIR/run_id (created once)")
    sup.add_argument("--lr-scale", type=float, help="learning-rate multiplier (rollbacks)")
    sup.add_argument(
        "--skip-position",
        type=int,
        action="append",
        default=[],
        metavar="P",
        help="pass over data position P once (a rollback's offending batch)",
    )
    sup.add_argument(
        "--skip-steps",
        type=int,
        default=0,
        help="after resuming, skip this many steps' worth of data",
    )
    sup.add_argument(
        "--skip-batch",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="never train on batch N of the epoch plan (a data problem)",
    )
    sup.add_argument(
        "--resume-fd",
        type=int,
        metavar="FD",
        help="load the model, then read where to resume from on this descriptor "
        "(shared/resume_handoff.py): the supervisor validates the checkpoint meanwhile",
    )
    sup.add_argument(
        "--validated",
        metavar="SHA256",
        help="the --resume checkpoint was validated by the supervisor; this is its "
        "manifest's sha256 (re-checked; every byte is not read again)",
    )


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, (key, _) in FLAG_KEYS.items():
        value = getattr(args, f"opt_{flag}", None)
        if value is not None:
            out[key] = value
    for flag in SWITCHES:
        if getattr(args, f"opt_{flag}", None):
            out[flag] = True
    if args.no_streaming:
        out["training.streaming"] = "false"
    for item in args.set:
        key, value = parse_set(item)
        out[key] = value
    return out


def run_id_for(run: RunDir, given: str | None, prefix: str) -> str:
    return given or os.environ.get("OVERNIGHT_RUN_ID") or run.ensure_run_id(prefix)


def demo_setup(base: Path) -> tuple[Path, Path]:
    from worker.tinymodel import make_corpus, make_tiny_model

    make_tiny_model(base / "model")
    make_corpus(base / "data", n_train=256, n_valid=32)
    config = base / "demo.yaml"
    config.write_text(
        f"model: {base / 'model'}\ndata: {base / 'data'}\n"
        "iters: 60\nbatch_size: 4\nlearning_rate: 1.0e-3\nsteps_per_report: 10\n"
        "steps_per_eval: 20\nsave_every: 20\nval_batches: 4\nnum_layers: -1\n"
        "lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}\n"
        "training: {warmup_steps: 5}\n"
    )
    return config, base / "run"


def main(args: argparse.Namespace) -> int:
    if args.demo:
        blas.reexec_with_preload("auto")  # before the demo's files are made
        base = Path(tempfile.mkdtemp(prefix="overnight-demo-"))
        args.config, demo_run = demo_setup(base)
        args.run_dir = args.run_dir or demo_run
        print(f"demo: tiny model, corpus and run directory in {base}", file=sys.stderr)
    if args.config is None:
        raise ConfigError("train: a CONFIG.yaml is required (or --demo)")
    config = cfg.load(args.config, overrides_from(args))
    # Alone, the same BLAS as under the supervisor (shared/blas.py): a run started by one
    # command and resumed by the other must not change its numbers.
    blas.reexec_with_preload(config.supervisor.openblas)
    run = RunDir((args.run_dir or Path("runs") / args.config.stem).resolve())
    run.create()  # RunDirError: one line naming the path
    # One writer per run directory: the supervisor's lock handed down to its worker, or our
    # own (RunDirLocked names the holder); held until this process exits.
    lock = runlock.worker_lock(run.lock)
    try:
        return _train(args, config, run)
    finally:
        lock.release()


def _train(args: argparse.Namespace, config: cfg.Config, run: RunDir) -> int:
    # The progress line already shows what the progress and phase events say.
    rank = os.environ.get("MLX_RANK", "0") if config.distributed.enabled else "0"
    logsetup.configure(
        "worker",
        run.worker_log if rank == "0" else run.logs / f"worker-rank{rank}.jsonl",
        max_bytes=config.logging.max_bytes,
        backups=config.logging.backups,
        console_skip=frozenset({"progress", "phase_changed", "mlx_lm_differences"}),
    )
    run_id = run_id_for(run, args.run_id, args.config.stem)
    structlog.contextvars.bind_contextvars(run_id=run_id, attempt=args.attempt)
    from worker.session import Session

    session = Session(config, run, run_id, args, overrides_from(args))
    return int(session.run())
