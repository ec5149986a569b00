"""shared/trainer_state.py with the validator (shared/checkpoint.py): what validates is what
the worker can resume from, checkpoints written by earlier versions still decode, and a
validation handed over by manifest hash is re-checked cheaply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared import checkpoint as ckpt
from shared import trainer_state as ts
from shared.errors import CheckpointError
from tests.checkpoint_support import trainer_state
from tests.test_checkpoint import write

OLD_CHECKPOINT = (Path(__file__).resolve().parent / "fixtures" / "run-before-11" / "checkpoints"
                  / "step-0000060")


def rewrite_state(path: Path, change) -> None:
    """Edit trainer_state.json and re-manifest it (as if the worker had written it so)."""
    state = json.loads((path / ckpt.TRAINER_STATE).read_text())
    change(state)
    data = json.dumps(state).encode()
    (path / ckpt.TRAINER_STATE).write_bytes(data)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.TRAINER_STATE] = {"sha256": ckpt.sha256_file(path / ckpt.TRAINER_STATE),
                                             "bytes": len(data)}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_written_before_the_typed_state_validates_and_decodes(tmp_path):
    path = shutil.copytree(OLD_CHECKPOINT, tmp_path / OLD_CHECKPOINT.name)
    result = ckpt.validate(path)
    assert result.ok, result.reason
    s = result.state
    assert s is not None and s.schema_version == 1  # no version field then: version 1
    assert (s.step, s.total_steps, s.data_position, s.reason) == (60, 60, 60, "final")
    assert s.best.step == 60 and s.best.val_loss == pytest.approx(2.26746, abs=1e-5)
    assert s.batch.effective == 4 and s.grad_spike.first_bad_step == -1
    assert len(s.loss_history) == 50 and s.data is not None and s.data.malformed_lines == 1


@pytest.mark.parametrize("key", ["grad_spike", "early_stopping", "best", "batch", "lr_scale",
                                 "loss_history", "data_position", "config_hash"])
def test_a_state_without_a_field_resume_reads_is_not_a_valid_checkpoint(tmp_path, key):
    path = write(tmp_path, 10)
    rewrite_state(path, lambda s: s.pop(key))
    result = ckpt.validate(path)
    assert not result.ok
    assert result.reason == f"step-0000010/trainer_state.json: missing field {key!r}"


@pytest.mark.parametrize(("change", "needle"), [
    (lambda s: s["best"].update(val_loss="low"), "best.val_loss: expected a number, got 'low'"),
    (lambda s: s["grad_spike"].update(history=None), "grad_spike.history: expected a list"),
    (lambda s: s.update(step="10"), "step: expected an integer, got '10'"),
    (lambda s: s.update(schema_version=2), "expected schema_version 1, got 2"),
    (lambda s: s.update(surprise=1), "unexpected fields ['surprise']"),
])
def test_a_malformed_state_is_named_by_field(tmp_path, change, needle):
    path = write(tmp_path, 10)
    rewrite_state(path, change)
    result = ckpt.validate(path)
    assert not result.ok and needle in result.reason, result.reason


def test_the_state_round_trips_through_its_json():
    state = trainer_state(7, 50, loss_history=(1.5, 1.25), reason="best")
    assert ts.decode(json.loads(json.dumps(state.to_dict())), "x") == state


def test_load_names_the_file_when_it_is_not_json(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: not valid JSON"):
        ts.load(tmp_path / "trainer_state.json")


def test_a_trusted_manifest_skips_the_hashes_only_while_it_is_the_same(tmp_path):
    path = write(tmp_path, 10)
    first = ckpt.validate(path)
    assert first.ok and first.manifest_sha256 == ckpt.manifest_sha256(path)
    data = bytearray((path / ckpt.ADAPTERS).read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only a full validation notices
    (path / ckpt.ADAPTERS).write_bytes(bytes(data))
    assert ckpt.validate(path, trusted_manifest=first.manifest_sha256).ok
    assert not ckpt.validate(path).ok
    assert not ckpt.validate(path, trusted_manifest="0" * 64).ok  # another manifest: full check
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["created"] += 1  # a rewritten manifest is another one
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert not ckpt.validate(path, trusted_manifest=first.manifest_sha256).ok


def test_a_trusted_manifest_still_checks_sizes_and_the_state(tmp_path):
    path = write(tmp_path, 10)
    sha = ckpt.validate(path).manifest_sha256
    (path / ckpt.OPTIMIZER).write_bytes((path / ckpt.OPTIMIZER).read_bytes()[:-4])
    assert "bytes" in ckpt.validate(path, trusted_manifest=sha).reason
