"""The morning report's numbers: what the night cost and how the run behaved.

The attempts (how many, restarts, failures, planned ends: the counts run.json's totals
hold), time lost to failures (noticing, restarting, redoing steps; planned ends are counted
apart, never as lost to failures), throughput and memory by attempt, how accurate the
progress line's ETA was, data lines skipped, settings the supervisor changed, checkpoints
kept. Computed from supervisor/morning/runfacts.py's facts;
the document around them is supervisor/morning/report.py.
"""

from __future__ import annotations

import math
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np

from shared.datalines import describe_lines
from shared.exitcodes import FailureClass
from shared.run_record import Detection
from supervisor.morning.eta_marks import ETA_POINTS
from supervisor.morning.facts import RunFacts
from supervisor.morning.report_doc import Block, Heading, Para, Table
from supervisor.morning.verdict import clock, duration, kind, restarts

MEMORY_GROWTH = 0.5  # as shared/progress.py: more than 50 % above the first steps


def time_lost(facts: RunFacts, planned: bool = False) -> tuple[float, float, float, int]:
    """(noticing, restarting, redoing steps, steps redone): seconds lost to the restarts
    after failures (planned=True: after planned ends, facts.py PLANNED_ENDS, instead)."""
    by_attempt = facts.metrics_by_attempt()
    notice = restart = redo = 0.0
    redone = 0
    for a, following in restarts(facts.attempts):
        if a.planned != planned:
            continue
        if a.detection_latency_s and a.detected_by not in (None, Detection.EXIT):
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
            lines = by_attempt.get(a.number)
            if lines is not None:  # its step_seconds above the resume step (runfacts._plan)
                redo += lines.redo_seconds
    return notice, restart, redo, redone


def _attempts(facts: RunFacts) -> str:
    """"4 (3 restarts); 1 failure, 2 planned ends": run.json's totals, said once."""
    n, failures, planned = len(facts.attempts), len(facts.failures), len(facts.planned_ends)
    r = facts.restart_count
    return (f"{n} ({r} restart{'s' if r != 1 else ''}); {failures} "
            f"failure{'s' if failures != 1 else ''}, {planned} planned "
            f"end{'s' if planned != 1 else ''}")


def _per_attempt(facts: RunFacts) -> dict[int, dict[str, float]]:
    """tokens/s, s/step, memory growth of each attempt, from metrics.jsonl."""
    out = {}
    for key, ms in facts.metrics_by_attempt().items():
        secs, toks = ms.seconds, ms.tokens
        base = float(np.median(ms.active_head)) if ms.active_head else 0.0
        out[key] = {"tok_s": toks / secs if secs else math.nan,
                    "s_step": secs / len(ms) if ms else math.nan,
                    "growth": (max(ms.active_tail) / base - 1) if ms.active_tail and base > 0
                    else 0.0,
                    "peak": ms.peak_mb, "rss": ms.rss_mb}
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
    found = [_PROBLEM_LINE.match(p) for p in problems if isinstance(p, str)] \
        if isinstance(problems, list) else []
    nums = sorted({int(m.group(1)) for m in found if m})
    if not nums:
        return ""
    more = total - len(nums)
    return f" at {describe_lines(Path(name), nums)}" + (f" and {more} more lines" if more > 0
                                                        else "")


def actual_end(facts: RunFacts) -> float | None:
    """When the run ended, as the ETA table measures it: the newest metrics line's time, else
    the record's end (no metrics.jsonl); None if neither is known."""
    actual = facts.metrics.last_time()
    return facts.ended if actual is None else actual


def eta_accuracy(facts: RunFacts) -> list[list[str]]:
    """At 10/25/50/75/90 % of the steps: what the ETA said, and when it actually finished."""
    if not facts.finished or not facts.progress or not facts.total_steps:
        return []
    actual = actual_end(facts)
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
        rows.append([f"{frac:.0%} (step {ev['step']})", clock(said),
                     f"{duration(abs(error))} {late}{pct}"])
    return rows


def _no_metrics(path: Path) -> str:
    """Why a run that made steps has no metrics line to show (the rows they feed are left
    out: throughput, step times, the training loss)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a directory, a FIFO (never opened)
            raise IsADirectoryError
        with open(path, "rb") as f:
            why = "empty" if not f.read(1) else "without a readable line"
    except FileNotFoundError:
        why = "absent"
    except IsADirectoryError:
        why = "not a file"
    except OSError as e:
        why = f"unreadable ({e.strerror})"
    return (f"logs/metrics.jsonl {why}: no throughput, step times or training loss "
            "(the validation losses come from the worker log)")


def numbers(facts: RunFacts) -> list[Block]:
    """The report's Numbers section: the table, by attempt, ETA accuracy."""
    rows: list[list[str]] = []
    wall = facts.wall_seconds
    train = sum(a.seconds or 0.0 for a in facts.attempts)
    rows.append(["wall time", f"{duration(wall)} (workers running {duration(train)})"])
    rows.append(["attempts", _attempts(facts)])
    notice, restart, redo, redone = time_lost(facts)
    lost = notice + restart + redo
    if any(not a.planned for a, _ in restarts(facts.attempts)):
        share = f" ({100 * lost / wall:.0f}% of the wall time)" if wall else ""
        parts = [f"noticing {duration(notice)}" if notice else "",
                 f"restarting {duration(restart)}" if restart else "",
                 f"redoing {redone} steps" + (f" {duration(redo)}" if redo else "")
                 if redone else ""]
        rows.append(["time lost to failures", f"{duration(lost)}{share}: "
                     + (", ".join(p for p in parts if p) or "none")])
    planned = facts.planned_ends
    if planned:
        _, p_restart, _, p_redone = time_lost(facts, planned=True)
        kinds = Counter(kind(a) for a in planned)
        text = ", ".join(f"{k} ×{c}" for k, c in kinds.most_common())
        if p_restart or p_redone:
            text += f"; {duration(p_restart)} restarting" + (
                f", {p_redone} steps redone" if p_redone else "")
        rows.append(["planned ends", text + " (not failures)"])
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
    if any(a.outcome is FailureClass.PLANNED_RESTART and a.detected_by is Detection.MEMORY
           for a in facts.attempts):
        mem += "; the supervisor restarted the worker for memory"
    rows.append(["memory", mem])
    if facts.evals:
        first, last = facts.evals[0], facts.evals[-1]
        again = facts.eval_events - len(facts.evals)  # steps evaluated again after a restart
        rows.append(["validation", f"{first[1]:.3f} at step {first[0]} → {last[1]:.3f} at "
                                   f"step {last[0]} ({len(facts.evals)} evaluations"
                                   + (f", {again} repeated after restarts" if again > 0 else "")
                                   + ")"])
    if facts.test is not None:
        loss, n = facts.test
        ppl = f"{math.exp(loss):.3f}" if loss < 700 else "inf"
        rows.append(["test (mlx_lm's test pass)", f"loss {loss:.3f}, perplexity {ppl} "
                     f"({n} examples of test.jsonl, final adapters)"])
    rows += _data_rows(facts)
    overrides = facts.record.overrides if facts.record else {}
    if overrides:
        rows.append(["settings changed", ", ".join(f"{k}={v}" for k, v in overrides.items()
                                                   if v is not None)])
    kept = ", ".join(str(s) for s in facts.checkpoints) or "none"
    rows.append(["checkpoints", f"{kept}" + (f"; {len(facts.quarantined)} quarantined "
                                             "(checkpoints/quarantine/)" if facts.quarantined
                                             else "")])
    if facts.unreadable_lines:
        rows.append(["metrics", f"{facts.unreadable_lines} unreadable line(s) skipped"])
    elif not len(facts.metrics) and facts.final_step > 0:
        rows.append(["metrics", _no_metrics(facts.layout.metrics_log)])
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
                        f"({clock(actual_end(facts) or 0.0)}); it does not "
                        "foresee failures."),
                   Table(["at", "ETA said", "actual end"], eta, "lrl")]
    return blocks
