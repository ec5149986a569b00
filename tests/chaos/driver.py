"""One supervised run under fire: start `overnight run`, wait for each fault's moment, cause
it (tests/chaos/faults.py), wait for the supervisor to start the next worker, and so on until
the run ends; then judge (tests/chaos/judge.py).

When the supervisor dies or gives up where it should not, the fault that did it is blamed
and the run is rescued the way a user would in the morning: start `overnight run` again
(after moving aside a checkpoint the campaign damaged, if that is what stopped it), at most
`MAX_RESCUES` times, so one broken kind does not hide how the others fare.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.chaos import diskfull, faults, judge
from tests.chaos.kinds import CORRUPT_PREFIX, KINDS
from tests.chaos.observe import Observer, alive, epoch, run_processes, wait_until
from tests.chaos.plan import RunPlan
from tests.chaos.results import FaultResult, RunResult

ROOT = Path(__file__).resolve().parents[2]
MAX_RESCUES = 2
LAST_STEPS = 3  # a fault due this close to the run's end is skipped ("missed"), not fired
MISSED = "missed"  # how the reason of a fault that missed its moment begins (planned again)
SOFT_NOFILE = 256  # macOS's default soft open-file limit: every supervisor starts with it


@dataclass(frozen=True)
class Setup:
    """What every run of a campaign shares."""

    workdir: Path
    config: Path
    reference: Path  # the uninterrupted run's adapters.safetensors
    env: dict[str, str]
    iters: int
    stop_timeout: float
    fault_timeout: float = 180.0  # longest wait for one fault's moment or its recovery
    run_timeout: float = 900.0
    log: Callable[[str], None] = print
    stop: threading.Event = field(default_factory=threading.Event)  # the campaign ends now


class Driver:
    def __init__(self, plan: RunPlan, setup: Setup, name: str = "") -> None:
        self.plan, self.s = plan, setup
        self.base = setup.workdir / (name or f"run-{plan.index:03d}")
        self.base.mkdir(parents=True, exist_ok=True)
        self.mount = self.base / "tmpfs" if plan.on_tmpfs else None
        self.run_dir = (self.mount or self.base) / "run"
        self.env = dict(setup.env)
        if plan.inject:
            self.env["OVERNIGHT_INJECT"] = plan.inject
        self.obs = Observer(self.run_dir)
        self.sup: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []
        self.outputs: dict[int, Path] = {}  # supervisor pid -> its output file
        self.results = [FaultResult.planned(f, plan.index) for f in plan.faults]
        self.unexpected: list[str] = []
        self.rescues = 0
        self.expect_exit = False  # a fault is about to stop the supervisor on purpose
        self.last_fired: FaultResult | None = None
        self.deadline = time.monotonic() + setup.run_timeout

    # ---- the run -------------------------------------------------------------------------

    def execute(self) -> RunResult:
        t0 = time.monotonic()
        try:
            self._prepare()
            for r in self.results:
                if r.fired or r.skipped:
                    continue
                rng = random.Random(r.seed)
                if not self.wait_trigger(r):
                    r.skipped = r.skipped or f"{MISSED}: the run ended before its moment"
                    continue
                faults.fire(self, r, rng)
                r.fired = r.t_fired is not None
                self.last_fired = r
                self.settle(r)
            self.wait_end()
        except Exception as e:
            self.unexpected.append(f"campaign error: {e!r}")
            self.s.log(traceback.format_exc())
        finally:
            self.stop_everything()
        try:
            return judge.judge_run(self, time.monotonic() - t0)
        finally:
            if self.mount is not None:
                # keep the evidence: the run directory (small) is copied off the tmpfs
                shutil.copytree(self.run_dir, self.base / "run", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("sock", "run.lock"))
                diskfull.unmount(self.mount)

    def _prepare(self) -> None:
        if self.mount is not None:
            why = diskfull.mount_tmpfs(self.mount)
            if why:
                for r in self.results:
                    if r.kind == "disk_full":
                        r.skipped = why
                self.mount = None
                self.run_dir = self.base / "run"
                self.obs = Observer(self.run_dir)
        first = self.results[0] if self.results else None
        if first is not None and first.kind == "start_race" and first.trigger == 0:
            faults.start_race(self, first, random.Random(first.seed), at_start=True)
            first.fired = first.t_fired is not None
            self.last_fired = first
        else:
            self.sup = self.start_supervisor()

    def start_supervisor(self) -> subprocess.Popen[bytes]:
        """`overnight run CONFIG --run-dir RUN` with the campaign's environment."""
        n = len(self.started) + 1
        out_path = self.base / f"supervisor-{n}.out"
        out: IO[bytes] = open(out_path, "wb")  # noqa: SIM115 - closed below, child keeps it
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.launch", str(SOFT_NOFILE), sys.executable,
                 "-m", "shared.cli", "run", str(self.s.config), "--run-dir", str(self.run_dir)],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            out.close()
        self.started.append(proc)
        self.outputs[proc.pid] = out_path
        return proc

    def output_tail(self, proc: subprocess.Popen[bytes], lines: int = 3) -> str:
        path = self.outputs.get(proc.pid)
        if path is None or not path.exists():
            return ""
        text = path.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    # ---- waiting -------------------------------------------------------------------------

    def going(self) -> bool:
        """False once the run is over (finished, or it cannot go on, or out of time)."""
        if self.s.stop.is_set():
            if "interrupted" not in self.unexpected:
                self.unexpected.append("interrupted")
            return False
        if time.monotonic() > self.deadline:
            if "run timed out" not in self.unexpected:
                self.unexpected.append("run timed out")
            return False
        return self.check_supervisor()

    def check_supervisor(self) -> bool:
        sup = self.sup
        if sup is None or sup.poll() is None or self.expect_exit:
            return True
        rec = self.obs.record() or {}
        state = rec.get("state")
        if sup.returncode == 0 and state in ("finished", "early_stopped"):
            return False
        what = (f"supervisor {sup.pid} exited {sup.returncode} with the run {state!r} "
                f"({rec.get('reason', '')!s:.200}): {self.output_tail(sup)!s:.400}")
        if any(u == what for u in self.unexpected):
            return False
        self.unexpected.append(what)
        culprit = judge.culprit(self, rec)
        if culprit is not None and not culprit.blamed:
            culprit.blamed = what
        self.s.log(f"run {self.plan.index}: UNEXPECTED {what}")
        if self.rescues >= MAX_RESCUES:
            return False
        self.rescues += 1
        self._clear_damage()
        self.sup = self.start_supervisor()
        return True

    def _clear_damage(self) -> None:
        """What a user would do before starting again: move aside checkpoints the campaign
        damaged that the supervisor left in place."""
        for r in self.results:
            path = r.facts.get("corrupted")
            if r.kind.startswith(CORRUPT_PREFIX) and path and Path(path).exists():
                dest = self.base / "moved-aside" / f"{Path(path).name}-{r.id}"
                dest.parent.mkdir(exist_ok=True)
                shutil.move(path, dest)
                r.notes.append(f"moved aside by the campaign before a rescue: {path}")

    def wait_trigger(self, r: FaultResult) -> bool:
        """Wait for the fault's moment; False if the run ended first."""
        kind = KINDS[r.kind]
        deadline = time.monotonic() + self.s.fault_timeout
        inject = kind.inject or ("disk_full" if r.variant == "inject" else "")
        last = time.monotonic()
        while self.going():
            now = time.monotonic()
            gap, last = now - last, now
            r.facts["max_poll_gap_s"] = round(max(gap, r.facts.get("max_poll_gap_s", 0.0)), 3)
            if time.monotonic() > deadline:
                r.skipped = f"its moment did not come within {self.s.fault_timeout:.0f} s"
                return False
            if inject:
                marker = self.run_dir / "inject" / f"{inject}@{r.trigger}"
                if marker.exists():
                    self._injected(r, marker)
                    return True
            elif r.kind == "kill_loading":
                pid = self.loading_worker()
                if pid is not None:
                    r.worker_pid = pid
                    return True
            else:
                at = self.obs.training_step(r.trigger)
                if at is not None and at[2] >= self.s.iters - LAST_STEPS:
                    r.skipped = (f"{MISSED}: the run was at step {at[2]} of {self.s.iters} "
                                 f"when its moment (step {r.trigger}) came (longest pause of "
                                 f"this watch: {r.facts['max_poll_gap_s']} s)")
                    return False
                if at is not None:
                    r.worker_pid, r.attempt, r.step = at
                    return True
            time.sleep(0.01)
        return False

    def _injected(self, r: FaultResult, marker: Path) -> None:
        """An injection fired: when, and in which worker (the marker says, as JSON since
        issue 12: shared/faults.py; a bare time before), else the attempt running then."""
        text = ""
        with contextlib.suppress(OSError):
            text = marker.read_text()
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            r.t_fired = float(data.get("time") or marker.stat().st_mtime)
            r.worker_pid = data.get("pid")
            r.attempt = data.get("attempt")
        else:
            try:
                r.t_fired = float(text.split()[0])
            except (ValueError, IndexError):
                r.t_fired = marker.stat().st_mtime
        r.step = r.trigger
        if r.worker_pid is None:
            rec = self.obs.record() or {}
            for a in reversed(rec.get("attempts", [])):
                started = epoch(a.get("started"))
                if started is not None and started <= r.t_fired:
                    r.worker_pid, r.attempt = a.get("pid"), a.get("attempt")
                    break
        r.fired = True

    def loading_worker(self) -> int | None:
        self.obs.poll()
        for pid in reversed(self.obs.loading_order):
            if self.obs.phases.get(pid, [])[-1:] == ["loading"] and alive(pid):
                return pid
        return None

    def settle(self, r: FaultResult) -> None:
        """After a fault that ends the worker's attempt: wait until the supervisor starts the
        next one (or the run ends)."""
        if not KINDS[r.kind].restarts or not r.fired:
            return
        hit = r.attempt
        if hit is None and r.worker_pid is not None:
            hit = self.attempt_of(r.worker_pid)

        def next_started() -> bool:
            w = self.obs.worker()
            return w is not None and (hit is None or w[1] > hit)

        deadline = time.monotonic() + self.s.fault_timeout
        while self.going() and time.monotonic() < deadline:
            if next_started():
                return
            time.sleep(0.02)

    def attempt_of(self, pid: int) -> int | None:
        rec = self.obs.record() or {}
        for a in rec.get("attempts", []):
            if a.get("pid") == pid:
                return int(a["attempt"])
        return None

    def wait_end(self) -> None:
        while self.going():
            time.sleep(0.05)

    # ---- clean-up ------------------------------------------------------------------------

    def stop_everything(self) -> None:
        """Kill what this run started (supervisors, by pid) and the workers they started."""
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        for p in run_processes(self.run_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGKILL)
        wait_until(lambda: not run_processes(self.run_dir), 10)
