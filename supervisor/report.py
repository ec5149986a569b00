"""`overnight report [RUN_DIR]`: the morning report — verdict, timeline, pictures, numbers.

    overnight report runs/mini                  # RUN_DIR/report.md + report.png, printed too
    overnight report runs/mini --format html    # RUN_DIR/report.html, the picture inside
    overnight report                            # the most recently modified run in ./runs/

The first line is the verdict (supervisor/verdict.py). Then: the commands to use the
result, what each attempt did and how it ended and what the supervisor did about it, the
failures in detail, and the numbers (time lost, throughput, memory, ETA accuracy, data).
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
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from supervisor.report_doc import Block, Code, Heading, Image, Para, Table, to_html, to_markdown
from supervisor.runfacts import Attempt, RunFacts, gather
from supervisor.runlogs import resolve_run_dir
from supervisor.verdict import KIND, describe, duration, restarts

MARK = {"finished": "✅", "early_stopped": "✅", "gave_up": "❌", "incomplete": "❌",
        "stopped": "⏹️"}
MEMORY_GROWTH = 0.5  # as worker/progress.py: more than 50 % above the first steps
ETA_POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)
DETAIL_CHARS = 90
TAIL_LINES = 6
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


def main(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run_dir, "report")
    facts = gather(run_dir)
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


@dataclass(frozen=True)
class Written:
    markdown: str  # the report as Markdown (also what is printed)
    png: Path | None  # the picture beside report.md; None for html or without matplotlib
    note: str  # why there is no picture, or ""


def render_png(facts: RunFacts) -> bytes | None:
    """The picture as PNG bytes; None when matplotlib is not installed."""
    try:
        from supervisor import report_plot

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
    blocks += _numbers(facts)
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
        lines.append(f"The run did not finish: the newest checkpoint (step "
                     f"{facts.checkpoints[-1]}) has usable adapters: `{latest}`.")
        use = latest
    else:
        return [*blocks, Para("No adapters yet: no checkpoint was saved.")]
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
        config = facts.record.get("config_path") if facts.record else None
        cmds.append(f"overnight run {q(str(config or 'CONFIG.yaml'))} --run-dir "
                    f"{q(str(run.root))}   # resume")
    return [*blocks, Code("\n".join(cmds))]


def _clock(t: float | None) -> str:
    if t is None or math.isnan(t):
        return "?"
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _short(text: str, n: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _ended(a: Attempt) -> str:
    if a.outcome == "running":
        return "running"
    kind = KIND.get(a.outcome, a.outcome.replace("_", " "))
    if a.outcome == "completed":
        kind = "completed"
    text = f"**{kind}**" + (f": {_short(a.detail, 55)}" if a.detail else "")
    if a.detected_by and a.detected_by != "exit" and a.detection_latency_s is not None:
        text += f" (noticed after {duration(a.detection_latency_s)})"
    return text


def _did(a: Attempt) -> str:
    if a.action is None:
        return "—"
    text = a.action.replace("_", " ")
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
        if a.outcome == "running" and not math.isnan(a.started):
            ran = duration(time.time() - a.started) + " so far"
        rows.append([str(a.number), _clock(a.started), ran, steps, _ended(a), _did(a)])
    head = ["#", "started", "ran", "steps", "how it ended", "what the supervisor did"]
    if not facts.supervised:
        head[-1] = "supervisor"
    return [Heading("What happened", 2), Table(head, rows, "rrrlll")]


def _failures(facts: RunFacts) -> list[Block]:
    pairs = restarts(facts.attempts)
    last = facts.attempts[-1] if facts.attempts else None
    failed_last = last is not None and last.outcome not in (
        "completed", "early_stopped", "running") and all(a is not last for a, _ in pairs)
    items = [a for a, _ in pairs] + ([last] if failed_last and last else [])
    if not items:
        return []
    blocks: list[Block] = [Heading("Failures in detail", 2)]
    for a in items:
        kind = KIND.get(a.outcome, a.outcome)
        detail = _short(a.detail, 240)
        if detail and detail[-1] not in ".!?)":
            detail += "."
        text = f"**Attempt {a.number}: {kind} at step {a.end_step}.** {detail}"
        if a.detected_by:
            how = ("when the process exited" if a.detected_by == "exit" else
                   f"by {a.detected_by.replace('_', ' ')}")
            latency = a.detection_latency_s
            after = (f", {duration(latency)} after its last sign of life"
                     if latency is not None else "")
            text += f" Noticed {how}{after}."
        if a.bad_data:
            text += f" The failing batch's data: `{a.bad_data}`."
        if a.action:
            text += f" The supervisor chose **{a.action.replace('_', ' ')}**"
            reason = a.action_reason
            if reason.startswith(f"{a.outcome}: {a.detail}"):
                reason = reason[len(f"{a.outcome}: {a.detail}"):].lstrip("; ")
            text += f": {_short(reason, 240)}." if reason else "."
        blocks.append(Para(text))
        tail = interesting_output(a.stderr_tail)
        if tail:
            blocks.append(Para(f"Last output (`{a.log or 'logs/worker-N.log'}`):"))
            blocks.append(Code("\n".join(_short(ln, 160) for ln in tail), lang=""))
    return blocks


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


# ---- numbers ---------------------------------------------------------------------------


def time_lost(facts: RunFacts) -> tuple[float, float, float, int]:
    """(noticing, restarting, redoing steps, steps redone): seconds lost to failures."""
    by_attempt = facts.metrics_by_attempt()
    notice = restart = redo = 0.0
    redone = 0
    for a, following in restarts(facts.attempts):
        if a.detection_latency_s and a.detected_by not in (None, "exit"):
            notice += a.detection_latency_s
        if following is None:
            continue
        if following.downtime_s is not None:
            restart += following.downtime_s
        elif a.ended is not None and not math.isnan(following.started):
            restart += max(0.0, following.started - a.ended)
        back = following.resumed_from or 0
        if back < a.end_step:
            redone += a.end_step - back
            lines = by_attempt.get(a.number, [])
            redo += sum(float(m.get("step_seconds") or 0.0) for m in lines
                        if isinstance(m.get("step"), int) and m["step"] > back)
    return notice, restart, redo, redone


def _per_attempt(facts: RunFacts) -> dict[int, dict[str, float]]:
    """tokens/s, s/step, memory growth of each attempt, from metrics.jsonl."""
    out = {}
    for key, ms in facts.metrics_by_attempt().items():
        secs = sum(float(m.get("step_seconds") or 0.0) for m in ms)
        toks = sum(int(m.get("tokens") or 0) for m in ms)
        active = [float(m["active_mb"]) for m in ms if isinstance(m.get("active_mb"),
                                                                    (int, float))]
        base = statistics.median(active[:5]) if active else 0.0
        out[key] = {"tok_s": toks / secs if secs else math.nan,
                    "s_step": secs / len(ms) if ms else math.nan,
                    "growth": (max(active[-5:]) / base - 1) if active and base > 0 else 0.0,
                    "peak": max((float(m.get("peak_mb") or 0) for m in ms), default=0.0),
                    "rss": max((float(m.get("rss_mb") or 0) for m in ms), default=0.0)}
    return out


def _data_rows(facts: RunFacts) -> list[list[str]]:
    """Lines skipped (malformed, no target tokens) and sequences cut to max_seq_length, per
    data file, from the worker's data events (worker/data.py); streaming says what it has
    read so far."""
    skipped, cut = [], []
    files = facts.data_files or {p: {"malformed": n} for p, n in facts.data_skipped.items()}
    for path, d in files.items():
        name = Path(path).name
        n, k = int(d.get("malformed") or 0), int(d.get("no_targets") or 0)
        parts = []
        if n:
            parts.append(f"{n} malformed in `{name}`")
        if k:
            parts.append(f"{k} with no target tokens in `{name}` (prompt fills "
                         "max_seq_length)")
        if parts:
            parts[-1] += _lines_named(name, d.get("first_problems"), n + k)
        skipped.extend(parts)
        read = d.get("examples_read")
        partial = "" if d.get("lengths_known", True) else (
            f" so far (streaming: {read} of {d.get('examples')} examples read)")
        if d.get("truncated"):
            cut.append(f"{d['truncated']} in `{name}` cut to max_seq_length "
                       f"{d.get('max_seq_length')} (longest {d.get('longest')} tokens){partial}")
        elif partial:
            cut.append(f"none in `{name}`{partial}")
    return [["data lines skipped", "; ".join(skipped) or "none"],
            ["sequences truncated", "; ".join(cut) or "none"]]


_PROBLEM_LINE = re.compile(r"line (\d+):")


def _lines_named(name: str, problems: object, total: int) -> str:
    """" at train.jsonl:34,38-40 and 7 more lines": the skipped lines the worker named
    ("line 34: reason", its first few), as the worker names a failing batch's lines."""
    from worker.jsonl_index import describe_lines  # numpy only, no MLX

    found = [_PROBLEM_LINE.match(p) for p in problems if isinstance(p, str)] \
        if isinstance(problems, list) else []
    nums = sorted({int(m.group(1)) for m in found if m})
    if not nums:
        return ""
    more = total - len(nums)
    return f" at {describe_lines(Path(name), nums)}" + (f" and {more} more lines" if more > 0
                                                        else "")


def eta_accuracy(facts: RunFacts) -> list[list[str]]:
    """At 10/25/50/75/90 % of the steps: what the ETA said, and when it actually finished."""
    if not facts.finished or not facts.progress or not facts.total_steps:
        return []
    times = [m["time"] for m in facts.metrics if isinstance(m.get("time"), (int, float))]
    actual = max(times) if times else facts.ended
    if actual is None:
        return []
    rows = []
    for frac in ETA_POINTS:
        ev = next((p for p in facts.progress if isinstance(p.get("step"), int)
                   and p["step"] >= frac * facts.total_steps
                   and isinstance(p.get("eta_h"), (int, float)) and math.isfinite(p["eta_h"])),
                  None)
        if ev is None or math.isnan(ev["time"]):
            continue
        said = ev["time"] + ev["eta_h"] * 3600
        error = actual - said
        remaining = actual - ev["time"]
        pct = f" ({100 * error / remaining:+.0f}%)" if remaining > 0 else ""
        late = "later" if error >= 0 else "earlier"
        rows.append([f"{frac:.0%} (step {ev['step']})", _clock(said),
                     f"{duration(abs(error))} {late}{pct}"])
    return rows


def _numbers(facts: RunFacts) -> list[Block]:
    rows: list[list[str]] = []
    wall = facts.wall_seconds
    train = sum(a.seconds or 0.0 for a in facts.attempts)
    rows.append(["wall time", f"{duration(wall)} (workers running {duration(train)})"])
    notice, restart, redo, redone = time_lost(facts)
    lost = notice + restart + redo
    if restarts(facts.attempts):
        share = f" ({100 * lost / wall:.0f}% of the wall time)" if wall else ""
        parts = [f"noticing {duration(notice)}" if notice else "",
                 f"restarting {duration(restart)}" if restart else "",
                 f"redoing {redone} steps" + (f" {duration(redo)}" if redo else "")
                 if redone else ""]
        rows.append(["time lost to failures", f"{duration(lost)}{share}: "
                     + ", ".join(p for p in parts if p)])
    per = _per_attempt(facts)
    keys = sorted(per)
    tok = [per[k]["tok_s"] for k in keys if not math.isnan(per[k]["tok_s"])]
    if tok:
        rows.append(["throughput", " / ".join(f"{x:,.0f}" for x in tok)
                     + " tokens/s" + (" by attempt" if len(tok) > 1 else "")])
    grow = [(k, per[k]["growth"]) for k in keys if per[k]["growth"] > MEMORY_GROWTH]
    peak = max([p["peak"] for p in per.values()]
               + [a.peak_mlx_mb or 0.0 for a in facts.attempts], default=0.0)
    rss = max([p["rss"] for p in per.values()]
              + [a.peak_rss_mb or 0.0 for a in facts.attempts], default=0.0)
    mem = (f"peak MLX {peak:,.0f} MB, peak RSS {rss:,.0f} MB; " if peak or rss else
           "no memory samples; ")
    mem += ("⚠️ grew " + ", ".join(f"{g:+.0%} in attempt {k}" for k, g in grow)
            if grow else "no growth within an attempt")
    if any(a.outcome == "planned_restart" for a in facts.attempts):
        mem += "; the supervisor restarted the worker for memory"
    rows.append(["memory", mem])
    if facts.evals:
        first, last = facts.evals[0], facts.evals[-1]
        rows.append(["validation", f"{first[1]:.3f} at step {first[0]} → {last[1]:.3f} at "
                                   f"step {last[0]} ({len(facts.evals)} evaluations)"])
    if facts.test is not None:
        loss, n = facts.test
        ppl = f"{math.exp(loss):.3f}" if loss < 700 else "inf"
        rows.append(["test (mlx_lm's test pass)", f"loss {loss:.3f}, perplexity {ppl} "
                     f"({n} examples of test.jsonl, final adapters)"])
    rows += _data_rows(facts)
    overrides = (facts.record or {}).get("overrides") or {}
    if overrides:
        rows.append(["settings changed", ", ".join(f"{k}={v}" for k, v in overrides.items()
                                                   if v is not None)])
    kept = ", ".join(str(s) for s in facts.checkpoints) or "none"
    rows.append(["checkpoints", f"{kept}" + (f"; {len(facts.quarantined)} quarantined "
                                             "(checkpoints/quarantine/)" if facts.quarantined
                                             else "")])
    if facts.unreadable_lines:
        rows.append(["metrics", f"{facts.unreadable_lines} unreadable line(s) skipped"])
    blocks: list[Block] = [Heading("Numbers", 2), Table(["", ""], rows, "ll")]
    if len(keys) > 1:
        arows = [[str(k), f"{per[k]['tok_s']:,.0f}", f"{per[k]['s_step']:.3f}",
                  f"{per[k]['peak']:,.1f}", f"{per[k]['rss']:,.0f}",
                  f"{per[k]['growth']:+.0%}" + (" ⚠️" if per[k]["growth"] > MEMORY_GROWTH
                                                else "")] for k in keys]
        blocks += [Heading("By attempt", 3), Table(
            ["attempt", "tokens/s", "s/step", "peak MLX MB", "peak RSS MB", "memory growth"],
            arows, "rrrrrr")]
    eta = eta_accuracy(facts)
    if eta:
        blocks += [Heading("ETA accuracy", 3),
                   Para("What the progress line's ETA predicted, against the actual end "
                        f"({_clock(max(m['time'] for m in facts.metrics))}); it does not "
                        "foresee failures."),
                   Table(["at", "ETA said", "actual end"], eta, "lrl")]
    return blocks
