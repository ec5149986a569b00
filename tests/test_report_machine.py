"""`overnight report` on a recorded night on a Mac (tests/fixtures/run-mac-night: run.json,
the supervisor's log and the step metrics as the supervisor writes them) shows a machine
restart with its kernel panic, a worker recycle before Metal's resource limit, a battery
pause and a throttled stretch — in words (supervisor/morning/machine.py's section, the
timeline, the verdict) and in the picture (report_plot.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from supervisor.morning import report_plot
from supervisor.morning.runfacts import gather
from tests.conftest import overnight, subprocess_env

FIXTURE = Path(__file__).parent / "fixtures" / "run-mac-night"


@pytest.fixture
def night(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "mac-night"))


def test_the_report_tells_the_machines_night_in_words(night):
    done = overnight("report", str(night), env=subprocess_env(TZ="UTC"), timeout=120)
    assert done.returncode == 0, done.stderr
    text = (night / "report.md").read_text()
    assert text.splitlines()[0] == (
        "# ✅ finished 400/400 steps in 7h21m; 5 restarts: 3 after failures (Metal resource "
        "limit at 120; Metal resource limit at 215; machine restart at 352), 2 planned (worker "
        "recycle at 292; battery pause at 320); best val 1.742 at step 400")
    section = text.split("## What the machine did")[1].split("## Numbers")[0]
    paragraphs = [p for p in section.strip().split("\n\n")]
    assert paragraphs[0] == ("**01:05:10–01:50:10 (45m00s) — throttled for heat** "
                             "(CPU_Speed_Limit = 35); its steps took 3.0× as long as the others.")
    assert paragraphs[1].startswith("**04:06:07 — worker recycled** at step 292 (attempt 3), "
                                    "before Metal's resource limit")
    assert paragraphs[2].startswith("**04:30:33–05:05:33 (35m00s) — paused on battery** "
                                    "(Battery Power, 18%; discharging)")
    assert "Not a failure." in paragraphs[2]
    assert paragraphs[3].startswith("**05:37:15 — the machine restarted.** the machine "
                                    "restarted at 05:37")
    assert "panic(cpu 4 caller 0xfffffe0028a2f6ac): AGX firmware panic" in paragraphs[3]
    assert "| planned ends          | worker recycle ×1, battery pause ×1" in text
    assert (night / "report.png").stat().st_size > 10_000
    # A recorded night has no adapters or checkpoints: not "no checkpoint was saved" under a
    # heading that says it finished with a best value at step 400.
    use = text.split("## Use the result")[1].split("##")[0].strip()
    assert use == (
        f"No adapters or checkpoints in `{night}`, but COMPLETE says the run finished at step "
        "400 and run.json names its newest checkpoint, step 400 "
        "(`/Users/ada/runs/mac-night/checkpoints/step-0000400`): this directory was moved or "
        "copied without `adapters/` and `checkpoints/`, or they were deleted.")


def test_the_picture_shades_heat_and_the_pause_and_marks_restart_and_recycle(night):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = gather(night)
    fig = plt.figure()
    loss, steps = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    report_plot._loss_panel(loss, facts)
    report_plot._progress_panel(steps, facts)
    labels = set(steps.get_legend_handles_labels()[1])
    assert {"throttled (heat)", "paused on battery", "machine restarted",
            "worker recycle (attempt 3 ended)", "battery pause (attempt 4 ended)",
            "machine restart (attempt 5 ended)",
            "Metal resource limit (attempt 1 ended)"} <= labels
    marks = {t.get_text().strip() for t in loss.texts}
    assert {"worker recycle @292", "battery pause @320", "machine restart @352",
            "Metal resource limit @120"} <= marks
    plt.close(fig)


def test_status_of_a_best_value_without_its_checkpoint_prints_no_none(night):
    """run.json's best_checkpoint.path is null when no checkpoint of that step is on disk
    (an evaluation before its checkpoint, or a night recorded on another machine)."""
    done = overnight("status", str(night), env=subprocess_env(TZ="UTC"), timeout=60)
    assert done.returncode == 0, done.stderr
    best = [line for line in done.stdout.splitlines() if line.startswith("best ")]
    assert best == ["best     step 400  val_loss 1.742  (no checkpoint of that step on disk)"]
