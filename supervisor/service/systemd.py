"""systemd (Linux): the user unit of one run and the exact `systemctl --user` command lines.

Nothing here writes a file or runs a command, so everything is tested on any platform: the
functions build the unit and the command lines, `Systemd` (at the end) chooses which to run
for a new, unchanged, replaced or removed unit, and `supervisor/service.py` runs them.

    ~/.config/systemd/user/mlx-overnight-<name>.service

A user unit runs inside the user's systemd instance, which lives from the first login to the
last logout unless lingering is on (`loginctl enable-linger USER`): then it starts at boot
and outlives logouts, which is what an overnight run wants.

Quoting: systemd expands `%` specifiers in most values and `$VAR` in ExecStart= words, and
unquotes C-style inside double quotes; `quote()` escapes all three.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template

from shared.errors import ConfigError
from shared.exitcodes import ExitCode
from supervisor.daemon.service_exit import SERVICE_ENV
from supervisor.service import model as service_model
from supervisor.service.model import Platform, ServiceManager, ServiceSpec, Step, Steps, steps

UNIT_PREFIX = "mlx-overnight-"
SUFFIX = ".service"
TEMPLATE = "mlx-overnight.service.template"
RESTART_SEC = 30  # pause before restarting a failed supervisor
START_LIMIT_INTERVAL_SEC = 1800  # more than START_LIMIT_BURST starts in 30 min: stay failed
START_LIMIT_BURST = 5
TIMEOUT_START_SEC = 300  # from exec to READY=1 (the supervisor does not import MLX)
# What the loop guarantees (supervisor/daemon/loop.py): from READY=1 to STOPPING=1 (systemd
# watches only in between) one pass waits at most 0.5 s, then does bounded work (telemetry,
# control requests, a memory sample, an fsync'd run.json); checkpoint validation runs in a
# thread. WATCHDOG=1 goes out every WatchdogSec/2 = 30 s, so a pass may stall up to 30 s (an
# fsync queued behind a multi-GB checkpoint write) before a working supervisor is killed; a
# hung one is restarted within a minute.
WATCHDOG_SEC = 60
RUN_DIR_COMMENT = "# overnight-run-dir: "
_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+\Z")
_NOT_EXECUTABLE = re.compile(r"[\"'\\$\x00-\x1f\x7f]")
_LINGER = re.compile(r"^Linger=(yes|no)\s*$", re.M)


def unit_name(name: str) -> str:
    return f"{UNIT_PREFIX}{name}{SUFFIX}"


def name_of(unit_or_file: str) -> str | None:
    """The run name in a unit (file) name; None if it is not one of ours."""
    return service_model.run_name(unit_or_file, UNIT_PREFIX, SUFFIX)


def units_dir(home: Path, xdg_config_home: str | None = None) -> Path:
    """Where the user manager looks for the user's own units ($XDG_CONFIG_HOME/systemd/user)."""
    base = Path(xdg_config_home) if xdg_config_home and xdg_config_home.startswith("/") else None
    return (base or home / ".config") / "systemd" / "user"


def unit_path(home: Path, name: str, xdg_config_home: str | None = None) -> Path:
    return units_dir(home, xdg_config_home) / unit_name(name)


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
    config: Path,
    run_dir: Path,
    python: str,
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
    return Template(service_model.template_text(TEMPLATE)).substitute(mapping)


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


# --- what `overnight install | uninstall | services` runs ---------------------------------


class Systemd(ServiceManager):
    platform = Platform.SYSTEMD
    prefix = UNIT_PREFIX
    suffix = SUFFIX

    def directory(self) -> Path:
        return units_dir(self.host.home, self.host.xdg_config_home)

    def path(self, name: str) -> Path:
        return unit_path(self.host.home, name, self.host.xdg_config_home)

    def render_spec(self, spec: ServiceSpec) -> str:
        return render(
            name=spec.name, python=spec.python, config=spec.config, run_dir=spec.run_dir,
            working_directory=spec.workdir,
            environment={**dict(spec.environment), SERVICE_ENV: "systemd"},
            stop_timeout=spec.stop_timeout, timeout_stop_sec=spec.stop_grace,
            watchdog_sec=spec.watchdog_sec,
        )

    def run_dir_in(self, text: str) -> Path | None:
        return run_dir_of(text)

    def install_steps(self, spec: ServiceSpec, state: str, old: str) -> Steps:
        ctl, name = self.host.systemctl, spec.name
        if state == "replace":
            # enable --now would leave the old process running; restart applies the new unit.
            return (), steps(daemon_reload(ctl), enable(ctl, name), restart(ctl, name))
        return (), steps(daemon_reload(ctl), enable_now(ctl, name))

    def uninstall_steps(self, name: str, text: str) -> Steps:
        ctl = self.host.systemctl
        stop = Step(tuple(disable_now(ctl, name)),
                    note="waits while the worker saves a checkpoint")
        return (stop,), steps(daemon_reload(ctl))

    def status(self, name: str) -> str:
        done = self.query(is_active(self.host.systemctl, name))
        return (done.stdout.strip() if done is not None else "") or "unknown"

    def notes(self, spec: ServiceSpec, dry_run: bool) -> list[str]:
        unit = unit_name(spec.name)
        notes = [f"logs: journalctl --user -u {unit} (structured logs in the run's logs/)"]
        query = linger_query(self.host.loginctl, self.host.user)
        advice = f"loginctl enable-linger {self.host.user}"
        if dry_run:
            return [*notes, f"would check lingering with: {shlex.join(query)}"]
        done = self.query(query)
        linger = parse_linger(done.stdout) if done and done.returncode == 0 else None
        if linger is False:
            notes.append(
                "lingering is off: the service stops when you log out and starts again at "
                f"your next login; to keep it running (and start it at boot): {advice}"
            )
        elif linger is None:
            notes.append(
                "could not check lingering (loginctl unavailable); if the run must outlive "
                f"your login session: {advice}"
            )
        return notes

    def failure_hint(self, argv: Sequence[str]) -> str:
        return (
            " (systemctl --user needs your user manager: log in as this user rather than "
            "`su`, or set XDG_RUNTIME_DIR=/run/user/UID)"
        )
