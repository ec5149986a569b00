"""A worker that is one rank of a data-parallel group (mx.distributed, the ring or jaccl backend).

The supervisor starts every rank itself (supervisor/daemon/group.py) with mlx's own
variables, `MLX_RANK` and `MLX_HOSTFILE` (ring) — what `mlx.launch` would set — plus
`OVERNIGHT_WORLD_SIZE`. This module is what a rank does differently from one process:

- **Joining.** `mx.distributed.init(strict=True)`: without `strict`, a missing or unusable
  hostfile silently gives a group of size 1 (measured with mlx 0.32.4), and two "groups" of
  one would each train alone. The size must be `distributed.processes`, or the rank refuses
  (ConfigError: one line, exit 78).
- **The same math as one process.** Each rank takes every `size`-th example of each
  effective batch (`shard`), splits its share into micro-batches of ceil(batch_size /
  size), and accumulates the *sums* worker/loss.py returns (weighted token losses, their
  weight, the token count, the gradient of the weighted sum). Those four are `all_sum`med
  across the ranks before the one division by the total weight (worker/train.py `finish`),
  so the update equals one process's with the same global batch. mlx_lm's
  `average_gradients` instead averages per-rank token means: with examples of mixed
  lengths that differs (4e-2 measured here against 5e-7 with sums: issue 14).
- **Consistent decisions.** Loss, gradient norm and validation loss are the same on every
  rank after the all_sum (every rank evaluates the same fixed validation subset), so early
  stopping, spike and non-finite aborts happen at the same step everywhere. Signals do not
  arrive everywhere at once: stop and checkpoint requests are agreed on (an all_sum of the
  flags) before each is acted on, so every rank stops after the same step.
- **One writer.** Rank 0 alone writes checkpoints, metrics, the final adapters and
  COMPLETE; every rank sends heartbeats (with its rank) so the supervisor sees each one.
- **Resume without copies.** Rank 0 chooses and validates the checkpoint; its files go to
  the other ranks over the group itself (`share_checkpoint`: names, sizes, bytes), which
  write them to a private temporary directory and validate them fully before loading — no
  copy of the run directory is needed on the other Macs.
- **Dropout** keys are seeded from (seed, step, rank, micro-batch) (`dropout_seed`).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from shared.config import Config
from shared.errors import ConfigError

RANK_ENV = "MLX_RANK"  # mlx's own (mlx/distributed_run.py)
HOSTFILE_ENV = "MLX_HOSTFILE"
WORLD_ENV = "OVERNIGHT_WORLD_SIZE"  # the size the supervisor started (checked after init)
CHUNK = 64 * 2**20  # bytes per all_sum when a checkpoint file is sent to the other ranks
PACK_ELEMENTS = 16 * 2**20  # float32 elements (64 MB) per all_sum of the gradients

log = structlog.get_logger("worker")


def env_rank() -> int:
    """This process's rank as the supervisor set it (0 when not in a group)."""
    try:
        return int(os.environ.get(RANK_ENV, "0") or 0)
    except ValueError:
        return 0


def local_micro_batch(batch_size: int, size: int) -> int:
    """Examples per forward pass on one rank: the global micro-batch split over the ranks
    (ceil: after an OOM halved it below the world size, each rank still takes one)."""
    return max(1, math.ceil(batch_size / size))


def dropout_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The MLX random seed of one micro-batch: worker/train.py's (seed, step, micro-batch)
    scheme, with the rank added so ranks draw different dropout masks (rank 0 keeps the
    single-process seed)."""
    return (seed * 1_000_003 + step * 1_009 + micro_batch + rank * 7_919_999_983) % 2**63


@dataclass
class Group:
    """This rank's view of the group: `rank` in 0..`size`-1 and mlx's Group object."""

    rank: int
    size: int
    group: Any
    raw: Any = None  # the Controls the signal handlers set (agree_controls)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run directory (rank 0 alone)."""
        return self.rank == 0

    def all_sum(self, tree: Any) -> Any:
        """Every array of `tree` summed over the ranks (mx.distributed.all_sum, lazy)."""
        import mlx.core as mx
        from mlx.utils import tree_map

        return tree_map(lambda x: mx.distributed.all_sum(x, group=self.group), tree)

    def all_sum_packed(self, tree: Any) -> Any:
        """`all_sum` of a whole tree, its leaves packed into float32 vectors of about
        PACK_ELEMENTS (64 MB; mlx_lm's average_gradients groups its all_sums the same way),
        each summed and evaluated before the next, then split back (each leaf keeps its
        shape and dtype; integer counts are exact below 2**24). One collective in flight at
        a time is also what survives a lost peer: with one all_sum per gradient leaf in one
        mx.eval, the step waited forever after the ring failed its pending tasks (measured,
        mlx 0.32.4), where one collective raises at once."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        out: list[tuple[str, Any]] = []
        batch: list[tuple[str, Any]] = []

        def flush() -> None:
            if not batch:
                return
            flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in batch])
            total = mx.distributed.all_sum(flat, group=self.group)
            mx.eval(total)  # raises when a peer is lost
            start = 0
            for key, v in batch:
                out.append((key, total[start:start + v.size].reshape(v.shape).astype(v.dtype)))
                start += v.size
            batch.clear()

        size = 0
        for key, v in tree_flatten(tree):
            batch.append((key, v))
            size += v.size
            if size >= PACK_ELEMENTS:
                flush()
                size = 0
        flush()
        return tree_unflatten(out)

    def agree(self, flags: list[bool]) -> list[bool]:
        """Each flag true on any rank, the same answer on every rank (a sync point)."""
        import mlx.core as mx

        total = self.all_sum(mx.array([int(f) for f in flags], mx.int32))
        return [bool(v) for v in _host(total)]

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (an all_sum where the others give zeros)."""
        import mlx.core as mx

        n = self.all_sum(mx.array([len(data) if self.rank == 0 and data else 0], mx.int64))
        size = int(_host(n)[0])
        out = bytearray()
        for start in range(0, size, CHUNK):
            k = min(CHUNK, size - start)
            if self.rank == 0 and data:
                part = mx.array(np.frombuffer(data, np.uint8, k, start))
            else:
                part = mx.zeros((k,), mx.uint8)
            out += _host(self.all_sum(part)).tobytes()
        return bytes(out)


def _host(x: Any) -> np.ndarray:
    """An evaluated array on the host. mx.eval first: it raises when a peer is lost
    ("[ring] connection to a peer was lost"), where np.array() of the pending collective
    waits forever (measured, mlx 0.32.4)."""
    import mlx.core as mx

    mx.eval(x)
    return np.array(x)


def init_group(c: Config) -> Group | None:
    """Join the group `c.distributed` describes; None for one process. ConfigError when
    this process was not started as a rank (no MLX_RANK: a group is started by `overnight
    run`) or the group's size is not `distributed.processes`."""
    d = c.distributed
    if not d.enabled:
        return None
    if RANK_ENV not in os.environ:
        raise ConfigError(
            f"distributed.processes is {d.processes}: the ranks of a group are started by "
            "`overnight run` (it sets MLX_RANK and MLX_HOSTFILE for each); run it, or set "
            "distributed.processes: 1 to train in this one process")
    import mlx.core as mx

    g = mx.distributed.init(strict=True, backend=d.backend)
    if g.size() != d.processes:
        raise ConfigError(f"distributed.processes: expected a group of {d.processes}, "
                          f"mx.distributed.init gave {g.size()} (rank {g.rank()})")
    log.info("group_joined", rank=g.rank(), size=g.size(), backend=d.backend,
             hostfile=os.environ.get(HOSTFILE_ENV, ""))
    return Group(g.rank(), g.size(), g)


def shard(items: list[Any], group: Group) -> list[Any]:
    """This rank's share of one effective batch: every `size`-th example from `rank`
    (mlx_lm's iterate_batches takes `batch[rank::size]` the same way)."""
    return items[group.rank :: group.size]


def _receive_dir(rank: int, key: str) -> Path:
    """The private directory a rank receives checkpoints into: one per run and rank
    (`key`: the run directory's), emptied before each use and removed at exit, so a rank
    killed before its exit leaves one copy, not one per restart; a fresh mkdtemp when the
    path is taken by something else (not a directory of ours)."""
    root = Path(tempfile.gettempdir()) / f"overnight-{os.getuid()}-{key}-rank{rank}"
    try:
        st = root.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(root)
        root.mkdir(mode=0o700)
    except FileNotFoundError:
        try:
            root.mkdir(mode=0o700)
        except OSError:
            root = Path(tempfile.mkdtemp(prefix=f"overnight-rank{rank}-"))
    except OSError:
        root = Path(tempfile.mkdtemp(prefix=f"overnight-rank{rank}-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def share_checkpoint(group: Group, chosen: Path | None, key: str = "run") -> Path | None:
    """Rank 0 sends the files of `chosen` (None: no checkpoint); every other rank receives
    them into its private directory (`_receive_dir`) and returns the copy."""
    header: dict[str, Any] = {"files": []}
    if group.rank == 0 and chosen is not None:
        header = {"name": chosen.name,
                  "files": sorted(p.name for p in chosen.iterdir() if p.is_file())}
    header = json.loads(group.broadcast_bytes(json.dumps(header).encode()))
    if not header["files"]:
        return chosen if group.rank == 0 else None
    dest: Path | None = None
    if group.rank != 0:
        root = _receive_dir(group.rank, key)
        dest = root / str(header["name"])
        dest.mkdir()
    for name in header["files"]:
        data = (chosen / name).read_bytes() if group.rank == 0 and chosen else None
        received = group.broadcast_bytes(data)
        if dest is not None:
            (dest / name).write_bytes(received)
    if dest is not None:
        log.info("checkpoint_received", name=header["name"], files=len(header["files"]),
                 path=str(dest))
    return chosen if group.rank == 0 else dest


def choose_checkpoint(
    group: Group | None, args: argparse.Namespace, run: Any,
    choose: Callable[[argparse.Namespace, Any], tuple[Path | None, Any]],
) -> tuple[Path | None, Any]:
    """The checkpoint to resume from (worker/resume.py's `choose`): rank 0 chooses and
    validates as one process does and shares it; the others validate what they received
    fully (their copy never passed the supervisor's validation)."""
    if group is None:
        return choose(args, run)
    key = hashlib.sha256(str(getattr(run, "root", run)).encode()).hexdigest()[:12]
    if group.rank == 0:
        chosen, stored = choose(args, run)
        share_checkpoint(group, chosen, key)
        return chosen, stored
    received = share_checkpoint(group, None, key)
    if received is None:
        return None, None
    mine = argparse.Namespace(**{**vars(args), "resume": str(received), "validated": None,
                                 "fresh": False})
    return choose(mine, run)


def compute_step(tr: Any, step: int) -> tuple[Any, float, float, int]:
    """worker/train.py's `_compute_step` for one rank of a group: this rank's share of the
    effective batch, its sums all_summed, then the one division (module docstring).
    Returns (gradients, loss, gradient norm, tokens of the whole effective batch)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from worker.batching import collate, micro_batches

    c, group = tr.config, tr.group
    tr.position, usable = tr._next_batch()
    tr.batch_examples = [i for i, _ in usable]
    mine = shard([ex for _, ex in usable], group)
    acc = None
    size = local_micro_batch(c.batch_size, group.size)
    for j, idx in enumerate(micro_batches(np.arange(len(mine)), size)):
        mb = collate([mine[int(i)] for i in idx], c.max_seq_length)
        mx.random.seed(dropout_seed(c.seed, step, group.rank, j))
        batch = (mx.array(mb.tokens), mx.array(mb.spans), mx.array(mb.weights))
        acc = tr._first(*batch) if acc is None else tr._more(acc, *batch)
        mx.eval(acc)
    if acc is None:  # fewer examples in this batch than ranks: this rank adds nothing
        zero = mx.array(0.0, mx.float32)
        acc = (zero, zero, mx.array(0, mx.int32),
               tree_map(mx.zeros_like, tr.model.trainable_parameters()))
    grads, norm, loss, ntok = tr._finish(group.all_sum_packed(acc))
    mx.eval(grads, norm, loss, ntok)
    return grads, float(loss.item()), float(norm.item()), int(ntok.item())


def agree_controls(group: Group | None, controls: Any) -> None:
    """Stop and checkpoint requests as the whole group sees them (module docstring).

    The signal handlers write `group.raw` (worker/signals.py), never `controls`, which the
    loop reads: a SIGTERM that arrives while this rank waits in the agreement itself (a
    rank blocked in a collective runs its Python handler only when the wait ends) stays in
    `raw` for the next agreement, instead of being overwritten by this one's answer (it
    was: a stopped rank's group trained on after SIGTERM + SIGCONT)."""
    if group is None:
        return
    raw = group.raw if group.raw is not None else controls
    local = [raw.stop_requested, raw.checkpoint_requested]
    stop, checkpoint = group.agree(local)
    if local[1] and raw is not controls:
        raw.checkpoint_requested = False  # taken into this agreement
    if stop and not controls.stop_requested:
        controls.stop_reason = raw.stop_reason or "another rank was asked to stop"
    controls.stop_requested = controls.stop_requested or stop
    controls.checkpoint_requested = checkpoint
