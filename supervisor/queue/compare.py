"""The morning after a night of several jobs: `overnight report --queue DIR` and
`overnight compare RUN_DIR...` (its command line: compare_cli.py).

    overnight report --queue queue             # queue/report.md + report.png, printed too
    overnight compare runs/a runs/b --format html --output night.html

One document: a verdict line per job (supervisor/morning/verdict.py, the same line as
`overnight status`; a queue's job that has not run says so, with why it was passed over), a
table — final and best validation loss, steps, wall time, restarts, tokens/s, peak MLX
memory, and the settings that differ between the jobs — one picture with every job's
validation loss against step and against wall-clock time (compare_plot.py), and the best
job (the lowest best validation loss) named with the commands to use its adapters (the
single-run report's own "Use the result", supervisor/morning/report.py). Every number comes
from the run facts the single-run report uses (supervisor/morning/runfacts.py); nothing here
reads a run file itself.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import queue_file
from shared.errors import ConfigError, OvernightError
from shared.queue_file import Job, JobState
from supervisor.morning.facts import RunFacts
from supervisor.morning.report_doc import (
    Block,
    Heading,
    Image,
    Para,
    Table,
    to_html,
    to_markdown,
)
from supervisor.morning.runfacts import gather
from supervisor.morning.verdict import describe, duration

MAX_SETTINGS = 8  # differing settings shown in the table (the rest are counted)


@dataclass(frozen=True)
class Entry:
    """One job: its name, its run's facts (None: it has not run), its queue record."""

    name: str
    facts: RunFacts | None
    job: Job | None = None
    job_config: dict[str, Any] | None = None  # a job that has not run: its config file's

    @property
    def config(self) -> dict[str, Any]:
        return self.facts.config if self.facts is not None else (self.job_config or {})


UseResult = Callable[[RunFacts], list[Block]]


def main_queue(queue_dir: Path, fmt: str, output: Path | None, use: UseResult,
               no_picture: str) -> int:
    """`overnight report --queue DIR`. `use` renders "Use the result" for a run (the
    single-run report's: supervisor/morning/report.py passes it), `no_picture` the line
    printed when matplotlib is missing."""
    queue_dir = queue_dir.resolve()
    if not (queue_dir / "queue.json").exists():
        raise ConfigError(f"{queue_dir}: no queue here (no queue.json)")
    q = queue_file.load(queue_dir)
    entries = []
    for job in q.jobs:
        run_dir = Path(job.run_dir)
        facts = gather(run_dir) if (run_dir / "run.json").exists() else None
        entries.append(Entry(job.name, facts, job, None if facts else _job_config(job)))
    out = output or queue_dir / f"report.{fmt}"
    return write_and_print(entries, out, fmt, f"The night of {queue_dir.name}", use,
                           no_picture)


def write_and_print(entries: list[Entry], out: Path, fmt: str, title: str, use: UseResult,
                    no_picture: str) -> int:
    """Write the comparison to `out` (md + png beside it, or one html) and print it."""
    image = render_png(entries)
    png = out.with_suffix(".png") if image is not None and fmt == "md" else None
    blocks = build(entries, title, out.with_suffix(".png").name if image is not None else None,
                   use)
    markdown = to_markdown(blocks)
    try:
        if fmt == "html":
            out.write_text(to_html(blocks, title, image))
        else:
            if png is not None and image is not None:
                png.write_bytes(image)
            out.write_text(markdown)
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the report ({e.strerror})") from None
    print(markdown, end="")
    if image is None:
        print(f"overnight: {no_picture}", file=sys.stderr)
    print(f"report: {out}" + (f"  picture: {png}" if png else ""), file=sys.stderr)
    return 0


def render_png(entries: list[Entry]) -> bytes | None:
    try:
        from supervisor.queue import compare_plot

        image = io.BytesIO()
        compare_plot.plot([(e.name, e.facts) for e in entries if e.facts is not None], image)
    except ImportError:
        return None
    return image.getvalue()


# ---- the document ------------------------------------------------------------------------


def verdict_line(e: Entry) -> str:
    """`name: verdict`; a queue's job also says what the queue did with it."""
    job = e.job
    if e.facts is None:
        why = (job.note or job.reason) if job else ""
        state = job.state.value if job else "no run"
        return f"{e.name}: {state}, not started" + (f" ({why})" if why else "")
    line = describe(e.facts)
    if job is not None and job.state is JobState.DEADLINE:
        line = ("stopped at the night's deadline (its best checkpoint is the result; it "
                f"resumes next night): {line}")
    elif job is not None and job.state is JobState.RUNNING and not e.facts.running:
        line = f"interrupted, resumes when the queue runs again: {line}"
    return f"{e.name}: {line}"


def best_entry(entries: list[Entry]) -> Entry | None:
    """The entry with the lowest best validation loss (the first one on a tie)."""
    scored = [(e.facts.best[1], i, e) for i, e in enumerate(entries)
              if e.facts is not None and e.facts.best is not None
              and math.isfinite(e.facts.best[1])]
    return min(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def build(entries: list[Entry], title: str, png_name: str | None, use: UseResult
          ) -> list[Block]:
    best = best_entry(entries)
    blocks: list[Block] = [Heading(title, 1)]
    if best is not None and best.facts is not None and best.facts.best is not None:
        step, val = best.facts.best
        blocks.append(Para(f"**Best job: {best.name}** — validation loss {val:.3f} at step "
                           f"{step}."))
    else:
        blocks.append(Para("**No best job**: no job has a validation loss yet."))
    blocks += [Heading("Verdicts", 2), Para("\n".join(f"- {verdict_line(e)}"
                                                      for e in entries))]
    blocks += _table(entries)
    if png_name is not None:
        blocks += [Heading("Validation loss", 2),
                   Image(png_name, "every job's validation loss against step and against "
                                   "wall-clock time")]
    if best is not None and best.facts is not None:
        blocks += [Heading(f"Use the best job: {best.name}", 2), *use(best.facts)[1:]]
    return blocks


def _table(entries: list[Entry]) -> list[Block]:
    differ, hidden = differing_settings([e.config for e in entries if e.config])
    header = ["job", "state", "final val", "best val (step)", "steps", "wall", "restarts",
              "tok/s", "peak MB", *differ]
    rows = []
    for e in entries:
        f = e.facts
        state = e.job.state.value if e.job is not None else (f.state.value if f else "-")
        if f is None:
            flat = flatten(e.config)
            rows.append([e.name, state, *["-"] * 7, *(_value(flat.get(k)) for k in differ)])
            continue
        final = f"{f.evals[-1][1]:.3f}" if f.evals else "-"
        best = f"{f.best[1]:.3f} ({f.best[0]})" if f.best else "-"
        flat = flatten(f.config)
        rows.append([e.name, state, final, best, f"{f.final_step}/{f.total_steps or '?'}",
                     duration(f.wall_seconds), str(f.restart_count), _fmt(tokens_per_sec(f)),
                     _fmt(peak_mb(f)), *(_value(flat.get(k)) for k in differ)])
    blocks: list[Block] = [Heading("Side by side", 2),
                           Table(header, rows, "llrrrrrrr" + "l" * len(differ))]
    if hidden:
        blocks.append(Para(f"{hidden} more settings differ (see each run's config.yaml)."))
    return blocks


def _job_config(job: Job) -> dict[str, Any]:
    from shared import config as config_mod

    try:
        return config_mod.load(Path(job.config)).to_dict()
    except (OvernightError, OSError):
        return {}


def tokens_per_sec(f: RunFacts) -> float | None:
    """Mean of the attempts' tokens/s (run.json's per-attempt average), weighted by time."""
    pairs = [(a.tokens_per_sec, a.seconds or 0.0) for a in f.attempts
             if a.tokens_per_sec is not None]
    weight = sum(s for _, s in pairs)
    if not pairs:
        return None
    if weight <= 0:
        return sum(t for t, _ in pairs) / len(pairs)
    return sum(t * s for t, s in pairs) / weight


def peak_mb(f: RunFacts) -> float | None:
    """The highest MLX peak memory of any attempt (MB)."""
    peaks = [a.peak_mlx_mb for a in f.attempts if a.peak_mlx_mb is not None]
    return max(peaks) if peaks else None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differing_settings(configs: list[dict[str, Any]]) -> tuple[list[str], int]:
    """The dotted keys whose values differ between the configs (at most MAX_SETTINGS, in
    the configs' order), and how many more differ."""
    flats = [flatten(c) for c in configs]
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str)
                                      for f in flats}) > 1]
    return differ[:MAX_SETTINGS], max(0, len(differ) - MAX_SETTINGS)


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if v == "":
        return "''"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"
