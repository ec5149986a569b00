"""`overnight install | uninstall | services`: keep a supervisor running as a user service.

    overnight install runs/cfg.yaml [--run-dir DIR] [--name NAME] [--dry-run] [--force]
    overnight uninstall NAME
    overnight services

macOS gets a launchd agent in the `gui/<uid>` domain (supervisor/launchd.py), Linux a systemd
user unit (supervisor/systemd.py); `--platform` overrides the choice made from sys.platform.
Each platform's ServiceManager says which commands to run; this module runs them. The types
both sides share (Host, ServiceSpec, Step, ...) are in supervisor/service_model.py.
The service runs `<this interpreter> -m supervisor.cli run CONFIG --run-dir RUN_DIR` and is
restarted only when the supervisor failed (non-zero exit, or killed): exit 0 is a final
decision. Stop timeouts are supervisor.stop_timeout plus STOP_MARGIN, so a stopping worker
always gets its full time to checkpoint.

The service-manager executables come from OVERNIGHT_LAUNCHCTL, OVERNIGHT_SYSTEMCTL and
OVERNIGHT_LOGINCTL when set (tests substitute recording fakes), else from PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared import config as config_mod
from shared import run_record
from shared.errors import ConfigError, OvernightError, RecordError, RunDirError
from shared.fsutil import atomic_write_bytes
from shared.layout import RunDir, creation_problem
from supervisor.service import at_boot, launchd, systemd
from supervisor.service.model import STOP_MARGIN, Host, Platform, ServiceManager, ServiceSpec, Step

QUERY_TIMEOUT = 10.0  # seconds for read-only service-manager queries
POLL_INTERVAL = 0.5
NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- running commands ----------------------------------------------------------------------


def _query(argv: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    """A read-only command; None if it cannot run at all."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=QUERY_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def backend(platform: Platform, host: Host) -> ServiceManager:
    manager = launchd.Launchd if platform is Platform.LAUNCHD else systemd.Systemd
    return manager(host, _query)


def _execute(step: Step, b: ServiceManager) -> None:
    print(f"$ {step.describe()}", flush=True)
    deadline = time.monotonic() + step.until_fails
    while True:
        try:
            done = subprocess.run(list(step.argv), capture_output=True, text=True, check=False)
        except OSError as e:
            raise OvernightError(
                f"{step.argv[0]}: cannot run ({e.strerror or e}); "
                "use --dry-run to see the file and commands"
            ) from None
        if step.until_fails:
            if done.returncode != 0:
                return
            if time.monotonic() > deadline:
                raise OvernightError(
                    f"`{shlex.join(step.argv)}`: the job is still loaded after "
                    f"{step.until_fails:g} s"
                )
            time.sleep(POLL_INTERVAL)
            continue
        for line in (done.stdout + done.stderr).splitlines():
            print(f"  {line}")
        if done.returncode != 0 and step.check:
            detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise OvernightError(
                f"`{shlex.join(step.argv)}` failed (exit {done.returncode})"
                f"{': ' + detail[-1] if detail else ''}{b.failure_hint(step.argv)}"
            )
        return


# --- building the spec from the command line -----------------------------------------------


def check_name(name: str, what: str = "--name") -> str:
    if len(name) > NAME_MAX or not _NAME.match(name):
        raise ConfigError(
            f"{what}: expected letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit, at most {NAME_MAX}), got {name!r}"
        )
    return name


def derive_name(run_dir: Path) -> str:
    """The run name, sanitised to [A-Za-z0-9._-]: `runs/my run` -> `my-run`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.name).strip("-._")[:NAME_MAX]
    if not name:
        raise ConfigError(f"{run_dir}: cannot derive a service name from it; pass --name")
    return name


def _no_control(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ConfigError(f"{what}: expected no control characters, got {value!r}")
    return value


def _abspath(base: Path, value: str | Path) -> Path:
    return Path(os.path.normpath(base / os.path.expanduser(str(value))))


def default_environment(python: str, env: Mapping[str, str]) -> dict[str, str]:
    """PATH with the interpreter's directory first, the virtualenv, and PYTHONPATH when the
    package is not installed into the interpreter (a source checkout)."""
    bin_dir = os.path.dirname(python)
    entries = [bin_dir, *env.get("PATH", "").split(os.pathsep)]
    path = [p for i, p in enumerate(entries) if p.startswith("/") and p not in entries[:i]]
    if len(path) == 1:
        path += ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    result = {"PATH": os.pathsep.join(path)}
    if sys.prefix != sys.base_prefix:
        result["VIRTUAL_ENV"] = sys.prefix
    root = Path(__file__).resolve().parents[2]  # the checkout: supervisor/service/ is 2 deep
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if root not in site:
        result["PYTHONPATH"] = str(root)
    result["PYTHONUNBUFFERED"] = "1"
    return result


def parse_env(items: Sequence[str]) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise ConfigError(f"--env: expected KEY=VALUE, got {item!r}")
        result[key] = _no_control(value, f"--env {key}")
    return result


def spec_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServiceSpec:
    env = os.environ if env is None else env
    cwd = Path.cwd()
    workdir = _abspath(cwd, args.workdir) if args.workdir else cwd
    if not workdir.is_dir():
        raise ConfigError(f"--workdir: expected a directory, got {str(workdir)!r}")
    if getattr(args, "queue", None) is not None:  # `run QUEUE_DIR`: supervisor/queue/night.py
        if args.config is not None or args.run_dir:
            raise ConfigError("expected CONFIG.yaml or --queue DIR, not both (a queue's jobs "
                              "have their own run directories)")
        from supervisor.queue.commands import stop_timeout as queue_stop_timeout

        config_path = run_dir = _abspath(cwd, args.queue)
        stop_timeout = queue_stop_timeout(run_dir)
    else:
        if args.config is None:
            raise ConfigError("expected CONFIG.yaml (one run) or --queue DIR (a night of jobs)")
        config_path = _abspath(cwd, args.config)
        stop_timeout = config_mod.load(config_path).supervisor.stop_timeout
        default_run_dir = workdir / "runs" / config_path.stem
        run_dir = _abspath(cwd, args.run_dir) if args.run_dir else default_run_dir
    name = check_name(args.name) if args.name else derive_name(run_dir)
    if args.watchdog_sec < 0:
        raise ConfigError(f"--watchdog-sec: expected seconds >= 0, got {args.watchdog_sec}")
    python = os.path.abspath(sys.executable) if sys.executable else ""
    if not python:
        raise ConfigError("cannot find this Python interpreter (sys.executable is empty)")
    environment = {**default_environment(python, env), **parse_env(args.env or [])}
    for what, value in (("interpreter", python), ("config", str(config_path)),
                        ("--run-dir", str(run_dir)), ("--workdir", str(workdir))):
        _no_control(value, what)
    for key, value in environment.items():
        _no_control(value, f"environment {key}")
    return ServiceSpec(
        name=name, python=python, config=config_path, run_dir=run_dir, workdir=workdir,
        environment=tuple(environment.items()), stop_timeout=stop_timeout,
        watchdog_sec=args.watchdog_sec,
    )


# --- listing ---------------------------------------------------------------------------------


def run_state(run_dir: Path | None) -> str:
    """The state in the run record; "unknown" if there is none or it is unreadable."""
    if run_dir is None:
        return "unknown"
    if (run_dir / "queue.json").exists():  # `install --queue`: the jobs' states
        from supervisor.queue.commands import summary

        return summary(run_dir)
    try:
        record = run_record.load(RunDir(run_dir).record)
    except RecordError:
        return "unknown"
    return record.state.value if record is not None else "unknown"


def installed(b: ServiceManager) -> list[tuple[str, Path, Path | None]]:
    """(name, service file, run dir) of every service of ours, sorted by name."""
    directory = b.directory()
    if not directory.is_dir():
        return []
    found = []
    for f in sorted(directory.iterdir()):
        name = b.name_of(f.name)
        if name is None or not f.is_file():
            continue
        try:
            run_dir = b.run_dir_in(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            run_dir = None
        found.append((name, f, run_dir))
    return found


# --- the commands ----------------------------------------------------------------------------


def add_install_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the run's YAML config")
    p.add_argument("--queue", metavar="DIR",
                   help="install a night of jobs instead: the service runs `overnight run "
                        "--queue DIR` (its deadline: `until:` in DIR/queue.yaml)")
    p.add_argument("--run-dir", help="run directory (default: WORKDIR/runs/<config stem>)")
    p.add_argument("--name", help="service name (default: the run directory's name)")
    p.add_argument("--workdir", help="working directory of the service (default: here)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="extra environment variable for the service (repeatable)")
    p.add_argument("--watchdog-sec", type=int, default=systemd.WATCHDOG_SEC,
                   help="systemd WatchdogSec (0 = off; default %(default)s)")
    _add_common(p)
    p.add_argument("--force", action="store_true",
                   help="replace an installed service of the same name with a different one")


def add_uninstall_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="service name (as shown by `overnight services`)")
    _add_common(p)


def add_services_arguments(p: argparse.ArgumentParser) -> None:
    _add_platform(p)


def _add_platform(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", choices=[m.value for m in Platform],
                   help="service manager (default: launchd on macOS, systemd on Linux)")
    p.add_argument("--at-boot", action="store_true",
                   help="a system-wide job that starts at boot with nobody logged in and runs "
                        "as you (LaunchDaemon / system unit; needs sudo); default: a per-user "
                        "service (LaunchAgent / user unit)")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_platform(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the file and the commands; write and run nothing")


def _backend(args: argparse.Namespace) -> ServiceManager:
    """The service manager the command line asks for: the user's (default), or the
    system's with --at-boot (supervisor/service/at_boot.py: root required unless a dry run)."""
    platform, host = Platform.choose(args.platform), Host.current()
    if not getattr(args, "at_boot", False):
        return backend(platform, host)
    if not getattr(args, "dry_run", False):
        at_boot.require_root()
    return at_boot.backend(platform, at_boot.host_for(host), _query)


def main_install(args: argparse.Namespace) -> int:
    b = _backend(args)
    spec = spec_from_args(args)
    path, content = b.path(spec.name), b.render_spec(spec)
    for other, other_path, other_run_dir in installed(b):
        if other != spec.name and other_run_dir == spec.run_dir:
            raise ConfigError(
                f"{other_path}: service {other!r} already runs {spec.run_dir}; "
                f"`overnight uninstall {other}` first"
            )
    state, old = "new", ""
    if path.exists():
        try:
            old = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the installed service ({e})") from None
        state = "same" if old == content else "replace"
        if state == "replace" and not args.force:
            raise ConfigError(
                f"{path}: a different service named {spec.name!r} is installed (run dir "
                f"{b.run_dir_in(old)}); pass --force to replace it or --name for another name"
            )
    before, after = b.install_steps(spec, state, old)
    what = {"new": "new", "same": "unchanged", "replace": "replaces the installed one"}[state]
    # A run directory the service could never create: one line now, not a failing service.
    if args.dry_run:
        problem = creation_problem(spec.run_dir)
        if problem:
            raise RunDirError(problem)
    elif spec.config != spec.run_dir:  # a queue's directory (--queue) is no run directory
        RunDir(spec.run_dir).create()
        if args.at_boot:  # created by root: the job's user must own it
            at_boot.hand_over(spec.run_dir, b.host)
    if args.dry_run:
        print(f"# overnight install: dry run, nothing written or run\n# {path} ({what})")
        print(content, end="" if content.endswith("\n") else "\n")
        print("# commands:")
        for step in (*before, *after):
            print(f"$ {step.describe()}")
        for note in b.notes(spec, dry_run=True):
            print(f"# {note}")
        return 0
    for step in before:
        _execute(step, b)
    if state != "same":
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, content.encode("utf-8"))
        print(f"wrote {path}")
    for step in after:
        _execute(step, b)
    print(f"installed {spec.name!r} ({b.platform.value}): {spec.run_dir}")
    print(f"stop timeout {spec.stop_grace} s (supervisor.stop_timeout {spec.stop_timeout:g} s "
          f"+ {STOP_MARGIN} s); remove with: overnight uninstall {spec.name}")
    for note in b.notes(spec, dry_run=False):
        print(f"note: {note}")
    return 0


def main_uninstall(args: argparse.Namespace) -> int:
    b = _backend(args)
    # "tiny", "io.mlx-overnight.tiny", "mlx-overnight-tiny.service": all mean the same job.
    exact = _NAME.match(args.name) and b.path(args.name).is_file()
    name = check_name(args.name if exact else b.strip(args.name), "NAME")
    path = b.path(name)
    if not path.is_file():
        names = ", ".join(n for n, _, _ in installed(b)) or "none"
        raise ConfigError(f"{path}: no service named {name!r} is installed (installed: {names})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    before, after = b.uninstall_steps(name, text)
    if args.dry_run:
        print(f"# overnight uninstall: dry run, nothing removed or run\n# would remove {path}")
        for step in (*before, *after):
            print(f"$ {step.describe()}")
        return 0
    for step in before:
        _execute(step, b)
    path.unlink(missing_ok=True)
    print(f"removed {path}")
    for step in after:
        _execute(step, b)
    print(f"uninstalled {name!r}; the run directory is untouched")
    return 0


def main_services(args: argparse.Namespace) -> int:
    b = _backend(args)
    rows = [
        (name, b.status(name), run_state(run_dir), str(run_dir) if run_dir else "?")
        for name, _, run_dir in installed(b)
    ]
    if not rows:
        print(f"no services installed in {b.directory()}")
        return 0
    table = [("NAME", "SERVICE", "RUN STATE", "RUN DIR"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3]]))
    return 0
