"""launchd (macOS): the agent plist of one run and the exact `launchctl` command lines.

Nothing here writes a file or runs a command, so everything is tested on any platform: the
functions build the plist and the command lines, `Launchd` (at the end) chooses which to run
for a new, unchanged, replaced or removed job, and `supervisor/service.py` runs them.

    ~/Library/LaunchAgents/io.mlx-overnight.<name>.plist     label io.mlx-overnight.<name>

Domain: `gui/<uid>`, the logged-in user's domain, where ~/Library/LaunchAgents is loaded at
every login. It exists only while that user is logged in (screen lock and sleep are fine; a
logout stops the job gracefully and the next login resumes it). `user/<uid>` would not
reload the agent at login, and the `system` domain needs root and a LaunchDaemon.
"""

from __future__ import annotations

import plistlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from typing import Any
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

from shared.layout import RunDir
from supervisor.daemon.service_exit import SERVICE_ENV
from supervisor.service import model as service_model
from supervisor.service.model import Platform, ServiceManager, ServiceSpec, Step, Steps, steps

LABEL_PREFIX = "io.mlx-overnight."
SUFFIX = ".plist"
TEMPLATE = "io.mlx-overnight.plist.template"
THROTTLE_INTERVAL = 60  # seconds between two starts of a failing supervisor (launchd: 10)
STDOUT_NAME = "service.out.log"
STDERR_NAME = "service.err.log"
RUN_DIR_OPTION = "--run-dir"
_STATE = re.compile(r"^\s*state = (.+?)\s*$", re.M)


def label(name: str) -> str:
    return f"{LABEL_PREFIX}{name}"


def name_of(label_or_file: str) -> str | None:
    """The run name in a label or plist file name; None if it is not one of ours."""
    return service_model.run_name(label_or_file, LABEL_PREFIX, SUFFIX)


def agents_dir(home: Path) -> Path:
    return home / "Library" / "LaunchAgents"


def plist_path(home: Path, name: str) -> Path:
    return agents_dir(home) / f"{label(name)}{SUFFIX}"


def domain(uid: int) -> str:
    return f"gui/{uid}"


def service_target(uid: int, name: str) -> str:
    return f"{domain(uid)}/{label(name)}"


def render(
    *,
    name: str,
    python: str,
    config: Path,
    run_dir: Path,
    working_directory: Path,
    environment: Mapping[str, str],
    log_dir: Path,
    stop_timeout: float,
    exit_timeout: int,
    throttle_interval: int = THROTTLE_INTERVAL,
) -> str:
    """The plist text; every path must be absolute and free of control characters."""
    env_lines = "\n".join(
        f"\t\t<key>{escape(k)}</key>\n\t\t<string>{escape(v)}</string>"
        for k, v in environment.items()
    )
    values = {
        "label": label(name),
        "python": python,
        "config": str(config),
        "run_dir": str(run_dir),
        "working_directory": str(working_directory),
        "stdout_path": str(log_dir / STDOUT_NAME),
        "stderr_path": str(log_dir / STDERR_NAME),
    }
    mapping = {k: escape(v) for k, v in values.items()}
    mapping.update(
        environment=env_lines,
        stop_timeout=f"{stop_timeout:g}",
        exit_timeout=str(exit_timeout),
        throttle_interval=str(throttle_interval),
    )
    return Template(service_model.template_text(TEMPLATE)).substitute(mapping)


def _load(text: str) -> dict[str, Any] | None:
    """The top-level dict of a plist; None if the text is not one."""
    try:
        plist = plistlib.loads(text.encode("utf-8"))
    except (ExpatError, ValueError):  # plistlib.InvalidFileException is a ValueError
        return None
    return plist if isinstance(plist, dict) else None


def run_dir_of(text: str) -> Path | None:
    """The run directory a plist starts the supervisor on; None if it cannot be read."""
    plist = _load(text)
    args = plist.get("ProgramArguments") if plist is not None else None
    if not isinstance(args, list) or RUN_DIR_OPTION not in args:
        return None
    i = args.index(RUN_DIR_OPTION) + 1
    return Path(args[i]) if i < len(args) and isinstance(args[i], str) else None


def exit_timeout_of(text: str) -> int | None:
    """The ExitTimeOut of an installed plist (how long its job may take to stop)."""
    plist = _load(text)
    value = plist.get("ExitTimeOut") if plist is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- launchctl command lines -------------------------------------------------------------


def enable(launchctl: str, uid: int, name: str) -> list[str]:
    """Clear a persistent `disable` left by an earlier install; bootstrap refuses disabled jobs."""
    return [launchctl, "enable", service_target(uid, name)]


def bootstrap(launchctl: str, uid: int, path: Path) -> list[str]:
    """Load the plist into the domain; RunAtLoad starts it."""
    return [launchctl, "bootstrap", domain(uid), str(path)]


def kickstart(launchctl: str, uid: int, name: str) -> list[str]:
    """Start the job if it is loaded and not running (no -k: a running job is left alone)."""
    return [launchctl, "kickstart", service_target(uid, name)]


def bootout(launchctl: str, uid: int, name: str) -> list[str]:
    """Stop (SIGTERM, SIGKILL after ExitTimeOut) and unload the job."""
    return [launchctl, "bootout", service_target(uid, name)]


def print_service(launchctl: str, uid: int, name: str) -> list[str]:
    """Describe the loaded job; exits non-zero when it is not loaded."""
    return [launchctl, "print", service_target(uid, name)]


def parse_state(print_output: str) -> str:
    """The job's `state = ...` line of `launchctl print` ("running", "not running", ...)."""
    m = _STATE.search(print_output)
    return m.group(1) if m else "loaded"


# --- what `overnight install | uninstall | services` runs ---------------------------------


class Launchd(ServiceManager):
    platform = Platform.LAUNCHD
    prefix = LABEL_PREFIX
    suffix = SUFFIX

    def directory(self) -> Path:
        return agents_dir(self.host.home)

    def path(self, name: str) -> Path:
        return plist_path(self.host.home, name)

    def render_spec(self, spec: ServiceSpec) -> str:
        return render(
            name=spec.name, python=spec.python, config=spec.config, run_dir=spec.run_dir,
            working_directory=spec.workdir,
            environment={**dict(spec.environment), SERVICE_ENV: "launchd"},
            log_dir=RunDir(spec.run_dir).logs, stop_timeout=spec.stop_timeout,
            exit_timeout=spec.stop_grace,
        )

    def run_dir_in(self, text: str) -> Path | None:
        return run_dir_of(text)

    def install_steps(self, spec: ServiceSpec, state: str, old: str) -> Steps:
        h, name, path = self.host, spec.name, self.path(spec.name)
        if state == "same":
            # Loaded already: bootstrap fails harmlessly and kickstart leaves it running.
            # Not loaded: bootstrap loads and starts it. Either way kickstart proves it loaded.
            return (), (
                Step(tuple(enable(h.launchctl, h.uid, name))),
                Step(tuple(bootstrap(h.launchctl, h.uid, path)), check=False,
                     note="fails if already loaded; ignored"),
                Step(tuple(kickstart(h.launchctl, h.uid, name))),
            )
        before = self._remove_steps(name, old) if state == "replace" else ()
        after = steps(enable(h.launchctl, h.uid, name), bootstrap(h.launchctl, h.uid, path))
        return before, after

    def _remove_steps(self, name: str, text: str) -> tuple[Step, ...]:
        """Boot the job out (it checkpoints first), then wait until launchd forgot it."""
        h = self.host
        wait = (exit_timeout_of(text) or service_model.STOP_MARGIN + 600) + 10
        return (
            Step(tuple(bootout(h.launchctl, h.uid, name)), check=False,
                 note="waits while the worker saves a checkpoint; fails if not loaded"),
            Step(tuple(print_service(h.launchctl, h.uid, name)), until_fails=wait,
                 note=f"repeated until it fails (job gone), at most {wait} s"),
        )

    def uninstall_steps(self, name: str, text: str) -> Steps:
        return self._remove_steps(name, text), ()

    def status(self, name: str) -> str:
        done = self.query(print_service(self.host.launchctl, self.host.uid, name))
        if done is None:
            return "unknown"
        return parse_state(done.stdout) if done.returncode == 0 else "not loaded"

    def notes(self, spec: ServiceSpec, dry_run: bool) -> list[str]:
        logs = RunDir(spec.run_dir).logs
        return [
            f"domain {domain(self.host.uid)}: the job runs while you are logged in "
            "(screen lock and sleep are fine); logging out stops it after a checkpoint and "
            "the next login resumes it",
            f"console output: {logs / STDOUT_NAME} and {logs / STDERR_NAME}",
        ]

    def failure_hint(self, argv: Sequence[str]) -> str:
        if len(argv) > 1 and argv[1] in ("bootstrap", "kickstart", "enable"):
            return (
                f" (the {domain(self.host.uid)} domain exists only while you are "
                "logged in at the console or via Screen Sharing, not over ssh alone)"
            )
        return ""
