"""shared/checkpoint.py: atomic writes, the validator, retention and quarantine."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from shared import checkpoint as ckpt
from shared.errors import CheckpointError
from tests.checkpoint_support import trainer_state


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A real safetensors file written by the format's rules (as mx.save_safetensors does)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": {np.float32: "F32", np.float16: "F16"}[arr.dtype.type],
                        "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write(dir: Path, step: int, value: float = 1.0, hook=None) -> Path:
    def files(tmp: Path) -> None:
        _safetensors(tmp / ckpt.ADAPTERS, {"a.lora_a": np.full((2, 3), value, np.float32)})
        _safetensors(tmp / ckpt.OPTIMIZER, {"a.lora_a.m": np.zeros((2, 3), np.float16)})
        (tmp / ckpt.ADAPTER_CONFIG).write_text("{}")
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state(step).to_dict()))

    return ckpt.write_checkpoint(dir, step, files, hook)


def test_written_checkpoint_validates(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    assert path.name == "step-0000010"
    result = ckpt.validate(path)
    assert result.ok, result.reason
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == set(ckpt.REQUIRED_FILES)
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_manifest_means_the_checkpoint_does_not_exist(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    (path / ckpt.MANIFEST).unlink()
    assert "no manifest.json" in ckpt.validate(path).reason


def test_one_flipped_byte_is_caught_by_the_hash(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    data = bytearray((path / ckpt.ADAPTERS).read_bytes())
    data[-1] ^= 0xFF
    (path / ckpt.ADAPTERS).write_bytes(bytes(data))
    result = ckpt.validate(path)
    assert not result.ok and "sha256" in result.reason
    assert ckpt.validate(path, deep=False).ok  # the quick listing only checks sizes


def test_truncated_file_is_caught_by_its_size(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    f = path / ckpt.OPTIMIZER
    f.write_bytes(f.read_bytes()[:-4])
    assert "bytes" in ckpt.validate(path, deep=False).reason


def test_non_finite_tensors_are_invalid_even_with_a_matching_manifest(tmp_path: Path) -> None:
    path = write(tmp_path, 10, value=float("nan"))
    result = ckpt.validate(path)
    assert not result.ok and "non-finite" in result.reason


def test_state_must_match_the_directory(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    target = tmp_path / "step-0000020"
    path.rename(target)
    assert "does not match directory" in ckpt.validate(target).reason


def test_a_crash_before_the_manifest_leaves_no_checkpoint(tmp_path: Path) -> None:
    def die(_tmp: Path) -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this runs

    write(tmp_path, 10)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 20, hook=die)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10]
    found = ckpt.newest_valid(tmp_path)
    assert found is not None and found[0].step == 10


def test_newest_valid_skips_invalid_ones_and_reports_them(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write(tmp_path, step)
    (tmp_path / "step-0000030" / ckpt.MANIFEST).unlink()
    seen: list[int] = []
    found = ckpt.newest_valid(tmp_path, on_invalid=lambda info, _: seen.append(info.step))
    assert found is not None and found[0].step == 20 and seen == [30]
    before = ckpt.newest_valid(tmp_path, before_step=20)
    assert before is not None and before[0].step == 10


def test_quarantine_moves_aside_never_deletes(tmp_path: Path) -> None:
    path = write(tmp_path, 10)
    info = ckpt.list_checkpoints(tmp_path)[0]
    moved = ckpt.quarantine(info, tmp_path / "quarantine")
    assert not path.exists() and (moved / ckpt.ADAPTERS).exists()
    assert ckpt.list_checkpoints(tmp_path) == []


def test_retention_keeps_the_last_n_and_the_best(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        write(tmp_path, step)
    deleted = ckpt.apply_retention(tmp_path, keep_last=2, best_step=20)
    assert sorted(deleted) == [10, 30]
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [50, 40, 20]


def test_retention_leaves_incomplete_checkpoints_to_the_validator(tmp_path: Path) -> None:
    for step in (10, 20):
        write(tmp_path, step)
    (tmp_path / "step-0000020" / ckpt.MANIFEST).unlink()
    assert ckpt.apply_retention(tmp_path, keep_last=1, best_step=None) == []


def test_rewriting_a_step_replaces_it_atomically(tmp_path: Path) -> None:
    write(tmp_path, 10, value=1.0)
    write(tmp_path, 10, value=2.0)
    assert ckpt.validate(tmp_path / "step-0000010").ok
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10]
    assert not list(tmp_path.glob(".tmp-*"))


def test_writer_must_produce_every_required_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="did not produce"):
        ckpt.write_checkpoint(tmp_path, 5, lambda tmp: (tmp / ckpt.ADAPTERS).write_bytes(b""))
