"""systemd (Linux): the user unit of one run and the exact `systemctl --user` command lines.

Pure functions: nothing here touches the file system or runs a command, so everything is
tested on any platform. `supervisor/service.py` decides what to run and runs it.

    ~/.config/systemd/user/mlx-overnight-<name>.service

A user unit runs inside the user's systemd instance, which lives from the first login to the
last logout unless lingering is on (`loginctl enable-linger USER`): then it starts at boot
and outlives logouts, which is what an overnight run wants.

Quoting: systemd expands `%` specifiers in most values and `$VAR` in ExecStart= words, and
unquotes C-style inside double quotes; `quote()` escapes all three.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from string import Template

from shared.errors import ConfigError
from shared.exitcodes import ExitCode

UNIT_PREFIX = "mlx-overnight-"
SUFFIX = ".service"
TEMPLATE = "mlx-overnight.service.template"
RESTART_SEC = 30  # pause before restarting a failed supervisor
START_LIMIT_INTERVAL_SEC = 1800  # more than START_LIMIT_BURST starts in 30 min: stay failed
START_LIMIT_BURST = 5
TIMEOUT_START_SEC = 300  # from exec to READY=1 (the supervisor does not import MLX)
WATCHDOG_SEC = 300  # generous: validating a large checkpoint blocks the supervisor's loop
RUN_DIR_COMMENT = "# overnight-run-dir: "
_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+\Z")
_NOT_EXECUTABLE = re.compile(r"[\"'\\$\x00-\x1f\x7f]")
_LINGER = re.compile(r"^Linger=(yes|no)\s*$", re.M)


def unit_name(name: str) -> str:
    return f"{UNIT_PREFIX}{name}{SUFFIX}"


def name_of(unit_or_file: str) -> str | None:
    """The run name in a unit (file) name; None if it is not one of ours."""
    base = unit_or_file.removesuffix(SUFFIX)
    if not base.startswith(UNIT_PREFIX) or base == UNIT_PREFIX:
        return None
    return base[len(UNIT_PREFIX) :]


def units_dir(home: Path, xdg_config_home: str | None = None) -> Path:
    """Where the user manager looks for the user's own units ($XDG_CONFIG_HOME/systemd/user)."""
    base = Path(xdg_config_home) if xdg_config_home and xdg_config_home.startswith("/") else None
    return (base or home / ".config") / "systemd" / "user"


def unit_path(home: Path, name: str, xdg_config_home: str | None = None) -> Path:
    return units_dir(home, xdg_config_home) / unit_name(name)


def template_text() -> str:
    return (resources.files("supervisor") / "templates" / TEMPLATE).read_text(encoding="utf-8")


def escape_specifiers(value: str) -> str:
    return value.replace("%", "%%")


def quote(word: str) -> str:
    """One ExecStart= word, read back by systemd as exactly `word`."""
    word = escape_specifiers(word).replace("$", "$$")
    if _SAFE_WORD.match(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def executable(path: str) -> str:
    """The first ExecStart= word. systemd refuses quotes and backslashes in the executable's
    path and does not undo `$$` there, so such paths are rejected instead of escaped."""
    if not path.startswith("/") or _NOT_EXECUTABLE.search(path):
        raise ConfigError(
            "interpreter: expected an absolute path without quotes, backslashes or '$' "
            f"(systemd cannot start it), got {path!r}"
        )
    return quote(path)


def environment_line(key: str, value: str) -> str:
    """`Environment="KEY=value"`: quoted, C-escaped, specifiers escaped ($ is literal here)."""
    text = escape_specifiers(f"{key}={value}").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def render(
    *,
    name: str,
    python: str,
    config: Path,
    run_dir: Path,
    working_directory: Path,
    environment: Mapping[str, str],
    stop_timeout: float,
    timeout_stop_sec: int,
    watchdog_sec: int = WATCHDOG_SEC,
) -> str:
    """The unit text; every path must be absolute and free of control characters."""
    args = ["-m", "supervisor.cli", "run", str(config), "--run-dir", str(run_dir)]
    mapping = {
        "name": name,
        "config": str(config),
        "run_dir": str(run_dir),
        "exec_start": " ".join([executable(python), *(quote(a) for a in args)]),
        "working_directory": escape_specifiers(str(working_directory)),
        "environment": "\n".join(environment_line(k, v) for k, v in environment.items()),
        "stop_timeout": f"{stop_timeout:g}",
        "timeout_stop_sec": str(timeout_stop_sec),
        "timeout_start_sec": str(TIMEOUT_START_SEC),
        "watchdog_sec": str(watchdog_sec),
        "restart_sec": str(RESTART_SEC),
        "start_limit_interval_sec": str(START_LIMIT_INTERVAL_SEC),
        "start_limit_burst": str(START_LIMIT_BURST),
        "bad_config_exit": str(int(ExitCode.BAD_CONFIG)),
    }
    return Template(template_text()).substitute(mapping)


def run_dir_of(text: str) -> Path | None:
    """The run directory recorded in a unit's header comment; None if absent."""
    for line in text.splitlines():
        if line.startswith(RUN_DIR_COMMENT):
            value = line[len(RUN_DIR_COMMENT) :]
            return Path(value) if value else None
    return None


# --- systemctl / loginctl command lines ---------------------------------------------------


def daemon_reload(systemctl: str) -> list[str]:
    """Make the user manager read the new or removed unit file."""
    return [systemctl, "--user", "daemon-reload"]


def enable_now(systemctl: str, name: str) -> list[str]:
    """Start at every start of the user manager, and now (a running unit is left alone)."""
    return [systemctl, "--user", "enable", "--now", unit_name(name)]


def enable(systemctl: str, name: str) -> list[str]:
    """Start at every start of the user manager (not now)."""
    return [systemctl, "--user", "enable", unit_name(name)]


def restart(systemctl: str, name: str) -> list[str]:
    """Stop (the worker checkpoints) and start again: used when a unit was replaced."""
    return [systemctl, "--user", "restart", unit_name(name)]


def disable_now(systemctl: str, name: str) -> list[str]:
    """Stop (waits up to TimeoutStopSec while the worker checkpoints) and disable."""
    return [systemctl, "--user", "disable", "--now", unit_name(name)]


def is_active(systemctl: str, name: str) -> list[str]:
    """Prints active / inactive / failed / activating / deactivating."""
    return [systemctl, "--user", "is-active", unit_name(name)]


def linger_query(loginctl: str, user: str) -> list[str]:
    return [loginctl, "show-user", user, "-p", "Linger"]


def parse_linger(output: str) -> bool | None:
    """True/False from `Linger=yes|no`; None when the output says neither."""
    m = _LINGER.search(output)
    return None if m is None else m.group(1) == "yes"
