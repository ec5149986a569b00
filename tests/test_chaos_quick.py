"""The quick fault campaign (issue 12): ~30 randomly timed faults of every kind in
tests/chaos/kinds.py against real supervised runs (`overnight run`) of the tiny model, judged
per kind: every run recovers, the supervisor names each fault right, no damaged checkpoint is
ever resumed from, and where a fault changes nothing that is trained, the final adapters
equal an uninterrupted run's bit for bit (max |Δ| == 0.0, OpenBLAS preloaded everywhere).

One campaign for the whole module: 3–5 minutes on an idle 2-core machine, more when it
is shared. The full campaign is
`python -m tests.chaos --faults 200` (README "Fault campaign").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.campaign import Campaign, Options, run_campaign
from tests.chaos.kinds import KINDS

# In the default run; `python -m pytest -m chaos` runs it alone.
pytestmark = pytest.mark.chaos

QUICK_FAULTS = 28
SEED = 12

# Kinds whose fix (issue 12) was not in the tree when the quick campaign was written: they
# are run and reported like every other kind, and turn into plain passes (XPASS) as the fixes
# land. Remove an entry once its fix is in.
PENDING: dict[str, str] = {}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
             corpus: Path) -> Campaign:
    lines: list[str] = []
    result = run_campaign(Options(
        faults=QUICK_FAULTS, seed=SEED, workdir=tmp_path_factory.mktemp("chaos"),
        model=tiny_model, data=corpus, check_reference=False, log=lines.append,
        command=f"tests/test_chaos_quick.py (faults={QUICK_FAULTS}, seed={SEED})"))
    from tests.chaos import table

    print("\n".join(lines), "\n", table.markdown(result.table), "\n", result.summary())
    return result


def test_the_quick_campaign_meets_every_kind_and_the_runner_works(campaign: Campaign) -> None:
    """Every kind was injected at least once (or skipped with a reason, e.g. no tmpfs), and
    the campaign itself never failed (an error of the runner is not a result)."""
    injected = {row.kind: row.injected for row in campaign.table}
    missing = [k for k in KINDS if k not in campaign.skipped_kinds and not injected.get(k)]
    assert not missing, f"never injected: {missing}\n{campaign.summary()}"
    errors = [u for run in campaign.runs for u in run.unexpected if "campaign error" in u]
    assert not errors, errors
    assert campaign.fired >= QUICK_FAULTS - 3, campaign.summary()


@pytest.mark.parametrize("kind", [
    pytest.param(k, marks=pytest.mark.xfail(strict=False, reason=PENDING[k]))
    if k in PENDING else k
    for k in KINDS
])
def test_fault_kind_is_recovered_classified_and_exact(campaign: Campaign, kind: str) -> None:
    row = campaign.row(kind)
    if kind in campaign.skipped_kinds:
        pytest.skip(campaign.skipped_kinds[kind])
    assert row is not None and row.injected > 0, f"{kind} was never injected"
    detail = "\n".join(row.failures)
    assert row.recovered == row.injected, f"not recovered:\n{detail}"
    assert row.classified_ok == row.injected, f"classified wrong:\n{detail}"
    assert not row.corrupt_accepted, f"resumed from a damaged checkpoint:\n{detail}"
    if KINDS[kind].exact:
        assert row.delta_max == 0.0, f"max |Δ| {row.delta_max} (training unchanged by design)"


# ---- the campaign's own means, checked without running anything (fast) -------------------


def test_the_plan_keeps_its_rules_for_every_seed() -> None:
    """Every kind is drawn; runs that change training by design hold only such faults; a run
    has at most one disk fill, two rollbacks, one OOM, one start race and one socket fault
    (last); corrupting comes after the first checkpoint; a kill while loading comes first or
    right after a fault that starts a new worker; triggers stay inside the run."""
    from tests.chaos.kinds import ROLLBACKS
    from tests.chaos.plan import CORRUPT_MIN, SOCKETS, plan

    for seed in range(30):
        runs = plan(list(KINDS), 60, 100, 10, seed)
        drawn = [f.kind for r in runs for f in r.faults]
        assert sorted(set(drawn)) == sorted(KINDS) and len(drawn) == 60
        assert len({f.id for r in runs for f in r.faults}) == 60
        for r in runs:
            kinds = [f.kind for f in r.faults]
            assert all(KINDS[k].exact == r.exact for k in kinds), kinds
            assert kinds.count("disk_full") <= 1 and kinds.count("oom") <= 1
            assert sum(k in ROLLBACKS for k in kinds) <= 2
            assert kinds.count("start_race") <= 1 and sum(k in SOCKETS for k in kinds) <= 1
            if any(k in SOCKETS for k in kinds):
                assert kinds[-1] in SOCKETS, kinds
            for i, f in enumerate(r.faults):
                assert 0 <= f.trigger <= 90
                if f.kind.startswith("corrupt_"):
                    assert f.trigger >= CORRUPT_MIN
                if f.kind == "checkpoint_crash":
                    assert f.trigger % 10 == 0 and f.trigger >= 10
                if f.kind == "kill_loading" and i:
                    before = r.faults[i - 1].kind
                    assert KINDS[before].restarts and before != "start_race", kinds
            assert [f.trigger for f in r.faults] == sorted(f.trigger for f in r.faults)


def _checkpoint(tmp_path: Path) -> Path:
    """A checkpoint directory in shared/checkpoint.py's layout with a valid manifest."""
    import hashlib
    import json

    import numpy as np

    from tests.chaos.tensorfile import TensorFile

    path = tmp_path / "checkpoints" / "step-0000020"
    path.mkdir(parents=True)
    tensors = {"a.lora_a": np.arange(24, dtype=np.float32).reshape(4, 6),
               "a.lora_b": np.ones((6, 4), np.float32)}
    header, data, offset = {}, b"", 0
    for name, t in tensors.items():
        raw = t.tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    TensorFile(header, {"format": "mlx"}, data).write(path / "adapters.safetensors")
    TensorFile({f"{k}.m": dict(v) for k, v in header.items()}, None, data).write(
        path / "optimizer.safetensors")
    (path / "trainer_state.json").write_text(json.dumps(
        {"step": 20, "config": {"seed": 0}, "config_hash": "0123456789abcdef"}))
    (path / "adapter_config.json").write_text("{}")
    files = {f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                      "bytes": f.stat().st_size} for f in sorted(path.iterdir())}
    (path / "manifest.json").write_text(json.dumps({"step": 20, "files": files}))
    return path


@pytest.mark.parametrize("variant", ["truncate", "bitflip", "no_manifest", "wrong_hash",
                                     "nan", "missing_tensor", "wrong_shape", "config"])
def test_each_corruption_damages_the_checkpoint_as_documented(tmp_path: Path,
                                                              variant: str) -> None:
    """The first four leave a manifest that no longer matches (or none); the last four
    rewrite it so every size and sha256 matches the damaged files."""
    import hashlib
    import json
    import random

    import numpy as np

    from tests.chaos.corrupt import corrupt, newest_complete
    from tests.chaos.tensorfile import TensorFile

    path = _checkpoint(tmp_path)
    assert newest_complete(tmp_path / "checkpoints") == path
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    corrupt(path, variant, random.Random(7))
    after = {f.name: f.read_bytes() for f in path.iterdir()}
    assert after != before
    if variant == "no_manifest":
        assert "manifest.json" not in after
        assert newest_complete(tmp_path / "checkpoints") is None
        return
    files = json.loads(after["manifest.json"])["files"]
    matches = all(hashlib.sha256(after[n]).hexdigest() == m["sha256"]
                  and len(after[n]) == m["bytes"] for n, m in files.items())
    assert matches == (variant in ("nan", "missing_tensor", "wrong_shape", "config"))
    if not matches:
        return
    adapters = TensorFile.read(path / "adapters.safetensors")
    optimizer = TensorFile.read(path / "optimizer.safetensors")
    if variant == "nan":
        values = [t.array(n) for t in (adapters, optimizer) for n in t.header]
        assert sum(int(np.isnan(v).sum()) for v in values) == 1
    if variant == "missing_tensor":
        assert len(adapters.header) == 1
    if variant == "wrong_shape":  # one tensor transposed in the header, its bytes unchanged
        shapes = {n: v["shape"] for n, v in adapters.header.items()}
        assert shapes in ({"a.lora_a": [6, 4], "a.lora_b": [6, 4]},
                          {"a.lora_a": [4, 6], "a.lora_b": [4, 6]})
    if variant == "config":
        state = json.loads(after["trainer_state.json"])
        assert state["config"]["seed"] == 1 and state["config_hash"] != "0123456789abcdef"


def test_a_checkpoint_complete_but_for_its_rename_is_found(tmp_path: Path) -> None:
    """What a kill between a checkpoint's manifest and its rename leaves: the corruption
    faults damage it (once in place), not the older `step-*` (CI: corrupt_bitflip damaged
    step 20 while step 30 was put in place and chosen)."""
    from tests.chaos.corrupt import unrenamed

    older = _checkpoint(tmp_path)
    ckpts = older.parent
    done = ckpts / ".tmp-step-0000030-4242"
    older.rename(done)
    _checkpoint(tmp_path)
    half = ckpts / ".tmp-step-0000040-4243"  # no manifest yet: removed, not put in place
    half.mkdir()
    resaved = ckpts / ".tmp-step-0000020-4244"  # its step exists: a re-save, not pending
    resaved.mkdir()
    (resaved / "manifest.json").write_text("{}")
    assert unrenamed(ckpts) == [(done, ckpts / "step-0000030")]


def test_max_abs_diff_reads_what_mlx_writes(tmp_path: Path) -> None:
    """Δ is computed without MLX: a file read and written back is identical (0.0), one value
    moved by 0.25 gives 0.25, a NaN gives NaN, another tensor set gives inf."""
    import math
    import struct

    from tests.chaos.tensorfile import TensorFile, max_abs_diff

    path = _checkpoint(tmp_path) / "adapters.safetensors"
    tf = TensorFile.read(path)
    tf.write(tmp_path / "same.safetensors")
    assert max_abs_diff(path, tmp_path / "same.safetensors") == 0.0
    raw = bytearray(tf.raw("a.lora_b"))
    raw[0:4] = struct.pack("<f", 1.25)
    tf.replace("a.lora_b", bytes(raw))
    tf.write(tmp_path / "moved.safetensors")
    assert max_abs_diff(path, tmp_path / "moved.safetensors") == 0.25
    raw[0:4] = struct.pack("<I", 0x7FC00000)
    tf.replace("a.lora_b", bytes(raw))
    tf.write(tmp_path / "nan.safetensors")
    assert math.isnan(max_abs_diff(path, tmp_path / "nan.safetensors"))
    tf.drop("a.lora_a")
    tf.write(tmp_path / "fewer.safetensors")
    assert max_abs_diff(path, tmp_path / "fewer.safetensors") == float("inf")
