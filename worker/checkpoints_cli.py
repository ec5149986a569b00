"""`overnight checkpoints RUN_DIR [--verify]`: list a run's checkpoints with their status."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shared import checkpoint as ckpt
from shared.layout import RunDir, require_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check hashes and tensor values (slower), not just the manifest",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per checkpoint")


def main(args: argparse.Namespace) -> int:
    require_run(args.run_dir)
    run = RunDir(args.run_dir)
    infos = ckpt.list_checkpoints(run.checkpoints)
    if not infos:
        print(f"no checkpoints in {run.checkpoints}")
        return 0
    bad = 0
    for info in infos:
        result = ckpt.validate(info.path, deep=args.verify)
        state = result.state
        bad += not result.ok
        row = {
            "step": info.step,
            "path": str(info.path),
            "status": "valid" if result.ok else "INVALID",
            "verified": args.verify, "reason": state.reason if state else result.reason,
            "val_loss": state.last_val_loss if state else None,
            "written": state.time if state else None,
        }
        if args.json:
            print(json.dumps(row))
            continue
        when = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(row["written"]))
            if row["written"]
            else "-"
        )
        val = f"{row['val_loss']:.4f}" if isinstance(row["val_loss"], float) else "-"
        status = row["status"] + (" (verified)" if args.verify and result.ok else "")
        print(
            f"step {info.step:>7}  {status:<17} val={val:<8} {when}  "
            f"{row['reason'] or ''}  {info.path.name}"
        )
    return 1 if bad else 0
