"""launchd (macOS): the agent plist of one run and the exact `launchctl` command lines.

Pure functions: nothing here touches the file system or runs a command, so everything is
tested on any platform. `supervisor/service.py` decides what to run and runs it.

    ~/Library/LaunchAgents/io.mlx-overnight.<name>.plist     label io.mlx-overnight.<name>

Domain: `gui/<uid>`, the logged-in user's domain, where ~/Library/LaunchAgents is loaded at
every login. It exists only while that user is logged in (screen lock and sleep are fine; a
logout stops the job gracefully and the next login resumes it). `user/<uid>` would not
reload the agent at login, and the `system` domain needs root and a LaunchDaemon.
"""

from __future__ import annotations

import plistlib
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from string import Template
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

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
    base = label_or_file.removesuffix(SUFFIX)
    if not base.startswith(LABEL_PREFIX) or base == LABEL_PREFIX:
        return None
    return base[len(LABEL_PREFIX) :]


def agents_dir(home: Path) -> Path:
    return home / "Library" / "LaunchAgents"


def plist_path(home: Path, name: str) -> Path:
    return agents_dir(home) / f"{label(name)}{SUFFIX}"


def domain(uid: int) -> str:
    return f"gui/{uid}"


def service_target(uid: int, name: str) -> str:
    return f"{domain(uid)}/{label(name)}"


def template_text() -> str:
    return (resources.files("supervisor") / "templates" / TEMPLATE).read_text(encoding="utf-8")


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
    return Template(template_text()).substitute(mapping)


def run_dir_of(text: str) -> Path | None:
    """The run directory a plist starts the supervisor on; None if it cannot be read."""
    try:
        plist = plistlib.loads(text.encode("utf-8"))
    except (ExpatError, ValueError):  # plistlib.InvalidFileException is a ValueError
        return None
    args = plist.get("ProgramArguments") if isinstance(plist, dict) else None
    if not isinstance(args, list) or RUN_DIR_OPTION not in args:
        return None
    i = args.index(RUN_DIR_OPTION) + 1
    return Path(args[i]) if i < len(args) and isinstance(args[i], str) else None


def exit_timeout_of(text: str) -> int | None:
    """The ExitTimeOut of an installed plist (how long its job may take to stop)."""
    try:
        plist = plistlib.loads(text.encode("utf-8"))
    except (ExpatError, ValueError):
        return None
    value = plist.get("ExitTimeOut") if isinstance(plist, dict) else None
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
