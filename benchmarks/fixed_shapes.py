"""Part 1b: every tool on fixed-shape batches, against the bare loop — how close to the limit.

Method: one corpus whose every example tokenises to exactly 32 tokens
(fixtures.fixed_length_corpus), so every batch of every tool is (batch, 33): batching and
padding rules cannot hide per-step costs. In the same invocation, repetitions interleaved
with the order rotated each round, we run

- **ours**: `overnight train` (benchmarks/throughput.py's `run_ours`);
- **mlx_lm**: plain `mlx_lm lora`, timed by benchmarks/mlxlm_timed.py;
- **bare**: benchmarks/bare_loop.py, the yardstick;
- **mlx-lm-lora**: PyPI `mlx-lm-lora` in its SFT mode, installed in its own venv in the
  benchmark cache (benchmarks/peer.py; not a project dependency) — skipped with the
  reason when it cannot be installed or run.

All train iters = 2E + 1 steps with the same keys (model, layers, rank, scale, Adam 1e-4,
batch size); each tool's timed interval is its second epoch (from the end of step E to the
end of step 2E). Every step of a tool is the same work (one shape), so s/step is each
repetition's median step, and the figure is the least disturbed repetition's (the minimum
over repetitions): on this shared 2-core machine whole runs are slowed by other processes
(load average 5-7), which part 1's estimator (per step k, the median over repetitions; also
in results.json as `step_ms_median_method`) does not remove.
tokens/s = B x 32 / (s/step) for every tool (the same shapes). Ratios are speed ratios,
ours / other (> 1: ours is faster).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import fixtures, peer
from benchmarks.common import PYTHON, child_env, median, noise, run
from benchmarks.throughput import Sample, Workload, run_mlx_lm, run_ours

LENGTH = 32


def workload(work: Path, n_train: int = 256) -> Workload:
    model = fixtures.tiny_model(work)
    data = fixtures.fixed_length_corpus(work, model, n_train, 16, LENGTH)
    return Workload("tiny, fixed 32-token", model, data, batch_size=4, num_layers=-1,
                    max_seq_length=2048, steps_per_epoch=n_train // 4)


def run_bare(w: Workload, work: Path, openblas: bool, tag: str) -> Sample:
    """benchmarks/bare_loop.py with the workload's keys."""
    out = work / f"bare-{tag}.json"
    out.unlink(missing_ok=True)
    k = w.keys()
    argv = [PYTHON, "-m", "benchmarks.bare_loop", str(out), "--model", str(w.model),
            "--data", str(w.data), "--iters", str(w.iters), "--batch-size", str(w.batch_size),
            "--num-layers", str(w.num_layers), "--rank", str(w.rank),
            "--scale", str(k["lora_parameters"]["scale"]),
            "--learning-rate", str(k["learning_rate"]),
            "--max-seq-length", str(w.max_seq_length)]
    proc = run(argv, child_env(openblas), work / f"bare-{tag}.log").check()
    rec = json.loads(out.read_text())
    return timed_sample("bare", w, rec, proc.wall_s, proc.peak_rss_mb)


def timed_sample(tool: str, w: Workload, rec: dict[str, Any], wall_s: float,
                 peak_rss_mb: float) -> Sample:
    """A Sample from a step_times record (one wall-clock stamp after each step)."""
    t, e = rec["step_times"], w.steps_per_epoch
    if len(t) < 2 * e:
        raise RuntimeError(f"{tool} ran {len(t)} steps, expected {w.iters}")
    tokens = e * w.batch_size * (LENGTH - 1)
    return Sample(tool, t[2 * e - 1] - t[e - 1], tokens, tokens, wall_s, peak_rss_mb,
                  rec.get("peak_mb", 0.0), len(t), step_s=[t[k] - t[k - 1]
                                                           for k in range(e, 2 * e)])


@dataclass
class FixedShapes:
    workload: Workload
    openblas: bool
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why it did not run

    def step_s(self, tool: str) -> float:
        """Seconds per step: the least disturbed repetition's median step (see the module
        docstring)."""
        return min(median(s.step_s) for s in self.samples[tool])

    def step_s_median(self, tool: str) -> float:
        """Seconds per step as part 1 takes it: the sum over steps k of the median over
        repetitions of step k, / E (robust to a burst, not to a whole slowed run)."""
        ss = self.samples[tool]
        return sum(median([s.step_s[k] for s in ss]) for k in range(len(ss[0].step_s))) / len(
            ss[0].step_s)

    def ratio(self, other: str) -> float:
        """Speed ours / other (> 1: ours is faster)."""
        return self.step_s(other) / self.step_s("ours")

    def summary(self) -> dict[str, Any]:
        w = self.workload
        out: dict[str, Any] = {"workload": w.name, "batch": [w.batch_size, LENGTH + 1],
                               "steps_timed": w.steps_per_epoch, "openblas": self.openblas,
                               "skipped": dict(self.skipped)}
        for tool, ss in self.samples.items():
            out[tool] = {
                "step_ms": round(self.step_s(tool) * 1000, 3),
                "tokens_per_s": round(w.batch_size * (LENGTH - 1) / self.step_s(tool), 1),
                "ratio_ours_over": round(self.ratio(tool), 3),
                "step_ms_median_method": round(self.step_s_median(tool) * 1000, 3),
                "ratio_median_method": round(self.step_s_median(tool)
                                             / self.step_s_median("ours"), 3),
                "rep_median_step_ms": [round(median(s.step_s) * 1000, 3) for s in ss],
                "noise": round(noise([s.epoch_s for s in ss]), 3),
                "peak_rss_mb": round(median([s.peak_rss_mb for s in ss]), 1),
                "mlx_peak_mb": round(median([s.mlx_peak_mb for s in ss]), 1),
                "epoch_s": [round(s.epoch_s, 4) for s in ss],
            }
        return out


def compare(work: Path, reps: int, openblas: bool, log: Any = print,
            n_train: int = 256, peer_too: bool = True) -> FixedShapes:
    """Interleaved repetitions of every tool; the order rotates each round. `peer_too`:
    also mlx-lm-lora (installed into its venv on first use, minutes)."""
    work.mkdir(parents=True, exist_ok=True)
    w = workload(work, n_train)
    r = FixedShapes(w, openblas)
    runners: dict[str, Any] = {
        "ours": lambda tag: run_ours(w, work / "ours", openblas, tag),
        "mlx_lm": lambda tag: run_mlx_lm(w, work / "mlx_lm", openblas, tag),
        "bare": lambda tag: run_bare(w, work, openblas, tag),
    }
    python, why = peer.environment(log) if peer_too else (None, "not asked for")
    if python is None:
        r.skipped["mlx-lm-lora"] = why
    else:
        runners["mlx-lm-lora"] = lambda tag: peer.run_sft(python, w, work / "peer", openblas,
                                                          tag, timed_sample)
    tools = list(runners)
    for i in range(reps):
        order = tools[i % len(tools):] + tools[:i % len(tools)]
        for tool in order:
            try:
                s = runners[tool](f"{i}")
            except Exception as e:  # a peer that breaks must not hide the others' numbers
                if tool != "mlx-lm-lora":
                    raise
                r.skipped[tool] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
                runners.pop(tool)
                tools.remove(tool)
                r.samples.pop(tool, None)
                continue
            r.samples.setdefault(tool, []).append(s)
            log(f"  fixed shapes rep {i + 1}/{reps} {tool:11s}: "
                f"{s.epoch_s / w.steps_per_epoch * 1000:6.2f} ms/step, "
                f"peak RSS {s.peak_rss_mb:6.1f} MB")
    return r


GOALS = {"bare": 0.95, "mlx_lm": 1.0, "mlx-lm-lora": 1.0}  # ours' speed / the other's
NAMES = {"bare": "the bare compiled loop", "mlx_lm": "`mlx_lm lora`",
         "mlx-lm-lora": "mlx-lm-lora SFT"}


def rows(res: Any, r: FixedShapes, load: tuple[float, float]) -> None:
    """Table rows (benchmarks/report.py's style): ours' s/step, tokens/s, and the speed
    ratio against each other tool; a skipped tool gets a row saying why."""
    w, s = r.workload, r.summary()
    ours = s["ours"]
    shape = f"{w.batch_size}x{LENGTH + 1}"
    for tool, goal in GOALS.items():
        label = f"{w.name}: s/step and tokens/s on fixed {shape} batches vs {NAMES[tool]}"
        if tool not in s:
            res.add("1 fixed shapes", label, f"{ours['step_ms']:.2f} ms", "not run", "",
                    f">= {goal:g}", False, r.skipped.get(tool, "not run"),
                    kind="peer" if tool == "mlx-lm-lora" else "yardstick")
            continue
        other, ratio = s[tool], s[tool]["ratio_ours_over"]
        bar = max(ours["noise"], other["noise"])
        met = True if ratio >= goal else (None if goal - ratio <= bar else False)
        res.add("1 fixed shapes", label,
                f"{ours['step_ms']:.2f} ms ({ours['tokens_per_s']:,.0f} tok/s)",
                f"{other['step_ms']:.2f} ms ({other['tokens_per_s']:,.0f} tok/s)",
                f"{ratio:.3f}", f">= {goal:g}", met,
                f"{len(r.samples['ours'])}+{len(r.samples[tool])} runs (best run's median "
                f"step); by medians of runs {other['ratio_median_method']:.3f}; noise {bar:.0%}; "
                f"peak RSS {ours['peak_rss_mb']:.0f} vs {other['peak_rss_mb']:.0f} MB; "
                f"load average {load[0]:.1f} -> {load[1]:.1f}",
                kind="yardstick" if tool == "bare" else "peer" if tool == "mlx-lm-lora"
                else "throughput_tiny")
    res.raw["fixed_shapes"] = {**s, "load_average": list(load)}
