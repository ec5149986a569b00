"""`overnight report [RUN_DIR]`: the morning report — verdict, timeline, pictures, numbers.

    overnight report runs/mini                  # RUN_DIR/report.md + report.png, printed too
    overnight report runs/mini --format html    # RUN_DIR/report.html, the picture inside
    overnight report                            # the most recently modified run in ./runs/

The first line is the verdict (supervisor/verdict.py). Then: the commands to use the
result, what each attempt did and how it ended and what the supervisor did about it, the
failures in detail, the planned ends (stops on request, planned restarts: not failures), and
the numbers (attempts, time lost to failures, throughput, memory, ETA accuracy, data). A
fault injected on purpose (`debug.inject`) is called injected wherever its ending appears.
The facts come from supervisor/runfacts.py; a run trained with `overnight train` alone
(no run.json) gets the same report without the supervisor's part. The picture needs
matplotlib (`pip install 'mlx-overnight[report]'`); without it the report is text only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.faults import EMULATED_OUTPUT
from shared.faults import describe as describe_fault
from shared.run_record import Detection, State
from supervisor.morning import machine
from supervisor.morning.facts import Attempt, RunFacts, RunState, Unclassified, Unsupervised
from supervisor.morning.report_doc import (
    Block,
    Code,
    Heading,
    Image,
    Para,
    Table,
    to_html,
    to_markdown,
)
from supervisor.morning.report_numbers import numbers
from supervisor.morning.runfacts import gather
from supervisor.morning.runlogs import resolve_run_dir
from supervisor.morning.verdict import clock, describe, duration, kind, restarts

MARK: dict[RunState, str] = {State.FINISHED: "✅", State.EARLY_STOPPED: "✅", State.GAVE_UP: "❌",
                             Unsupervised.INCOMPLETE: "❌", State.STOPPED: "⏹️"}
DETAIL_CHARS = 90
TAIL_LINES = 6
MATPLOTLIB_IMPORT_S = 1.0  # matplotlib.pyplot's import on this machine (runfacts.gather)
MATPLOTLIB_MISSING = ("matplotlib is not installed: the report has no pictures "
                      "(pip install 'mlx-overnight[report]')")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="run directory (default: the most recently modified under ./runs/)")
    parser.add_argument("--format", choices=("md", "html"), default="md",
                        help="md: report.md + report.png; html: one self-contained report.html")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="write the report here (default: RUN_DIR/report.md or .html)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the verdict and where the report is")
    parser.add_argument("--queue", type=Path, metavar="DIR",
                        help="the report of a night of jobs: every job side by side "
                             "(supervisor/queue/compare.py)")


def main(args: argparse.Namespace) -> int:
    if args.queue is not None:
        if args.run_dir is not None:
            raise ConfigError("expected RUN_DIR or --queue DIR, not both")
        from supervisor.queue.compare import main_queue

        return main_queue(args.queue, args.format, args.output, _use_result,
                          MATPLOTLIB_MISSING)
    run_dir = resolve_run_dir(args.run_dir, "report")
    facts = gather(run_dir, meanwhile=_import_matplotlib, meanwhile_s=MATPLOTLIB_IMPORT_S)
    out = args.output or run_dir / f"report.{args.format}"
    written = write_report(facts, out, args.format)
    if args.quiet:
        print(describe(facts))
    else:
        print(written.markdown, end="")
    if written.note:
        print(f"overnight report: {written.note}", file=sys.stderr)
    print(f"report: {out}" + (f"  picture: {written.png}" if written.png and args.format == "md"
                              else ""), file=sys.stderr)
    return 0


def _import_matplotlib() -> None:
    """matplotlib's import (~1 s here), done while a helper parses the metrics' tail
    (runfacts.gather's `meanwhile`); without matplotlib the report says so later."""
    try:
        from supervisor.morning import report_plot

        report_plot.pyplot()
    except ImportError:
        pass


@dataclass(frozen=True)
class Written:
    markdown: str  # the report as Markdown (also what is printed)
    png: Path | None  # the picture beside report.md; None for html or without matplotlib
    note: str  # why there is no picture, or ""


def render_png(facts: RunFacts) -> bytes | None:
    """The picture as PNG bytes; None when matplotlib is not installed."""
    try:
        from supervisor.morning import report_plot

        image = io.BytesIO()
        report_plot.plot(facts, image)
    except ImportError:
        return None
    return image.getvalue()


def write_report(facts: RunFacts, out: Path, fmt: str = "md") -> Written:
    """Write the report to `out` (md: with the picture beside it as .png; html: inside it)."""
    image = render_png(facts)
    note = "" if image is not None else MATPLOTLIB_MISSING
    png = out.with_suffix(".png") if image is not None and fmt == "md" else None
    blocks = build(facts, out.with_suffix(".png").name if image is not None else None, note)
    markdown = to_markdown(blocks)
    try:
        if fmt == "html":
            out.write_text(to_html(blocks, facts.run_id, image))
        else:
            if png is not None and image is not None:
                png.write_bytes(image)
            out.write_text(markdown)
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the report ({e.strerror})") from None
    return Written(markdown, png, note)


# ---- the document ----------------------------------------------------------------------


def build(facts: RunFacts, png_name: str | None, note: str = "") -> list[Block]:
    mark = MARK.get(facts.state, "⏳")
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    how = "supervised (run.json)" if facts.supervised else "`overnight train` alone (no run.json)"
    blocks: list[Block] = [
        Heading(f"{mark} {describe(facts)}", 1),
        Para(f"Run `{facts.run_id}` in `{facts.run_dir}` · {how} · report written {when}"),
    ]
    blocks.append(Image(png_name, "loss, progress and memory") if png_name else
                  Para(f"*{note or 'no picture'}*"))
    blocks += _use_result(facts)
    blocks += _timeline(facts)
    blocks += _failures(facts)
    blocks += _planned(facts)
    blocks += machine.section(facts)  # restarts, battery pauses, heat, recycles
    blocks += numbers(facts)
    blocks += [Heading("More", 2), Para(
        f"`overnight logs {shlex.quote(str(facts.run_dir))} --level warning` (what went "
        f"wrong), `--attempt N` (one attempt), `-f` (follow); raw output of each attempt: "
        f"`logs/worker-N.log`; per-step numbers: `logs/metrics.jsonl`.")]
    return blocks


def _model(facts: RunFacts) -> str:
    return str(facts.config.get("model") or "MODEL")


def _use_result(facts: RunFacts) -> list[Block]:
    run, q = facts.layout, shlex.quote
    model = q(_model(facts))
    blocks: list[Block] = [Heading("Use the result", 2)]
    final = run.adapters if (run.adapters / "adapters.safetensors").exists() else None
    best_dir = run.checkpoint_dir(facts.best[0]) if facts.best else None
    if best_dir is not None and not best_dir.is_dir():
        best_dir = None
    latest = run.checkpoint_dir(facts.checkpoints[-1]) if facts.checkpoints else None
    lines = []
    if final is not None:
        step = (facts.complete or {}).get("step", facts.final_step)
        lines.append(f"Final adapters (step {step}): `{final}`.")
        use = final
    elif latest is not None:
        lines.append((f"No final adapters in `{run.adapters}`" if facts.finished else
                      "The run did not finish")
                     + f": the newest checkpoint (step {facts.checkpoints[-1]}) has usable "
                     f"adapters: `{latest}`.")
        use = latest
    else:
        return [*blocks, Para(_no_adapters(facts))]
    if facts.best is not None:
        bstep, bval = facts.best
        final_step = (facts.complete or {}).get("step", facts.final_step)
        if bstep == final_step or best_dir is None:
            lines.append(f"Best validation loss {bval:.3f} at step {bstep}"
                         + (" — these are the best adapters." if bstep == final_step else
                            " (that checkpoint was not kept)."))
        else:
            lines.append(f"The best validation loss, {bval:.3f}, was at step {bstep}: "
                         f"`{best_dir}` (use it as --adapter-path for those weights).")
    blocks.append(Para(" ".join(lines)))
    cmds = [
        f"mlx_lm generate --model {model} --adapter-path {q(str(use))} --prompt 'Hello'",
        f"mlx_lm fuse --model {model} --adapter-path {q(str(use))} "
        f"--save-path {q(str(run.root / 'fused'))}",
    ]
    if not facts.finished and not facts.running:
        config = facts.record.config_path if facts.record else None
        cmds.append(f"overnight run {q(str(config or 'CONFIG.yaml'))} --run-dir "
                    f"{q(str(run.root))}   # resume")
    return [*blocks, Code("\n".join(cmds))]


use_result = _use_result  # `overnight compare` names the best run's adapters with it


def _no_adapters(facts: RunFacts) -> str:
    """Why "Use the result" has nothing to show: none saved yet, or (a run directory moved
    or copied without its adapters and checkpoints) saved where this directory has none."""
    step = (facts.complete or {}).get("step")
    named = [f"COMPLETE says the run {'finished' if facts.finished else 'ended'} at step "
             f"{step}"] if isinstance(step, int) else []
    latest = facts.record.latest_checkpoint if facts.record else None
    if latest is not None:
        named.append(f"run.json names its newest checkpoint, step {latest.step} "
                     f"(`{latest.path}`)")
    if not named:
        return "No adapters yet: no checkpoint was saved."
    return (f"No adapters or checkpoints in `{facts.layout.root}`, but {' and '.join(named)}: "
            "this directory was moved or copied without `adapters/` and `checkpoints/`, or "
            "they were deleted.")


def _short(text: str, n: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _ended(a: Attempt) -> str:
    if a.outcome is Unclassified.RUNNING:
        return "running"
    text = f"**{kind(a)}**"
    if a.injected_by:
        text += f" (injected: `{a.injected_by}`)"
    text += f": {_short(a.detail, 55)}" if a.detail else ""
    if a.detected_by not in (None, Detection.EXIT) and a.detection_latency_s is not None:
        text += f" (noticed after {duration(a.detection_latency_s)})"
    return text


def _did(a: Attempt) -> str:
    if a.action is None:
        return "—"
    text = a.action.value.replace("_", " ")
    if a.restart_delay_s is not None:
        text += f" after {duration(a.restart_delay_s)}"
    changes = [f"{k} {v[0]}→{v[1]}" for k, v in (a.settings_changed or {}).items()
               if isinstance(v, list) and len(v) == 2]
    if changes:
        text += " with " + ", ".join(changes)
    return text


def _timeline(facts: RunFacts) -> list[Block]:
    if not facts.attempts:
        return [Heading("What happened", 2), Para("No worker attempt was recorded.")]
    rows = []
    for a in facts.attempts:
        steps = f"{a.start_step} → {a.end_step}"
        if a.resumed_from is not None:
            steps += f" (from checkpoint {a.resumed_from})"
        ran = duration(a.seconds)
        if a.outcome is Unclassified.RUNNING and not math.isnan(a.started):
            ran = duration(time.time() - a.started) + " so far"
        rows.append([str(a.number), clock(a.started), ran, steps, _ended(a), _did(a)])
    head = ["#", "started", "ran", "steps", "how it ended", "what the supervisor did"]
    if not facts.supervised:
        head[-1] = "supervisor"
    return [Heading("What happened", 2), Table(head, rows, "rrrlll")]


def _failures(facts: RunFacts) -> list[Block]:
    """Every failure (run.json's failure count) and every other restart that was not
    planned (an attempt a dead supervisor left behind), in order."""
    unplanned = {a.number for a, _ in restarts(facts.attempts) if not a.planned}
    items = [a for a in facts.attempts if a.failed or a.number in unplanned]
    if not items:
        return []
    blocks: list[Block] = [Heading("Failures in detail", 2)]
    for a in items:
        detail = _sentence(_short(a.detail, 240))
        text = f"**Attempt {a.number}: {_what(a)} at step {a.end_step}.**{_injected(a)}"
        text += f" {'What the supervisor saw: ' if a.injected_by else ''}{detail}"
        if a.detected_by:
            how = ("when the process exited" if a.detected_by is Detection.EXIT else
                   f"by {a.detected_by.value.replace('_', ' ')}")
            latency = a.detection_latency_s
            after = (f", {duration(latency)} after its last sign of life"
                     if latency is not None else "")
            text += f" Noticed {how}{after}."
        if a.bad_data:
            text += f" The failing batch's data: `{a.bad_data}`."
        text += _chose(a)
        blocks.append(Para(text))
        tail = interesting_output(a.stderr_tail)
        if tail:
            emulated = (" (the error is the injected fault's emulation)"
                        if a.injected_by.partition("@")[0] in EMULATED_OUTPUT else "")
            blocks.append(Para(f"Last output (`{a.log or 'logs/worker-N.log'}`){emulated}:"))
            blocks.append(Code("\n".join(_short(ln, 160) for ln in tail), lang=""))
    return blocks


def _planned(facts: RunFacts) -> list[Block]:
    """Attempts ended on purpose (facts.py PLANNED_ENDS): a stop on request, a planned
    restart for memory. Not failures: not counted as one, nor in the time lost to them."""
    items = facts.planned_ends
    if not items:
        return []
    blocks: list[Block] = [Heading("Planned ends", 2), Para(
        "Attempts ended on purpose: not failures, not in the time lost to failures.")]
    following = {a.number: f for a, f in restarts(facts.attempts)}
    for a in items:
        text = (f"**Attempt {a.number}: {_what(a)} at step {a.end_step}.**{_injected(a)} "
                f"{_sentence(_short(a.detail, 240))}{_chose(a)}")
        after = following.get(a.number)
        if after is not None:
            text += f" Attempt {after.number} went on at {clock(after.started)}"
            if after.resumed_from is not None:
                text += f" from checkpoint {after.resumed_from}"
            text += (f", {duration(after.downtime_s)} after it ended."
                     if after.downtime_s is not None else ".")
        elif a is facts.attempts[-1] and not facts.running:
            text += " The run ended here; `overnight run` with its config resumes it."
        blocks.append(Para(text))
    return blocks


def _what(a: Attempt) -> str:
    return ("injected " if a.injected_by else "") + kind(a)


def _sentence(text: str) -> str:
    return text + "." if text and text[-1] not in ".!?)" else text


def _injected(a: Attempt) -> str:
    """Said of an ending caused by a fault injected on purpose (shared/faults.py)."""
    fault = a.injected_by
    if not fault:
        return ""
    return (f" Injected on purpose (`debug.inject` {fault}): it emulates "
            f"{describe_fault(fault)}; not a real fault of this machine or of the training.")


def _chose(a: Attempt) -> str:
    """What the supervisor chose, without repeating the ending its reason starts with."""
    if not a.action:
        return ""
    text = f" The supervisor chose **{a.action.value.replace('_', ' ')}**"
    reason = a.action_reason
    said = f"{a.outcome.value}: {a.detail}"  # the policy's reasons repeat the ending
    if reason.startswith(said):
        reason = reason[len(said):].lstrip("; ")
    elif a.detail and reason.startswith(a.detail):  # a planned restart: the detail itself
        reason = reason[len(a.detail):].lstrip("; ")
    elif a.detail and reason.endswith(f" ({a.detail})"):  # "stopped on request (…)"
        reason = reason[:-len(a.detail) - 3]
    return text + (f": {_short(reason, 240)}." if reason else ".")


_ROUTINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ \[(info|debug)\s*\]")


def interesting_output(tail: str, n: int = TAIL_LINES) -> list[str]:
    """The end of an attempt's output without the routine: info lines and all progress lines
    but the last (the crash message, warnings and tracebacks stay)."""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    last_progress = max((i for i, ln in enumerate(lines) if ln.startswith("Training:")),
                        default=-1)
    keep = [ln for i, ln in enumerate(lines)
            if not _ROUTINE.match(ln) and (not ln.startswith("Training:") or i == last_progress)]
    return keep[-n:]
