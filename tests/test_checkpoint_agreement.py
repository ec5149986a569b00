"""The validator (shared/checkpoint.py, shared/checkpoint_tensors.py) and the worker
(worker/resume.py, worker/checkpointing.py) agree on which checkpoints can be resumed from;
a checkpoint the worker refuses is quarantined by the supervisor and the next older one used;
a changed config names its changed keys. Real checkpoints of the tiny model, damaged in each
way with a consistent manifest (every hash and size right), a real worker and supervisor.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from shared import checkpoint as ckpt
from shared.config_identity import config_hash
from tests.conftest import overnight, subprocess_env, write_config
from tests.supervisor_support import ROOT, record

FAST = {"heartbeat_timeout": 10.0, "startup_timeout": 60.0, "stop_timeout": 10.0,
        "backoff_initial": 0.2, "backoff_max": 1.0, "sample_interval": 1.0,
        "caffeinate": False}
REFUSED = 25  # ExitCode.CHECKPOINT_REFUSED, pinned
BAD_CONFIG = 78
A = "model.layers.1.mlp.down_proj.lora_a"  # (128, 4): rank 4, the MLP's 128 inputs
B = "model.layers.1.mlp.down_proj.lora_b"  # (4, 64)


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_model, corpus) -> tuple[Path, Path]:
    """(config, run dir) of one uninterrupted 20-step run: checkpoints at 10 and 20."""
    base = tmp_path_factory.mktemp("agreement")
    config = write_config(base / "agree.yaml", tiny_model, corpus, iters=20,
                          supervisor=FAST)
    run = base / "run"
    done = overnight("train", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-0000010", "step-0000020"]
    return config, run


def unfinished_copy(original: tuple[Path, Path], tmp_path: Path) -> Path:
    """The run as if killed after its step-20 checkpoint: no COMPLETE, no final adapters."""
    run = tmp_path / "run"
    shutil.copytree(original[1], run)
    (run / "COMPLETE").unlink()
    shutil.rmtree(run / "adapters")
    return run


def remanifest(path: Path) -> None:
    """Rewrite manifest.json for the files as they are now: damage the hashes cannot see."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    for name in manifest["files"]:
        f = path / name
        manifest["files"][name] = {"sha256": ckpt.sha256_file(f), "bytes": f.stat().st_size}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def edit_tensors(path: Path, name: str, change: Callable[[dict], None]) -> None:
    tensors = dict(mx.load(str(path / name)))
    change(tensors)
    meta = {"format": "mlx"} if name == ckpt.ADAPTERS else None
    mx.save_safetensors(str(path / name), tensors, metadata=meta)


def edit_json(path: Path, name: str, change: Callable[[dict], None]) -> None:
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


def drop(*keys: str) -> Callable[[dict], None]:
    return lambda t: [t.pop(k) for k in keys]


def reshape(rows: int, *keys: str) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        for k in keys:
            t[k] = mx.zeros((rows, *t[k].shape[1:]), t[k].dtype)
    return change


def wrong_hash(s: dict) -> None:
    s["config_hash"] = "0123456789abcdef"


def wrong_batch(s: dict) -> None:
    s["batch"]["effective"] = 3


def rank_8(c: dict) -> None:
    c["lora_parameters"]["rank"] = 8


# (kind, damage, who refuses it, what the refusal says)
KINDS = {
    "config_hash": ([(ckpt.TRAINER_STATE, wrong_hash)], "validator",
                    "config_hash 0123456789abcdef is not the hash of the config stored"),
    "batch_split": ([(ckpt.TRAINER_STATE, wrong_batch)], "validator",
                    "batch: effective 3 is not batch_size 4 x grad_accumulation_steps 1"),
    "adapter_missing": ([(ckpt.ADAPTERS, drop(A))], "validator",
                        f"optimizer.safetensors has {A}.m, adapters.safetensors no tensor"),
    "optimizer_state_missing": ([(ckpt.OPTIMIZER, drop(f"{A}.m", f"{A}.v"))], "validator",
                                f"adapters.safetensors has {A}, optimizer.safetensors no "
                                "state"),
    "lora_b_missing_everywhere": ([(ckpt.ADAPTERS, drop(B)),
                                   (ckpt.OPTIMIZER, drop(f"{B}.m", f"{B}.v"))], "validator",
                                  f"adapters.safetensors has {A} but not {B}"),
    "adapter_wrong_shape": ([(ckpt.ADAPTERS, reshape(127, A))], "validator",
                            f"optimizer.safetensors {A}.m has shape [128, 4], expected "
                            "[127, 4]"),
    "rank_in_adapter_config": ([(ckpt.ADAPTER_CONFIG, rank_8)], "validator",
                               "rank 4, adapter_config.json says lora_parameters.rank 8"),
    # consistent among the files: only the model can tell
    "module_missing_everywhere": ([(ckpt.ADAPTERS, drop(A, B)),
                                   (ckpt.OPTIMIZER, drop(*(f"{k}.{s}" for k in (A, B)
                                                           for s in "mv")))],
                                  "worker", "2 tensors missing ['model.layers.1.mlp."
                                            "down_proj.lora_a', 'model.layers.1.mlp."
                                            "down_proj.lora_b']"),
    "wrong_shape_everywhere": ([(ckpt.ADAPTERS, reshape(127, A)),
                                (ckpt.OPTIMIZER, reshape(127, f"{A}.m", f"{A}.v"))],
                               "worker", f"1 tensors of another shape, e.g. {A} [127, 4], "
                                         "the model's [128, 4]"),
}


def damage(path: Path, kind: str) -> None:
    for name, change in KINDS[kind][0]:
        (edit_json if name.endswith(".json") else edit_tensors)(path, name, change)
    remanifest(path)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_validator_and_worker_agree_on_each_kind_of_damage(original, tmp_path, kind):
    """Each damaged step-20 checkpoint, manifest consistent: either the validator refuses it
    (deep, as the supervisor runs it, and trusting the manifest, as the worker runs it) and
    then so does the worker; or only the model can tell, and the worker refuses it by name
    with CHECKPOINT_REFUSED (25). Never bad_config, never "(changed: [])", never --fresh."""
    _, who, says = KINDS[kind]
    run = unfinished_copy(original, tmp_path)
    path = run / "checkpoints" / "step-0000020"
    damage(path, kind)
    sha = ckpt.manifest_sha256(path)
    deep, trusting = ckpt.validate(path), ckpt.validate(path, trusted_manifest=sha)
    if who == "validator":
        assert not deep.ok and not trusting.ok
        assert says in deep.reason and deep.reason == trusting.reason, deep.reason
    else:
        assert deep.ok and trusting.ok, deep.reason
    # the worker, told (as by a supervisor) to resume from it with its manifest trusted
    worker = overnight("train", str(original[0]), "--run-dir", str(run), "--resume",
                       str(path), "--validated", sha)
    last = worker.stderr.strip().splitlines()[-1]
    assert worker.returncode == REFUSED, worker.stderr[-2000:]
    assert last.startswith("overnight train: checkpoint step-0000020 refused: "), last
    assert says in last
    assert "--fresh" not in last and "changed: []" not in last


def adapters(run: Path) -> dict[str, mx.array]:
    return dict(mx.load(str(run / "adapters" / "adapters.safetensors")))


def supervise(config: Path, run: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir", str(run)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["config_hash", "wrong_shape_everywhere"])
def test_a_refused_checkpoint_is_quarantined_and_the_next_older_one_used(original, tmp_path,
                                                                         kind):
    """The issue's stuck run: before, every start gave up ("bad config or data ... (changed:
    []) ... use --fresh"). Now the damaged step-20 checkpoint is quarantined — before the
    start when the validator sees it, after the worker's refusal when only the model can —
    the run resumes from step 10 and ends with the adapters of the uninterrupted run."""
    config, reference = original
    run = unfinished_copy(original, tmp_path)
    damage(run / "checkpoints" / "step-0000020", kind)
    done = supervise(config, run)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = record(run)
    assert rec["state"] == "finished", rec["reason"]
    attempts = rec["attempts"]
    if KINDS[kind][1] == "validator":
        assert [a["classification"] for a in attempts] == ["completed"]
    else:
        assert [a["classification"] for a in attempts] == ["checkpoint_refused", "completed"]
        assert attempts[0]["action"] == "quarantine_checkpoint"
        assert attempts[0]["resumed_from"]["step"] == 20
        assert "checkpoint step-0000020 refused" in attempts[0]["detail"]
    assert attempts[-1]["resumed_from"]["step"] == 10
    [moved] = rec["quarantined"]
    assert moved["checkpoint"] == "step-0000020" and KINDS[kind][2] in moved["reason"]
    assert Path(moved["path"]).is_dir()  # moved aside, never deleted
    ref, got = adapters(reference), adapters(run)
    assert ref.keys() == got.keys()
    assert max(mx.abs(ref[k] - got[k]).max().item() for k in ref) == 0.0


def test_a_changed_config_names_the_changed_keys_and_quarantines_nothing(original, tmp_path):
    """A real config change (rank 4 -> 8, the batch split too: allowed) is no checkpoint's
    fault: the run gives up naming the hashed key that changed, dotted, with both values."""
    config, _ = original
    run = unfinished_copy(original, tmp_path)
    changed = yaml.safe_load(config.read_text())
    changed["lora_parameters"]["rank"] = 8
    changed["batch_size"], changed["grad_accumulation_steps"] = 2, 2  # not hashed
    path = tmp_path / "agree.yaml"
    path.write_text(yaml.safe_dump(changed))
    done = supervise(path, run)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = record(run)
    assert rec["state"] == "gave_up"
    assert ("step-0000020 was written with a different config: lora_parameters.rank: 4 -> 8;"
            " restore that key to resume this run") in rec["reason"]
    assert "changed: [" not in rec["reason"] and "batch_size" not in rec["reason"]
    assert rec["quarantined"] == []
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-0000010", "step-0000020"]


def test_a_replaced_model_is_the_configs_fault_not_the_checkpoints(original, tmp_path,
                                                                   tmp_path_factory):
    """The model directory now holds another model (hidden size 96, not 64): step 20 does not
    fit it, and neither does step 10, which has the same tensors. Quarantining them one by
    one would end in a silent fresh start: the worker says the model changed instead."""
    from worker.tinymodel import make_tiny_model

    config, _ = original
    run = unfinished_copy(original, tmp_path)
    other = make_tiny_model(tmp_path_factory.mktemp("models") / "wider", hidden_size=96)
    moved = yaml.safe_load(config.read_text())
    moved["model"] = str(other)
    new_config = tmp_path / "agree.yaml"
    new_config.write_text(yaml.safe_dump(moved))
    for step in ("step-0000010", "step-0000020"):  # as if `other` were their model's path
        def to_other(s: dict) -> None:
            s["config"]["model"] = str(other)
            s["config_hash"] = config_hash(s["config"])
        edit_json(run / "checkpoints" / step, ckpt.TRAINER_STATE, to_other)
        remanifest(run / "checkpoints" / step)
    worker = overnight("train", str(new_config), "--run-dir", str(run))
    last = worker.stderr.strip().splitlines()[-1]
    assert worker.returncode == BAD_CONFIG, worker.stderr[-2000:]
    assert "does not fit the model" in last and "the older step-0000010 has the same " \
        "tensors, so the model is not the one this run trained" in last
    assert not (run / "checkpoints" / "quarantine").exists()


@pytest.mark.parametrize("variant", ["full", "dora_qlora_adafactor"])
def test_real_checkpoints_of_every_kind_validate(tmp_path, tiny_model, tiny_model_q4, corpus,
                                                variant):
    """No false alarm: the agreement checks pass on what the worker really writes, for every
    fine-tune type (lora: the module fixture), a quantized base, and an optimizer whose state
    is factored (Adafactor)."""
    extra = ({"fine_tune_type": "full"} if variant == "full"
             else {"fine_tune_type": "dora", "optimizer": "adafactor"})
    model = tiny_model if variant == "full" else tiny_model_q4
    config = write_config(tmp_path / "c.yaml", model, corpus, iters=2, save_every=1,
                          steps_per_eval=2, **extra)
    done = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    paths = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(paths) == 2
    for path in paths:
        result = ckpt.validate(path)
        assert result.ok, result.reason
