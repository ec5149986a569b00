"""The run record RUN_DIR/run.json: what happened, for `overnight status` and `overnight report`.

Written atomically (temp file, fsync, rename) on every change; a reader never sees a torn
file. Times are ISO 8601 UTC strings; durations are seconds (float); memory is MB.

    {
      "schema_version": 1,
      "run_id": "mini-20250102T013000-3fa2",
      "run_dir": "/abs/runs/mini",   "config_path": "/abs/mini.yaml",
      "config": {...},               # resolved config (shared.config.Config.to_dict())
      "config_hash": "9c1e...",
      "created": "...", "updated": "...", "ended": null | "...",
      "state": "training",           # supervisor/state.py State value
      "reason": "",                  # why the last state was entered (final: the verdict)
      "supervisor": {"pid": 123, "host": "mbp", "started": "...", "starts": 1},
      "worker": null | {"pid": 456, "attempt": 3, "started": "...", "argv": [...]},
      "overrides": {"batch_size": 2, "grad_accumulation_steps": 8,   # persisted settings:
                    "grad_checkpoint": false, "lr_scale": 0.5,        # every attempt gets them
                    "skip_batches": [41]},   # epoch-plan batches found to be data problems
      "rollbacks": 1,                # rollbacks so far (budget: supervisor.max_rollbacks)
      "high_water_step": 830,        # highest step the run ever reached (progress measure)
      "final_step": 812,             # the step the run is at (after a rollback: below the
                                     # high-water mark); at the end: the final step
      "total_steps": 2000,
      "best_checkpoint": null | {"step": 750, "path": "...", "val_loss": 1.84},
      "latest_checkpoint": null | {"step": 800, "path": "..."},
      "quarantined": [{"checkpoint": "step-0000250", "path": "...", "reason": "...",
                       "time": "..."}],
      "totals": {"attempts": 3, "failures": 2, "planned_restarts": 0, "rollbacks": 1,
                 "restarts": 2, "steps_trained": 900, "tokens": 123456,
                 "train_seconds": 3600.0, "downtime_seconds": 42.0},
      "attempts": [{
        "attempt": 1, "pid": 456, "argv": [...], "log": "logs/worker-1.log",
        "started": "...", "ended": null | "...",
        "start_reason": "initial" | "<previous attempt's action_reason>",
        "resumed_from": null | {"step": 250, "path": "..."},   # null: fresh start
        "skip_steps": 0,               # data positions skipped after the resume point
        "lr_scale": null | 0.5,
        "settings": {...overrides in effect...},
        "start_step": 250, "end_step": 400, "steps_gained": 150,
        "exit_code": null | 21, "signal": null | 6, "signal_name": null | "SIGABRT",
        "classification": null | "crash",  # shared.exitcodes.FailureClass value; null while
                                           # running, or "abandoned" attempts (see action)
        "detail": "killed by SIGABRT: ... command buffer ...",
        "detected_by": "exit" | "heartbeat_timeout" | "stall_timeout" | "memory" | "stop_request",
        "detection_latency_s": 0.04,   # last sign of life (message or output) -> noticed
        "killed_after_stop_timeout": false,
        "time_to_first_heartbeat_s": 0.9, "time_to_first_step_s": 4.1,
        "downtime_s": null | 6.2,      # previous attempt's end noticed -> this one's first step
        "tokens": 40960, "tokens_per_sec_avg": 812.5,
        "peak_rss_mb": 1400.2, "peak_mlx_mb": 900.1, "min_available_mb": 5100.0,
        "checkpoints_saved": [300, 350, 400],
        "stderr_tail": "last lines of logs/worker-1.log",
        "bad_data": null | {"position": 815, "batch": 41, "lines": "train.jsonl:88-91",
                            "lr_scale": 1.0},  # the failing step's batch (non-finite, spike)
        "action": "restart" | "reduce_memory" | "rollback" | "skip_batch" | "planned_restart"
                  | "finish" | "early_stop" | "stop" | "give_up"
                  | "abandoned",   # the supervisor died during this attempt; the next
                                   # supervisor stopped the orphan (if any) and resumed
        "action_reason": "crash: killed by SIGABRT ...",
        "restart_delay_s": 5.3,
        "settings_changed": {"batch_size": [4, 2], "grad_accumulation_steps": [2, 4]}
      }]
    }
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any

from shared.fsutil import atomic_write_json

SCHEMA_VERSION = 1


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def load(path: Path) -> dict[str, Any] | None:
    """The record as a dict, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


class RunRecord:
    """The record of one run, kept in memory and saved whole on every change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(
        cls, path: Path, run_id: str, run_dir: Path, config_path: Path,
        config: dict[str, Any], config_hash: str,
    ) -> RunRecord:
        """Load the existing record (a restarted supervisor continues it) or start one."""
        data = load(path)
        if data is None or data.get("schema_version") != SCHEMA_VERSION:
            data = {
                "schema_version": SCHEMA_VERSION, "run_id": run_id, "created": now_iso(),
                "state": "starting", "reason": "", "ended": None, "worker": None,
                "overrides": {}, "rollbacks": 0, "final_step": 0, "total_steps": 0,
                "best_checkpoint": None, "latest_checkpoint": None, "quarantined": [],
                "attempts": [], "supervisor": {"starts": 0},
            }
        data.update(
            run_dir=str(run_dir), config_path=str(config_path), config=config,
            config_hash=config_hash,
        )
        starts = int(data.get("supervisor", {}).get("starts", 0)) + 1
        data["supervisor"] = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(),
            "starts": starts,
        }
        data["ended"] = None
        return cls(path, data)

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    @property
    def attempts(self) -> list[dict[str, Any]]:
        return self.data["attempts"]  # type: ignore[no-any-return]

    @property
    def current(self) -> dict[str, Any] | None:
        return self.attempts[-1] if self.attempts else None

    def save(self) -> None:
        self.data["updated"] = now_iso()
        self.data["totals"] = totals(self.data)
        atomic_write_json(self.path, self.data)

    def set_state(self, state: str, reason: str = "") -> None:
        self.data["state"] = state
        self.data["reason"] = reason
        if state in ("finished", "early_stopped", "gave_up", "stopped"):
            self.data["ended"] = now_iso()
        self.save()

    def begin_attempt(self, entry: dict[str, Any], worker: dict[str, Any]) -> None:
        self.attempts.append(entry)
        self.data["worker"] = worker
        self.save()

    def end_attempt(self, fields: dict[str, Any]) -> None:
        assert self.current is not None
        self.current.update(fields, ended=now_iso())
        self.data["worker"] = None
        self.save()

    def note_quarantine(self, name: str, path: Path, reason: str) -> None:
        self.data["quarantined"].append(
            {"checkpoint": name, "path": str(path), "reason": reason, "time": now_iso()}
        )
        self.save()


def totals(d: dict[str, Any]) -> dict[str, Any]:
    attempts = d.get("attempts", [])
    ended = [a for a in attempts if a.get("classification")]
    planned = sum(1 for a in ended if a["classification"] == "planned_restart")
    not_failures = {"completed", "early_stopped", "graceful_stop", "planned_restart"}
    return {
        "attempts": len(attempts),
        "failures": sum(1 for a in ended if a["classification"] not in not_failures),
        "planned_restarts": planned,
        "rollbacks": d.get("rollbacks", 0),
        "restarts": max(0, len(attempts) - 1),
        "steps_trained": sum(max(0, a.get("steps_gained") or 0) for a in attempts),
        "tokens": sum(a.get("tokens") or 0 for a in attempts),
        "train_seconds": round(sum(_duration(a) for a in attempts), 3),
        "downtime_seconds": round(sum(a.get("downtime_s") or 0.0 for a in attempts), 3),
    }


def _duration(a: dict[str, Any]) -> float:
    try:
        start = dt.datetime.fromisoformat(a["started"])
        end = dt.datetime.fromisoformat(a["ended"]) if a.get("ended") else None
    except (KeyError, TypeError, ValueError):
        return 0.0
    return (end - start).total_seconds() if end else 0.0
