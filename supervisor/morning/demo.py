"""`overnight demo`: a supervised fine-tune that fails twice, recovers, finishes, and reports.

    overnight demo                      # everything in a new temporary directory (printed)
    overnight demo --keep ~/od-demo     # ... in ~/od-demo (model/, data/, demo.yaml, run/)
    overnight demo --format html        # the report as one HTML file

A tiny random llama model and a small corpus are built offline (`overnight tiny-model`), then
`overnight run` trains it as a separate process with two injected faults: a Metal-style
crash (the worker prints the error a Mac's GPU driver would and aborts — on Linux too, where
there is no Metal: it is an emulation) and a hang (the worker freezes; no heartbeat). The
supervisor notices each, restarts from the newest checkpoint and finishes. While it runs, the
demo narrates what the supervisor and the worker log, saying of each fault that it was
injected and what it emulates (shared/faults.py); the report says so too. At the end it
prints the report. About 30 s on a 2-core CPU, no downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from shared.errors import ConfigError, OvernightError, RunDirError
from shared.exitcodes import FailureClass
from shared.faults import describe, ended_by
from shared.layout import RunDir, cannot_create
from shared.run_record import State
from supervisor.daemon.stopping import PopenHandle, stop
from supervisor.morning.runfacts import gather
from supervisor.morning.runlogs import LogLine, Problems, tails
from supervisor.morning.verdict import duration

ITERS = 200
TIMEOUT = 600.0
POLL = 0.3
# Short timeouts: a hang is noticed in 5 s, restarts wait about 1 s.
SUPERVISOR = {
    "heartbeat_timeout": 5.0, "startup_timeout": 90.0, "stop_timeout": 10.0,
    "backoff_initial": 1.0, "backoff_max": 5.0, "sample_interval": 1.0, "caffeinate": False,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the model, corpus, config and run in DIR "
                             "(default: a new temporary directory, printed; kept either way)")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="the run directory (default: run/ in the demo directory)")
    parser.add_argument("--iters", type=int, default=ITERS, help="steps to train")
    parser.add_argument("--inject", metavar="SPEC",
                        help="faults to inject (default: a crash at 35%% of the steps and a "
                             "hang at 75%%); '' for none; see worker/inject.py")
    parser.add_argument("--format", choices=("md", "html"), default="md",
                        help="the report's format (see overnight report)")
    parser.add_argument("--queue", action="store_true",
                        help="a night of two jobs instead: a queue, run, then compared "
                             "(supervisor/queue/demo.py)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help="seconds before the demo gives up on the supervisor")


def default_faults(iters: int) -> str:
    return f"crash@{max(2, round(iters * 0.35))},hang@{max(3, round(iters * 0.75))}"


def write_config(base: Path, iters: int, inject: str) -> Path:
    every = max(1, iters // 10)
    config = {
        "model": str(base / "model"), "data": str(base / "data"), "iters": iters,
        "batch_size": 4, "learning_rate": 1e-3, "steps_per_report": every,
        "steps_per_eval": every, "save_every": every, "val_batches": 4, "num_layers": -1,
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        "training": {"warmup_steps": 5},
        "early_stopping": {"enabled": False},
        "debug": {"inject": inject},
        "supervisor": SUPERVISOR,
    }
    path = base / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare(base: Path, iters: int, inject: str) -> Path:
    """The tiny model and the corpus (once per directory: `python -m worker tiny-model`, the
    worker's command), and the config; returns the config."""
    done = subprocess.run([sys.executable, "-m", "worker", "tiny-model", str(base),
                           "--n-train", "512", "--n-valid", "32"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OvernightError(f"{base}: cannot build the demo's model ({done.stderr.strip()})")
    return write_config(base, iters, inject)


def main(args: argparse.Namespace) -> int:
    if args.iters < 10:
        raise ConfigError(f"--iters: expected at least 10 steps, got {args.iters}")
    started = time.time()
    base = (args.keep or Path(tempfile.mkdtemp(prefix="overnight-demo-"))).resolve()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(cannot_create(base, e, "demo directory")) from None
    if args.queue:
        from supervisor.queue import demo as queue_demo

        return queue_demo.main(args, base, prepare)
    run = RunDir((args.run_dir or base / "run").resolve())
    if run.record.exists() or run.checkpoints.exists():
        raise ConfigError(f"{run.root}: already holds a run; choose another --run-dir or "
                          "--keep directory, or remove it")
    run.create()  # RunDirError: one line naming the path
    inject = default_faults(args.iters) if args.inject is None else args.inject
    out = sys.stdout
    print(f"demo: {base}", file=out)
    print(f"demo: building a tiny model and a corpus; then `overnight run` trains "
          f"{args.iters} steps with faults injected: {inject or 'none'}", file=out)
    config = prepare(base, args.iters, inject)
    console = base / "supervisor-console.log"
    t0 = time.time()
    with open(console, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir",
             str(run.root)], stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            narrate_until_exit(proc, run, t0, args.timeout, out)
        except BaseException:  # Ctrl-C, or our output's reader gone (`overnight demo | head`)
            _stop(proc)
            raise
    if proc.returncode != 0:
        print(f"demo: the supervisor failed (exit {proc.returncode}); its output: {console}",
              file=out)
    from supervisor.morning.report import write_report

    report = run.root / f"report.{args.format}"
    facts = gather(run.root)
    written = write_report(facts, report, args.format)
    print(f"\ndemo: finished in {duration(time.time() - started)}. The report "
          f"(`overnight report {run.root}`):\n", file=out)
    print(written.markdown, file=out)
    if written.note:
        print(f"demo: {written.note}", file=out)
    print(f"report: {report}" + (f"\npicture: {written.png}" if written.png else ""), file=out)
    print(f"logs:   overnight logs {run.root}   (--level warning, --attempt 2, --json, -f)",
          file=out)
    return 0 if facts.state is State.FINISHED and proc.returncode == 0 else 1


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM: the supervisor asks the worker to checkpoint and stop, then exits."""
    stop(PopenHandle(proc), float(SUPERVISOR["stop_timeout"]) + 10)


def narrate_until_exit(proc: subprocess.Popen[Any], run: RunDir, t0: float, timeout: float,
                       out: TextIO) -> None:
    """Follow the run's logs and tell what happens, until the supervisor exits."""
    problems = Problems()
    followed = tails(run, problems)
    try:
        while True:
            done = proc.poll() is not None
            batch = sorted((ln for t in followed for ln in t.new_lines(final=done)),
                           key=lambda ln: ln.time if not math.isnan(ln.time) else 0.0)
            for line in batch:
                text = narrate(line)
                if text:
                    print(f"[{duration(max(0.0, line.time - t0)):>6}] {text}", file=out,
                          flush=True)
            if done:
                return
            if time.time() - t0 > timeout:
                print(f"demo: no result after {timeout:g} s; stopping the supervisor", file=out)
                _stop(proc)
                return
            time.sleep(POLL)
    finally:
        for t in followed:
            t.close()


def narrate(line: LogLine) -> str | None:
    """One line for the events a person watching the demo cares about, else None."""
    d, ev = line.data, line.event
    if line.source == "supervisor":
        if ev == "worker_spawned":
            resume = d.get("resume_step")
            where = f"resuming from checkpoint {resume}" if resume else "from scratch"
            return f"supervisor: attempt {d.get('attempt')} started ({where})"
        if ev == "worker_unhealthy":
            return f"supervisor: worker unhealthy: {d.get('kind')}, {d.get('detail')}"
        if ev == "worker_exited":
            cls = d.get("classification")
            mark = "✓" if cls == "completed" else "✗"
            detail = str(d.get("detail") or "")
            detail = detail if len(detail) < 90 else detail[:89] + "…"
            fault = ended_by(d.get("injected") or [], cls and _failure_class(cls))
            how = f"{cls}, injected ({fault})" if fault else str(cls)
            return (f"supervisor: {mark} attempt {d.get('attempt')} ended at step "
                    f"{d.get('step')}: {how} ({detail})")
        if ev == "recovery_decision":
            delay = d.get("delay_s") or 0
            wait = f" in {duration(float(delay))}" if d.get("verdict") == "restart" else ""
            return f"supervisor: → {d.get('action')}{wait}"
        if ev == "run_ended":
            return f"supervisor: run ended: {d.get('state')} ({d.get('reason')})"
        return None
    if ev == "progress":
        return (f"worker:     step {d.get('step')}  loss {_f(d.get('loss'))}  "
                f"{_f(d.get('tokens_per_sec'), '.0f')} tok/s")
    if ev == "evaluated":
        return (f"worker:     step {d.get('step')}  validation loss {_f(d.get('val_loss'))} "
                f"(best {_f(d.get('best_val_loss'))})")
    if ev == "resumed":
        return f"worker:     resumed from step {d.get('step')} (exact state restored)"
    if ev == "fault_injected":
        return (f"worker:     injecting {d.get('fault')} on purpose (debug.inject), emulating "
                f"{d.get('emulates') or describe(str(d.get('fault')))}: not a real failure")
    return None


def _failure_class(value: Any) -> FailureClass | None:
    try:
        return FailureClass(value)
    except ValueError:
        return None


def _f(x: Any, fmt: str = ".3f") -> str:
    with contextlib.suppress(TypeError, ValueError):
        return format(float(x), fmt)
    return "?"
