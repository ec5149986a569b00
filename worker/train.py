"""The training loop: mlx_lm's shape (one flat step loop with `if step % every == 0` blocks),
plus what an unattended night needs — exact resume, fixed-subset validation, early stopping,
spike/non-finite aborts, checkpoints on every kind of stop.

A step is one optimizer update over one effective batch (micro-batch x accumulation). The
gradient of each micro-batch is the gradient of a weighted *sum* of token losses; they are
added up and divided once by the batch's total weight, so accumulation is the same math as
one big batch. Dropout randomness is seeded from (seed, step, micro-batch), so a resumed run
draws the same masks as an uninterrupted one without saving generator state.

Longer than 400 lines: the loop is kept whole, as mlx_lm keeps its `train()`: the step
functions, which batch comes next, the step itself, evaluation and what a checkpoint holds
are read top to bottom in the order a step runs them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import psutil
import structlog

from shared import protocol as p
from shared.config import Config
from shared.errors import DataError
from shared.exitcodes import ExitCode
from shared.footprint import phys_footprint_mb
from shared.progress import Progress
from shared.trainer_state import BatchSplit, Best, PlanState, RngScheme, TrainerState
from worker.batching import EpochPlan, collate, micro_batches, target_count
from worker.checkpointing import CheckpointWriter, SavedCheckpoint, snapshot
from worker.data import Example, Examples
from worker.distributed import agree_controls
from worker.inject import Injector
from worker.loss import token_mean, weighted_ce_sums
from worker.monitors import EarlyStopper, SpikeDetector
from worker.reporting import Reporter


@dataclass
class Controls:
    """Set asynchronously (signal handlers, parent watch); read between steps."""

    stop_requested: bool = False
    stop_reason: str = ""
    checkpoint_requested: bool = False


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that resume needs."""

    step: int = 0
    data_position: int = 0
    lr_scale: float = 1.0
    tokens_total: int = 0
    train_seconds: float = 0.0
    best_val: float | None = None
    best_step: int = -1
    val_examples: int = -1
    last_val: float | None = None
    loss_history: list[float] = field(default_factory=list)


@dataclass
class Outcome:
    code: ExitCode
    reason: str
    detail: str = ""
    first_bad_step: int = -1
    data_position: int = -1  # the batch of the failing step (non-finite, spike): its position,
    data_batch: int = -1  # its group in the epoch plan (the same in every epoch)
    data_lines: str = ""  # and where its examples are, e.g. "train.jsonl:3,8-11"
    first_bad_position: int = -1  # a spike: its window is first_bad_position..data_position


@dataclass
class Trainer:
    config: Config
    run_id: str
    attempt: int
    model: Any
    optimizer: Any
    train_set: Examples
    valid_set: Examples | None
    val_subset: np.ndarray
    plan: EpochPlan
    state: TrainState
    stopper: EarlyStopper
    spikes: SpikeDetector
    writer: CheckpointWriter
    reporter: Reporter
    progress: Progress
    controls: Controls
    injector: Injector
    adapter_config: dict[str, Any]
    lr_schedule: Any  # the optimizer's learning-rate schedule (step -> rate)
    state_extra: dict[str, Any]  # TrainerState's versions and data identity
    last_saved_step: int = 0
    skip_batches: frozenset[int] = frozenset()  # plan groups never trained on (data problems)
    skip_positions: frozenset[int] = frozenset()  # data positions passed over once (rollbacks)
    position: int = 0  # data position of the batch being computed
    batch_examples: list[int] = field(default_factory=list)  # its usable examples
    # the steps of the current gradient-spike run: (data position, usable examples)
    spike_window: list[tuple[int, list[int]]] = field(default_factory=list)
    group: Any = None  # this rank's data-parallel group (worker/distributed.py); None: alone
    _proc: Any = None
    _rss: float = 0.0  # MB, the last reading (see _memory)
    _kept: Any = None  # (trainable weights, optimizer state) before a fused update
    _slots: list[tuple[Any, Any]] | None = None  # (module or list, key) of each trainable
    _opt_slots: list[tuple[Any, Any]] | None = None  # ... of each optimizer state array
    _fused: bool = False
    _updates: int = 0  # updates applied in this process
    _pending: Any = None  # a plain step's metrics, reported while the next step computes
    _ahead: Any = None  # (data position, usable examples, device micro-batches), built early

    # ------------------------------------------------------------------ step machinery
    def _build_step_functions(self) -> None:
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        model, optimizer, c = self.model, self.optimizer, self.config
        if c.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        loss_and_grad = nn.value_and_grad(model, weighted_ce_sums)

        def first(tokens: Any, spans: Any, weights: Any) -> Any:
            (wce, (wtok, ntok)), grads = loss_and_grad(model, tokens, spans, weights)
            return wce, wtok, ntok, grads

        def more(acc: Any, tokens: Any, spans: Any, weights: Any) -> Any:
            wce, wtok, ntok, grads = first(tokens, spans, weights)
            return acc[0] + wce, acc[1] + wtok, acc[2] + ntok, tree_map(mx.add, acc[3], grads)

        def finish(acc: Any) -> Any:
            """Divide once by the batch's total weight; the norm is before any clipping."""
            wce, wtok, ntok, grads = acc
            grads = tree_map(lambda g: token_mean(g, wtok), grads)
            sq = [mx.sum(mx.square(g.astype(mx.float32))) for g in _leaves(grads)]
            return grads, mx.sqrt(sum(sq[1:], sq[0])), token_mean(wce, wtok), ntok

        def only(tokens: Any, spans: Any, weights: Any) -> Any:
            return finish(first(tokens, spans, weights))

        def last(acc: Any, tokens: Any, spans: Any, weights: Any) -> Any:
            return finish(more(acc, tokens, spans, weights))

        def apply(grads: Any) -> None:
            if c.training.max_grad_norm > 0:
                grads, _ = optim.clip_grad_norm(grads, c.training.max_grad_norm)
            optimizer.update(model, grads)

        def only_update(tokens: Any, spans: Any, weights: Any) -> Any:
            grads, norm, loss, ntok = only(tokens, spans, weights)
            apply(grads)
            return norm, loss, ntok

        def last_update(acc: Any, tokens: Any, spans: Any, weights: Any) -> Any:
            grads, norm, loss, ntok = last(acc, tokens, spans, weights)
            apply(grads)
            return norm, loss, ntok

        fns = [first, more, only, last]
        updates = [only_update, last_update]
        if c.training.compile:
            # value_and_grad swaps traced arrays into the model: model.state is an output too.
            io = [model.state, mx.random.state]
            fns = [partial(mx.compile, inputs=io, outputs=io)(f) for f in fns]
            state = [model.state, optimizer.state]
            apply = partial(mx.compile, inputs=state, outputs=state)(apply)
            state = [model.state, optimizer.state, mx.random.state]
            updates = [partial(mx.compile, inputs=state, outputs=state)(f) for f in updates]
        self._first, self._more, self._only, self._last = fns
        self._finish = finish  # a group's rank divides after the all_sum (worker/distributed.py)
        self._apply = apply
        self._only_update, self._last_update = updates
        # One compiled call a step (gradient, norm and update, as mlx_lm and the bare loop
        # of benchmarks/bare_loop.py) when the pre-update state kept to undo a rejected step
        # is small: LoRA/DoRA. Full fine-tuning keeps gradient and update apart (a second
        # copy of every weight and moment would cost more memory than the split costs time).
        self._fused = c.fine_tune_type != "full"

    def _clear_cache(self) -> None:
        """mlx_lm's `clear_cache_threshold`: free MLX's buffer cache when it holds more."""
        import mlx.core as mx

        limit = self.config.clear_cache_threshold
        if limit > 0 and mx.get_cache_memory() > limit:
            mx.clear_cache()

    def _memory(self, step: int) -> tuple[float, float, float]:
        """(MLX active, MLX peak, process RSS) in MB. RSS is read (psutil, ~10-25 us) at the
        first step, at report steps and at the last; the steps between repeat that reading."""
        import mlx.core as mx

        c = self.config
        if self._proc is None or step % c.steps_per_report == 0 or step == c.iters:
            if self._proc is None:
                self._proc = psutil.Process(os.getpid())
            self._rss = self._proc.memory_info().rss / 2**20
        return mx.get_active_memory() / 2**20, mx.get_peak_memory() / 2**20, self._rss

    def _held_memory(self) -> tuple[float, float]:
        """MLX's buffer cache and (macOS) the physical footprint, MB: what the Metal memory
        the counters above miss shows in (shared/footprint.py)."""
        import mlx.core as mx

        return mx.get_cache_memory() / 2**20, phys_footprint_mb(os.getpid()) or 0.0

    def _next_batch(self) -> tuple[int, list[tuple[int, Example]]]:
        """The data position of the next batch to train on and its usable examples.

        Positions in `skip_positions` (a rollback's offending data, supervisor/daemon/
        policy.py), positions whose group is in `skip_batches`, or whose examples are all
        unusable (streaming finds unusable rows only when it reads them, worker/data.py), are
        passed over: deterministic, so a resumed run passes over the same ones.
        """
        plan = self.plan
        pos = self.state.data_position
        tried = 0
        while tried <= plan.groups_per_epoch:  # every group once: none is usable
            batch = plan.batch_id(pos)
            if pos in self.skip_positions:
                _log.info(
                    "batch_skipped",
                    data_position=pos,
                    batch=batch,
                    reason="the offending data of a rollback (passed over once)",
                    lines=self.train_set.index.where(plan.members(batch)),
                )
                pos += 1
                continue
            tried += 1
            if batch in self.skip_batches:
                _log.info(
                    "batch_skipped",
                    data_position=pos,
                    batch=batch,
                    reason="a data problem found by the supervisor",
                    lines=self.train_set.index.where(plan.members(batch)),
                )
                pos += 1
                continue
            usable = self._usable(pos)
            if usable:
                return pos, usable
            _log.warning(
                "batch_skipped",
                data_position=pos,
                batch=batch,
                reason="no usable example",
                lines=self.train_set.index.where(plan.members(batch)),
            )
            pos += 1
        raise DataError(
            f"{self.train_set.index.path}: no batch of the training set has a usable example"
        )

    def _compute_step(self, step: int) -> tuple[Any, float, float, int, float]:
        """(gradients or None, loss, gradient norm, target tokens, learning rate) of the
        effective batch at the next data position (`self.position`).

        One sync point per micro-batch, as mlx_lm: it keeps one micro-batch's graph alive,
        and the last one also yields the loss and gradient norm the checks need on the host.
        Fused (`self._fused`), the last call also applies the update, after `_keep()` has
        kept the state before it, and the gradients returned are None; otherwise the update
        is left to `_apply`. The rate is the one the update uses (mlx's optimizer stores
        `schedule(step)` in its state before it counts the step).
        """
        import mlx.core as mx

        if self.group is not None:  # this rank's share, all_summed; never fused: the update
            from worker.distributed import compute_step  # follows the all_sum, as unfused

            self._flush()
            grads, loss, norm, ntok = compute_step(self, step)
            lr = float(self.lr_schedule(mx.array(self.state.step, mx.uint64)).item())
            return grads, loss, norm, ntok, lr
        c = self.config
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == self.state.data_position:
            self.position, usable, parts = ahead
        else:
            self.position, usable = self._next_batch()
            parts = self._device_batches(usable)
        self.batch_examples = [i for i, _ in usable]
        acc = None
        for j, batch in enumerate(parts):
            mx.random.seed((c.seed * 1_000_003 + step * 1_009 + j) % 2**63)
            if j < len(parts) - 1:
                acc = self._first(*batch) if acc is None else self._more(acc, *batch)
                mx.eval(acc)
                continue
            if self._fused:
                self._keep()
                if acc is None:
                    norm, loss, ntok = self._only_update(*batch)
                else:
                    norm, loss, ntok = self._last_update(acc, *batch)
                lr = self.optimizer.learning_rate
                mx.async_eval(norm, loss, ntok, lr, self.model.state, self.optimizer.state)
                self._while_computing()
                return None, float(loss.item()), float(norm.item()), int(ntok.item()), float(
                    lr.item())
            grads, norm, loss, ntok = self._only(*batch) if acc is None else self._last(acc, *batch)
            mx.async_eval(grads, norm, loss, ntok)
            self._while_computing()
        lr = float(self.lr_schedule(mx.array(self.state.step, mx.uint64)).item())
        return grads, float(loss.item()), float(norm.item()), int(ntok.item()), lr

    def _device_batches(self, usable: list[tuple[int, Example]]) -> list[tuple[Any, Any, Any]]:
        """The micro-batches of an effective batch as MLX arrays: (tokens (B, W) int32,
        spans (B, 2) int32, weights (B,) float32) each, padded as `collate` says."""
        import mlx.core as mx

        c = self.config
        examples = [ex for _, ex in usable]
        out = []
        for idx in micro_batches(np.arange(len(examples)), c.batch_size):
            mb = collate([examples[int(i)] for i in idx], c.max_seq_length)
            out.append((mx.array(mb.tokens), mx.array(mb.spans), mx.array(mb.weights)))
        return out

    def _while_computing(self) -> None:
        """Host work done while MLX computes the step just dispatched: the previous step's
        report (`_flush`) and the next batch (`_look_ahead`), both off the step's critical
        path (the bare loop of benchmarks/bare_loop.py has neither)."""
        self._flush()
        self._ahead = self._look_ahead(self.position + 1)

    def _look_ahead(self, pos: int) -> Any:
        """(pos, usable examples, device micro-batches) of the batch at data position `pos`,
        or None where fetching early could differ from fetching in turn: a streaming
        dataset (reading counts and logs), a position or batch to pass over (logged when
        passed), or a batch with no usable example (`_next_batch` logs and moves on). The
        step after uses it only if it starts at `pos` (`_compute_step`)."""
        plan = self.plan
        if not self.train_set.in_memory or pos in self.skip_positions:
            return None
        if plan.batch_id(pos) in self.skip_batches:
            return None
        usable = self._usable(pos)
        return (pos, usable, self._device_batches(usable)) if usable else None

    def _usable(self, pos: int) -> list[tuple[int, Example]]:
        """The examples of the batch at data position `pos` that have a target to train on
        (the first epoch's reads are counted when streaming, worker/data.py)."""
        plan, c = self.plan, self.config
        return [
            (i, ex)
            for i, ex in self.train_set.fetch(plan.group(pos), count=plan.epoch(pos) == 0)
            if target_count(len(ex[0]), ex[1], c.max_seq_length) > 0
        ]

    def _flush(self) -> None:
        """Report the plain step kept in `_pending` (its metrics, then its progress line).

        A plain step (no evaluation) is reported while the next step computes: `_compute_step`
        calls this between dispatching the step (`mx.async_eval`) and reading its loss, so
        the ~0.1-0.2 ms of serialising and sending a metrics line overlaps MLX's work instead
        of adding to it. Anything that reports or ends first (a checkpoint, an evaluation
        step, a stop, an injected fault, an exception) flushes before it, so the logs keep
        the order of a step-by-step run; the metrics themselves (times included) were taken
        when the step ended.
        """
        m, self._pending = self._pending, None
        if m is not None:
            self.reporter.step(m)
            self.reporter.step_done(m.step)

    def _keep(self) -> None:
        """Keep the trainable weights and the optimizer state before a fused update: MLX
        arrays are immutable, so references are enough (no copy of the data). Both are
        read through slots found once: `model.trainable_parameters()` walks every module
        with filters (~0.3-0.5 ms a step, 3-5% of a small model's step). The optimizer's
        state is empty until its first update creates it; its slots are found then."""
        state = self.optimizer.state
        # Found again until one update has run in this process: the optimizer's first
        # update (`init`, also after a resume loaded its state) rebuilds its lists.
        if self._slots is None or self._updates <= 1:
            self._slots = _slots(self.model.trainable_parameters(), self.model)
        if state and (self._opt_slots is None or self._updates <= 1):
            self._opt_slots = _slots(state, state)
        opt = [parent[key] for parent, key in self._opt_slots] if state else None
        self._kept = ([parent[key] for parent, key in self._slots], opt)

    def _undo(self) -> None:
        """Put back what `_keep()` kept, in place (the compiled step holds these dicts):
        the step the host rejected never happened."""
        if not (self._fused and self._kept is not None and self._slots is not None):
            return
        params, opt = self._kept
        for (parent, key), value in zip(self._slots, params, strict=True):
            parent[key] = value
        if opt is None:  # before the first update the optimizer had no state
            self.optimizer.state.clear()
        else:
            assert self._opt_slots is not None
            for (parent, key), value in zip(self._opt_slots, opt, strict=True):
                parent[key] = value
        self._kept = None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset: Examples | None = None, subset: np.ndarray | None = None) -> float:
        """Token-mean loss over `subset` of `dataset` (default: the validation subset; the
        session's test pass gives test.jsonl)."""
        import mlx.core as mx

        c = self.config
        dataset = self.valid_set if dataset is None else dataset
        subset = self.val_subset if subset is None else subset
        assert dataset is not None
        self.model.eval()
        order = subset[np.argsort(dataset.lengths[subset], kind="stable")]
        total = mx.array(0.0)
        ntok = mx.array(0.0)
        for idx in micro_batches(order, c.batch_size):
            examples = [ex for _, ex in dataset.fetch(idx)]
            if not examples:
                continue
            mb = collate(examples, c.max_seq_length)
            ones = mx.ones((len(examples),), mx.float32)
            wce, (_, n) = weighted_ce_sums(
                self.model, mx.array(mb.tokens), mx.array(mb.spans), ones
            )
            total, ntok = total + wce, ntok + n
            mx.eval(total, ntok)
            self._clear_cache()
        self.model.train()
        return float((total / ntok).item())

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self, reason: str) -> TrainerState:
        s, c = self.state, self.config
        return TrainerState(
            step=s.step,
            total_steps=c.iters,
            data_position=s.data_position,
            groups_per_epoch=self.plan.groups_per_epoch,
            plan=PlanState(**self.plan.to_dict()),
            skipped_batches=tuple(sorted(self.skip_batches)),
            rng=RngScheme("seed(seed*1000003 + step*1009 + micro_batch)", c.seed),
            early_stopping=self.stopper.state(),
            grad_spike=self.spikes.state(),
            best=Best(s.best_val, s.best_step),
            last_val_loss=s.last_val,
            val_examples=s.val_examples,
            batch=BatchSplit(c.batch_size, c.grad_accumulation_steps, c.effective_batch),
            config_hash=c.hash(),
            config=c.to_dict(),
            lr_scale=s.lr_scale,
            lr=float(self.optimizer.learning_rate.item()),
            loss_history=tuple(self.progress.losses),
            step_seconds=tuple(self.progress.step_seconds),
            step_tokens=tuple(self.progress.tokens),
            tokens_total=s.tokens_total,
            train_seconds=s.train_seconds,
            reason=reason,
            run_id=self.run_id,
            attempt=self.attempt,
            time=time.time(),
            versions=self.state_extra["versions"],
            data=dataclasses.replace(self.state_extra["data"], **_summary(self.train_set)),
        )

    def save(self, reason: str) -> None:
        import mlx.core as mx

        self._flush()  # the step's own report comes before its checkpoint
        if self.group is not None and not self.group.writes:
            self.last_saved_step = self.state.step  # rank 0 writes the group's checkpoint
            return
        mx.eval(self.model.state, self.optimizer.state)  # pending update; not in a writer thread
        self.reporter.phase(p.Phase.CHECKPOINTING, self.state.step)
        self.train_set.log_progress()
        adapters, opt_state = snapshot(self.model, self.optimizer)
        best = self.state.best_step if self.state.best_step >= 0 else None
        self.writer.before_manifest = self.injector.checkpoint_hook(self.state.step)

        def on_saved(saved: SavedCheckpoint) -> None:
            self.reporter.checkpoint(
                p.CheckpointSaved(
                    run_id=self.run_id,
                    attempt=self.attempt,
                    step=saved.step,
                    path=str(saved.path),
                    seconds=saved.seconds,
                    bytes=saved.bytes,
                )
            )

        self.writer.save(
            self.state.step,
            adapters,
            opt_state,
            self.adapter_config,
            self.trainer_state(reason),
            best,
            on_saved,
        )
        self.last_saved_step = self.state.step
        self.reporter.phase(p.Phase.TRAINING, self.state.step)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Outcome:
        """Train until `iters`, a stop, an early stop or a fault; the outcome says which.
        A step's report still pending when an exception leaves the loop goes out first."""
        try:
            return self._loop()
        finally:
            self._flush()

    def _loop(self) -> Outcome:
        c, s = self.config, self.state
        self._build_step_functions()
        self.model.train()
        self.reporter.phase(p.Phase.COMPILING, s.step)
        first = True
        while s.step < c.iters:
            agree_controls(self.group, self.controls)  # a group stops after the same step
            if self.controls.stop_requested:
                return self._stop_gracefully()
            step = s.step + 1
            if self.injector.due(step):  # the report of the step before goes out first
                self._flush()
            self.injector.before_step(step)
            tic = time.perf_counter()
            grads, loss, norm, ntok, lr = self._compute_step(step)
            if self.injector.loss_is_nan(step):
                loss = math.nan
            norm *= self.injector.spike_factor(step, c.grad_spike.patience)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self._undo()
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                where = self._where()
                return Outcome(
                    ExitCode.NON_FINITE,
                    "non_finite",
                    f"{what} is {loss if what == 'loss' else norm} at step {step} "
                    f"(data position {self.position}, batch {where['data_batch']}: "
                    f"{where['data_lines']})",
                    first_bad_step=step,
                    **where,
                )
            spike = self.spikes.observe(step, norm)
            if self.spikes.consecutive <= 1:
                self.spike_window.clear()
            if self.spikes.consecutive:
                self.spike_window.append((self.position, self.batch_examples))
            if spike is not None:
                # This step's update is not applied; the checkpoint holds the last one.
                self._undo()
                self.save("grad_spike")
                return Outcome(
                    ExitCode.GRAD_SPIKE,
                    "grad_spike",
                    spike,
                    first_bad_step=self.spikes.first_bad_step,
                    **self._spike_where(),
                )
            if grads is not None:
                # Not fused: the update is evaluated lazily, with the next step's gradients
                # (one sync per step, as mlx_lm).
                self._apply(grads)
            self._kept = None
            self._updates += 1
            self._clear_cache()
            seconds = time.perf_counter() - tic
            s.step, s.data_position = step, self.position + 1
            s.tokens_total += ntok
            s.train_seconds += seconds
            if first:
                self.reporter.phase(p.Phase.TRAINING, step)
                first = False
            active, peak, rss = self._memory(step)
            cache, footprint = self._held_memory()
            metrics = (
                p.StepMetrics(
                    run_id=self.run_id,
                    attempt=self.attempt,
                    step=step,
                    time=time.time(),
                    loss=loss,
                    grad_norm=norm,
                    lr=lr,
                    tokens=ntok,
                    tokens_per_sec=ntok / seconds if seconds > 0 else 0.0,
                    step_seconds=seconds,
                    active_mb=active,
                    peak_mb=peak,
                    rss_mb=rss,
                    data_position=self.position,
                    cache_mb=cache,
                    footprint_mb=footprint,
                )
            )

            stop_early = False
            new_best = False
            if step % c.steps_per_eval == 0 or step == c.iters:
                self.reporter.step(metrics)
                stop_early, new_best = self._evaluate_and_watch(step)
                self.reporter.step_done(step)  # the progress line, with this evaluation
            else:  # reported while the next step computes (or before whatever comes first)
                self._pending = metrics
            if stop_early:
                self.save("early_stop")
                return self.early_stopped()
            if step == c.iters:
                self.save("final")
                return Outcome(ExitCode.COMPLETED, "completed", f"{step} steps")
            agree_controls(self.group, self.controls)
            if self.controls.stop_requested:
                return self._stop_gracefully()
            if step % c.save_every == 0 or new_best or self.controls.checkpoint_requested:
                reason = (
                    "periodic" if step % c.save_every == 0 else "best" if new_best else "requested"
                )
                self.controls.checkpoint_requested = False
                self.save(reason)
        return Outcome(ExitCode.COMPLETED, "completed", f"{s.step} steps (already done)")

    def early_stopped(self) -> Outcome:
        """The outcome of an early stop (also of a run resumed from its early-stop
        checkpoint, worker/session.py: that checkpoint is final)."""
        s = self.state
        watched = "" if self.valid_set is not None else "smoothed training loss "
        return Outcome(
            ExitCode.EARLY_STOPPED,
            "early_stopped",
            self.stopper.reason(s.best_val, s.best_step, watched),  # the reference and the best
        )

    def _evaluate_and_watch(self, step: int) -> tuple[bool, bool]:
        """(stop early?, new best validation loss?)"""
        s = self.state
        if self.valid_set is None:
            return self.stopper.observe(step, self.progress.loss_avg), False
        self.reporter.phase(p.Phase.EVALUATING, step)
        tic = time.perf_counter()
        val = self.evaluate()
        s.last_val = val
        # A NaN (no target tokens, or a broken model) is never a best value.
        new_best = math.isfinite(val) and (s.best_val is None or val < s.best_val)
        if new_best:
            s.best_val, s.best_step = val, step
        self.reporter.evaluation(
            p.EvalResult(
                run_id=self.run_id,
                attempt=self.attempt,
                step=step,
                val_loss=val,
                best_val_loss=s.best_val if s.best_val is not None else val,
                best_step=s.best_step,
                seconds=time.perf_counter() - tic,
            )
        )
        self.reporter.phase(p.Phase.TRAINING, step)
        return self.stopper.observe(step, val), new_best

    def _where(self) -> dict[str, Any]:
        """The data of the step just computed, as Outcome fields."""
        return {
            "data_position": self.position,
            "data_batch": self.plan.batch_id(self.position),
            "data_lines": self.train_set.index.where(self.batch_examples),
        }

    def _spike_where(self) -> dict[str, Any]:
        """The data of a gradient spike: the batches of its window (`patience` steps), as
        Outcome fields. A run resumed inside a window knows only the steps since: the
        earlier ones are taken as the positions just before (exact unless a skipped batch
        fell among them)."""
        where = self._where()
        window = self.spike_window or [(self.position, self.batch_examples)]
        earlier = max(0, self.spikes.consecutive - len(window))
        examples = sorted({i for _, batch in window for i in batch})
        where["first_bad_position"] = max(0, window[0][0] - earlier)
        where["data_lines"] = self.train_set.index.where(examples)
        return where

    def _stop_gracefully(self) -> Outcome:
        self._flush()
        if self.state.step != self.last_saved_step:
            self.save("graceful_stop")
        return Outcome(
            ExitCode.GRACEFUL_STOP,
            "graceful_stop",
            self.controls.stop_reason or "stop requested",
            -1,
        )


_log = structlog.get_logger("worker")


def _slots(tree: Any, root: Any) -> list[tuple[Any, Any]]:
    """(parent, key) of every array of `tree`, found in `root`: `parent[key]` is the array
    (a module or a dict takes a str, a list an int). For a model, `tree` is its
    `trainable_parameters()`; for an optimizer's state, the state itself."""
    from mlx.utils import tree_flatten

    out = []
    for name, _ in tree_flatten(tree):
        parent: Any = root
        *path, key = name.split(".")
        for part in path:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        out.append((parent, int(key) if isinstance(parent, list) else key))
    return out


def _leaves(tree: Any) -> list[Any]:
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def _summary(examples: Any) -> dict[str, Any]:
    """worker/data.py's counts as trainer_state.json's "data" fields (DataIdentity)."""
    s = dict(examples.summary())
    s["first_problems"] = tuple(s.get("first_problems") or ())
    return s
