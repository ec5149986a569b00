"""Causing each fault kind (tests/chaos/kinds.py) at its moment, and noting what happened
right then (`FaultResult.facts`, `landed`). Injected kinds (worker/inject.py) have already
fired when `fire` is called: the worker did it at its step.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shared.layout import RunDir
from tests.chaos import corrupt, diskfull, garbage
from tests.chaos.inotify import Inotify
from tests.chaos.kinds import CORRUPT_PREFIX, KINDS, SIGNALS
from tests.chaos.observe import freeze, kill, wait_dead, wait_until, workers_of
from tests.chaos.results import FaultResult

if TYPE_CHECKING:
    from tests.chaos.driver import Driver

ORPHAN_LIMIT_S = 5.0  # issue 12: no worker outlives its supervisor by more than a few seconds
RACE_WAIT_S = 30.0
DISK_HOLD_MAX_S = 10.0


def fire(d: Driver, r: FaultResult, rng: random.Random) -> None:
    """Cause fault `r` now (the driver waited for its moment)."""
    if KINDS[r.kind].inject or (r.kind == "disk_full" and r.variant == "inject"):
        return  # the worker fired it itself
    if r.step is None:
        r.step = d.obs.step()
    if r.kind == "worker_kill":
        time.sleep(rng.uniform(0, 0.05))
        _kill_worker(d, r)
    elif r.kind == "kill_mid_checkpoint":
        _kill_mid_checkpoint(d, r, rng)
    elif r.kind == "kill_loading":
        time.sleep(rng.uniform(0, 0.5))
        d.obs.poll()
        phases = d.obs.phases.get(r.worker_pid or -1, [])
        r.landed = f"while {phases[-1] if phases else 'starting'}"
        _kill_worker(d, r)
    elif r.kind == "hang":
        r.t_fired = time.time()
        kill(r.worker_pid, signal.SIGSTOP)
    elif r.kind in ("supervisor_kill", "both_kill", "orphan_stopped"):
        _supervisor_death(d, r, rng)
    elif r.kind in SIGNALS:
        _stop_signal(d, r, rng)
    elif r.kind.startswith(CORRUPT_PREFIX):
        _corrupt(d, r, rng)
    elif r.kind in ("socket_control", "socket_telemetry"):
        _garbage(d, r, rng)
    elif r.kind == "start_race":
        start_race(d, r, rng, at_start=False)
    elif r.kind == "disk_full":
        _disk_full(d, r, rng)
    else:  # pragma: no cover - kinds.py and this table are kept together
        raise ValueError(f"no way to cause {r.kind!r}")


def _kill_worker(d: Driver, r: FaultResult) -> None:
    r.t_fired = time.time()
    kill(r.worker_pid)


def _kill_mid_checkpoint(d: Driver, r: FaultResult, rng: random.Random) -> None:
    pid = r.worker_pid
    ckpts = d.run_dir / "checkpoints"

    def ours(n: str) -> bool:
        return n.startswith(".tmp-step-") and n.endswith(f"-{pid}")

    try:
        with Inotify(ckpts) as watch:
            name = watch.wait_for(ours, timeout=20.0)
    except OSError:  # no inotify (macOS): list the directory as fast as we can instead
        r.facts["timed_by"] = "polling"
        name = wait_until(lambda: next((n for n in os.listdir(ckpts) if ours(n)), None),
                          20.0, 0.0002)
    if name is not None:
        time.sleep(rng.uniform(0, 0.002))  # a tiny checkpoint is written in ~4 ms
    r.step = d.obs.step()
    _kill_worker(d, r)
    wait_dead(pid, 10)
    if name is None:
        r.landed = "no checkpoint began within 20 s: killed anyway"
    else:
        r.landed = "mid-checkpoint" if (ckpts / name).exists() else "after the checkpoint"
        r.facts["temp_dir"] = name


def _supervisor_death(d: Driver, r: FaultResult, rng: random.Random) -> None:
    sup = d.sup
    assert sup is not None
    r.facts["supervisor_pid"] = sup.pid
    if r.kind == "orphan_stopped":
        kill(r.worker_pid, signal.SIGSTOP)
        time.sleep(0.2)
    d.expect_exit = True
    r.t_fired = time.time()
    if r.kind == "both_kill" and rng.random() < 0.5:
        kill(r.worker_pid)
    kill(sup.pid)
    if r.kind == "both_kill":
        kill(r.worker_pid)
    sup.wait()
    d.expect_exit = False
    if r.kind == "orphan_stopped":
        gone = wait_dead(r.worker_pid, ORPHAN_LIMIT_S)
        r.facts["orphan_gone_s"] = None if gone is None else round(gone, 3)
    elif r.kind == "supervisor_kill":
        delay = rng.uniform(0, 1.0)
        gone = wait_dead(r.worker_pid, delay)
        r.facts["restart_after_s"] = round(delay, 3)
        if gone is not None:
            r.facts["worker_outlived_s"] = round(gone, 3)
        time.sleep(max(0.0, delay - (gone or delay)))
    else:
        time.sleep(rng.uniform(0, 1.0))
    d.sup = d.start_supervisor()


def _stop_signal(d: Driver, r: FaultResult, rng: random.Random) -> None:
    sup = d.sup
    assert sup is not None
    sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP}[r.kind]
    d.expect_exit = True
    r.t_fired = time.time()
    sup.send_signal(sig)
    try:
        rc: int | None = sup.wait(timeout=d.s.stop_timeout + 60)
    except subprocess.TimeoutExpired:
        rc = None
    d.expect_exit = False
    rec = d.obs.record() or {}
    r.facts.update(exit=rc, state_after=rec.get("state"), reason_after=rec.get("reason"),
                   workers_left=len(workers_of(d.run_dir)),
                   stop_s=round(time.time() - r.t_fired, 3))
    if rc is None:
        kill(sup.pid)
        sup.wait()
    if rec.get("state") in ("finished", "early_stopped"):
        return  # it finished on its own meanwhile
    time.sleep(rng.uniform(0, 1.0))
    d.sup = d.start_supervisor()


def _corrupt(d: Driver, r: FaultResult, rng: random.Random) -> None:
    """Damage the newest checkpoint while nothing uses it: with the supervisor down
    ("offline": both SIGKILLed, started again after), or frozen ("backoff": SIGSTOPped
    while its worker is SIGKILLed and the checkpoint damaged, then let go: the same
    process sees the end, backs off, validates). Frozen, it cannot begin validating before
    the damage is done (its backoff is 0.3 s: under load the damage took longer, and the
    worker trusts the supervisor's validation)."""
    sup = d.sup
    assert sup is not None
    r.facts["mode"] = r.variant
    if r.variant == "backoff" and not freeze(sup.pid):
        r.notes.append("the supervisor did not stop within 5 s of SIGSTOP")
    try:
        r.facts["t_kill"] = time.time()
        kill(r.worker_pid)
        if r.variant == "offline":
            d.expect_exit = True
            kill(sup.pid)
            sup.wait()
            d.expect_exit = False
        wait_dead(r.worker_pid, 10)
        _settle(d.run_dir / "checkpoints", r)
        target = corrupt.newest_complete(d.run_dir / "checkpoints")
        if target is None:
            r.notes.append("no complete checkpoint to damage: only the kill happened")
        else:
            variant = r.kind.removeprefix(CORRUPT_PREFIX)
            r.facts["corrupted"] = str(target)
            r.facts["damage"] = corrupt.corrupt(target, variant, rng)
        r.t_fired = time.time()
    finally:
        if r.variant == "backoff":
            kill(sup.pid, signal.SIGCONT)
    if r.variant == "offline":
        d.sup = d.start_supervisor()


def _settle(checkpoints: Path, r: FaultResult) -> None:
    """The kill landed between a checkpoint's manifest and its rename: damage what the next
    checkpoint choice sees first, that checkpoint, put in place as the supervisor would when
    it sees the worker end (supervisor/daemon/runner.py) or at its start. Nothing else runs
    here meanwhile (the supervisor is dead or frozen)."""
    pending = corrupt.unrenamed(checkpoints)
    if pending:
        r.facts["unrenamed"] = [tmp.name for tmp, _ in pending]
    for tmp, final in pending:
        os.replace(tmp, final)


def _garbage(d: Driver, r: FaultResult, rng: random.Random) -> None:
    socks = RunDir(d.run_dir).sockets
    endpoint = "control" if r.kind == "socket_control" else "telemetry"
    path = socks / endpoint
    rec = d.obs.record() or {}
    run_id = str(rec.get("run_id", ""))
    attempt = int((rec.get("worker") or {}).get("attempt", 1))
    r.t_fired = time.time()
    sent: list[str] = []
    messages: list[tuple[str, bytes]] = []
    for what in r.variant.split("+"):
        if what == "raw":
            sent.append(garbage.send_raw(path, rng.randbytes(rng.randint(1, 4096))))
        elif what == "idle":
            sent.append(garbage.hold_idle(path))
        else:
            messages.append((what, garbage.payload(what, rng, endpoint, run_id, attempt)))
    if messages and endpoint == "control":
        sent.extend(garbage.send_control(path, messages))
    elif messages:
        names = "+".join(name for name, _ in messages)
        sent.append(f"{names}: {garbage.send_telemetry(path, [m for _, m in messages])}")
    time.sleep(0.2)
    sup = d.sup
    r.facts["sent"] = sent
    r.facts["status_ok"] = garbage.status(socks / "control") is not None
    if not r.facts["status_ok"] and sup is not None:
        # Unanswered: the run may be ending (a finishing supervisor closes its control socket
        # first; the tiny model's last steps go fast), or the request was lost. Either it
        # exits (judged by how), or it must answer the next request.
        with contextlib.suppress(subprocess.TimeoutExpired):
            sup.wait(timeout=5.0)
        if sup.poll() is None:
            r.facts["status_ok"] = r.facts["status_retry"] = (
                garbage.status(socks / "control") is not None)
    r.facts["alive"] = sup is not None and sup.poll() is None
    if sup is not None and sup.poll() is not None:
        r.facts["exit"] = sup.returncode
        r.facts["state_after"] = (d.obs.record() or {}).get("state")


def start_race(d: Driver, r: FaultResult, rng: random.Random, at_start: bool) -> None:
    """Two `overnight run` at once: at the run's start, or after SIGKILLing the supervisor.
    Exactly one must be refused (exit 78, "in use"), and one worker must run at a time."""
    r.facts["at"] = "start" if at_start else "restart after a supervisor SIGKILL"
    if at_start:
        r.step = 0
    if not at_start and d.sup is not None:
        d.expect_exit = True
        kill(d.sup.pid)
        d.sup.wait()
        d.expect_exit = False
    r.t_fired = time.time()
    a, b = d.start_supervisor(), d.start_supervisor()
    most = 0

    def one_exited() -> bool:
        nonlocal most
        most = max(most, len(workers_of(d.run_dir)))
        return a.poll() is not None or b.poll() is not None

    wait_until(one_exited, RACE_WAIT_S, 0.05)
    # The loser is whoever exited first: judged now, before the winner may finish a short run.
    first = [p for p in (a, b) if p.poll() is not None]
    if len(first) == 2:  # both within one poll: the refused one is the one that said so
        first = [p for p in first if p.returncode == 78][:1] or first
    loser = first[0] if len(first) == 1 else None
    winner = None if loser is None else (b if loser is a else a)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        most = max(most, len(workers_of(d.run_dir)))
        time.sleep(0.05)
    r.facts["max_workers"] = most
    if loser is not None and winner is not None:
        r.facts["refused_exit"] = loser.returncode
        r.facts["refused_output"] = d.output_tail(loser, 1)
        if winner.poll() is not None:  # e.g. it finished the run's last steps meanwhile
            r.facts["winner_exit"] = winner.returncode
            r.facts["state_after"] = (d.obs.record() or {}).get("state")
    else:
        r.facts["refused_exit"] = None
        r.facts["both"] = "exited" if len(first) == 2 else "running"
    exited = [p for p in (a, b) if p.poll() is not None]
    running = [p for p in (a, b) if p.poll() is None]
    if len(running) == 2:
        d.expect_exit = True
        kill(b.pid, signal.SIGTERM)
        b.wait()
        d.expect_exit = False
        running = [a]
    if winner is not None:
        d.sup = winner
    else:
        d.sup = running[0] if running else (exited[-1] if exited else a)


def _disk_full(d: Driver, r: FaultResult, rng: random.Random) -> None:
    mount = d.mount
    assert mount is not None
    r.t_fired = time.time()
    r.facts["filled_bytes"] = diskfull.fill(mount)
    r.facts["free_bytes_after_fill"] = diskfull.free_bytes(mount)
    ended = wait_dead(r.worker_pid, DISK_HOLD_MAX_S)
    r.facts["worker_ended_after_s"] = None if ended is None else round(ended, 3)
    hold = rng.uniform(0.5, 2.0)
    time.sleep(hold)
    sup = d.sup
    r.facts["supervisor_alive_while_full"] = sup is not None and sup.poll() is None
    r.facts["full_for_s"] = round(time.time() - r.t_fired, 3)
    diskfull.free(mount)
    if ended is None:
        r.notes.append(f"the worker did not end while the disk was full "
                       f"({r.facts['full_for_s']} s)")
