"""supervisor/morning/metrics_summary.py, buckets.py, eta_marks.py (issue 15, cost as the
night grows): the report reads logs/metrics.jsonl in memory that does not grow with the
night, and prints the same numbers — exact sums, extremes and lasts at 200k steps, checked
against the formula that wrote the file."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from supervisor.morning import metrics_summary as ms
from supervisor.morning.buckets import Buckets
from supervisor.morning.eta_marks import EtaMarks
from supervisor.morning.report import build, to_markdown
from supervisor.morning.runfacts import gather
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

T0 = 1.76e9  # the night's start (Unix s)
ITERS = 200_000
CRASH, RESUME = 120_000, 100_000  # attempt 1 ends at CRASH; attempt 2 resumes from RESUME
SPIKE = 123_456  # attempt 2's one step with a peak of 9999.5 MB
GAP = 30.0  # seconds between the crash and the next process


def secs(attempt: int) -> float:
    return 0.5 if attempt == 1 else 0.25


def started(attempt: int) -> float:
    return T0 if attempt == 1 else T0 + 10 + CRASH * 0.5 + GAP


def step_time(attempt: int, step: int) -> float:
    first = 1 if attempt == 1 else RESUME + 1
    return started(attempt) + 10 + (step - first + 1) * secs(attempt)


def tokens(step: int) -> int:
    return 100 + step % 50


def peak(attempt: int, step: int) -> float:
    return 9999.5 if step == SPIKE else 2000.0 + step % 1009 + attempt


def rss(step: int) -> float:
    return 3000.0 + step % 13


def active(attempt: int, step: int) -> float:
    return 500.0 + 0.01 * step if attempt == 1 else 1000.0  # attempt 1 grows


def steps_of(attempt: int) -> range:
    return range(1, CRASH + 1) if attempt == 1 else range(RESUME + 1, ITERS + 1)


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def night(run: Path, iters: int = ITERS) -> Path:
    """A run of `overnight train` alone (no run.json) of `iters` steps as the worker leaves
    it: two processes, the first killed at CRASH without a word, the second resumed from
    RESUME to the end; a metrics line a step, a progress event every 10 steps."""
    logs = run / "logs"
    logs.mkdir(parents=True)
    worker = []
    with open(logs / "metrics.jsonl", "w") as m:
        for a in (1, 2):
            base = {"source": "worker", "run_id": "big", "pid": 100 + a, "attempt": 1,
                    "level": "info"}
            worker.append({**base, "event": "worker_started", "timestamp": _stamp(started(a))})
            if a == 1:
                worker.append({**base, "event": "config_resolved", "config": {"iters": iters},
                               "timestamp": _stamp(started(a) + 1)})
            else:
                worker.append({**base, "event": "resumed", "step": RESUME,
                               "timestamp": _stamp(started(a) + 1)})
            for s in steps_of(a):
                if s > iters:
                    break
                t = step_time(a, s)
                m.write(json.dumps({
                    "type": "metrics", "v": 1, "run_id": "big", "attempt": 1, "step": s,
                    "time": t, "loss": 2.0 + (s * 7919 % 1000) / 1000, "grad_norm": 0.5,
                    "lr": 1e-4, "tokens": tokens(s), "tokens_per_sec": 1.0,
                    "step_seconds": secs(a), "active_mb": active(a, s),
                    "peak_mb": peak(a, s), "rss_mb": rss(s), "cache_mb": 0.0}) + "\n")
                if s % 10 == 0:
                    worker.append({**base, "event": "progress", "step": s,
                                   "eta_h": (iters - s) * 0.25 / 3600, "timestamp": _stamp(t)})
    (logs / "worker.jsonl").write_text("".join(json.dumps(e) + "\n" for e in worker))
    (run / "COMPLETE").write_text(json.dumps({"status": "completed", "step": iters,
                                              "total_steps": iters}))
    return run


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return night(tmp_path_factory.mktemp("big") / "run")


def _cells(text: str) -> list[list[str]]:
    """The rows of the markdown tables in `text`, each a list of its cells."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def _rows(text: str) -> dict[str, str]:
    return {r[0]: r[1] for r in _cells(text) if len(r) == 2}


def test_a_200k_step_report_prints_the_formulas_sums_extremes_and_lasts(big: Path) -> None:
    facts = gather(big)
    text = to_markdown(build(facts, None))
    tok = {a: sum(tokens(s) for s in steps_of(a)) / (len(steps_of(a)) * secs(a))
           for a in (1, 2)}
    rows = _rows(text)
    assert rows["throughput"] == f"{tok[1]:,.0f} / {tok[2]:,.0f} tokens/s by attempt"
    assert tok[1] != tok[2]
    # attempt 1's last 5 active_mb against its first 5: 500.02 .. 1700.0 -> +240 %
    assert rows["memory"] == ("peak MLX 10,000 MB, peak RSS 3,012 MB; ⚠️ grew +240% in "
                              "attempt 1")
    assert max(peak(2, s) for s in steps_of(2)) == 9999.5  # shown as 10,000
    # attempt 1 redid nothing of its own: the steps after RESUME, 20,000 x 0.5 s, were lost
    assert "redoing 20000 steps 2h46m" in rows["time lost to failures"]
    by_attempt = _cells(text.split("### By attempt")[1].split("###")[0])
    assert [f"{tok[1]:,.0f}", "0.500", f"{2000 + 1008 + 1:,.1f}", "3,012", "+240% ⚠️"] \
        in [r[1:] for r in by_attempt]
    assert ["2", f"{tok[2]:,.0f}", "0.250", "9,999.5", "3,012", "+0%"] in by_attempt
    eta = text.split("### ETA accuracy")[1]
    assert re.findall(r"\| \d+% \(step (\d+)\)", eta) == ["20000", "50000", "100000",
                                                         "150000", "180000"]
    assert facts.final_step == ITERS and len(facts.metrics) == CRASH + ITERS - RESUME
    assert facts.metrics.last_time() == step_time(2, ITERS)
    assert [a.end_step for a in facts.attempts] == [CRASH, ITERS]
    assert facts.attempts[1].peak_mlx_mb == 9999.5
    assert facts.attempts[0].tokens_per_sec == tok[1]


# Gathers a run's facts in a fresh process and prints its peak RSS (MiB; Linux: ru_maxrss
# in KiB): the numbers the report reads, without the picture.
PEAK = ("import resource, sys; from pathlib import Path; "
        "from supervisor.morning.runfacts import gather; f = gather(Path(sys.argv[1])); "
        "print(len(f.metrics), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")


def _peak_mib(run: Path) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, str(run)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[1])


def test_reading_a_night_for_the_report_takes_the_same_memory_at_20k_and_200k_steps(
        big: Path, tmp_path: Path) -> None:
    """Before: a numpy column per field and step (~110 bytes a step): 200k steps took
    ~25 MB more than 20k."""
    small = night(tmp_path / "small", iters=20_000)
    at_20k, at_200k = _peak_mib(small), _peak_mib(big)
    assert at_200k < at_20k + 5, (at_20k, at_200k)


def test_buckets_are_exact_below_the_cap_and_keep_spikes_and_totals_past_it() -> None:
    b = Buckets(1, 8)
    b.add(np.arange(1.0, 9.0), np.arange(1.0, 9.0)[:, None])
    assert b.exact and list(b.x_last) == list(range(1, 9)) and list(b.max[:, 0]) == \
        list(range(1, 9))
    rng = np.random.default_rng(5)
    ys = rng.normal(size=10_007)
    ys[4321] = 50.0  # one spike
    ys[17] = math.nan  # not measured
    b = Buckets(1, 64)
    for lo in range(0, len(ys), 333):  # in pieces, as the file is read
        b.add(np.arange(lo, min(lo + 333, len(ys)), dtype=np.float64), ys[lo:lo + 333, None])
    r = b.result()
    assert not r.exact and 32 <= len(r.x_first) <= 65
    finite = ys[np.isfinite(ys)]
    assert r.count.sum() == len(finite) == 10_006
    assert r.max.max() == 50.0 and r.min.min() == finite.min()
    assert r.sum.sum() == pytest.approx(finite.sum())
    assert r.x_first[0] == 0 and r.x_last[-1] == 10_006
    assert (np.diff(r.x_first) > 0).all()
    assert r.last[-1, 0] == ys[-1]


def test_past_the_cap_a_restart_supersedes_the_steps_it_redoes() -> None:
    s = ms.StepSeries()
    k = len(ms.SERIES)
    first = np.arange(1, 6001)
    s.add(first, np.ones((len(first), k)))  # attempt 1 to step 6000
    assert not s.exact
    redo = np.arange(5001, 7001)
    s.add(redo, np.full((len(redo), k), 2.0))  # attempt 2 from step 5000
    b = s.buckets.result() if s.buckets is not None else None
    assert b is not None and b.x_last[-1] == 7000
    assert b.count[:, 0].sum() <= 7000 + b.width  # 5000 + 2000, give or take a bucket
    assert b.max[b.x_first > 5001, 0].min() == 2.0  # attempt 1's steps above 5000 are gone


def test_a_median_is_exact_then_within_a_quarter_percent() -> None:
    m = ms.Median()
    m.add(np.array([3.0, 1.0, 2.0, 10.0]))
    assert m.value() == 2.5
    values = np.random.default_rng(1).lognormal(size=300_000)
    m = ms.Median()
    for piece in np.array_split(values, 7):
        m.add(piece)
    got = m.value()
    assert got is not None and abs(got / float(np.median(values)) - 1) < 0.0025


def _first_past(events: list[dict], total: int) -> list[dict]:
    """The ETA table's pick, from every event (report_numbers.eta_accuracy before)."""
    out = []
    for frac in (0.1, 0.25, 0.5, 0.75, 0.9):
        ev = next((p for p in events if isinstance(p.get("step"), int)
                   and p["step"] >= frac * total and isinstance(p.get("eta_h"), float)
                   and math.isfinite(p["eta_h"])), None)
        if ev is not None:
            out.append(ev)
    return out


@pytest.mark.parametrize("known_at", [0, 500, None], ids=["at once", "midway", "at the end"])
def test_the_eta_events_kept_are_the_ones_the_table_picks(known_at: int | None) -> None:
    rng = random.Random(7)
    events = [{"time": float(i), "step": rng.randrange(0, 1200),
               "eta_h": rng.choice([1.0, math.nan])} for i in range(2000)]
    marks = EtaMarks()
    for i, ev in enumerate(events):
        if i == known_at:
            marks.know_total(1000)
        marks.add(ev)
    kept = marks.events(1000)
    assert len(kept) <= 5
    assert _first_past(kept, 1000) == _first_past(events, 1000)
    assert len(_first_past(events, 1000)) == 5
