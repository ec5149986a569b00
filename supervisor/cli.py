"""`overnight`: one command line for the worker, the supervisor and the morning after.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; modules are imported only when their command runs, so `overnight status`
never pays for importing MLX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared.errors import OvernightError
from shared.exitcodes import ExitCode

# (command, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "supervisor.demo", "run the built-in demo: a supervised fine-tune with failures"),
    ("run", "supervisor.daemon", "start the supervisor: train CONFIG and keep the worker alive"),
    ("train", "worker.main", "run the worker alone, in the foreground (no supervisor)"),
    ("status", "supervisor.control_client", "show the state of a run (live or from its record)"),
    ("stop", "supervisor.control_client", "ask a running supervisor to checkpoint and stop"),
    ("checkpoints", "worker.checkpoints_cli", "list a run's checkpoints with their status"),
    ("logs", "supervisor.logview", "show a run's merged supervisor and worker logs"),
    ("report", "supervisor.report", "write and print the morning report of a run"),
    ("install", "supervisor.service", "install a run as a launchd/systemd user service"),
    ("uninstall", "supervisor.service", "remove an installed service"),
    ("services", "supervisor.service", "list installed services and their runs' states"),
    ("import-gguf", "worker.gguf_import", "convert a llama GGUF file into an mlx_lm model dir"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overnight",
        description="Keep an MLX fine-tuning job alive through the night.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        specific = f"add_{name.replace('-', '_')}_arguments"
        add = getattr(module, specific, None) or module.add_arguments
        add(p)
        p.set_defaults(_module=module_name, _command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    entry = getattr(module, f"main_{args._command.replace('-', '_')}", None) or module.main
    try:
        return int(entry(args))
    except OvernightError as e:
        print(f"overnight {args._command}: {e}", file=sys.stderr)
        return int(ExitCode.BAD_CONFIG)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
