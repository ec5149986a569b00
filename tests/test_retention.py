"""Retention and what killed writers leave (shared/checkpoint.py, issue 12): a delete is a
rename first, so a kill in the middle never leaves a half-deleted checkpoint for
`checkpoints --verify` to list as invalid forever; leftovers are cleaned at start by the
worker and the supervisor; the newest valid checkpoint is never deleted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from shared import checkpoint as ckpt
from tests.conftest import overnight, write_config
from tests.supervisor_support import ROOT, record, run_inprocess
from tests.supervisor_support import write_config as fake_config
from tests.test_checkpoint import write

# A child that runs retention and is SIGKILLed after the first file of the first victim is
# gone: the middle of a delete.
KILLED_MID_DELETE = """
import os, shutil, signal, sys
from pathlib import Path
from shared import checkpoint as ckpt

real = shutil.rmtree
def rmtree(path, *args, **kwargs):
    path = Path(path)
    first = sorted(p for p in path.iterdir() if p.is_file())[0]
    first.unlink()
    os.kill(os.getpid(), signal.SIGKILL)
ckpt.shutil.rmtree = rmtree
ckpt.apply_retention(Path(sys.argv[1]), keep_last=2, best_step=None)
"""


def _steps(checkpoints: Path) -> list[int]:
    return [c.step for c in ckpt.list_checkpoints(checkpoints)]


def _verify(checkpoints: Path) -> dict[int, bool]:
    """What `overnight checkpoints --verify` judges: every listed checkpoint, validated."""
    return {c.step: ckpt.validate(c.path).ok for c in ckpt.list_checkpoints(checkpoints)}


def test_a_kill_in_the_middle_of_retention_leaves_no_invalid_checkpoint(tmp_path):
    for step in (10, 20, 30):
        write(tmp_path, step)
    child = subprocess.run([sys.executable, "-c", KILLED_MID_DELETE, str(tmp_path)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert child.returncode == -signal.SIGKILL
    assert _verify(tmp_path) == {30: True, 20: True}  # step 10 is no checkpoint any more
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".deleting-step-0000010-")
    assert ckpt.clean_leftovers(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000020", "step-0000030"]


def test_retention_never_deletes_the_newest_valid_checkpoint(tmp_path):
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    with open(newest / ckpt.ADAPTERS, "r+b") as f:  # cut short: its manifest no longer holds
        f.truncate(10)
    assert ckpt.apply_retention(tmp_path, keep_last=1, best_step=None) == []
    assert _verify(tmp_path) == {20: False, 10: True}
    write(tmp_path, 30)  # a valid newer one: now the older ones go, as retention says
    assert ckpt.apply_retention(tmp_path, keep_last=1, best_step=None) == [20, 10]
    assert _verify(tmp_path) == {30: True}


def test_leftovers_are_removed_and_a_complete_temp_checkpoint_is_put_in_place(tmp_path):
    write(tmp_path, 10)
    half_deleted = tmp_path / ".deleting-step-0000005-4242"
    half_deleted.mkdir()
    (half_deleted / ckpt.MANIFEST).write_text("{}")
    half_written = tmp_path / ".tmp-step-0000030-4242"
    half_written.mkdir()
    (half_written / ckpt.ADAPTERS).write_bytes(b"partial")
    # a kill between the two renames of a re-save: the complete new copy is only a temp dir
    resaved = write(tmp_path, 20)
    os.replace(resaved, tmp_path / ".tmp-step-0000020-4243")
    done = ckpt.clean_leftovers(tmp_path)
    assert done == [".deleting-step-0000005-4242", ".tmp-step-0000020-4243 -> step-0000020",
                    ".tmp-step-0000030-4242"]
    assert _verify(tmp_path) == {20: True, 10: True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _plant_leftovers(checkpoints: Path) -> None:
    (checkpoints / ".deleting-step-0000001-99999").mkdir(parents=True)
    (checkpoints / ".tmp-step-0000002-99999").mkdir()
    (checkpoints / ".tmp-step-0000002-99999" / ckpt.ADAPTERS).write_bytes(b"partial")


def test_the_supervisor_cleans_leftovers_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.01")
    monkeypatch.delenv("OVERNIGHT_INJECT", raising=False)
    run_dir = tmp_path / "run"
    _plant_leftovers(run_dir / "checkpoints")
    assert run_inprocess(fake_config(tmp_path, iters=20), run_dir) == 0
    assert record(run_dir)["state"] == "finished"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    removed = [json.loads(line) for line in (run_dir / "logs" / "supervisor.jsonl")
               .read_text().splitlines() if "checkpoint_leftovers_removed" in line]
    assert removed[0]["names"] == [".deleting-step-0000001-99999", ".tmp-step-0000002-99999"]


def test_the_worker_cleans_leftovers_at_start(tmp_path, tiny_model, corpus):
    run_dir = tmp_path / "run"
    _plant_leftovers(run_dir / "checkpoints")
    config = write_config(tmp_path / "w.yaml", tiny_model, corpus, iters=5, save_every=5,
                          steps_per_eval=5)
    done = overnight("train", str(config), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert "checkpoint_leftovers_removed" in (run_dir / "logs" / "worker.jsonl").read_text()
