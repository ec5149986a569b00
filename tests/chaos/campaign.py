"""The campaign: a tiny model, an uninterrupted reference run (twice: it must be
reproducible, or no Δ means anything), then the planned runs under fire, one table.

Every run — the references too — is `overnight run` with the same config and environment:
OpenBLAS preloaded as tests/conftest.py does (same BLAS, so "Δ == 0.0" is a fair demand) and
the soft open-file limit at 256 (tests/chaos/launch.py).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.chaos import diskfull, plan, table
from tests.chaos.driver import MISSED, ROOT, Driver, Setup
from tests.chaos.kinds import KINDS
from tests.chaos.plan import RunPlan
from tests.chaos.results import RunResult, finite
from tests.chaos.table import KindRow
from tests.conftest import subprocess_env

SUPERVISOR = {
    "heartbeat_timeout": 3.0, "startup_timeout": 60.0, "stall_timeout": 4.0,
    "stop_timeout": 5.0, "backoff_initial": 0.3, "backoff_max": 1.0, "sample_interval": 1.0,
    "caffeinate": False,
}


@dataclass
class Options:
    faults: int = 200
    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    out: Path | None = None
    jobs: int = 1
    iters: int = 100
    save_every: int = 10
    workdir: Path | None = None  # default: a new temp dir (kept: evidence)
    model: Path | None = None  # default: `overnight tiny-model` in the workdir
    data: Path | None = None
    command: str = ""  # how the campaign was started (for the record)
    check_reference: bool = True  # a second uninterrupted run must equal the first
    only_runs: list[int] | None = None  # run only these runs of the plan (to reproduce one)
    stop: threading.Event = field(default_factory=threading.Event)  # set: stop now, cleanly
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


@dataclass
class Campaign:
    options: dict[str, Any]
    workdir: str
    started: str
    seconds: float = 0.0
    reference_seconds: float = 0.0
    reference_reproducible: float | None = None  # max |Δ| between two uninterrupted runs
    skipped_kinds: dict[str, str] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    table: list[KindRow] = field(default_factory=list)
    complete: bool = False

    @property
    def fired(self) -> int:
        return sum(f.fired for run in self.runs for f in run.faults)

    def row(self, kind: str) -> KindRow | None:
        return next((r for r in self.table if r.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = finite({
            "options": self.options, "workdir": self.workdir, "started": self.started,
            "seconds": self.seconds, "complete": self.complete, "faults_fired": self.fired,
            "seconds_per_fault": round(self.seconds / self.fired, 2) if self.fired else None,
            "reference_seconds": self.reference_seconds,
            "reference_reproducible": self.reference_reproducible,
            "skipped_kinds": self.skipped_kinds,
            "table": [r.to_dict() for r in self.table],
            "runs": [r.to_dict() for r in self.runs],
        })
        return out

    def summary(self) -> str:
        finished = sum(r.finished for r in self.runs)
        per = f"{self.seconds / self.fired:.1f}" if self.fired else "–"
        lines = [
            f"{self.fired} faults in {len(self.runs)} runs ({finished} finished) in "
            f"{self.seconds:.0f} s: {per} s per fault; uninterrupted run "
            f"{self.reference_seconds:.1f} s, reproducible: max |Δ| "
            f"{self.reference_reproducible}",
        ]
        for kind, why in self.skipped_kinds.items():
            lines.append(f"skipped {kind}: {why}")
        for run in self.runs:
            for u in run.unexpected:
                lines.append(f"run {run.index}: {u[:400]}")
            for f in run.faults:
                if not f.fired:
                    lines.append(f"run {run.index}: #{f.id} {f.kind} not fired: {f.skipped}")
        return "\n".join(lines)


def run_campaign(opts: Options) -> Campaign:
    """Plan, run and judge a campaign (see the package docstring); writes `opts.out` after
    every run (a partial file is a valid one, `complete: false`)."""
    t0 = time.monotonic()
    workdir = (opts.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = list(opts.kinds)
    campaign = Campaign(options=_options(opts), workdir=str(workdir),
                        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    disk_mode = "tmpfs"
    if "disk_full" in kinds:
        why = diskfull.tmpfs_allowed()
        if why and diskfull.injection_available():
            disk_mode = "inject"
        elif why:
            kinds.remove("disk_full")
            campaign.skipped_kinds["disk_full"] = (
                f"cannot mount a tmpfs ({why}) and worker/inject.py has no disk_full@N")
    model, data = _model(opts, workdir)
    config = _config(workdir / "chaos.yaml", model, data, opts)
    ref_setup = Setup(workdir=workdir, config=config,
                      reference=workdir / "reference-1" / "run" / "adapters" /
                      "adapters.safetensors",
                      env=subprocess_env(), iters=opts.iters,
                      stop_timeout=float(SUPERVISOR["stop_timeout"]), log=opts.log,
                      stop=opts.stop)
    t_ref = time.monotonic()
    first = Driver(RunPlan(0), ref_setup, name="reference-1").execute()
    if opts.stop.is_set():
        raise KeyboardInterrupt
    campaign.reference_seconds = round(time.monotonic() - t_ref, 2)
    if not first.finished:
        raise RuntimeError(f"the uninterrupted reference run did not finish: {first.unexpected}"
                           f" (see {workdir / 'reference-1'})")
    opts.log(f"reference: {campaign.reference_seconds} s")
    if opts.check_reference:
        second = Driver(RunPlan(0), ref_setup, name="reference-2").execute()
        campaign.reference_reproducible = second.delta
        opts.log(f"a second uninterrupted run differs by max |Δ| {second.delta}")
    plans = plan.plan(kinds, opts.faults, opts.iters, opts.save_every, opts.seed, disk_mode)
    if opts.only_runs:
        plans = [p for p in plans if p.index in opts.only_runs]
    opts.log(f"{sum(len(p.faults) for p in plans)} faults in {len(plans)} runs; work dir "
             f"{workdir}")
    lock = threading.Lock()

    def one(p: RunPlan) -> RunResult:
        result = Driver(p, ref_setup).execute()
        with lock:
            campaign.runs.append(result)
            campaign.runs.sort(key=lambda r: r.index)
            _log_run(opts.log, result)
            campaign.seconds = round(time.monotonic() - t0, 1)
            campaign.table = table.rows(campaign.runs, kinds)
            _write(opts.out, campaign)
        return result

    pool = ThreadPoolExecutor(max_workers=max(1, opts.jobs))
    try:
        list(pool.map(one, plans))
        if opts.stop.is_set():
            raise KeyboardInterrupt
        missed = [f.kind for run in campaign.runs for f in run.faults
                  if not f.fired and f.skipped.startswith(MISSED)]
        if missed:
            makeup = plan.plan_kinds(
                missed, opts.iters, opts.save_every, random.Random(opts.seed + 1), disk_mode,
                first_run=max(p.index for p in plans) + 1,
                first_id=max(f.id for p in plans for f in p.faults) + 1)
            opts.log(f"{len(missed)} faults missed their moment: {len(makeup)} make-up runs")
            list(pool.map(one, makeup))
        if opts.stop.is_set():
            raise KeyboardInterrupt
    except BaseException:
        # Ctrl-C (or an error): the running drivers stop and clean up (their processes, a
        # tmpfs), nothing new starts, and the file keeps what was done (complete: false)
        ref_setup.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        _write(opts.out, campaign)
        raise
    pool.shutdown()
    campaign.seconds = round(time.monotonic() - t0, 1)
    campaign.table = table.rows(campaign.runs, kinds)
    campaign.complete = True
    _write(opts.out, campaign)
    return campaign


def _options(opts: Options) -> dict[str, Any]:
    return {"faults": opts.faults, "seed": opts.seed, "kinds": opts.kinds, "jobs": opts.jobs,
            "iters": opts.iters, "save_every": opts.save_every, "command": opts.command,
            "check_reference": opts.check_reference, "only_runs": opts.only_runs,
            "supervisor": SUPERVISOR}


def _model(opts: Options, workdir: Path) -> tuple[Path, Path]:
    if opts.model is not None and opts.data is not None:
        return opts.model, opts.data
    subprocess.run([sys.executable, "-m", "shared.cli", "tiny-model", str(workdir / "tiny")],
                   cwd=ROOT, env=subprocess_env(), check=True, capture_output=True,
                   timeout=300)
    return workdir / "tiny" / "model", workdir / "tiny" / "data"


def _config(path: Path, model: Path, data: Path, opts: Options) -> Path:
    """The runs' config: mlx_lm keys at test scale, dropout and accumulation on (everything
    exact resume must restore), fast supervisor timeouts, default budgets."""
    config = {
        "model": str(model), "data": str(data), "iters": opts.iters, "batch_size": 2,
        "grad_accumulation_steps": 2, "learning_rate": 1e-3, "steps_per_report": 10,
        "steps_per_eval": 20, "save_every": opts.save_every, "val_batches": 2,
        "num_layers": -1, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1},
        "training": {"warmup_steps": 5}, "grad_spike": {"patience": 2},
        "supervisor": SUPERVISOR,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _log_run(log: Callable[[str], None], run: RunResult) -> None:
    fired = [f for f in run.faults if f.fired]
    bad = [f for f in fired if not (f.recovered and f.classified_ok)
           or f.corrupt_accepted or (f.delta_required and f.delta not in (0.0, None))]
    log(f"run {run.index}: {run.state} at {run.final_step}/{run.total_steps} in "
        f"{run.seconds:.0f} s, {len(fired)} faults "
        f"({', '.join(f'{f.kind}@{f.step}' for f in fired)}), Δ {run.delta}, "
        f"{len(bad)} bad" + "".join(f"\n   #{f.id} {f.kind}: {f.observed[:200]}"
                                    f"{' BLAMED: ' + f.blamed[:200] if f.blamed else ''}"
                                    for f in bad))


def _write(out: Path | None, campaign: Campaign) -> None:
    if out is None:
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(campaign.to_dict(), indent=1, allow_nan=False))
    tmp.replace(out)
