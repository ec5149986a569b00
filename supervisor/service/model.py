"""The shared vocabulary of `overnight install | uninstall | services`.

`supervisor/service.py` (the commands) and the two platforms, `supervisor/launchd.py` and
`supervisor/systemd.py`, all speak in these terms, so they live here and neither side imports
the other's module:

    Platform         launchd (macOS) or systemd (Linux)
    Host             home, user and service-manager executables, read once per command
    ServiceSpec      everything a service file says about one run
    Step             one service-manager command line, and how a failure of it counts
    ServiceManager   one platform: where its files go, what they say, which Steps to run

A ServiceManager runs nothing itself: service.py executes its Steps, and its read-only
queries (status, lingering) go through the `Query` function it is constructed with.
"""

from __future__ import annotations

import math
import os
import pwd
import shlex
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import ClassVar

from shared.errors import ConfigError

STOP_MARGIN = 60  # seconds beyond stop_timeout: the supervisor records the outcome and exits
ENV_LAUNCHCTL = "OVERNIGHT_LAUNCHCTL"
ENV_SYSTEMCTL = "OVERNIGHT_SYSTEMCTL"
ENV_LOGINCTL = "OVERNIGHT_LOGINCTL"


class Platform(str, Enum):
    LAUNCHD = "launchd"
    SYSTEMD = "systemd"

    @classmethod
    def choose(cls, override: str | None, sys_platform: str = sys.platform) -> Platform:
        if override:
            return cls(override)
        if sys_platform == "darwin":
            return cls.LAUNCHD
        if sys_platform.startswith("linux"):
            return cls.SYSTEMD
        raise ConfigError(
            f"--platform: expected launchd (macOS) or systemd (Linux), got sys.platform "
            f"{sys_platform!r}; pass --platform to choose"
        )


@dataclass(frozen=True)
class Host:
    """Where, as whom and with which tools services are installed; read once per command."""

    home: Path
    uid: int
    user: str
    xdg_config_home: str | None
    launchctl: str
    systemctl: str
    loginctl: str

    @classmethod
    def current(cls, env: Mapping[str, str] | None = None) -> Host:
        env = os.environ if env is None else env
        uid = os.getuid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)  # loginctl accepts a UID too
        return cls(
            home=Path(env["HOME"]) if env.get("HOME") else Path.home(),
            uid=uid,
            user=user,
            xdg_config_home=env.get("XDG_CONFIG_HOME"),
            launchctl=env.get(ENV_LAUNCHCTL) or "launchctl",
            systemctl=env.get(ENV_SYSTEMCTL) or "systemctl",
            loginctl=env.get(ENV_LOGINCTL) or "loginctl",
        )


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a service file says about one run; every path absolute.

    watchdog_sec is systemd's WatchdogSec (launchd has none); `overnight install` defaults it
    to systemd.WATCHDOG_SEC.
    """

    name: str
    python: str
    config: Path
    run_dir: Path
    workdir: Path
    environment: tuple[tuple[str, str], ...]
    stop_timeout: float
    watchdog_sec: int

    @property
    def stop_grace(self) -> int:
        """Service-manager stop timeout: the worker's checkpoint time plus a margin."""
        return math.ceil(max(self.stop_timeout, 0.0)) + STOP_MARGIN


@dataclass(frozen=True)
class Step:
    """One service-manager command line.

    check: a failure aborts. until_fails > 0: repeat until the command fails (the job is
    gone), at most that many seconds. note: shown after the command in dry runs.
    """

    argv: tuple[str, ...]
    check: bool = True
    until_fails: float = 0.0
    note: str = ""

    def describe(self) -> str:
        text = shlex.join(self.argv)
        return f"{text}    # {self.note}" if self.note else text


def steps(*argvs: Sequence[str]) -> tuple[Step, ...]:
    """Plain steps: each checked, none repeated, no note."""
    return tuple(Step(tuple(a)) for a in argvs)


Steps = tuple[tuple[Step, ...], tuple[Step, ...]]  # (before writing/removing, after)
# Runs a read-only command; None if it cannot run at all.
Query = Callable[[Sequence[str]], subprocess.CompletedProcess[str] | None]


def run_name(text: str, prefix: str, suffix: str) -> str | None:
    """The run name in `<prefix><name>` or `<prefix><name><suffix>`; None if not one of ours."""
    base = text.removesuffix(suffix)
    if not base.startswith(prefix) or base == prefix:
        return None
    return base[len(prefix) :]


def template_text(file_name: str) -> str:
    """A service-file template shipped in supervisor/service/templates/."""
    templates = resources.files("supervisor.service") / "templates"
    return (templates / file_name).read_text(encoding="utf-8")


class ServiceManager(ABC):
    """One platform's service manager, as the install commands drive it.

    A service file is named `<prefix><run name><suffix>`. Subclasses say where the files go,
    what they say and which Steps install, replace or remove a job.
    """

    platform: ClassVar[Platform]
    prefix: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(self, host: Host, query: Query) -> None:
        self.host = host
        self.query = query

    def name_of(self, file_name: str) -> str | None:
        """The run name of a service file of ours; None for any other file."""
        if not file_name.endswith(self.suffix):
            return None
        return run_name(file_name, self.prefix, self.suffix)

    def strip(self, name: str) -> str:
        """A run name from a name, label, unit or file name as a user may type it."""
        return run_name(name, self.prefix, self.suffix) or name

    @abstractmethod
    def directory(self) -> Path:
        """Where this user's service files are."""

    @abstractmethod
    def path(self, name: str) -> Path:
        """The service file of run `name`."""

    @abstractmethod
    def render_spec(self, spec: ServiceSpec) -> str:
        """The service file's text."""

    @abstractmethod
    def run_dir_in(self, text: str) -> Path | None:
        """The run directory an installed service file names; None if it cannot be read."""

    @abstractmethod
    def install_steps(self, spec: ServiceSpec, state: str, old: str) -> Steps:
        """state: "new", "same" (`old`, the installed text, is identical) or "replace"."""

    @abstractmethod
    def uninstall_steps(self, name: str, text: str) -> Steps:
        """Steps around removing the service file whose text is `text` ("" if unreadable)."""

    @abstractmethod
    def status(self, name: str) -> str:
        """The job's state as the service manager reports it; "unknown" if it cannot say."""

    @abstractmethod
    def notes(self, spec: ServiceSpec, dry_run: bool) -> list[str]:
        """What the user should know after installing."""

    @abstractmethod
    def failure_hint(self, argv: Sequence[str]) -> str:
        """Appended to the error when the command `argv` failed ("" for none)."""
