"""Loading the base model while the supervisor validates the checkpoint (`--resume-fd`).

A worker started by the supervisor with `--resume-fd FD` (shared/resume_handoff.py) loads
the base model and makes it trainable first, then waits for the checkpoint choice; a worker
started any other way (`overnight train`, `--resume PATH`) chooses first, as it always did,
then loads. Both do the same MLX work in the same order — wired limit, `load_base`, the
seed, the LoRA layers (mlx_lm lora's order: seeded after loading) — so the numbers of a run
do not depend on how its worker was started. Nothing the model load uses can change with the
checkpoint: a resumed run must have the checkpoint's config hash (worker/resume.py), which
covers the model, the fine-tune type and the LoRA parameters; `reconcile` changes only the
batch split.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import structlog

from shared import resume_handoff
from shared.config import Config

log = structlog.get_logger("worker")


def load_model(c: Config) -> tuple[Any, Any]:
    """(model, tokenizer): the base model with its trainable layers, as the session uses it.
    Logs `model_loaded` with the seconds of MLX's and mlx_lm's imports (transformers: most
    of them) and of the load itself."""
    t0 = time.monotonic()
    import mlx.core as mx
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    from worker import model as models

    started = time.monotonic()
    if c.wired_limit:
        mx.set_wired_limit(c.wired_limit)
    else:
        maybe_set_recommended_wired_limit()
    model, tokenizer = models.load_base(c)
    # Seeded after loading, as mlx_lm lora: the same seed gives the same LoRA weights.
    mx.random.seed(c.seed)
    models.make_trainable(model, c)
    log.info("model_loaded", imports_s=round(started - t0, 3),
             seconds=round(time.monotonic() - started, 3))
    return model, tokenizer


def await_resume(args: argparse.Namespace, c: Config, stop_requested: Any) -> bool:
    """Wait for the supervisor's checkpoint choice on `args.resume_fd` and put it into `args`
    (resume, validated, skip_steps, skip_position), as the command line would have said it.
    False: no choice is coming (the supervisor is gone or decided against this start, or a
    SIGTERM came): leave without training. HandoffError: a bad line, or none within the
    supervisor's startup_timeout."""
    started = time.monotonic()
    handoff = resume_handoff.receive(args.resume_fd, lambda: bool(stop_requested()),
                                     limit=c.supervisor.startup_timeout)
    waited = round(time.monotonic() - started, 3)
    if handoff is None:
        log.info("resume_handoff_closed", waited_s=waited)
        return False
    args.resume = handoff.resume
    args.validated = handoff.validated
    args.skip_steps = handoff.skip_steps
    args.skip_position = [*(getattr(args, "skip_position", None) or []),
                          *handoff.skip_positions]
    log.info("resume_handoff_received", resume=handoff.resume, skip_steps=handoff.skip_steps,
             skip_positions=list(handoff.skip_positions), waited_s=waited)
    return True
