"""The worker as users run it: `overnight train` in a subprocess on a tiny model, with real
signals (SIGKILL, SIGTERM), real files and a real ZeroMQ subscriber."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from shared import checkpoint as ckpt
from shared import protocol as p
from shared.exitcodes import ExitCode
from tests.conftest import overnight, subprocess_env, write_config

TRAIN = [sys.executable, "-m", "shared.cli", "train"]


def adapters(run: Path) -> dict[str, mx.array]:
    return mx.load(str(run / "adapters" / "adapters.safetensors"))


def max_abs_diff(a: dict[str, mx.array], b: dict[str, mx.array]) -> float:
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def metrics(run: Path) -> dict[int, dict]:
    """Per-step metrics; a step re-done after a kill keeps its last record."""
    out: dict[int, dict] = {}
    path = run / "logs" / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                out[m["step"]] = m
    return out


def events(run: Path, name: str) -> list[dict]:
    lines = (run / "logs" / "worker.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def start(config: Path, run: Path, *extra: str, inject: str = "") -> subprocess.Popen:
    env = subprocess_env(**({"OVERNIGHT_INJECT": inject} if inject else {}))
    return subprocess.Popen([*TRAIN, str(config), "--run-dir", str(run), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step in metrics(run):
            return
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read()}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


def phases(run: Path, pid: int) -> list[str]:
    """The phases the worker with this pid logged, in order (logs/worker.jsonl)."""
    path = run / "logs" / "worker.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if e.get("event") == "phase_changed" and e.get("pid") == pid:
            found.append(e["phase"])
    return found


def wait_for_phase(run: Path, proc: subprocess.Popen, phase: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if phase in phases(run, proc.pid):
            return
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read()}"
        time.sleep(0.005)
    raise AssertionError(f"the worker never logged phase {phase!r}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.fixture()
def resume_config(tmp_path: Path, tiny_model: Path, weighted_corpus: Path) -> Path:
    # Dropout and distrust weights on, accumulation on: everything resume must restore.
    return write_config(tmp_path / "resume.yaml", tiny_model, weighted_corpus, iters=60,
                        batch_size=2, grad_accumulation_steps=2, steps_per_eval=15,
                        lora_parameters={"dropout": 0.1}, training={"lambda_weight": 0.5})


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path: Path,
                                                                  resume_config: Path) -> None:
    base = tmp_path / "base"
    done = overnight("train", str(resume_config), "--run-dir", str(base))
    assert done.returncode == 0, done.stderr

    run = tmp_path / "killed"
    # 1. killed while loading the model (its log says it is loading; nothing was compiled yet)
    proc = start(resume_config, run)
    wait_for_phase(run, proc, "loading")
    kill(proc)
    assert phases(run, proc.pid) == ["loading"]
    # 2. killed in the middle of writing the step-20 checkpoint (before its manifest)
    proc = start(resume_config, run, inject="checkpoint_crash@20")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".tmp-step-0000020-*"))
    assert not (run / "checkpoints" / "step-0000020").exists()
    # 3. and 4. killed between checkpoints (the worker is parked before steps 33 and 47)
    for parked in (33, 47):
        proc = start(resume_config, run, inject=f"stall@{parked}")
        wait_for_step(run, proc, parked - 1)
        time.sleep(0.2)
        kill(proc)
    # 5. the last attempt finishes
    proc = start(resume_config, run)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()

    assert max_abs_diff(adapters(base), adapters(run)) == 0.0  # bit for bit, as documented
    resumed = events(run, "resumed")
    # newest valid each time: 15 (best; step 20 died unfinished), 30 (periodic), 45 (best)
    assert [e["step"] for e in resumed] == [15, 30, 45]
    assert json.loads((run / "COMPLETE").read_text())["step"] == 60
    ref, got = metrics(base), metrics(run)
    assert sorted(ref) == sorted(got) == list(range(1, 61))
    for step in range(11, 61):  # the loss history after the first resume point: the same
        assert (got[step]["loss"], got[step]["grad_norm"]) == (
            ref[step]["loss"], ref[step]["grad_norm"]), step
    # the half-written checkpoint was never used and is cleaned up by retention
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_accumulation_and_a_smaller_micro_batch_on_resume_keep_the_math(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    # SGD makes the update linear in the gradient, so equal math shows as equal weights.
    common = dict(iters=20, optimizer="sgd", learning_rate=0.05, steps_per_eval=100)
    one_batch = write_config(tmp_path / "a.yaml", tiny_model, corpus, batch_size=4, **common)
    accum = write_config(tmp_path / "b.yaml", tiny_model, corpus, batch_size=2,
                         grad_accumulation_steps=2, **common)
    assert overnight("train", str(one_batch), "--run-dir", str(tmp_path / "a")).returncode == 0
    run = tmp_path / "b"
    proc = start(accum, run, inject="stall@15")
    wait_for_step(run, proc, 14)
    kill(proc)
    # resumed after an "OOM" with micro-batch 1: accumulation becomes 4, same effective batch
    done = overnight("train", str(accum), "--run-dir", str(run), "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    kept = events(run, "effective_batch_kept")
    assert kept and kept[0]["grad_accumulation_steps"] == 4
    # float32 sums in another order: equal to rounding, not bit for bit
    assert max_abs_diff(adapters(tmp_path / "a"), adapters(run)) < 1e-4


def test_sigterm_finishes_the_step_saves_and_exits_graceful(tmp_path: Path, tiny_model: Path,
                                                           corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=100000,
                          save_every=100000, steps_per_eval=100000)
    run = tmp_path / "run"
    proc = start(config, run)
    wait_for_step(run, proc, 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == ExitCode.GRACEFUL_STOP
    last = max(metrics(run))
    found = ckpt.newest_valid(run / "checkpoints")
    assert found is not None and found[0].step == last
    assert found[1].state is not None and found[1].state.reason == "graceful_stop"
    stopping = events(run, "worker_stopping")[-1]
    assert stopping["reason"] == "graceful_stop" and stopping["step"] == last


def test_non_finite_loss_aborts_without_a_checkpoint(tmp_path: Path, tiny_model: Path,
                                                     corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, save_every=5)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run),
                       env=subprocess_env(OVERNIGHT_INJECT="nan@8"))
    assert result.returncode == ExitCode.NON_FINITE
    assert [c.step for c in ckpt.list_checkpoints(run / "checkpoints")] == [5]
    stopping = events(run, "worker_stopping")[-1]
    assert stopping["reason"] == "non_finite" and stopping["first_bad_step"] == 8
    assert max(metrics(run)) == 7  # the bad step was never applied or reported


def test_gradient_spike_aborts_after_patience_with_a_checkpoint(tmp_path: Path,
                                                                tiny_model: Path,
                                                                corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, save_every=100,
                          grad_spike={"patience": 3})
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run),
                       env=subprocess_env(OVERNIGHT_INJECT="spike@12"))
    assert result.returncode == ExitCode.GRAD_SPIKE
    stopping = events(run, "worker_stopping")[-1]
    assert stopping["first_bad_step"] == 12 and "3 consecutive steps" in stopping["detail"]
    found = ckpt.newest_valid(run / "checkpoints")
    assert found is not None and found[0].step == 13
    assert found[1].state is not None and found[1].state.reason == "grad_spike"


def test_a_rejected_step_leaves_weights_and_moments_as_before_it(tmp_path: Path,
                                                                tiny_model: Path,
                                                                corpus: Path) -> None:
    """One compiled call computes a step's gradient and applies its update (as mlx_lm); a
    step the host rejects (here the third spike in a row, at step 14) is undone: the
    grad_spike checkpoint is bit for bit the state an unbroken run has after step 13."""
    spiked = tmp_path / "spiked"
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, save_every=100, iters=13,
                          grad_spike={"patience": 3})
    clean = tmp_path / "clean"
    assert overnight("train", str(config), "--run-dir", str(clean)).returncode == 0
    config = write_config(tmp_path / "c2.yaml", tiny_model, corpus, save_every=100,
                          grad_spike={"patience": 3})
    result = overnight("train", str(config), "--run-dir", str(spiked),
                       env=subprocess_env(OVERNIGHT_INJECT="spike@12"))
    assert result.returncode == ExitCode.GRAD_SPIKE
    # the same after a resume (the optimizer's loaded state is re-made by its first update)
    resumed = tmp_path / "resumed"
    config = write_config(tmp_path / "c3.yaml", tiny_model, corpus, save_every=10,
                          grad_spike={"patience": 3})
    proc = start(config, resumed, inject="stall@11")
    wait_for_step(resumed, proc, 10)
    time.sleep(0.2)
    kill(proc)
    result = overnight("train", str(config), "--run-dir", str(resumed),
                       env=subprocess_env(OVERNIGHT_INJECT="spike@12"))
    assert result.returncode == ExitCode.GRAD_SPIKE
    ref = ckpt.newest_valid(clean / "checkpoints")
    assert ref is not None and ref[0].step == 13
    for run in (spiked, resumed):
        got = ckpt.newest_valid(run / "checkpoints")
        assert got is not None and got[0].step == 13
        for name in ("adapters.safetensors", "optimizer.safetensors"):
            a, b = mx.load(str(got[0].path / name)), mx.load(str(ref[0].path / name))
            assert max_abs_diff(a, b) == 0.0, (run.name, name)


def test_early_stopping_saves_and_marks_the_run_complete(tmp_path: Path, tiny_model: Path,
                                                         corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, steps_per_eval=5,
                          early_stopping={"patience": 1, "min_delta": 100.0,
                                          "warmup_steps": 0})
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == ExitCode.EARLY_STOPPED, result.stderr
    complete = json.loads((run / "COMPLETE").read_text())
    assert complete["status"] == "early_stopped" and complete["step"] == 10
    assert (run / "adapters" / "adapters.safetensors").exists()


def test_completed_run_is_not_trained_again(tmp_path: Path, tiny_model: Path,
                                            corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=5)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    before = (run / "logs" / "metrics.jsonl").read_text()
    again = overnight("train", str(config), "--run-dir", str(run), "--auto-resume")
    assert again.returncode == 0 and "already complete" in again.stderr
    assert (run / "logs" / "metrics.jsonl").read_text() == before
    fresh = overnight("train", str(config), "--run-dir", str(run), "--fresh")
    assert fresh.returncode == 0
    assert list((run / "previous").iterdir())  # the old run was moved aside, not deleted


def test_adapters_work_with_mlx_lm_generate_and_fuse(tmp_path: Path, tiny_model: Path,
                                                     corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=5)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    gen = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_model),
         "--adapter-path", str(run / "adapters"), "--prompt", "the fox", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert gen.returncode == 0, gen.stderr
    fused = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(tiny_model),
         "--adapter-path", str(run / "adapters"), "--save-path", str(tmp_path / "fused")],
        capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert fused.returncode == 0, fused.stderr
    assert (tmp_path / "fused" / "config.json").exists()


@pytest.mark.parametrize(
    ("model_fixture", "fine_tune_type"),
    [("tiny_model_q4", "lora"), ("tiny_model", "dora"), ("tiny_model", "full")],
    ids=["qlora-4bit", "dora", "full"],
)
def test_qlora_dora_and_full_fine_tuning_train_and_load(
        request: pytest.FixtureRequest, tmp_path: Path, corpus: Path, model_fixture: str,
        fine_tune_type: str) -> None:
    from mlx_lm.utils import load

    model = request.getfixturevalue(model_fixture)
    config = write_config(tmp_path / "c.yaml", model, corpus, iters=6, steps_per_eval=3,
                          fine_tune_type=fine_tune_type, num_layers=1)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    losses = [m["loss"] for m in metrics(run).values()]
    assert len(losses) == 6 and all(x == x for x in losses)
    load(str(model), adapter_path=str(run / "adapters"))  # mlx_lm accepts what we wrote


def test_telemetry_heartbeats_from_loading_on_and_metrics_every_step(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    import zmq

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    endpoint = f"ipc://{tmp_path}/telemetry"
    sub.bind(endpoint)
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=15)
    run = tmp_path / "run"
    proc = start(config, run, "--telemetry", endpoint, "--attempt", "3", inject="stall@12")
    got: list[p._Message] = []
    deadline = time.monotonic() + 120
    stalled_beats = 0
    while time.monotonic() < deadline and stalled_beats < 3:
        if sub.poll(200):
            msgs = p.decode_all(sub.recv())
            got.extend(msgs)
            msg = msgs[-1]
            if isinstance(msg, p.Heartbeat) and msg.step == 11 and \
                    msg.phase == p.Phase.TRAINING and 11 in {
                        m.step for m in got if isinstance(m, p.StepMetrics)}:
                stalled_beats += 1
    assert stalled_beats == 3, "heartbeats must continue while the training thread is stuck"
    kill(proc)
    sub.close()
    beats = [m for m in got if isinstance(m, p.Heartbeat)]
    assert beats and all(b.attempt == 3 and b.total_steps == 15 for b in beats)
    # nothing is lost to the slow joiner (XPUB waits for our subscription): heartbeats from
    # before the model loads, and every phase change announced at once
    assert isinstance(got[0], p.Heartbeat) and got[0].phase in (p.Phase.STARTING,
                                                                p.Phase.LOADING)
    assert {b.phase for b in beats} >= {p.Phase.LOADING, p.Phase.COMPILING, p.Phase.TRAINING}
    steps = [m.step for m in got if isinstance(m, p.StepMetrics)]
    assert steps == list(range(1, 12))
    assert [m.step for m in got if isinstance(m, p.CheckpointSaved)] == [10]
    seqs = [b.seq for b in beats]
    assert seqs == sorted(seqs)


def test_checkpoints_command_lists_and_verifies(tmp_path: Path, tiny_model: Path,
                                                corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=30)
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    listing = overnight("checkpoints", str(run))
    assert listing.returncode == 0 and listing.stdout.count("valid") == 3
    victim = run / "checkpoints" / "step-0000020" / "adapters.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    quick = overnight("checkpoints", str(run))
    assert quick.returncode == 0  # sizes still match: only --verify reads the bytes
    deep = overnight("checkpoints", str(run), "--verify")
    assert deep.returncode == 1 and "INVALID" in deep.stdout and "sha256" in deep.stdout


def test_malformed_lines_are_logged_with_a_count(tmp_path: Path, tiny_model: Path,
                                                 corpus: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = (corpus / "train.jsonl").read_text().splitlines()
    lines[3] = "{broken"
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=2)
    run = tmp_path / "run"
    result = overnight("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    skipped = events(run, "data_lines_skipped")
    assert skipped[0]["malformed"] == 1 and skipped[0]["first_problems"][0].startswith("line 4:")
    # no valid.jsonl: not an error (mlx_lm refuses it), but a warning and one line on stderr
    assert [e["level"] for e in events(run, "validation_skipped")] == ["warning"]
    assert "no valid.jsonl or val.jsonl in" in result.stderr


def test_a_hub_model_that_cannot_be_downloaded_is_one_clear_line(tmp_path: Path,
                                                                 corpus: Path) -> None:
    """Not in the cache, no network (HF_HUB_OFFLINE: the same LocalEntryNotFoundError as a
    machine without one, deterministically): what to do, not huggingface_hub's first line
    ("Cannot find an appropriate cached snapshot folder ...", offline "Got: ConnectError")."""
    from tests.conftest import subprocess_env

    model = "no-such-org/no-such-model-overnight-test"
    config = write_config(tmp_path / "c.yaml", tmp_path / "x", corpus)
    config.write_text(config.read_text().replace(str(tmp_path / "x"), model))
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"),
                       env=subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert result.returncode == ExitCode.BAD_CONFIG
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: model: cannot load {model!r}: not in the Hugging Face cache, and it "
        "cannot be downloaded (HF_HUB_OFFLINE is set); download it where there is a network "
        f"(`hf download {model}`), or give a local model directory")


def test_missing_model_is_one_clear_line(tmp_path: Path, corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "nope", corpus)
    result = overnight("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == ExitCode.BAD_CONFIG
    assert result.stderr.strip().splitlines()[-1] == (
        f"overnight train: model: {str(tmp_path / 'nope')!r} is not a directory")
    assert "Traceback" not in result.stderr


def test_async_checkpoints_give_the_same_result(tmp_path: Path, tiny_model: Path,
                                                corpus: Path) -> None:
    runs = {}
    for mode in ("sync", "async"):
        config = write_config(tmp_path / f"{mode}.yaml", tiny_model, corpus, iters=30,
                              save_every=5, checkpoints={"async_save": mode == "async"})
        runs[mode] = tmp_path / mode
        done = overnight("train", str(config), "--run-dir", str(runs[mode]))
        assert done.returncode == 0, done.stderr
        for info in ckpt.list_checkpoints(runs[mode] / "checkpoints"):
            assert ckpt.validate(info.path).ok
    assert max_abs_diff(adapters(runs["sync"]), adapters(runs["async"])) == 0.0
    saved = [e["step"] for e in events(runs["async"], "checkpoint_saved")]
    assert saved == [5, 10, 15, 20, 25, 30]


def _tfrecord_events(path: Path) -> list:
    """Events of a TensorBoard file: TFRecords (u64 length, u32 crc, data, u32 crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + n])
        events.append(event)
        pos += 12 + n + 4
    return events


def test_tensorboard_scalars_when_the_run_asks(tmp_path: Path, tiny_model: Path,
                                               corpus: Path) -> None:
    pytest.importorskip("tensorboardX", reason="the optional tensorboard extra is not installed")
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=10, steps_per_eval=5,
                          steps_per_report=2, report_to="tensorboard")
    run = tmp_path / "run"
    assert overnight("train", str(config), "--run-dir", str(run)).returncode == 0
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars: dict[str, list[int]] = {}
    for event in _tfrecord_events(files[0]):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(event.step)
    assert scalars["train/loss"] == [2, 4, 6, 8, 10]  # report steps
    assert scalars["val/loss"] == [5, 10]
    assert {"train/grad_norm", "train/lr", "train/tokens_per_sec"} <= set(scalars)


def test_streaming_mode_resumes_exactly_too(tmp_path: Path, tiny_model: Path,
                                            corpus: Path) -> None:
    config = write_config(tmp_path / "s.yaml", tiny_model, corpus, iters=30, save_every=10,
                          training={"streaming": "true"})
    base = tmp_path / "base"
    assert overnight("train", str(config), "--run-dir", str(base)).returncode == 0
    run = tmp_path / "killed"
    proc = start(config, run, inject="stall@17")
    wait_for_step(run, proc, 16)
    kill(proc)
    done = overnight("train", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert events(run, "data_loaded")[0]["streaming"] is True
    assert [e["step"] for e in events(run, "resumed")] == [10]
    assert max_abs_diff(adapters(base), adapters(run)) == 0.0
