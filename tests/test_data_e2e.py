"""Real users' data through the real worker (and supervisor): `overnight train` / `overnight
run` in subprocesses on the tiny model, with small data files each test writes.

- a row the tokenizer rejects is a skipped line, in memory and streaming, never the end;
- every example is trained on every epoch when the effective batch does not divide the data,
  exact resume and a smaller micro-batch still hold, an old checkpoint keeps its plan;
- sequences cut to max_seq_length are reported (log, stderr, checkpoint, report);
- mask_prompt rows with no target tokens are skipped, never a NaN;
- a NaN that comes back on the same batch is data: the supervisor skips that batch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared import checkpoint as ckpt
from tests.conftest import overnight, subprocess_env, write_config
from tests.supervisor_support import ROOT, record
from tests.test_worker_e2e import (
    adapters,
    events,
    kill,
    max_abs_diff,
    metrics,
    start,
    wait_for_step,
)
from worker.tinymodel import sentences

FAST = {"heartbeat_timeout": 10.0, "startup_timeout": 60.0, "stall_timeout": 60.0,
        "stop_timeout": 10.0, "backoff_initial": 0.1, "backoff_max": 0.5, "caffeinate": False}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


def write_lines(directory: Path, lines: list[object], name: str = "train.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return directory


def last_state(run: Path) -> dict:
    """The newest valid checkpoint's trainer state (decoded by shared/trainer_state.py), in
    its JSON form."""
    found = ckpt.newest_valid(run / "checkpoints")
    assert found is not None and found[1].state is not None
    return found[1].state.to_dict()


def lines_of(text: str) -> set[int]:
    """{3, 8, 9, 10} from "train.jsonl:3,8-10"."""
    out: set[int] = set()
    for part in text.split(":", 1)[1].split(" ")[0].split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


# ---- a row the tokenizer rejects --------------------------------------------------------


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_row_the_tokenizer_rejects_is_skipped_and_named_never_the_end_of_the_run(
        tmp_path: Path, tiny_model: Path, streaming: str) -> None:
    # Before: "example 19 could not be tokenised" ended the run (mid-run when streaming).
    rows: list[object] = [{"text": t} for t in sentences(24, seed=3)]
    rows[3] = ""
    rows[7] = "{not json"
    rows[20] = '{"text": "the fox \\ud83e jumps"}'
    data = write_lines(tmp_path / "data", rows)
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=12, save_every=6,
                          steps_per_eval=100, training={"warmup_steps": 2,
                                                        "streaming": streaming})
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert "example 19" not in result.stderr and "Traceback" not in result.stderr
    if streaming == "true":  # found when its batch is read, in the first epoch
        skipped = events(run, "data_line_skipped")
        assert [(e["line"], e["level"]) for e in skipped] == [(21, "warning")]
        assert "lone UTF-16 surrogate \\ud83e" in skipped[0]["reason"]
    else:  # found at load
        loaded = events(run, "data_lines_skipped")[0]
        assert loaded["malformed"] == 2 and loaded["first_problems"][1].startswith("line 21:")
    data_state = last_state(run)["data"]
    assert data_state["malformed"] == 2 and data_state["examples"] == (
        22 if streaming == "true" else 21)
    assert max(metrics(run)) == 12


# ---- validation and test files read while streaming ----------------------------------------


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_validation_or_test_file_with_nothing_to_learn_is_one_line_at_load(
        tmp_path: Path, tiny_model: Path, split: str, streaming: str) -> None:
    """Every row of valid.jsonl (or test.jsonl) has a prompt that fills max_seq_length under
    mask_prompt. In memory that was refused at load; streaming, it was a NaN validation loss
    at every evaluation for the whole night (or a NaN test loss "of 8 examples" at its end).
    Now both modes refuse it at load, naming the file and the first line."""
    rows = [{"prompt": h, "completion": t} for h, _, t in
            (s.partition(" ") for s in sentences(24, seed=2))]
    long_prompt = " ".join(sentences(6, seed=9))
    data = write_lines(tmp_path / "data", rows)
    write_lines(data, [{"prompt": long_prompt, "completion": "yes"}] * 8, f"{split}.jsonl")
    if split == "test":
        write_lines(data, rows[:8], "valid.jsonl")
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=6, mask_prompt=True,
                          max_seq_length=40, steps_per_eval=3, save_every=3,
                          test=split == "test", test_batches=2,
                          training={"warmup_steps": 2, "streaming": streaming})
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 78, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    where = "in 8 lines" if streaming == "false" else (
        f"in the 8 {'validation' if split == 'valid' else 'test'} examples read")
    assert last.startswith(f"overnight train: {data / split}.jsonl: no usable examples {where} "
                           "(first: line 1: no target tokens: the prompt is "), last
    assert not (run / "logs" / "metrics.jsonl").exists()  # refused before any training


def test_a_streamed_validation_file_has_its_skipped_lines_in_the_report(
        tmp_path: Path, tiny_model: Path) -> None:
    """Before: a streamed valid.jsonl was counted only at load (nothing read yet), so the
    report said nothing of its skipped line and "none in valid.jsonl so far (0 of 9 read)"."""
    data = write_lines(tmp_path / "data", [{"text": t} for t in sentences(24, seed=3)])
    valid: list[object] = [{"text": t} for t in sentences(8, seed=4)]
    valid.insert(2, '{"text": "the owl \\ud800 sings"}')
    write_lines(data, valid, "valid.jsonl")
    reports = {}
    for streaming in ("false", "true"):
        config = write_config(tmp_path / f"{streaming}.yaml", tiny_model, data, iters=4,
                              steps_per_eval=2, save_every=4, val_batches=-1,
                              training={"warmup_steps": 2, "streaming": streaming})
        run = tmp_path / streaming
        result = overnight("train", str(config), "--run-dir", str(run))
        assert result.returncode == 0, result.stderr
        report = overnight("report", str(run))
        assert report.returncode == 0, report.stderr
        [row] = [line for line in report.stdout.splitlines()
                 if line.startswith("| data lines skipped")]
        reports[streaming] = row.split("|")[2].strip()
    assert reports["true"] == reports["false"]
    assert reports["true"].startswith("1 malformed in `valid.jsonl`")


# ---- every example, every epoch -----------------------------------------------------------


def uneven_data(tmp_path: Path) -> Path:
    """60 examples: with batch 4 x accumulation 2 = 8, seven full batches and one of four."""
    return write_lines(tmp_path / "data", [{"text": t} for t in sentences(60, seed=11)])


def test_every_example_is_trained_on_in_every_epoch(tmp_path: Path, tiny_model: Path,
                                                    tokenizer) -> None:
    data = uneven_data(tmp_path)
    texts = [json.loads(x)["text"] for x in (data / "train.jsonl").read_text().splitlines()]
    # target tokens of the whole file: each example is its tokens + EOS, minus one
    per_epoch = sum(len(tokenizer.encode(t)) for t in texts)
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=16, batch_size=4,
                          grad_accumulation_steps=2, steps_per_eval=100, save_every=8)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    m = metrics(run)
    # Before: 7 batches per epoch, the 4 longest examples never seen.
    assert sum(m[s]["tokens"] for s in range(1, 9)) == per_epoch
    assert sum(m[s]["tokens"] for s in range(9, 17)) == per_epoch
    plan = last_state(run)["plan"]
    assert (plan["groups_per_epoch"], plan["leftover"], plan["examples"]) == (
        8, "short_group", 60)


def test_an_effective_batch_larger_than_the_data_trains_one_step_per_epoch(
        tmp_path: Path, tiny_model: Path, tokenizer) -> None:
    """batch 4 x accumulation 16 = 64 on 60 examples. Before: refused ("fewer than one
    effective batch") while `mlx_lm lora` runs it (its iterate_batches only needs batch_size
    examples). Now every step trains on the whole set once, and the worker says so."""
    data = uneven_data(tmp_path)
    texts = [json.loads(x)["text"] for x in (data / "train.jsonl").read_text().splitlines()]
    per_epoch = sum(len(tokenizer.encode(t)) for t in texts)
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=3, batch_size=4,
                          grad_accumulation_steps=16, steps_per_eval=100, save_every=3)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert ("overnight train: the effective batch (batch_size x grad_accumulation_steps = 64) "
            f"is larger than the 60 training examples of {data / 'train.jsonl'}: each "
            "optimizer step trains on all 60 once") in result.stderr
    m = metrics(run)
    assert [m[s]["tokens"] for s in (1, 2, 3)] == [per_epoch] * 3
    assert [m[s]["data_position"] for s in (1, 2, 3)] == [0, 1, 2]
    plan = last_state(run)["plan"]
    assert (plan["groups_per_epoch"], plan["examples"]) == (1, 60)


def test_fewer_examples_than_batch_size_is_refused_as_mlx_lm_does(
        tmp_path: Path, tiny_model: Path) -> None:
    data = write_lines(tmp_path / "data", [{"text": t} for t in sentences(3, seed=11)])
    config = write_config(tmp_path / "c.yaml", tiny_model, data, batch_size=4)
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: {data / 'train.jsonl'}: 3 usable example(s), fewer than "
        'batch_size 4 (mlx_lm lora refuses this too: "Dataset must have at least batch_size '
        'examples"); lower batch_size or add examples')


# ---- a split file that is not a file, or empty ---------------------------------------------


@pytest.mark.parametrize("name", ["valid.jsonl", "val.jsonl", "train.jsonl", "test.jsonl"])
def test_a_split_name_taken_by_a_directory_is_one_line_never_no_validation(
        tmp_path: Path, tiny_model: Path, corpus: Path, name: str) -> None:
    """Before: a valid.jsonl directory silently meant a night without validation (and a
    train.jsonl directory was "not found"). `mlx_lm lora` stops on it with a traceback."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    for gone in {name, "valid.jsonl" if name == "val.jsonl" else name}:
        if (data / gone).exists():
            (data / gone).unlink()
    (data / name).mkdir()
    config = write_config(tmp_path / "c.yaml", tiny_model, data, test=name == "test.jsonl")
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 78, result.stderr
    role = {"train.jsonl": "the training split", "test.jsonl": "the test split"}.get(
        name, "the validation split")
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: {data / name} is a directory: expected {role} as a JSONL file "
        "(one example per line)" + (" or nothing at all (no validation)"
                                    if role == "the validation split" else ""))
    assert not (run / "logs" / "metrics.jsonl").exists()  # refused before training


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_validation_file_says_it_is_empty(
        tmp_path: Path, tiny_model: Path, corpus: Path, content: str) -> None:
    """Before: "no usable examples in 0 lines"."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "valid.jsonl").write_text(content)
    config = write_config(tmp_path / "c.yaml", tiny_model, data)
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 78, result.stderr
    blank = " (3 blank lines)" if content else ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: {data / 'valid.jsonl'} is empty{blank}: expected one JSON "
        "example per line")


def test_exact_resume_and_a_smaller_micro_batch_hold_with_the_short_batch(
        tmp_path: Path, tiny_model: Path) -> None:
    # SGD: the update is linear in the gradient, so equal math shows as equal weights.
    config = write_config(tmp_path / "c.yaml", tiny_model, uneven_data(tmp_path), iters=20,
                          batch_size=4, grad_accumulation_steps=2, steps_per_eval=100,
                          save_every=5, optimizer="sgd", learning_rate=0.05)
    base = tmp_path / "base"
    assert overnight("train", str(config), "--run-dir", str(base)).returncode == 0
    # SIGKILL between checkpoints (epoch 2, after the short batch of epoch 1), then resume
    run = tmp_path / "killed"
    proc = start(config, run, inject="stall@13")
    wait_for_step(run, proc, 12)
    kill(proc)
    done = overnight("train", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert max_abs_diff(adapters(base), adapters(run)) == 0.0
    # an "OOM" in epoch 1: resumed with micro-batch 1 (accumulation 8), the short batch split
    # into 4 micro-batches of 1 instead of 1 of 4 (float32 sums in another order)
    small = tmp_path / "small"
    proc = start(config, small, inject="stall@9")
    wait_for_step(small, proc, 8)
    kill(proc)
    done = overnight("train", str(config), "--run-dir", str(small), "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    assert events(small, "effective_batch_kept")[0]["grad_accumulation_steps"] == 8
    assert max_abs_diff(adapters(base), adapters(small)) < 1e-4


def test_a_checkpoint_of_the_old_plan_keeps_its_data_order_and_says_so(
        tmp_path: Path, tiny_model: Path) -> None:
    data = uneven_data(tmp_path)
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=20, batch_size=4,
                          grad_accumulation_steps=2, steps_per_eval=100, save_every=5)
    run = tmp_path / "run"
    proc = start(config, run, inject="stall@8")
    wait_for_step(run, proc, 7)
    kill(proc)
    # Make step 5 look like a checkpoint of the previous version: no "plan", 7 batches.
    old = run / "checkpoints" / "step-0000005"
    state = json.loads((old / ckpt.TRAINER_STATE).read_text())
    del state["plan"]
    state["groups_per_epoch"] = 7
    copy = tmp_path / "copy"
    shutil.copytree(old, copy)
    shutil.rmtree(old)

    def write(tmp: Path) -> None:
        for f in copy.iterdir():
            if f.name not in (ckpt.MANIFEST, ckpt.TRAINER_STATE):
                shutil.copy2(f, tmp / f.name)
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(state))

    ckpt.write_checkpoint(run / "checkpoints", 5, write)
    assert ckpt.validate(old).ok
    done = overnight("train", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert "older version that never trains on the 4 longest of 60 examples" in done.stderr
    assert events(run, "data_plan_changed")[0]["level"] == "warning"
    plan = last_state(run)["plan"]
    assert (plan["leftover"], plan["groups_per_epoch"]) == ("drop", 7)


# ---- truncation ---------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_sequences_cut_to_max_seq_length_are_warned_recorded_and_reported(
        tmp_path: Path, tiny_model: Path, tokenizer, streaming: str) -> None:
    texts = sentences(36, seed=5) + [" and ".join(sentences(k, seed=k)) for k in (3, 4, 5, 6)]
    lengths = [len(tokenizer.encode(t)) + 1 for t in texts]  # mlx_lm appends EOS
    limit = 24
    cut, longest = sum(n > limit for n in lengths), max(lengths)
    assert cut == 4  # the data is what the test means it to be
    data = write_lines(tmp_path / "data", [{"text": t} for t in texts])
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=12, max_seq_length=limit,
                          steps_per_eval=100, save_every=12,
                          training={"warmup_steps": 2, "streaming": streaming})
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    warned = events(run, "data_truncated")
    assert len(warned) == 1 and warned[0]["level"] == "warning"  # once
    assert "data_truncated" in result.stderr
    if streaming == "false":  # known at load, exactly
        assert (warned[0]["examples"], warned[0]["longest"]) == (cut, longest)
    truncated = last_state(run)["data"]  # after 12 steps of 10 batches: an epoch was read
    assert (truncated["truncated"], truncated["longest"], truncated["lengths_known"]) == (
        cut, longest, True)
    report = overnight("report", str(run))
    assert report.returncode == 0, report.stderr
    assert (f"| sequences truncated | {cut} in `train.jsonl` cut to max_seq_length {limit} "
            f"(longest {longest} tokens) |") in report.stdout


# ---- mask_prompt: rows with nothing to learn ---------------------------------------------


def test_rows_whose_prompt_fills_max_seq_length_are_skipped_not_a_nan(
        tmp_path: Path, tiny_model: Path) -> None:
    # Before: length sorting put the long prompts together, their batches had no target
    # tokens, the loss was 0/0 = NaN and the worker exited NON_FINITE (22).
    rows = [{"prompt": h, "completion": t} for h, _, t in
            (s.partition(" ") for s in sentences(24, seed=2))]
    long_prompt = " ".join(sentences(6, seed=9))
    for i in (3, 9, 12, 14, 17, 20, 22, 23):
        rows.insert(i, {"prompt": long_prompt, "completion": "yes"})
    data = write_lines(tmp_path / "data", rows)
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=10, mask_prompt=True,
                          max_seq_length=40, steps_per_eval=100, save_every=10)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    loaded = events(run, "data_lines_skipped")[0]
    assert (loaded["no_targets"], loaded["examples"]) == (8, 24)
    assert [p.split(":")[0] for p in loaded["first_problems"]] == [
        "line 4", "line 10", "line 13", "line 15", "line 18"]
    assert all(np.isfinite(m["loss"]) for m in metrics(run).values())
    report = overnight("report", str(run)).stdout
    assert "8 with no target tokens in `train.jsonl`" in report


# ---- a NaN that comes back on the same batch ----------------------------------------------


def test_a_nan_on_the_same_batch_twice_is_data_the_supervisor_skips_that_batch(
        tmp_path: Path, tiny_model: Path, corpus: Path, tokenizer) -> None:
    # 256 examples, batch 4: 64 batches per epoch, visited in default_rng([seed, epoch])
    # order (docs/architecture.md). A NaN at step 8 is position 7, batch perm0[7]; the
    # rollback to step 5 skips that one position only: steps 6 and 7 train the healthy
    # positions 5 and 6 again, step s >= 8 trains position s, and the same batch comes
    # back in epoch 1 at position 64 + k1: step 64 + k1.
    for seed in range(100):
        perm0 = np.random.default_rng([seed, 0]).permutation(64)
        perm1 = np.random.default_rng([seed, 1]).permutation(64)
        batch = int(perm0[7])
        k1 = int(np.flatnonzero(perm1 == batch)[0])
        if 3 <= k1 < 12:
            break
    again = 64 + k1
    iters = again + 6
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=iters, seed=seed,
                          save_every=5, steps_per_eval=1000, supervisor=FAST,
                          early_stopping={"enabled": False})
    run = tmp_path / "run"
    sup = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "run", str(config), "--run-dir", str(run)],
        cwd=ROOT, env=subprocess_env(OVERNIGHT_INJECT=f"nan@8,nan@{again}"),
        capture_output=True, text=True, timeout=300)
    assert sup.returncode == 0, sup.stderr[-3000:]
    rec = record(run)
    attempts = rec["attempts"]
    assert [a["classification"] for a in attempts] == ["non_finite", "non_finite", "completed"]
    first, second, third = attempts
    assert first["action"] == "rollback" and third["lr_scale"] == 1.0  # the cut is undone
    assert second["action"] == "skip_batch" and second["lr_scale"] == 0.5
    assert "a data problem, not divergence" in second["action_reason"]
    assert rec["rollbacks"] == 1 and rec["state"] == "finished"
    assert first["bad_data"]["batch"] == second["bad_data"]["batch"] == batch
    assert (first["bad_data"]["position"], second["bad_data"]["position"]) == (7, 64 + k1)
    # the lines named are the batch's examples: the length-sorted order, cut in fours
    texts = [json.loads(x)["text"] for x in (corpus / "train.jsonl").read_text().splitlines()]
    order = np.argsort([len(tokenizer.encode(t)) + 1 for t in texts], kind="stable")
    expected = {int(i) + 1 for i in order[batch * 4 : batch * 4 + 4]}
    assert lines_of(first["bad_data"]["lines"]) == expected
    assert second["bad_data"]["lines"] == first["bad_data"]["lines"]
    assert third["argv"][third["argv"].index("--skip-batch") + 1] == str(batch)
    # the rollback passed over the failing position only, and said so in the record
    assert second["argv"][second["argv"].index("--skip-position") + 1] == "7"
    assert "--skip-steps" not in second["argv"] and second["skip_steps"] == 1
    assert "--skip-position" not in third["argv"]  # position 7 is behind its checkpoint
    # what changed, and only that (before: "lr_scale None→0.5"; every setting listed)
    assert first["settings_changed"] == {"lr_scale": [1.0, 0.5], "skip_positions": [[], [7]]}
    assert second["settings_changed"] == {"lr_scale": [0.5, 1.0],
                                          "skip_batches": [[], [batch]]}
    assert rec["overrides"] == {"lr_scale": 1.0, "skip_batches": [batch], "skip_positions": [7]}
    # the healthy batches between the rollback checkpoint (step 5, position 5) and the
    # failing one were trained again (before: positions 5 and 6 were skipped with 7); the
    # run's steps cover every position but the two occurrences of the bad batch
    attempt2 = [m for m in map(json.loads, (run / "logs" / "metrics.jsonl").read_text()
                               .splitlines()) if m["attempt"] == 2]
    assert [(m["step"], m["data_position"]) for m in attempt2[:3]] == [(6, 5), (7, 6), (8, 8)]
    trained = {s: m["data_position"] for s, m in metrics(run).items()}
    assert trained == {s: s - 1 if s < 8 else s if s < again else s + 1
                       for s in range(1, iters + 1)}
    passed = [e["data_position"] for e in events(run, "batch_skipped") if e.get("attempt") == 2]
    assert passed == [7]
    skipped = [e for e in events(run, "batch_skipped") if e.get("attempt") == 3]
    assert [e["batch"] for e in skipped] == [batch]
    assert max(metrics(run)) == iters and last_state(run)["skipped_batches"] == [batch]
    report = overnight("report", str(run)).stdout
    assert f"The failing batch's data: `{first['bad_data']['lines']}`" in report
    assert "skip batch" in report
    assert "NaN loss at 7 → rolled back to 5" in report  # the verdict: the last good step
    assert f"NaN loss at {again - 1} → that batch skipped (its data, not divergence)" in report
    assert re.search(r"skip_batches=\[\d+\]", report)


def test_a_position_skipped_once_is_passed_over_after_a_resume_too_exactly(
        tmp_path: Path, tiny_model: Path) -> None:
    """--skip-position (a rollback's offending batch): that position alone is passed over,
    the batches around it are trained, and a run killed before it and resumed with the same
    flag (as the supervisor starts every attempt) ends with the same adapters."""
    config = write_config(tmp_path / "c.yaml", tiny_model, uneven_data(tmp_path), iters=12,
                          save_every=5, steps_per_eval=100)
    base = tmp_path / "base"
    done = overnight("train", str(config), "--run-dir", str(base), "--skip-position", "7")
    assert done.returncode == 0, done.stderr
    assert [metrics(base)[s]["data_position"] for s in range(1, 13)] == [
        0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    run = tmp_path / "killed"
    proc = start(config, run, "--skip-position", "7", inject="stall@7")
    wait_for_step(run, proc, 6)
    kill(proc)  # after the checkpoint at step 5 (position 5), before position 7
    done = overnight("train", str(config), "--run-dir", str(run), "--skip-position", "7")
    assert done.returncode == 0, done.stderr
    assert max_abs_diff(adapters(base), adapters(run)) == 0.0
    assert [e["data_position"] for e in events(run, "batch_skipped")] == [7]


def test_a_skipped_batch_recorded_in_a_checkpoint_stays_skipped_after_a_resume(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    batch = int(np.random.default_rng([0, 0]).permutation(64)[9])  # visited at position 9
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=12, save_every=5,
                          steps_per_eval=1000)
    run = tmp_path / "run"
    proc = start(config, run, "--skip-batch", str(batch), inject="stall@8")
    wait_for_step(run, proc, 7)
    kill(proc)
    assert last_state(run)["skipped_batches"] == [batch]
    done = overnight("train", str(config), "--run-dir", str(run))  # no --skip-batch now
    assert done.returncode == 0, done.stderr
    resumed = [e for e in events(run, "batch_skipped") if e["data_position"] == 9]
    assert [e["batch"] for e in resumed] == [batch]  # passed over after the resume too
    assert last_state(run)["skipped_batches"] == [batch]
