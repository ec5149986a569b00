"""supervisor/demo.py: `overnight demo` — the README's first command — trains the tiny model
under the real supervisor, recovers from an injected crash and hang, and prints the report."""

from __future__ import annotations

import re
import time

import pytest

from shared import cli
from supervisor.morning.demo import default_faults, narrate
from supervisor.morning.runlogs import LogLine
from tests.conftest import overnight


@pytest.mark.slow
def test_the_demo_recovers_from_a_crash_and_a_hang_and_prints_the_report(tmp_path):
    t0 = time.monotonic()
    done = overnight("demo", "--keep", str(tmp_path), timeout=240)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert f"demo: {tmp_path}" in out
    # the narration: two failures noticed, two restarts from checkpoints, the end; each
    # fault said to be injected, the Metal-style crash as the emulation it is
    assert "worker:     injecting crash@70 on purpose (debug.inject), emulating a Metal " \
           "command-buffer abort" in out
    assert re.search(r"attempt 1 ended at step \d+: crash, injected \(crash@70\)", out)
    assert "injecting hang@150 on purpose" in out
    assert "worker unhealthy: hang, no heartbeat for 5.0 s" in out
    assert re.search(r"attempt 2 started \(resuming from checkpoint \d+\)", out)
    assert re.search(r"attempt 3 started \(resuming from checkpoint 150\)", out)
    assert "run ended: finished (all steps done)" in out
    # the report, verdict first
    report = out.split("The report (`overnight report")[1]
    verdict = report.splitlines()[2]
    assert re.fullmatch(r"# ✅ finished 200/200 steps in \S+; 2 restarts \(injected crash at "
                        r"\d+; injected hang at 150\); best val \d\.\d{3} at step \d+",
                        verdict), verdict
    assert "Injected on purpose (`debug.inject` crash@70): it emulates a Metal command-buffer" \
           " abort" in report
    run = tmp_path / "run"
    assert (run / "report.md").read_text().splitlines()[0] == verdict
    assert (run / "report.png").stat().st_size > 30_000
    assert (run / "adapters" / "adapters.safetensors").exists()
    print(f"\nMEASURED demo_wall_s={elapsed:.1f}")
    assert elapsed < 120


def test_the_demo_will_not_reuse_a_run_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert cli.main(["demo", "--keep", str(tmp_path)]) == 78
    err = capsys.readouterr().err.strip()
    assert err == (f"overnight demo: {tmp_path / 'run'}: already holds a run; choose another "
                   "--run-dir or --keep directory, or remove it")


def test_faults_scale_with_the_steps_and_the_narration_is_short():
    assert default_faults(200) == "crash@70,hang@150"
    exited = LogLine(0.0, {"source": "supervisor", "event": "worker_exited", "attempt": 1,
                           "step": 69, "classification": "crash", "detail": "x" * 200})
    text = narrate(exited)
    assert text is not None and text.startswith("supervisor: ✗ attempt 1 ended at step 69: crash")
    assert len(text) < 160
    assert narrate(LogLine(0.0, {"source": "worker", "event": "phase_changed"})) is None


def test_the_narration_says_a_fault_was_injected_and_what_it_emulates():
    """On Linux the injected crash prints a Metal GPU error; the narration said only
    "crash (killed by SIGABRT: Metal command buffer abort: ...)", as if it were real."""
    injected = LogLine(0.0, {"source": "worker", "event": "fault_injected", "attempt": 1,
                             "fault": "crash@70", "kind": "crash", "step": 70,
                             "emulates": "a Metal command-buffer abort (SIGABRT)"})
    assert narrate(injected) == (
        "worker:     injecting crash@70 on purpose (debug.inject), emulating a Metal "
        "command-buffer abort (SIGABRT): not a real failure")
    exited = {"source": "supervisor", "event": "worker_exited", "attempt": 1, "step": 69,
              "classification": "crash", "detail": "killed by SIGABRT: Metal command buffer"}
    assert narrate(LogLine(0.0, {**exited, "injected": ["crash@70"]})) == (
        "supervisor: ✗ attempt 1 ended at step 69: crash, injected (crash@70) (killed by "
        "SIGABRT: Metal command buffer)")
    # a fault of another kind fired in the attempt: its crash is a real one
    text = narrate(LogLine(0.0, {**exited, "injected": ["leak@50"]}))
    assert text is not None and "injected" not in text
