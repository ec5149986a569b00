"""`overnight status [RUN_DIR]` and `overnight stop [RUN_DIR]`: the control socket's client.

Status asks the live supervisor (REQ, short timeout, LINGER 0) and falls back to the run
record when none answers, so it also works after the run ended or the machine rebooted.
RUN_DIR defaults to the most recently updated run under ./runs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zmq

from shared import run_record
from shared.errors import ConfigError, OvernightError, ProtocolError, RunDirError
from shared.layout import RunDir, unsafe_directory
from shared.protocol import ControlReply, ControlRequest, decode
from shared.run_record import RunRecord
from shared.runlock import Role, is_locked, read, read_holder
from supervisor.daemon.control import RunStatus, decode_status
from supervisor.morning.runfacts import attempts_from_record
from supervisor.morning.runlogs import resolve_run_dir
from supervisor.morning.verdict import progress_line, verdict

TIMEOUT = 2.0


class NoSupervisor(OvernightError):
    """No live supervisor answered on the control socket."""


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="run directory (default: the newest under ./runs/)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help="seconds to wait for the supervisor's answer")


def add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    add_status_arguments(parser)
    parser.add_argument("--wait", action="store_true",
                        help="wait until the supervisor has stopped")
    parser.add_argument("--reason", default="", metavar="TEXT",
                        help="why (at most 200 printable characters): the run's record and "
                             "report say 'stopped on request: TEXT'")


def add_arguments(parser: argparse.ArgumentParser) -> None:  # the registry's fallback
    add_status_arguments(parser)


def request(run: RunDir, command: str, timeout: float = TIMEOUT,
            reason: str = "") -> ControlReply:
    """One request/reply on the control socket (`reason`: a stop's, "" for none);
    NoSupervisor if nobody answers in time, RunDirError (one line) if the socket directory is
    not this user's alone (mode 0700), ProtocolError for a reason the request refuses."""
    path = Path(run.control_endpoint.removeprefix("ipc://"))
    holder = read(run.lock)
    if not path.exists() or not is_locked(run.lock) or (
            holder is not None and holder.role is Role.WORKER):  # `overnight train` alone
        raise NoSupervisor(f"{run.root}: no supervisor is running")
    # The supervisor made the socket directory private (RunDir.create_socket_dir); one that is
    # not (a planted fallback under /tmp) may hold another user's socket answering with lies.
    problem = unsafe_directory(run.sockets)
    if problem is not None:
        raise RunDirError(f"{run.sockets}: refusing to talk to the supervisor through this "
                          f"socket directory: {problem}")
    message = ControlRequest(command=command, reason=reason).to_json()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(run.control_endpoint)
        sock.send(message)
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise NoSupervisor(f"{run.root}: the supervisor did not answer within {timeout:g} s")
        reply = decode(sock.recv())
    finally:
        sock.close(linger=0)
    if not isinstance(reply, ControlReply):
        raise ProtocolError(f"expected a reply, got {type(reply).__name__}")
    return reply


def main_status(args: argparse.Namespace) -> int:
    run = RunDir(resolve_run_dir(args.run_dir, "status"))
    live: RunStatus | None = None
    try:
        reply = request(run, "status", args.timeout)
        live = decode_status(reply.data)
    except NoSupervisor:
        pass
    found = run_record.load_with_json(run.record)  # RecordError: one line naming the field
    record, stored = found if found is not None else (None, {})
    gone = supervisor_gone(run, record) if live is None else None  # never "training" then
    if args.json:  # the live reply, or run.json as the supervisor wrote it
        data = live.to_dict() if live is not None else stored
        print(json.dumps({"live": live is not None, **data,
                          **({"supervisor_gone": True} if gone else {})},
                         indent=2, sort_keys=True))
        return 0
    # The report's verdict first; then the supervisor's view (when there is one) and, while
    # it trains, the worker's own progress line.
    print(gone or verdict(run.root, record, live))
    if live is not None:
        print(format_live(live))
        if line := progress_line(run.root, live.total_steps, live.latest_checkpoint,
                                 live.best_checkpoint, attempt=live.attempt or None):
            print(line)
    elif record is not None:
        print(format_record(record, gone=gone is not None))
    else:
        print(f"(no run.json: trained with `overnight train` alone) {run.root}")
    return 0


def main_stop(args: argparse.Namespace) -> int:
    run = RunDir(resolve_run_dir(args.run_dir, "stop"))
    try:
        ControlRequest(command="stop", reason=args.reason)
    except ProtocolError as e:  # before a supervisor is looked for
        raise ConfigError(f"--reason: {str(e).removeprefix('control: reason ')}") from None
    try:
        reply = request(run, "stop", args.timeout, args.reason)
    except NoSupervisor as e:
        print(f"overnight stop: {e}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"overnight stop: {reply.error}", file=sys.stderr)
        return 1
    pid = reply.data.get("supervisor_pid") or read_holder(run.lock)
    print(f"stopping: supervisor {pid} asked the worker to save a checkpoint and exit "
          f"(up to {reply.data.get('stop_timeout', '?')} s)")
    if args.json:
        print(json.dumps(reply.data, indent=2, sort_keys=True))
    if args.wait:
        while is_locked(run.lock):
            time.sleep(0.5)
        stored = run_record.load(run.record)
        print(f"{stored.state.value}: {stored.reason}" if stored else "?: ")
    return 0


def format_live(s: RunStatus) -> str:
    """A few readable lines from a live status reply."""
    lines = [
        f"run      {s.run_id}  [live]",
        f"state    {s.state.value}" + (f"  ({s.reason})" if s.reason else ""),
        f"step     {s.step} / {s.total_steps}",
    ]
    if s.worker_pid is None:  # backing off, restarting, waiting for disk space: no worker
        lines.append(f"worker   none: between attempts (attempt {s.attempt} ended)"
                     if s.attempt else "worker   none yet")
    else:
        heartbeat = ("-" if s.last_heartbeat_s is None else f"{s.last_heartbeat_s}")
        lines.append(f"worker   pid {s.worker_pid}  attempt {s.attempt}  "
                     f"phase {s.phase.value if s.phase else '-'}  heartbeat {heartbeat} s ago  "
                     f"{s.tokens_per_sec or '-'} tok/s  rss {s.rss_mb or '-'} MB")
    for r in s.ranks:  # a data-parallel group (supervisor/daemon/group.py)
        lines.append(f"rank {r.rank}   pid {r.pid or 'remote'}  phase {r.phase.value}  "
                     f"step {r.step}  heartbeat {r.last_heartbeat_s} s ago")
    lines.append(f"attempts {s.attempts} ({max(0, s.attempts - 1)} restarts)  "
                 f"failures {s.failures}")
    if s.restart_in_s is not None:
        lines.append(f"restart  in {s.restart_in_s} s")
    return "\n".join(lines + _checkpoints_and_settings(s))


def supervisor_gone(run: RunDir, record: RunRecord | None) -> str | None:
    """The line for a record left under way (not final) with no live supervisor holding the
    run's lock (it was killed, or the machine restarted); None otherwise."""
    if record is None or record.state.is_final:
        return None
    holder = read(run.lock)
    if is_locked(run.lock) and (holder is None or (
            holder.alive and holder.role is Role.SUPERVISOR)):
        return None  # alive, only slow to answer
    s, why = record.supervisor, f" ({record.reason})" if record.reason else ""
    return (f"not running: last recorded state {record.state.value}{why}, supervisor gone "
            f"(pid {s.pid} on {s.host}, last update {record.updated or '?'})")


def format_record(r: RunRecord, gone: bool = False) -> str:
    """A few readable lines from a stored run record (no supervisor running; `gone`: the
    record says under way, but no supervisor runs it)."""
    state = f"{r.state.value} (last recorded; the supervisor is gone)" if gone else r.state.value
    lines = [
        f"run      {r.run_id}  [from run.json (no supervisor running)]",
        f"state    {state}" + (f"  ({r.reason})" if r.reason else ""),
        f"step     {r.final_step} / {r.total_steps}",
        f"attempts {r.totals.attempts} ({r.totals.restarts} restarts)  failures "
        f"{r.totals.failures}  planned ends {len(planned_ends(r))}  "
        f"rollbacks {r.totals.rollbacks}",
    ]
    return "\n".join(lines + _checkpoints_and_settings(r))


def planned_ends(r: RunRecord) -> list[int]:
    """The attempts of the record that ended on purpose (supervisor/morning/facts.py)."""
    return [a.number for a in attempts_from_record(r) if a.planned]


def _checkpoints_and_settings(s: RunStatus | RunRecord) -> list[str]:
    lines = []
    if s.latest_checkpoint is not None:
        lines.append(f"latest   step {s.latest_checkpoint.step}  {s.latest_checkpoint.path}")
    if s.best_checkpoint is not None:
        best = s.best_checkpoint
        where = best.path or "(no checkpoint of that step on disk)"  # run.json's null
        lines.append(f"best     step {best.step}  val_loss {best.val_loss:.3f}  {where}")
    if s.overrides:
        lines.append(f"settings {json.dumps(s.overrides, sort_keys=True)}")
    return lines
