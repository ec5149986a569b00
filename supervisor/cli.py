"""`overnight`: one command line for the worker, the supervisor and the morning after.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int` (or `add_<cmd>_arguments` / `main_<cmd>` when a module serves several
commands). Only the module of the command being run is imported, so `overnight status` never
pays for importing MLX, and command modules keep MLX imports inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from typing import NoReturn

from shared.errors import OvernightError
from shared.exitcodes import ExitCode

BROKEN_PIPE = 128 + int(signal.SIGPIPE)  # 141: the output's reader went away (`| head -1`)

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


class _Parser(argparse.ArgumentParser):
    """Bad arguments are bad input like a bad config: one line, exit 78 (so a supervisor
    never restarts a worker whose command line cannot work)."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.BAD_CONFIG), f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (all of them when None)."""
    parser = _Parser(
        prog="overnight",
        description="Keep an MLX fine-tuning job alive through the night.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name, _command=name)
        if command is not None and name != command:
            continue
        module = importlib.import_module(module_name)
        specific = f"add_{name.replace('-', '_')}_arguments"
        add = getattr(module, specific, None) or module.add_arguments
        add(p)
    return parser


def _command_in(argv: list[str]) -> str | None:
    known = {name for name, _, _ in COMMANDS}
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in known else None
    return None


def main(argv: list[str] | None = None) -> int:
    """The outermost boundary: run one command; its output to a closed pipe ends it quietly.

    `overnight status RUN | head -1`: once the reader has gone, a write (or the final flush)
    raises BrokenPipeError. As the Python docs advise (library/signal.html, "Note on SIGPIPE"),
    stdout and stderr are pointed at /dev/null so that the interpreter's own flush at exit
    cannot fail again, and the process exits with 141 (128 + SIGPIPE), what a shell reports
    for a command that the pipe's signal ended (`yes | head -1`).
    """
    try:
        try:
            return _dispatch(sys.argv[1:] if argv is None else argv)
        finally:  # also after --help (SystemExit): a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_output()
        return BROKEN_PIPE


def _silence_output() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _dispatch(argv: list[str]) -> int:
    command = _command_in(argv)
    parser = build_parser(command or "")
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
