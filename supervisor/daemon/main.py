"""`overnight run CONFIG.yaml [--run-dir DIR]`: the supervisor daemon.

    overnight run configs/mini.yaml                 # run dir: ./runs/mini
    overnight status runs/mini                      # from another terminal
    overnight stop runs/mini                        # checkpoint, then stop
    overnight run --queue queue --until 07:00       # a night of jobs: supervisor/queue/night.py

Start-up: create the run dir, lock it (shared/runlock.py: a second supervisor, or one while
an `overnight train` writes the directory, is refused naming the holder's PID; the lock is
handed down to each worker), open or continue the run record, stop any orphaned worker of
this run, reconcile what a dead supervisor left in the record (supervisor/daemon/reconcile.py),
remove half-done checkpoint directories, bind the telemetry (SUB) and control (REP) sockets in
a 0700 directory, then hand over to the loop.

Exit status: 0 whenever the supervisor reached a final decision (finished, early_stopped,
stopped, gave_up: the reason is in run.json and on the last log line); 1 only when the
supervisor itself failed, so a service manager restarts only a broken supervisor (a full disk
is not that: run.json and the logs wait in memory, shared/logsetup.py, record.py). A config
it cannot read at all, a run dir it cannot create, a locked one, or a hard open-file limit
below the 4096 mlx_lm needs (shared/openfile_limit.py), exits 78 (EX_CONFIG) before anything
starts:
use `RestartPreventExitStatus=78` (systemd). Under a service manager (`overnight install`
sets OVERNIGHT_SERVICE_MANAGER) such a refusal is recorded and exits 0 instead: launchd
relaunches any non-zero exit (supervisor/daemon/service_exit.py). Stopping takes up to
`stop_timeout` (default 120 s) while the worker saves: give the service manager
`TimeoutStopSec` (systemd) / `ExitTimeOut` (launchd) of at least stop_timeout + 60 s (what
`overnight install` writes), or a checkpoint is cut in half.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import structlog
import zmq

from shared import config as config_mod
from shared import logsetup, openfile_limit
from shared.checkpoint import clean_leftovers
from shared.errors import OvernightError, RunDirError, RunDirLocked, SystemLimitError
from shared.fsutil import describe_space
from shared.layout import RunDir, never_world_writable
from shared.runlock import Role, RunLock
from supervisor.daemon import curve, gpu_watchdog, group, sdnotify, service_exit, sockets, spawn
from supervisor.daemon.control import ControlServer
from supervisor.daemon.loop import Supervisor
from supervisor.daemon.platform_readings import Platform
from supervisor.daemon.policy import Policy
from supervisor.daemon.powerwatch import PowerWatch
from supervisor.daemon.reconcile import reconcile
from supervisor.daemon.record import RecordKeeper
from supervisor.daemon.runner import AttemptRunner
from supervisor.daemon.state import AlreadyComplete, Begin, State
from supervisor.daemon.stopping import HowStopped, ProcessHandle, stop
from supervisor.queue import night

ON_EXIT_TIMEOUT = 60.0
# The worker: `python -m worker train CONFIG ...` (supervisor/daemon/worker_command.py).
WORKER_COMMAND = [sys.executable, "-m", "worker"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?",
                        help="the run's YAML config (with a supervisor: section for these "
                             "settings); a queue directory: as --queue")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory (default: ./runs/<config name>)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="console and JSON log level")
    night.add_arguments(parser)  # --queue, --until, ...: supervisor/queue/night.py


def main(args: argparse.Namespace) -> int:
    """Run the supervisor (or, with `--queue DIR`, the night's queue of jobs: supervisor/queue/);
    under a service manager a refusal to start is recorded and exits 0
    (supervisor/daemon/service_exit.py: launchd would relaunch it in a loop)."""
    queue_dir = night.queue_of(args)  # `run --queue DIR`: the night's jobs, one at a time
    if queue_dir is not None:
        return night.main(args, queue_dir)
    try:
        return _main(args)
    except OvernightError as e:
        manager = service_exit.under_service_manager()
        if not manager:
            raise
        config_path = args.config.resolve()
        run_dir = (args.run_dir or Path("runs") / config_path.stem).resolve()
        return service_exit.refused(run_dir, e, manager)


def _main(args: argparse.Namespace) -> int:
    config_path = args.config.resolve()
    config = config_mod.load(config_path)  # ConfigError: one line, exit 78, nothing started
    group.check_hosts(config.distributed.hosts)  # a group's other Macs answer ssh (exit 78)
    limit = openfile_limit.problem()  # every worker would die importing mlx_lm: refuse now
    if limit is not None:
        raise SystemLimitError(f"cannot run: {limit}")
    run = RunDir((args.run_dir or Path("runs") / config_path.stem).resolve())
    never_world_writable()  # the umask, plus o-w; the worker inherits it
    run.create()  # RunDirError: one line naming the path
    lock = RunLock(run.lock, Role.SUPERVISOR)
    _take_lock(lock, config, run, args.log_level)  # RunDirLocked: one line naming the holder
    try:
        return _run(config, config_path, run, args.log_level, lock)
    finally:
        lock.release()


def _configure_logging(config: config_mod.Config, run: RunDir, level: str) -> None:
    logsetup.configure("supervisor", run.supervisor_log, console=True, level=level,
                       max_bytes=config.logging.max_bytes, backups=config.logging.backups)


def _take_lock(lock: RunLock, config: config_mod.Config, run: RunDir, level: str) -> None:
    """Take the run's lock. When the supervisor that held it has died, the worker it spawned
    still holds it (inherited): stop that worker, as any orphan, then take the lock."""
    try:
        lock.acquire()
        return
    except RunDirLocked as e:
        holder = e.holder
        if holder is None or holder.alive or holder.role is not Role.SUPERVISOR:
            raise
        dead_pid = holder.pid
    _configure_logging(config, run, level)
    log = logsetup.get("supervisor")
    for proc in spawn.find_orphans(run.root):
        log.warning("orphan_holds_lock", worker_pid=proc.pid, dead_supervisor_pid=dead_pid)
        _stop_orphan(proc, config.supervisor.stop_timeout, log)
    lock.acquire()  # still held by something else: refused, naming the holder


def _run(config: config_mod.Config, config_path: Path, run: RunDir, level: str,
         lock: RunLock) -> int:
    opts = config.supervisor
    _configure_logging(config, run, level)
    try:
        run_id = run.ensure_run_id(config_path.stem)
    except OSError as e:  # a new run on a full disk: one line, nothing started
        raise RunDirError(f"{run.root}: cannot write the run directory ({e.strerror or e}; "
                          f"{describe_space(run.root)})") from None
    record, note = RecordKeeper.open(run.record, run_id, run.root, config_path,
                                     config.to_dict(), config.hash())
    structlog.contextvars.bind_contextvars(run_id=record.run_id)
    log = logsetup.get("supervisor")
    if note:
        log.warning("record_unreadable", detail=note)
    log.info("supervisor_started", run_dir=str(run.root), config_path=str(config_path),
             starts=record.record.supervisor.starts,
             previous_state=record.record.state.value)
    log.info("config_resolved", config=config.to_dict(), config_hash=config.hash())
    try:
        _copy_config(config_path, run, log)
    except OSError as e:  # a full disk: the copy is for reference only, the run goes on
        log.warning("config_copy_failed", path=str(run.config_copy), error=str(e))
    machine = Platform()  # boot, panic reports, power, heat (platform_readings.py)
    _adopt_previous(record, run, opts.stop_timeout, log, machine)

    before, soft, hard = sockets.raise_open_files_limit()  # each connection costs a file
    log.info("open_files_limit", soft_before=before, soft=soft, hard=hard)
    run.create_socket_dir()  # RunDirError when an existing one is not ours alone (exit 78)
    for endpoint in (run.telemetry_endpoint, run.control_endpoint):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.removeprefix("ipc://"))  # stale: we hold the lock
    ctx: zmq.Context[Any] = zmq.Context()
    # Remote ranks: CURVE on ipc:// and tcp:// (curve.py); else ipc:// alone.
    secure = curve.setup(ctx, config.distributed, run.root, run.telemetry_endpoint, log)
    telemetry = (secure.sock if secure is not None
                 else sockets.bind_telemetry(ctx, run.telemetry_endpoint))  # bounded: sockets.py
    control = ControlServer(ctx, run.control_endpoint, target=None)  # type: ignore[arg-type]
    log.info("sockets_bound", telemetry=run.telemetry_endpoint, control=run.control_endpoint)
    # Ready = holding the run and answering control requests; also on the path where the
    # run is already complete and no worker starts (else systemd calls it failed).
    sdnotify.ready()

    runner = AttemptRunner(
        config=config, config_path=config_path, run=run, record=record,
        spawner=group.spawner(  # a data-parallel group's ranks, or the one worker
            spawn.PopenSpawner(pass_fds=(lock.fd,),  # the worker writes under our lock
                               stop_timeout=opts.stop_timeout),  # its orphan grace
            config, run.root, log, secure.endpoint if secure is not None else ""),
        policy=Policy(opts, high_water=record.record.high_water_step,
                      rollbacks=record.record.rollbacks),
        env={**spawn.worker_env(sdnotify.child_environment(), opts.openblas, log),
             **lock.child_environment(), **gpu_watchdog.worker_environment(opts),
             **(secure.env if secure is not None else {})},
        command=list(opts.worker_command) or WORKER_COMMAND,
        log=log,
    )
    sup = Supervisor(runner=runner, record=record, telemetry=telemetry, control=control, log=log,
                     power=PowerWatch(machine, opts, log))
    control.target = sup
    caffeinate = spawn.start_caffeinate(opts.caffeinate, log)
    gpu_watchdog.at_start(opts, machine, log)
    complete = run.is_complete or record.record.state.is_complete
    begin: AlreadyComplete | Begin = Begin()
    if complete:
        log.info("run_already_complete", state=record.record.state.value)
        begin = runner.note_complete()  # its final step, total and best, not "0 / 0"
    try:
        final = sup.run(begin)
    except BaseException:
        log.exception("supervisor_failed")
        _emergency_stop(runner, opts.stop_timeout, log)
        raise
    finally:
        sdnotify.stopping()
        control.close()
        telemetry.close(linger=0)
        if secure is not None:
            secure.close()
        ctx.term()
        if caffeinate is not None:
            caffeinate.terminate()
    reason = record.record.reason
    _on_exit(opts.on_exit, final, reason, record, run, log)
    if not record.flush():  # a full disk to the end: the final state is said here at least
        print(f"overnight run: {run.record} could not be written; its last saved state is "
              "behind", file=sys.stderr)
    print(f"overnight run: {final.value}: {reason}", file=sys.stderr)
    return 0


def _copy_config(config_path: Path, run: RunDir, log: Any) -> None:
    target = run.config_copy
    if target.exists() and filecmp.cmp(config_path, target, shallow=False):
        return
    if target.exists():
        log.warning("config_changed", config_path=str(config_path), copy=str(target))
    shutil.copyfile(config_path, target)


def _adopt_previous(record: RecordKeeper, run: RunDir, stop_timeout: float, log: Any,
                    machine: Platform) -> None:
    """A previous supervisor died: stop its orphaned worker, reconcile the record it left
    (supervisor/daemon/reconcile.py), remove half-done checkpoint directories."""
    stopped = set()
    for proc in spawn.find_orphans(run.root):
        log.warning("orphan_found", worker_pid=proc.pid, cmdline=" ".join(proc.cmdline()[:12]))
        _stop_orphan(proc, stop_timeout, log)
        stopped.add(proc.pid)
    found = reconcile(record, run, frozenset(stopped), platform=machine)
    restart = found.machine if found is not None else None
    if restart is not None:  # its own event: the report's "the machine at night" reads it
        log.warning("machine_restarted", detail=restart.text, boot_time=restart.boot_time,
                    previous_boot=restart.previous_boot, this_boot=restart.this_boot,
                    panic_file=restart.panic.file if restart.panic else None,
                    panic=restart.panic.text if restart.panic else None,
                    previous_boot_log=restart.previous_log or None,
                    attempt=found.attempt if found is not None else None)
    if found is not None:
        log.warning("record_reconciled", previous_state=found.previous_state.value,
                    attempt_abandoned=found.attempt, reason=found.reason)
    cleaned = clean_leftovers(run.checkpoints)  # no worker runs: every temp dir is stale
    if cleaned:
        log.info("checkpoint_leftovers_removed", names=cleaned)


def _stop_orphan(proc: psutil.Process, stop_timeout: float, log: Any) -> None:
    """A worker of this run that no supervisor owns: stopped as any worker is (stopping.py)."""
    how = stop(ProcessHandle(proc), stop_timeout)
    if how is HowStopped.KILLED:
        log.warning("orphan_kill", pid=proc.pid, waited_s=stop_timeout)
    log.info("orphan_stopped", worker_pid=proc.pid, how=how.value)


def _emergency_stop(runner: AttemptRunner, stop_timeout: float, log: Any) -> None:
    """The supervisor itself failed: do not leave the worker behind."""
    runner.abandon_early()
    attempt = runner.attempt
    if attempt is None or attempt.poll() is not None:
        return
    stop(attempt.proc, stop_timeout)
    log.info("worker_stopped_on_failure", worker_pid=attempt.pid)


def _on_exit(command: str, final: State, reason: str, record: RecordKeeper, run: RunDir,
             log: Any) -> None:
    """The optional `supervisor.on_exit` shell command, e.g. a notification."""
    if not command:
        return
    env = dict(os.environ, OVERNIGHT_STATE=final.value, OVERNIGHT_REASON=reason,
               OVERNIGHT_RUN_ID=record.run_id, OVERNIGHT_RUN_DIR=str(run.root),
               OVERNIGHT_FINAL_STEP=str(record.record.final_step))
    try:
        done = subprocess.run(command, shell=True, env=env, timeout=ON_EXIT_TIMEOUT,
                              stdin=subprocess.DEVNULL, capture_output=True, check=False)
        log.info("on_exit_ran", command=command, returncode=done.returncode,
                 output=(done.stdout + done.stderr).decode(errors="replace")[-500:])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("on_exit_failed", command=command, error=str(e))


def _standalone(argv: list[str] | None = None) -> int:
    """`python -m supervisor.daemon CONFIG ...`: the run command without the CLI registry."""
    parser = argparse.ArgumentParser(prog="overnight run")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except OvernightError as e:
        print(f"overnight run: {e}", file=sys.stderr)
        return 78


if __name__ == "__main__":
    sys.exit(_standalone())
