"""`overnight`: one command line for the worker, the supervisor and the morning after.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int` (or `add_<cmd>_arguments` / `main_<cmd>` when a module serves several
commands). Only the module of the command being run is imported, so `overnight status` never
pays for importing MLX, and command modules keep MLX imports inside functions.

Why the dispatcher is here: it fronts both programs, the supervisor's commands and the
worker's (`train`, `checkpoints`, `import-gguf`), and neither program may import the other
(supervisor/ imports nothing from worker/). The registry names modules as strings and
imports only the one command that runs, so this module depends on neither side either.
`python -m worker` is the same dispatcher with the worker's commands only (the supervisor
starts its workers so); `python -m supervisor.cli` is an alias of `overnight` kept for the
service files that earlier versions installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from typing import Any, NoReturn

from shared.errors import OvernightError
from shared.exitcodes import ExitCode

BROKEN_PIPE = 128 + int(signal.SIGPIPE)  # 141: the output's reader went away (`| head -1`)

# (command, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "supervisor.morning.demo",
     "run the built-in demo: a supervised fine-tune with failures"),
    ("run", "supervisor.daemon.main",
     "start the supervisor: train CONFIG and keep the worker alive"),
    ("queue", "supervisor.queue.commands",
     "add, list, move, remove, pause, resume the jobs of a night (run with run --queue)"),
    ("train", "worker.main", "run the worker alone, in the foreground (no supervisor)"),
    ("status", "supervisor.morning.status", "show the state of a run (live or from its record)"),
    ("stop", "supervisor.morning.status", "ask a running supervisor to checkpoint and stop"),
    ("checkpoints", "worker.checkpoints_cli", "list a run's checkpoints with their status"),
    ("logs", "supervisor.morning.logview", "show a run's merged supervisor and worker logs"),
    ("report", "supervisor.morning.report", "write and print the morning report of a run"),
    ("compare", "supervisor.queue.compare_cli",
     "compare runs side by side: verdicts, a table, one picture, the best run"),
    ("install", "supervisor.service.commands", "install a run as a launchd/systemd user service"),
    ("uninstall", "supervisor.service.commands", "remove an installed service"),
    ("services", "supervisor.service.commands", "list installed services and their runs' states"),
    ("import-gguf", "worker.gguf_import", "convert a llama GGUF file into an mlx_lm model dir"),
    ("tiny-model", "worker.tinymodel",
     "build a tiny random model and corpus offline (what `overnight demo` trains)"),
]


class _Parser(argparse.ArgumentParser):
    """Bad arguments are bad input like a bad config: one line, exit 78 (so a supervisor
    never restarts a worker whose command line cannot work)."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.BAD_CONFIG), f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # the innermost (sub)parser left with arguments it does not know is the one whose
        # name and --help the error gives (`overnight run: unrecognized arguments: ...`)
        ns, extra = super().parse_known_args(args, namespace)
        if extra and not hasattr(ns, "_unknown_to"):
            ns._unknown_to = self
        return ns, extra


# The worker's own commands: what `python -m worker` offers.
WORKER_COMMANDS = [c for c in COMMANDS if c[1].startswith("worker.")]
Commands = list[tuple[str, str, str]]


def build_parser(command: str | None = None,
                 commands: Commands = COMMANDS) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (all of them when None)."""
    parser = _Parser(
        prog="overnight",
        description="Keep an MLX fine-tuning job alive through the night.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, help_text in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name, _command=name)
        if command is not None and name != command:
            continue
        module = importlib.import_module(module_name)
        specific = f"add_{name.replace('-', '_')}_arguments"
        add = getattr(module, specific, None) or module.add_arguments
        add(p)
    return parser


def _command_in(argv: list[str], commands: Commands) -> str | None:
    known = {name for name, _, _ in commands}
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in known else None
    return None


def main(argv: list[str] | None = None, commands: Commands = COMMANDS) -> int:
    """The outermost boundary: run one command; its output to a closed pipe ends it quietly.

    `overnight status RUN | head -1`: once the reader has gone, a write (or the final flush)
    raises BrokenPipeError. As the Python docs advise (library/signal.html, "Note on SIGPIPE"),
    stdout and stderr are pointed at /dev/null so that the interpreter's own flush at exit
    cannot fail again, and the process exits with 141 (128 + SIGPIPE), what a shell reports
    for a command that the pipe's signal ended (`yes | head -1`).
    """
    try:
        try:
            return _dispatch(sys.argv[1:] if argv is None else argv, commands)
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


def _dispatch(argv: list[str], commands: Commands) -> int:
    command = _command_in(argv, commands)
    parser = build_parser(command or "", commands)
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_unknown_to", parser).error(f"unrecognized arguments: {' '.join(extra)}")
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
