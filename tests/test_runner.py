"""supervisor/daemon/runner.py with a fake spawner and real checkpoints on disk: a checkpoint
the worker refuses (exit 25, checkpoint_refused) is quarantined and the next start takes the
next older valid one — keeping what the decision before asked of it (a rollback's resume
point and the steps it skips)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import structlog

from shared import checkpoint as ckpt
from shared.config import resolve
from shared.layout import RunDir
from supervisor.daemon.policy import Decision, Policy
from supervisor.daemon.record import RecordKeeper
from supervisor.daemon.runner import AttemptRunner
from supervisor.daemon.state import Verdict
from tests.checkpoint_support import trainer_state
from tests.test_loop import FakeSpawner

REFUSED = 25  # ExitCode.CHECKPOINT_REFUSED, pinned


def save(run: RunDir, step: int) -> None:
    def files(d: Path) -> None:
        for name, key in ((ckpt.ADAPTERS, "lora_a"), (ckpt.OPTIMIZER, "m")):
            head = json.dumps({key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
            (d / name).write_bytes(struct.pack("<Q", len(head)) + head.encode() + bytes(4))
        (d / ckpt.ADAPTER_CONFIG).write_text("{}")
        (d / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state(step, 100).to_dict()))
    ckpt.write_checkpoint(run.checkpoints, step, files)


def test_a_refused_checkpoint_is_set_aside_and_the_rollback_it_served_is_kept(tmp_path):
    config = resolve({"model": "m", "data": "d", "iters": 100})
    run = RunDir(tmp_path / "run")
    run.create()
    for step in (10, 20, 30):
        save(run, step)
    record, _ = RecordKeeper.open(run.record, "r1", run.root, tmp_path / "c.yaml", {}, "h")
    spawner = FakeSpawner()
    runner = AttemptRunner(config=config, config_path=tmp_path / "c.yaml", run=run,
                           record=record, spawner=spawner,
                           policy=Policy(config.supervisor, random.Random(0)), env={},
                           command=["worker"], log=structlog.get_logger())
    # a rollback was decided: resume before step 25, skip the data through step 27
    runner.pending = Decision(Verdict.RESTART, "rollback", "grad_spike at 25",
                              rollback_before=25, bad_until=27)
    runner.start(runner.chooser()(), now=0.0)
    argv, proc = spawner.started[0]
    assert argv[argv.index("--resume") + 1].endswith("step-0000020")

    proc.returncode = REFUSED  # the worker refuses step 20 (its tensors do not fit)
    decision = runner.finish(REFUSED, now=1.0)
    assert (decision.verdict, decision.action) == (Verdict.RESTART, "quarantine_checkpoint")
    assert (decision.rollback_before, decision.bad_until, decision.delay) == (25, 27, 0.0)
    assert not (run.checkpoints / "step-0000020").exists()
    assert [q.checkpoint for q in record.record.quarantined] == ["step-0000030",
                                                                 "step-0000020"]
    assert record.record.quarantined[1].reason.startswith("refused by the worker")
    assert record.attempts[0].action.value == "quarantine_checkpoint"

    runner.start(runner.chooser()(), now=2.0)
    argv, _ = spawner.started[1]
    assert argv[argv.index("--resume") + 1].endswith("step-0000010")
    assert argv[argv.index("--skip-steps") + 1] == "17"  # through step 27, from step 10
