"""A tiny scripted worker speaking the real protocol, for fast supervisor tests.

    python tests/fake_worker.py train CONFIG --run-dir D --telemetry E --attempt N
        [--resume auto|PATH [--validated SHA256] | --fresh] [--set k=v]... [--lr-scale F]
        [--skip-steps K] [--skip-batch B]... [--skip-position P]... [--resume-fd FD]

Same contract as the real worker: telemetry through the worker's own sender
(worker/telemetry.py: heartbeats from its thread, batched non-blocking sends), StepMetrics per
step (also appended to logs/metrics.jsonl), CheckpointSaved after real checkpoints
(shared.checkpoint, with a full trainer state), SIGTERM = finish the step, save, exit 23;
SIGUSR1 = save at the end of the step; a --resume checkpoint is validated as the worker does
(trusting the supervisor's --validated manifest hash); exit codes from shared.exitcodes; faults
from `debug.inject` / OVERNIGHT_INJECT, each once per run.

Environment knobs: FAKE_STEP_SECONDS (0.02), FAKE_HEARTBEAT (0.2), FAKE_LOAD_SECONDS (0.1),
FAKE_LEAK_MB (reported MLX memory grows by this much per step of the process),
FAKE_OOM_ABOVE (oom@N fires only while batch_size is above this), FAKE_EARLY_STOP_AT (early
stopping fires at this step).
Every start, validation and end is appended to RUN_DIR/fake.log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from shared import config as config_mod
from shared.checkpoint import validate, write_checkpoint
from shared.errors import CheckpointError, CheckpointRefused, ConfigError
from shared.exitcodes import ExitCode
from shared.protocol import (
    CheckpointSaved,
    EvalResult,
    Phase,
    StepMetrics,
    WorkerStopping,
)
from shared.resume_handoff import receive
from shared.trainer_state import BatchSplit, Best
from tests.checkpoint_support import trainer_state
from worker.telemetry import LiveStatus, Telemetry

STEP_SECONDS = float(os.environ.get("FAKE_STEP_SECONDS", "0.02"))
HEARTBEAT = float(os.environ.get("FAKE_HEARTBEAT", "0.2"))
LOAD_SECONDS = float(os.environ.get("FAKE_LOAD_SECONDS", "0.1"))
LEAK_MB = float(os.environ.get("FAKE_LEAK_MB", "0"))
OOM_ABOVE = int(os.environ.get("FAKE_OOM_ABOVE", "0"))
EARLY_STOP_AT = int(os.environ.get("FAKE_EARLY_STOP_AT", "0"))


def safetensors(name: str, value: float) -> bytes:
    data = struct.pack("<4f", value, value, value, value)
    header = json.dumps({name: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + data


class Fake:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir = Path(args.run_dir)
        overrides = dict(kv.split("=", 1) for kv in args.set)
        self.config = config_mod.load(Path(args.config), overrides)
        self.attempt = args.attempt
        self.step = 0
        self.steps_here = 0
        self.stop = False
        self.save_now = False
        self.lr_scale = 1.0
        self.data_position = 0
        self.best = Best(None, -1)
        # The real worker's sender: heartbeats from its thread, batched non-blocking sends.
        self.status = LiveStatus("fake", self.attempt, self.config.iters,
                                 active_mb=self.mlx_mb(), peak_mb=self.mlx_mb())
        self.telemetry = Telemetry(args.telemetry, self.status, interval=HEARTBEAT)
        self.metrics = self.run_dir / "logs" / "metrics.jsonl"
        spec = os.environ.get("OVERNIGHT_INJECT") or self.config.debug.inject
        self.faults = [
            (k, int(s)) for k, _, s in (p.strip().partition("@") for p in spec.split(",") if p)
        ]

    # ---- telemetry ----
    def send(self, msg: Any) -> None:
        self.telemetry.send(msg)

    @property
    def phase(self) -> Phase:
        return self.status.phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self.status.phase = phase
        self.telemetry.beat_now()  # as the worker: a phase change is told at once

    def mlx_mb(self) -> float:
        return 100.0 + LEAK_MB * self.steps_here  # a leak: grows with this process's steps

    def exit(self, code: ExitCode, reason: str, detail: str = "", first_bad: int = -1) -> None:
        self.send(WorkerStopping(run_id="fake", attempt=self.attempt, step=self.step,
                                 exit_code=int(code), reason=reason, detail=detail,
                                 first_bad_step=first_bad))
        self.log(f"end {os.getpid()} {time.time()} {int(code)}")
        self.telemetry.close()  # delivers what is queued, as the worker does on its way out
        os._exit(int(code))

    def log(self, line: str) -> None:
        with open(self.run_dir / "fake.log", "a") as f:
            f.write(line + "\n")

    # ---- faults ----
    def fire(self, kind: str) -> bool:
        for k, step in self.faults:
            if k != kind or step != self.step:
                continue
            marker = self.run_dir / f"fake-inject-{k}@{step}"
            if marker.exists():
                return False
            if kind == "oom" and self.config.batch_size <= OOM_ABOVE:
                return False
            marker.write_text(str(self.attempt))
            return True
        return False

    def abort_with(self, line: str) -> None:
        self.log(f"end {os.getpid()} {time.time()} abort")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        signal.signal(signal.SIGABRT, signal.SIG_DFL)
        os.abort()

    # ---- checkpoints ----
    def save(self, reason: str, kill_before_manifest: bool = False) -> None:
        self.phase = Phase.CHECKPOINTING
        t0 = time.time()
        state = trainer_state(
            self.step, self.config.iters, data_position=self.data_position,
            best=self.best,
            batch=BatchSplit(self.config.batch_size, self.config.grad_accumulation_steps,
                             self.config.effective_batch),
            config_hash=self.config.hash(), lr_scale=self.lr_scale, reason=reason)

        def files(d: Path) -> None:
            (d / "adapters.safetensors").write_bytes(safetensors("lora_a", float(self.step)))
            (d / "optimizer.safetensors").write_bytes(safetensors("m", 0.5))
            (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
            (d / "trainer_state.json").write_text(json.dumps(state.to_dict()))

        def die(d: Path) -> None:
            self.log(f"end {os.getpid()} {time.time()} killed")
            os.kill(os.getpid(), signal.SIGKILL)

        path = write_checkpoint(self.run_dir / "checkpoints", self.step, files,
                                die if kill_before_manifest else None)
        if self.fire("checkpoint_unrenamed"):  # killed between the manifest and the rename
            os.replace(path, path.parent / f".tmp-{path.name}-{os.getpid()}")
            die(path)
        self.send(CheckpointSaved(run_id="fake", attempt=self.attempt, step=self.step,
                                  path=str(path), seconds=time.time() - t0, bytes=100))
        self.phase = Phase.TRAINING

    def await_resume(self) -> None:
        """`--resume-fd`: the resume point comes over the pipe, as to the real worker
        (shared/resume_handoff.py); logs/fake-argv-N.json then holds the equivalent flags."""
        a = self.args
        self.log(f"awaiting {os.getpid()} {time.time()}")
        handoff = receive(a.resume_fd, lambda: self.stop, limit=600)
        if handoff is None:
            self.log(f"handoff_closed {os.getpid()} {time.time()}")
            self.exit(ExitCode.GRACEFUL_STOP, "graceful_stop", "no checkpoint choice")
            return
        self.log(f"handoff {os.getpid()} {time.time()} {handoff.resume}")
        a.resume, a.validated = handoff.resume, handoff.validated
        a.skip_steps, a.skip_position = handoff.skip_steps, list(handoff.skip_positions)
        argv = sys.argv[1:]
        at = argv.index("--resume-fd")
        argv[at:at + 2] = ["--resume", a.resume, *(["--validated", a.validated]
                                                   if a.validated else [])]
        argv += [x for p in a.skip_position for x in ("--skip-position", str(p))]
        argv += ["--skip-steps", str(a.skip_steps)] if a.skip_steps else []
        with open(self.run_dir / "logs" / f"fake-argv-{self.attempt}.json", "w") as f:
            json.dump(argv, f)

    def resume(self) -> None:
        a = self.args
        if a.fresh or a.resume in (None, "auto"):
            return
        result = validate(Path(a.resume), trusted_manifest=a.validated)  # as the worker does
        if not result.ok or result.state is None:
            raise CheckpointRefused(Path(a.resume), f"--resume {a.resume}: {result.reason}")
        self.log(f"validated {os.getpid()} {time.time()} "
                 f"{'trusted' if a.validated == result.manifest_sha256 else 'full'}")
        state = result.state
        self.step = state.step
        self.data_position = state.data_position
        self.lr_scale = state.lr_scale
        self.best = state.best

    def run(self) -> None:
        self.log(f"start {os.getpid()} {time.time()} attempt={self.attempt}")
        signal.signal(signal.SIGTERM, lambda s, f: setattr(self, "stop", True))
        signal.signal(signal.SIGUSR1, lambda s, f: setattr(self, "save_now", True))
        self.phase = Phase.LOADING
        if (self.run_dir / "COMPLETE").exists():
            self.exit(ExitCode.COMPLETED, "completed", "already complete")
        if not Path(self.config.data).is_dir():
            sys.stderr.write(f"data: {self.config.data}: directory not found\n")
            self.exit(ExitCode.BAD_CONFIG, "bad_config",
                      f"data: {self.config.data}: directory not found")
        time.sleep(LOAD_SECONDS)
        if self.args.resume_fd is not None:
            self.await_resume()
        self.resume()
        if self.args.lr_scale is not None:
            self.lr_scale = self.args.lr_scale
        self.data_position += self.args.skip_steps
        self.phase = Phase.TRAINING
        while self.step < self.config.iters:
            time.sleep(STEP_SECONDS)
            self.step += 1
            self.steps_here += 1
            self.data_position += 1
            self.train_step()
            if self.step == EARLY_STOP_AT:
                self.save("early_stopped")
                (self.run_dir / "COMPLETE").write_text("early stopped\n")
                self.exit(ExitCode.EARLY_STOPPED, "early_stopped", "no improvement for 5 evals")
            if self.stop:
                self.save("graceful_stop")
                self.exit(ExitCode.GRACEFUL_STOP, "graceful_stop", "SIGTERM")
            if self.step % self.config.save_every == 0 or self.save_now:
                self.save_now = False
                self.save("periodic", kill_before_manifest=self.fire("checkpoint_crash"))
            if self.step % self.config.steps_per_eval == 0:
                loss = 2.0 / self.step
                self.best = Best(loss, self.step)
                self.send(EvalResult(run_id="fake", attempt=self.attempt, step=self.step,
                                     val_loss=loss, best_val_loss=loss, best_step=self.step,
                                     seconds=0.01))
        self.save("completed")
        (self.run_dir / "COMPLETE").write_text("done\n")
        self.exit(ExitCode.COMPLETED, "completed", "all steps done")

    def train_step(self) -> None:
        loss = 1.0 / self.step
        m = StepMetrics(run_id="fake", attempt=self.attempt, step=self.step, time=time.time(),
                        loss=loss, grad_norm=0.5, lr=1e-5 * self.lr_scale,
                        tokens=100 * self.config.batch_size, tokens_per_sec=1000.0,
                        step_seconds=STEP_SECONDS, active_mb=self.mlx_mb(),
                        peak_mb=self.mlx_mb(), rss_mb=50.0)
        s = self.status  # what the next heartbeat says, as worker/reporting.py keeps it
        s.step, s.last_step_time, s.active_mb, s.peak_mb = m.step, m.time, m.active_mb, m.peak_mb
        with open(self.metrics, "a") as f:  # the worker's per-step file (logs/metrics.jsonl)
            f.write(json.dumps(m.to_dict()) + "\n")
        self.send(m)
        if self.fire("crash"):
            self.abort_with("[METAL] Command buffer execution failed: Caused GPU Hang Error "
                            "(00000003:kIOGPUCommandBufferCallbackErrorHang)")
        if self.fire("oom"):
            self.abort_with("libc++abi: terminating due to uncaught exception of type "
                            "std::runtime_error: [METAL] Command buffer execution failed: "
                            "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOf"
                            "Memory)")
        if self.fire("gpu_watchdog"):
            self.abort_with("[METAL] Command buffer execution failed: Impacting Interactivity "
                            "(0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)")
        if self.fire("hang"):
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.fire("stall"):
            while True:
                time.sleep(1)
        if self.fire("nan"):
            self.exit(ExitCode.NON_FINITE, "non_finite", f"loss is nan at step {self.step}",
                      self.step)
        if self.fire("spike"):
            self.save("grad_spike")
            self.exit(ExitCode.GRAD_SPIKE, "grad_spike", "grad norm 3.1e4 > 1000 for 3 steps",
                      self.step - 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["train"])
    p.add_argument("config")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--telemetry", required=True)
    p.add_argument("--attempt", type=int, default=1)
    p.add_argument("--run-id")
    p.add_argument("--resume", default="auto")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--lr-scale", type=float)
    p.add_argument("--skip-steps", type=int, default=0)
    p.add_argument("--validated")
    p.add_argument("--resume-fd", type=int)
    p.add_argument("--skip-batch", type=int, action="append", default=[])  # accepted, unused
    p.add_argument("--skip-position", type=int, action="append", default=[])  # likewise
    args = p.parse_args()
    (Path(args.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    with open(Path(args.run_dir) / "logs" / f"fake-argv-{args.attempt}.json", "w") as f:
        json.dump(sys.argv[1:], f)
    try:
        Fake(args).run()
    except CheckpointRefused as e:  # as worker/session.py: quarantined, an older one next
        print(f"overnight train: {e}", file=sys.stderr)
        sys.exit(int(ExitCode.CHECKPOINT_REFUSED))
    except (ConfigError, CheckpointError) as e:
        print(f"overnight train: {e}", file=sys.stderr)
        sys.exit(int(ExitCode.BAD_CONFIG))


if __name__ == "__main__":
    main()
