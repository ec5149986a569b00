"""`overnight compare RUN_DIR...`: several runs side by side (supervisor/queue/compare.py).

    overnight compare runs/a runs/b                 # ./compare.md + compare.png, printed too
    overnight compare runs/* --format html --output night.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.errors import ConfigError
from supervisor.morning.report import MATPLOTLIB_MISSING, use_result
from supervisor.morning.runfacts import gather
from supervisor.queue.compare import Entry, write_and_print


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="the runs to compare")
    _add_output(parser, "./compare.md")


def _add_output(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--format", choices=("md", "html"), default="md",
                        help="md: the document + a .png beside it; html: one file")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help=f"where to write it (default: {default}, .html for html)")


def main(args: argparse.Namespace) -> int:
    entries = []
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: not a run directory")
        entries.append(Entry(run_dir.resolve().name, gather(run_dir.resolve())))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):  # runs/a/x and runs/b/x: name them by their path
        entries = [Entry(str(d), e.facts) for d, e in zip(args.run_dirs, entries, strict=True)]
    out = args.output or Path(f"compare.{args.format}")
    return write_and_print(entries, out, args.format, "Comparison", use_result,
                           MATPLOTLIB_MISSING)
