"""One night, every view: a real supervised run read through `overnight report` (md and html),
`overnight status`, `overnight logs --json`, run.json and COMPLETE tells one story — the same
best checkpoint, failures, restarts, final step and event counts wherever they appear.

The night (one run directory, built once, ~20 s): `overnight run` with an injected crash at
step 18 (a failure), an injected leak at step 22 under `memory_limit_mb` (a planned restart)
and `overnight stop` while the third attempt loads (a stop on request); then `overnight run`
again, which resumes until early stopping fires. With min_delta 0.3 the reference value early
stopping waited to beat is not the best validation loss: two numbers, named differently.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared import cli
from tests.conftest import overnight, subprocess_env, write_config

ITERS, EVERY, CRASH_AT, LEAK_AT = 200, 10, 18, 22
SUPERVISOR = {
    "heartbeat_timeout": 5.0, "startup_timeout": 90.0, "stall_timeout": 60.0,
    "stop_timeout": 10.0, "backoff_initial": 0.2, "backoff_max": 1.0, "caffeinate": False,
    # the injected leak holds 1024 MB (shared/faults.py); the tiny worker needs ~130 MB
    "memory_limit_mb": 700.0, "memory_growth": 0.0, "sample_interval": 0.2,
}
BEST = re.compile(r"[Bb]est val(?:idation loss)?,? (\d+\.\d{3}),?(?: was)? at step (\d+)")


@dataclass
class Night:
    run: Path
    record: dict[str, Any]
    complete: dict[str, Any]
    logs: list[dict[str, Any]]  # `overnight logs --json`
    logs_relayed: list[dict[str, Any]]  # ... --relayed
    md: str
    html: str  # report.html as text: tags removed, entities unescaped
    status: str  # `overnight status` after the run
    live_status: str  # `overnight status` while the supervisor ran (third attempt loading)
    seconds: float


def _cli(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    assert code == 0, err.getvalue()
    return out.getvalue()


def _worker_events(run: Path, name: str) -> list[dict[str, Any]]:
    path = run / "logs" / "worker.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, filter(None, lines)) if e["event"] == name]


def _supervisor_events(run: Path, name: str) -> list[dict[str, Any]]:
    path = run / "logs" / "supervisor.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, filter(None, lines)) if e["event"] == name]


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _text(page: str) -> str:
    """The words of report.html, a line per block (its <body>; the picture left out)."""
    body = page.split("<body>", 1)[1]
    body = re.sub(r"<img [^>]*>", "", body).replace("</td><td", "</td> | <td")
    body = re.sub(r"</(h\d|p|tr|pre)>", "\n", body)
    return html.unescape(re.sub(r"<[^>]+>", "", body)).strip()


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_model, corpus) -> Night:
    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("night")
    config = write_config(
        base / "night.yaml", tiny_model, corpus, iters=ITERS, steps_per_eval=EVERY,
        save_every=EVERY, steps_per_report=EVERY,
        early_stopping={"enabled": True, "patience": 3, "min_delta": 0.3, "warmup_steps": 0},
        debug={"inject": f"crash@{CRASH_AT},leak@{LEAK_AT}"}, supervisor=SUPERVISOR)
    run = base / "run"
    command = [sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir", str(run)]
    first = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        # the third attempt: its worker adopted by the supervisor (a worker starts during the
        # backoff and waits for its checkpoint choice: a stop before that abandons the start)
        _wait(lambda: [e for e in _supervisor_events(run, "worker_spawned")
                       if e["attempt"] == 3]
              and [e for e in _worker_events(run, "worker_started") if e["attempt"] == 3],
              90, "the third attempt")
        live = _cli("status", str(run))
        _cli("stop", str(run))
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert json.loads((run / "run.json").read_text())["state"] == "stopped"
    second = overnight("run", str(config), "--run-dir", str(run), timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    _cli("report", str(run), "--format", "html")
    md = _cli("report", str(run))
    assert md == (run / "report.md").read_text()
    return Night(
        run=run, record=json.loads((run / "run.json").read_text()),
        complete=json.loads((run / "COMPLETE").read_text()),
        logs=[json.loads(s) for s in _cli("logs", str(run), "--json").splitlines()],
        logs_relayed=[json.loads(s) for s in
                      _cli("logs", str(run), "--json", "--relayed").splitlines()],
        md=md, html=_text((run / "report.html").read_text()), status=_cli("status", str(run)),
        live_status=live, seconds=time.monotonic() - t0)


def _section(text: str, heading: str) -> str:
    """The text under `## heading` up to the next heading (markdown or html text)."""
    after = text.split(heading, 1)[1]
    return re.split(r"\n(?:## )?(?:Failures in detail|Planned ends|Numbers|More|What happened)"
                    r"\n", after, maxsplit=1)[0]


def _row(text: str, name: str) -> str:
    """The value of a row of the Numbers table (markdown, or report.html's text)."""
    m = re.search(rf"^\|? ?{re.escape(name)} +\| (.*?)(?: +\|)?$", text, re.M)
    assert m is not None, name
    return m.group(1)


def counts(lines: list[dict[str, Any]]) -> Counter[str]:
    """`jq -r .event | sort | uniq -c`."""
    return Counter(x["event"] for x in lines)


# ---- the story -------------------------------------------------------------------------


def test_the_night_is_the_one_asked_for(night):
    rec = night.record
    classes = [a["classification"] for a in rec["attempts"]]
    assert classes == ["crash", "planned_restart", "graceful_stop", "early_stopped"]
    assert [a["injected"] for a in rec["attempts"]] == [[f"crash@{CRASH_AT}"],
                                                       [f"leak@{LEAK_AT}"], [], []]
    assert rec["state"] == "early_stopped"
    print(f"\nMEASURED consistency_night_s={night.seconds:.1f}")


def test_one_best_checkpoint_everywhere(night):
    """The lowest validation loss and its step: the worker's evaluations, run.json, COMPLETE,
    the early-stop reason, the report (md, html) and status say the same; the min_delta
    reference is a second number with its own name."""
    evals = _worker_events(night.run, "evaluated")
    step, val = min(((e["step"], e["val_loss"]) for e in evals), key=lambda x: x[1])
    assert (evals[-1]["best_step"], evals[-1]["best_val_loss"]) == (step, val)
    best = night.record["best_checkpoint"]
    assert (best["step"], best["val_loss"]) == (step, val)
    assert (night.complete["best_step"], night.complete["best_val_loss"]) == (step, val)
    said = f"{val:.3f}", str(step)
    for name, text in (("md", night.md), ("html", night.html), ("status", night.status),
                       ("reason", night.record["reason"])):
        found = set(BEST.findall(text))
        assert found == {said}, (name, found, said)
    assert f"best     step {step}  val_loss {val:.3f}" in night.status
    reference = re.search(r"no improvement of 0\.3 on (\d+\.\d{3}) \(step (\d+)\) in 3 "
                          r"evaluations; best val", night.record["reason"])
    assert reference is not None, night.record["reason"]
    ref_val, ref_step = float(reference.group(1)), int(reference.group(2))
    assert ref_step < step and ref_val > val + 0.0005  # two different numbers, two names
    assert {e["step"]: e["val_loss"] for e in evals}[ref_step] == pytest.approx(ref_val,
                                                                                abs=5e-4)


def test_the_live_status_has_one_best(night):
    """While the supervisor runs, the verdict line and the table come from one view."""
    first = night.live_status.splitlines()[0]
    table = re.search(r"best     step (\d+)  val_loss (\d+\.\d{3})", night.live_status)
    assert table is not None, night.live_status
    assert set(BEST.findall(first)) == {(table.group(2), table.group(1))}


def test_the_verdict_is_one_line_everywhere(night):
    md_verdict = night.md.splitlines()[0].removeprefix("# ✅ ")
    assert night.html.splitlines()[0].strip() == f"✅ {md_verdict}"
    assert night.status.splitlines()[0] == md_verdict
    assert _cli("report", str(night.run), "--quiet").strip() == md_verdict


def test_failures_and_restarts_are_counted_once_and_alike(night):
    rec, totals = night.record, night.record["totals"]
    assert (totals["attempts"], totals["restarts"], totals["failures"],
            totals["planned_restarts"]) == (4, 3, 1, 1)
    crash, back = rec["attempts"][0]["end_step"], rec["attempts"][1]["resumed_from"]["step"]
    for text in (night.md, night.html):
        verdict = text.splitlines()[0]
        assert f"3 restarts: 1 after a failure (injected crash at {crash}), 2 planned (" \
               in verdict, verdict
        failures = _section(text, "Failures in detail")
        assert re.findall(r"Attempt (\d+): ", failures) == ["1"], failures
        planned = _section(text, "Planned ends")
        assert re.findall(r"Attempt (\d+): ", planned) == ["2", "3"], planned
        assert "injected memory restart" in planned and "stop on request" in planned
        assert _row(text, "attempts").startswith("4 (3 restarts); 1 failure, 2 planned ends")
        lost = _row(text, "time lost to failures")
        assert f"redoing {crash - back} steps" in lost, lost  # the crash's, nothing planned
        assert "memory restart ×1, stop on request ×1" in _row(text, "planned ends")
    assert "attempts 4 (3 restarts)  failures 1  planned ends 2" in night.status
    exited = [x for x in night.logs if x["event"] == "worker_exited"]
    assert [x["level"] for x in exited].count("warning") == 1  # failures are warnings


def test_the_final_step_is_the_same_everywhere(night):
    final = night.record["final_step"]
    assert night.complete["step"] == final and night.complete["status"] == "early_stopped"
    assert f"early-stopped at step {final}/{ITERS}" in night.md.splitlines()[0]
    assert f"Final adapters (step {final})" in night.md and f"Final adapters (step {final})" \
        in night.html
    assert f"step     {final} / {ITERS}" in night.status
    ended = [x for x in night.logs if x["event"] == "run_ended"]
    assert [x["state"] for x in ended] == ["stopped", "early_stopped"]
    assert ended[-1]["final_step"] == final
    stopping = [x for x in night.logs if x["event"] == "worker_stopping"]
    assert stopping[-1]["step"] == final
    metrics = [json.loads(s) for s in (night.run / "logs" / "metrics.jsonl").read_text()
               .splitlines()]
    assert max(m["step"] for m in metrics) == final


def test_every_event_is_one_record_in_the_merged_logs(night):
    """`overnight logs --json | jq -r .event | sort | uniq -c` counts each event once."""
    c = counts(night.logs)
    rec = night.record
    attempts = rec["attempts"]
    assert c["worker_spawned"] == c["worker_started"] == c["worker_exited"] == len(attempts)
    assert c["checkpoint_saved"] == sum(len(a["checkpoints_saved"]) for a in attempts)
    assert {x["source"] for x in night.logs if x["event"] in ("checkpoint_saved",
                                                              "worker_stopping")} == {"worker"}
    # three deliberate exits (planned restart, stop, early stop); the crash said nothing
    assert c["worker_stopping"] == 3
    assert c["fault_injected"] == 2 == len(list((night.run / "inject").iterdir()))
    assert c["run_complete"] == 1 and (night.run / "COMPLETE").exists()
    rows = re.findall(r"^\|\s+(\d+) \|", _section(night.md, "What happened"), re.M)
    assert rows == ["1", "2", "3", "4"]
    unique = len({x["step"] for x in night.logs if x["event"] == "evaluated"})
    validation = _row(night.md, "validation")
    assert f"({unique} evaluations" in validation
    again = c["evaluated"] - unique
    assert (f", {again} repeated after restarts)" in validation) == (again > 0), validation
    # the supervisor's copies, with --relayed: marked, one for each worker line
    relayed = [x for x in night.logs_relayed if x.get("relayed_from") == "worker"]
    assert len(night.logs_relayed) == len(night.logs) + len(relayed)
    mine = Counter((x["event"], x["attempt"], x["step"]) for x in night.logs
                   if x["event"] in ("checkpoint_saved", "worker_stopping"))
    assert Counter((x["event"], x["attempt"], x["step"]) for x in relayed) == mine
    assert all(x["source"] == "supervisor" for x in relayed)


def test_injected_faults_are_called_injected(night):
    assert f"(injected: `crash@{CRASH_AT}`)" in night.md
    for text in (night.md, night.html):
        failures = _section(text, "Failures in detail").replace("`", "")
        assert f"injected crash at step {night.record['attempts'][0]['end_step']}. Injected " \
               f"on purpose (debug.inject crash@{CRASH_AT}): it emulates a Metal " \
               "command-buffer abort" in failures.replace("*", ""), failures
        assert "(the error is the injected fault's emulation)" in failures
    out = (night.run / "logs" / "worker-1.log").read_text()
    note = out.index(f"overnight: injected fault crash@{CRASH_AT} (debug.inject): the next "
                     "line emulates a Metal command-buffer abort")
    assert note < out.index("[METAL] Command buffer execution failed")
    exited = [x for x in night.logs if x["event"] == "worker_exited"]
    assert [x.get("injected") for x in exited] == [[f"crash@{CRASH_AT}"], [f"leak@{LEAK_AT}"],
                                                   None, None]


def test_the_progress_line_shows_the_evaluation_of_its_step(night):
    """At an evaluation step the progress line's val= is that evaluation (it was the one
    before: the line was printed before the evaluation ran)."""
    checked = 0
    for n in range(1, 5):
        evals = {e["step"]: e for e in _worker_events(night.run, "evaluated")
                 if e["attempt"] == n}
        out = (night.run / "logs" / f"worker-{n}.log").read_text()
        for m in re.finditer(r"\| step (\d+)/\d+ \|.*? val=(\d+\.\d\d) \(best (\d+\.\d\d)\)",
                             out):
            e = evals.get(int(m.group(1)))
            if e is not None:
                assert (m.group(2), m.group(3)) == (f"{e['val_loss']:.2f}",
                                                    f"{e['best_val_loss']:.2f}"), m.group(0)
                checked += 1
    assert checked >= 5
