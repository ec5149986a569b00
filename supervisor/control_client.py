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
from typing import Any

import zmq

from shared.errors import OvernightError, ProtocolError
from shared.layout import RunDir
from shared.protocol import ControlReply, ControlRequest, decode
from shared.runlock import Role, is_locked, read, read_holder
from supervisor import record as record_mod
from supervisor.runlogs import resolve_run_dir
from supervisor.verdict import progress_line, verdict

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


def add_arguments(parser: argparse.ArgumentParser) -> None:  # the registry's fallback
    add_status_arguments(parser)


def request(run: RunDir, command: str, timeout: float = TIMEOUT) -> ControlReply:
    """One request/reply on the control socket; NoSupervisor if nobody answers in time."""
    path = Path(run.control_endpoint.removeprefix("ipc://"))
    holder = read(run.lock)
    if not path.exists() or not is_locked(run.lock) or (
            holder is not None and holder.role is Role.WORKER):  # `overnight train` alone
        raise NoSupervisor(f"{run.root}: no supervisor is running")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(run.control_endpoint)
        sock.send(ControlRequest(command=command).to_json())
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
    try:
        reply = request(run, "status", args.timeout)
        live, data = True, reply.data
    except NoSupervisor:
        live, data = False, record_mod.load(run.record)
    if args.json:
        print(json.dumps({"live": live, **(data or {})}, indent=2, sort_keys=True))
        return 0
    # The report's verdict first; then the supervisor's view (when there is one) and, while
    # it trains, the worker's own progress line.
    print(verdict(data, run.root))
    if data is not None:
        print(format_status(data, live))
    else:
        print(f"(no run.json: trained with `overnight train` alone) {run.root}")
    if live and (line := progress_line(run.root, data)):
        print(line)
    return 0


def main_stop(args: argparse.Namespace) -> int:
    run = RunDir(resolve_run_dir(args.run_dir, "stop"))
    try:
        reply = request(run, "stop", args.timeout)
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
        stored = record_mod.load(run.record) or {}
        print(f"{stored.get('state', '?')}: {stored.get('reason', '')}")
    return 0


def format_status(d: dict[str, Any], live: bool) -> str:
    """A few readable lines from a live status reply or a stored run record."""
    source = "live" if live else "from run.json (no supervisor running)"
    step, total = d.get("step", d.get("final_step")), d.get("total_steps")
    lines = [
        f"run      {d.get('run_id', '?')}  [{source}]",
        f"state    {d.get('state', '?')}" + (f"  ({d['reason']})" if d.get("reason") else ""),
        f"step     {step} / {total}",
    ]
    if live:
        lines.append(
            f"worker   pid {d.get('worker_pid')}  attempt {d.get('attempt')}  "
            f"phase {d.get('phase')}  heartbeat {d.get('last_heartbeat_s')} s ago  "
            f"{d.get('tokens_per_sec') or '-'} tok/s  rss {d.get('rss_mb') or '-'} MB"
        )
        if d.get("restart_in_s") is not None:
            lines.append(f"restart  in {d['restart_in_s']} s")
    else:
        totals = d.get("totals", {})
        lines.append(f"attempts {totals.get('attempts', len(d.get('attempts', [])))}  "
                     f"failures {totals.get('failures', '?')}  "
                     f"rollbacks {totals.get('rollbacks', '?')}")
    for key in ("latest_checkpoint", "best_checkpoint"):
        ck = d.get(key)
        if ck:
            extra = f"  val_loss {ck['val_loss']:.4g}" if ck.get("val_loss") is not None else ""
            lines.append(f"{key.split('_')[0]:<8} step {ck.get('step')}{extra}  {ck.get('path')}")
    if d.get("overrides"):
        lines.append(f"settings {json.dumps(d['overrides'], sort_keys=True)}")
    return "\n".join(lines)
