"""Part 1: training throughput and peak memory, `overnight train` vs plain `mlx_lm lora`.

Method (the same for both tools): each run trains iters = 2E + 1 steps (E = batches per
epoch = training examples // batch_size, nothing left over) and we time the second epoch:
from the end of step E to the end of step 2E. Each epoch trains on every example exactly
once in both tools, every padded shape is already compiled, and no evaluation or checkpoint
falls inside (steps_per_eval and save_every are beyond iters; mlx_lm evaluates before step
1 and before step 2E + 1). Timestamps: ours from logs/metrics.jsonl (one line per step,
written after the step's evaluation), mlx_lm's from its progress bar's `advance()` right
after its per-step `mx.eval` (benchmarks/mlxlm_timed.py). Model load, tokenisation,
compilation and evaluation are outside the interval.

Batches: both tools mean to sort examples by length and cut batches of similar lengths
(padding to 1 + a multiple of 32). Ours do; mlx_lm 0.32.2's `CacheDataset.itemlen` returns
`len()` of the raw JSON record (1 for {"text": ...}), so its "sorted" order is file order
and each batch pads to its longest member. That padding is part of what is measured: the
harness reports padded positions per epoch for both (ours from the worker's own EpochPlan,
mlx_lm's from the recorded batch shapes). On the tiny corpus every example fits in 32
tokens, so both tools train 4 x 33 batches and the ratio is pure per-step overhead.

tokens/s = target tokens in that epoch (padding excluded, our count; mlx_lm's own count adds
one padding target per sequence — the harness checks the difference is exactly that) /
seconds; the ratio ours/mlx_lm is the inverse ratio of the epoch times. Peak memory: each
process's own peak RSS (wait4; on the CPU build MLX memory is in RSS) and MLX's peak
allocator memory (mx.get_peak_memory).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    MLX_LM_TIMED,
    OVERNIGHT,
    child_env,
    median,
    noise,
    read_jsonl,
    run,
    spread,
)


@dataclass(frozen=True)
class Workload:
    name: str
    model: Path
    data: Path
    batch_size: int
    num_layers: int
    max_seq_length: int
    steps_per_epoch: int  # E = training examples // batch_size
    rank: int = 8
    save_every: int = 10**6  # beyond iters: no checkpoint inside the timed epoch
    total_iters: int = 0  # 0: 2E + 1

    @property
    def iters(self) -> int:
        return self.total_iters or 2 * self.steps_per_epoch + 1

    def keys(self) -> dict[str, Any]:
        """The mlx_lm keys both tools get, with the same values."""
        return {
            "model": str(self.model), "data": str(self.data), "iters": self.iters,
            "batch_size": self.batch_size, "num_layers": self.num_layers,
            "max_seq_length": self.max_seq_length, "learning_rate": 1e-4,
            "optimizer": "adam", "fine_tune_type": "lora",
            "lora_parameters": {"rank": self.rank, "scale": 20.0, "dropout": 0.0},
            "val_batches": 1, "steps_per_report": self.steps_per_epoch,
            "steps_per_eval": 10**6, "save_every": self.save_every, "seed": 0,
            "grad_accumulation_steps": 1, "grad_checkpoint": False,
        }


@dataclass
class Sample:
    tool: str
    epoch_s: float
    tokens: int  # target tokens in the timed epoch, padding excluded
    tool_tokens: int  # the tool's own count for that epoch
    wall_s: float
    peak_rss_mb: float
    mlx_peak_mb: float
    steps: int
    padded_positions: int = 0  # batch x (width - 1) summed over the timed epoch; 0: unknown
    step_s: list[float] = field(default_factory=list)  # each timed step's duration, in order

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.epoch_s


def ours_config(w: Workload, work: Path, **sections: Any) -> Path:
    config = {**w.keys(), "training": {"warmup_steps": 0},  # constant lr, as mlx_lm's default
              "early_stopping": {"enabled": False}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_ours(w: Workload, work: Path, openblas: bool, tag: str, *, extra: list[str] | None = None,
             command: list[str] | None = None, **sections: Any) -> Sample:
    """`overnight train` (or `command`, e.g. `overnight run`) on a fresh run directory."""
    work.mkdir(parents=True, exist_ok=True)
    config = ours_config(w, work, **sections)
    rd = work / f"run-{tag}"
    shutil.rmtree(rd, ignore_errors=True)
    argv = [*(command or [*OVERNIGHT, "train"]), str(config), "--run-dir", str(rd), *(extra or [])]
    proc = run(argv, child_env(openblas), work / f"ours-{tag}.log").check()
    return ours_sample(w, rd, proc.wall_s, proc.peak_rss_mb)


def ours_sample(w: Workload, rd: Path, wall_s: float, peak_rss_mb: float) -> Sample:
    metrics = {m["step"]: m for m in read_jsonl(rd / "logs" / "metrics.jsonl")}
    e = w.steps_per_epoch
    if 2 * e not in metrics or e not in metrics:
        raise RuntimeError(f"{rd}: metrics.jsonl has {len(metrics)} steps, expected {w.iters}")
    tokens = sum(metrics[s]["tokens"] for s in range(e + 1, 2 * e + 1))
    steps = [metrics[s + 1]["time"] - metrics[s]["time"] for s in range(e, 2 * e)]
    return Sample("ours", metrics[2 * e]["time"] - metrics[e]["time"], tokens, tokens, wall_s,
                  peak_rss_mb, max(m["peak_mb"] for m in metrics.values()), len(metrics),
                  step_s=steps)


def run_mlx_lm(w: Workload, work: Path, openblas: bool, tag: str) -> Sample:
    work.mkdir(parents=True, exist_ok=True)
    adapters = work / f"mlx_lm-adapters-{tag}"
    shutil.rmtree(adapters, ignore_errors=True)
    config = work / "mlx_lm.yaml"
    config.write_text(yaml.safe_dump({**w.keys(), "train": True, "adapter_path": str(adapters)}))
    out = work / f"mlx_lm-{tag}.json"
    out.unlink(missing_ok=True)
    proc = run([*MLX_LM_TIMED, str(out), "-c", str(config)], child_env(openblas),
               work / f"mlx_lm-{tag}.log").check()
    rec = json.loads(out.read_text())
    t = rec["step_times"]
    e = w.steps_per_epoch
    if len(t) < 2 * e:
        raise RuntimeError(f"mlx_lm ran {len(t)} steps, expected {w.iters}")
    reports = {r["iteration"]: r["trained_tokens"] for r in rec["reports"]}
    tool_tokens = int(reports.get(2 * e, 0) - reports.get(e, 0))
    shapes = rec.get("batch_shapes", [])[e:2 * e]
    padded = sum(b * (width - 1) for b, width in shapes)
    return Sample("mlx_lm", t[2 * e - 1] - t[e - 1], 0, tool_tokens, proc.wall_s,
                  proc.peak_rss_mb, rec["peak_mb"], len(t), padded,
                  [t[k] - t[k - 1] for k in range(e, 2 * e)])


def ours_padded_positions(w: Workload) -> int:
    """batch x (width - 1) over one epoch of our batches: the worker's own data loading,
    length-sorted grouping (EpochPlan) and padding rule (collate), without training."""
    from mlx_lm.utils import load_tokenizer

    from shared.config import resolve
    from worker.batching import PAD_TO, EpochPlan
    from worker.data import load_split

    c = resolve(w.keys())
    examples = load_split(w.data / "train.jsonl", load_tokenizer(w.model), c, 0.0)
    plan = EpochPlan(examples.lengths, c.effective_batch, c.seed)
    total = 0
    for group in plan.groups:
        longest = int(examples.lengths[group].max())
        width = min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), c.max_seq_length)
        total += len(group) * (width - 1)
    return total


@dataclass
class Comparison:
    workload: Workload
    openblas: bool
    ours: list[Sample] = field(default_factory=list)
    mlx_lm: list[Sample] = field(default_factory=list)

    def med(self, tool: str, attr: str) -> float:
        return median([getattr(s, attr) for s in getattr(self, tool)])

    @property
    def tokens(self) -> int:
        return self.ours[0].tokens

    def epoch(self, tool: str) -> float:
        """The timed epoch, robust to a burst of load from other processes: step k is the
        same batch in every repetition of a tool (same seed), so sum over k the median over
        repetitions of step k's duration."""
        samples = getattr(self, tool)
        return sum(median([s.step_s[k] for s in samples])
                   for k in range(len(samples[0].step_s)))

    @property
    def ratio(self) -> float:
        """Throughput ours / mlx_lm (> 1: we are faster)."""
        return self.epoch("mlx_lm") / self.epoch("ours")

    def summary(self) -> dict[str, Any]:
        w = self.workload
        return {
            "workload": w.name, "openblas": self.openblas, "batch_size": w.batch_size,
            "num_layers": w.num_layers, "max_seq_length": w.max_seq_length,
            "steps_per_epoch": w.steps_per_epoch, "iters": w.iters,
            "tokens_per_epoch": self.tokens,
            "mlx_lm_tokens_per_epoch": self.mlx_lm[0].tool_tokens,
            "padding_targets_mlx_lm_counts": self.mlx_lm[0].tool_tokens - self.tokens,
            "mlx_lm_padded_positions": self.mlx_lm[0].padded_positions,
            "ours_padded_positions": self.ours[0].padded_positions,
            "ours_epoch_s": [round(s.epoch_s, 4) for s in self.ours],
            "mlx_lm_epoch_s": [round(s.epoch_s, 4) for s in self.mlx_lm],
            "ours_epoch_robust_s": round(self.epoch("ours"), 4),
            "mlx_lm_epoch_robust_s": round(self.epoch("mlx_lm"), 4),
            "ours_tokens_per_s": round(self.tokens / self.epoch("ours"), 1),
            "mlx_lm_tokens_per_s": round(self.tokens / self.epoch("mlx_lm"), 1),
            "ratio": round(self.ratio, 3),
            "spread_ours": round(spread([s.epoch_s for s in self.ours]), 3),
            "spread_mlx_lm": round(spread([s.epoch_s for s in self.mlx_lm]), 3),
            "noise": round(max(noise([s.epoch_s for s in self.ours]),
                               noise([s.epoch_s for s in self.mlx_lm])), 3),
            "ours_peak_rss_mb": round(self.med("ours", "peak_rss_mb"), 1),
            "mlx_lm_peak_rss_mb": round(self.med("mlx_lm", "peak_rss_mb"), 1),
            "ours_mlx_peak_mb": round(self.med("ours", "mlx_peak_mb"), 1),
            "mlx_lm_mlx_peak_mb": round(self.med("mlx_lm", "mlx_peak_mb"), 1),
            "ours_wall_s": [round(s.wall_s, 2) for s in self.ours],
            "mlx_lm_wall_s": [round(s.wall_s, 2) for s in self.mlx_lm],
        }


def compare(w: Workload, work: Path, reps: int, openblas: bool, log: Any = print) -> Comparison:
    """A/B repetitions, interleaved and alternating which tool goes first."""
    c = Comparison(w, openblas)
    label = f"{w.name} ({'OpenBLAS' if openblas else 'no OpenBLAS'})"
    for r in range(reps):
        order = ("mlx_lm", "ours") if r % 2 == 0 else ("ours", "mlx_lm")
        for tool in order:
            tag = f"{'blas' if openblas else 'noblas'}-{r}"
            if tool == "ours":
                s = run_ours(w, work, openblas, tag)
            else:
                s = run_mlx_lm(w, work, openblas, tag)
            getattr(c, tool).append(s)
            log(f"  {label} rep {r + 1}/{reps} {tool:6s}: epoch {s.epoch_s:7.3f} s, "
                f"wall {s.wall_s:6.1f} s, peak RSS {s.peak_rss_mb:7.1f} MB")
    padded = ours_padded_positions(w)
    for s in c.ours:
        s.padded_positions = padded
    if c.mlx_lm[0].tool_tokens and c.mlx_lm[0].tool_tokens < c.tokens:
        raise RuntimeError(f"{label}: mlx_lm counted {c.mlx_lm[0].tool_tokens} tokens, "
                           f"we counted {c.tokens}: not the same examples")
    return c
