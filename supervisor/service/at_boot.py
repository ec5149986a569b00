"""`overnight install --at-boot`: a service that starts at boot, with nobody logged in.

The default install is a per-user service: a LaunchAgent in `gui/<uid>` starts again only at
the next login, so after a 3 a.m. kernel panic the night is lost unless auto-login is on; a
systemd user unit needs lingering. `--at-boot` installs the same supervisor as a
system-wide job that runs as the installing user:

- **launchd**: a LaunchDaemon, /Library/LaunchDaemons/io.mlx-overnight.<name>.plist, in the
  `system` domain (launchctl enable system/<label>, launchctl bootstrap system <plist>),
  with `UserName` (launchd.plist(5): "the user to run the job as"; only for the system
  domain) and HOME/USER in its environment (a daemon gets no login environment). The plist
  is the agent's, read and written with plistlib, with those keys added.
- **systemd**: a system unit, /etc/systemd/system/mlx-overnight-<name>.service, with
  `User=` and `Group=` (systemd.exec(5)), `WantedBy=multi-user.target`, managed with
  `systemctl` (no --user): it starts at boot whatever the user's sessions do.

Both need root to install (`sudo overnight install --at-boot CONFIG`): the user is the one
who ran sudo (SUDO_USER), never root; the run directory is created and handed to that user.
Trade-offs, said in README "What the Mac does at night" and in the install output: the job
starts at boot before anyone logs in — with no GUI session, so a locked-down FileVault Mac
reaches it only after the disk is unlocked at the login window; it keeps running through
logouts; removing it needs sudo too (`sudo overnight uninstall --at-boot NAME`); and the
system domain's jobs are visible to every administrator.
"""

from __future__ import annotations

import grp
import os
import plistlib
import pwd
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.errors import ConfigError
from supervisor.daemon.service_exit import SERVICE_ENV
from supervisor.service import launchd, systemd
from supervisor.service import model as service_model
from supervisor.service.model import Host, Platform, ServiceManager, ServiceSpec, Step, Steps

LAUNCH_DAEMONS = Path("/Library/LaunchDaemons")
SYSTEM_UNITS = Path("/etc/systemd/system")
# Where the files go, overridable like the tools (model.ENV_LAUNCHCTL): tests install into
# a temporary directory with fake launchctl / systemctl.
ENV_LAUNCH_DAEMONS = "OVERNIGHT_LAUNCH_DAEMONS_DIR"
ENV_SYSTEM_UNITS = "OVERNIGHT_SYSTEM_UNITS_DIR"


def _dir(key: str, default: Path) -> Path:
    value = os.environ.get(key)
    return Path(value) if value else default
SYSTEM_DOMAIN = "system"


def host_for(current: Host, env: Mapping[str, str] | None = None) -> Host:
    """The user the job runs as: the one who ran sudo (SUDO_USER), else the current one."""
    env = os.environ if env is None else env
    user = env.get("SUDO_USER") if current.uid == 0 else None
    if not user or user == "root":
        return current
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"SUDO_USER: no such user {user!r}") from None
    return Host(home=Path(entry.pw_dir), uid=entry.pw_uid, user=user, xdg_config_home=None,
                launchctl=current.launchctl, systemctl=current.systemctl,
                loginctl=current.loginctl)


def require_root(euid: int | None = None) -> None:
    """ConfigError unless running as root (one line saying how)."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise ConfigError(
            "--at-boot installs a system-wide job (a LaunchDaemon / a system unit): run it "
            "with sudo, e.g. `sudo overnight install --at-boot CONFIG`; the job runs as you, "
            "not as root (or use --dry-run to see the file and commands)")


def hand_over(path: Path, host: Host) -> None:
    """Give the run directory (and what install created in it) to the job's user, when
    root created it for someone else."""
    if os.geteuid() != 0 or host.uid == 0:
        return
    gid = pwd.getpwnam(host.user).pw_gid
    for p in [path, *path.rglob("*")]:
        if p.stat().st_uid == 0:
            os.chown(p, host.uid, gid, follow_symlinks=False)


class LaunchDaemon(launchd.Launchd):
    """The LaunchDaemon of one run (module docstring)."""

    def directory(self) -> Path:
        return _dir(ENV_LAUNCH_DAEMONS, LAUNCH_DAEMONS)

    def path(self, name: str) -> Path:
        return self.directory() / f"{launchd.label(name)}{launchd.SUFFIX}"

    def render_spec(self, spec: ServiceSpec) -> str:
        plist = plistlib.loads(super().render_spec(spec).encode("utf-8"))
        plist["UserName"] = self.host.user
        env = plist.setdefault("EnvironmentVariables", {})
        env.update({"HOME": str(self.host.home), "USER": self.host.user,
                    SERVICE_ENV: "launchd"})
        return plistlib.dumps(plist, sort_keys=False).decode("utf-8")

    def install_steps(self, spec: ServiceSpec, state: str, old: str) -> Steps:
        target = f"{SYSTEM_DOMAIN}/{launchd.label(spec.name)}"
        path = str(self.path(spec.name))
        ctl = self.host.launchctl
        if state == "same":
            return (), (Step((ctl, "enable", target)),
                        Step((ctl, "bootstrap", SYSTEM_DOMAIN, path), check=False,
                             note="fails if already loaded; ignored"),
                        Step((ctl, "kickstart", target)))
        before = self._remove_steps(spec.name, old) if state == "replace" else ()
        return before, (Step((ctl, "enable", target)),
                        Step((ctl, "bootstrap", SYSTEM_DOMAIN, path)))

    def _remove_steps(self, name: str, text: str) -> tuple[Step, ...]:
        target = f"{SYSTEM_DOMAIN}/{launchd.label(name)}"
        wait = (launchd.exit_timeout_of(text) or service_model.STOP_MARGIN + 600) + 10
        ctl = self.host.launchctl
        return (Step((ctl, "bootout", target), check=False,
                     note="waits while the worker saves a checkpoint; fails if not loaded"),
                Step((ctl, "print", target), until_fails=wait,
                     note=f"repeated until it fails (job gone), at most {wait} s"))

    def status(self, name: str) -> str:
        done = self.query((self.host.launchctl, "print",
                           f"{SYSTEM_DOMAIN}/{launchd.label(name)}"))
        if done is None:
            return "unknown"
        return launchd.parse_state(done.stdout) if done.returncode == 0 else "not loaded"

    def notes(self, spec: ServiceSpec, dry_run: bool) -> list[str]:
        return [
            f"LaunchDaemon in the system domain, running as {self.host.user}: it starts at "
            "boot with nobody logged in (after a kernel panic or a power cut the night goes "
            "on), and keeps running through logouts",
            "trade-offs: installing and removing need sudo; no GUI session (no keychain "
            "prompts); with FileVault the disk must be unlocked at the login window first",
            *launchd.Launchd.notes(self, spec, dry_run)[1:],
        ]

    def failure_hint(self, argv: Sequence[str]) -> str:
        return " (the system domain needs root: run with sudo)"


class SystemUnit(systemd.Systemd):
    """The systemd system unit of one run, running as the user (module docstring)."""

    def directory(self) -> Path:
        return _dir(ENV_SYSTEM_UNITS, SYSTEM_UNITS)

    def path(self, name: str) -> Path:
        return self.directory() / systemd.unit_name(name)

    def render_spec(self, spec: ServiceSpec) -> str:
        text = super().render_spec(spec)
        group = grp.getgrgid(pwd.getpwnam(self.host.user).pw_gid).gr_name \
            if _known(self.host.user) else self.host.user
        text = text.replace("\n[Service]\n", f"\n[Service]\nUser={self.host.user}\n"
                                             f"Group={group}\n", 1)
        text = re.sub(r"^WantedBy=default\.target$", "WantedBy=multi-user.target", text,
                      count=1, flags=re.M)
        return text

    def install_steps(self, spec: ServiceSpec, state: str, old: str) -> Steps:
        return _system(super().install_steps(spec, state, old))

    def uninstall_steps(self, name: str, text: str) -> Steps:
        return _system(super().uninstall_steps(name, text))

    def status(self, name: str) -> str:
        done = self.query((self.host.systemctl, "is-active", systemd.unit_name(name)))
        return (done.stdout.strip() if done is not None else "") or "unknown"

    def notes(self, spec: ServiceSpec, dry_run: bool) -> list[str]:
        unit = systemd.unit_name(spec.name)
        return [f"system unit running as {self.host.user}: it starts at boot, with or without "
                f"a login (no lingering needed); logs: journalctl -u {unit}",
                "trade-offs: installing and removing need sudo; every administrator sees it"]

    def failure_hint(self, argv: Sequence[str]) -> str:
        return " (the system manager needs root: run with sudo)"


def _known(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _system(s: Steps) -> Steps:
    """The user manager's steps for the system manager: `systemctl --user X` -> `systemctl X`."""
    def fix(step: Step) -> Step:
        argv = tuple(a for a in step.argv if a != "--user")
        return Step(argv, step.check, step.until_fails, step.note)
    return tuple(fix(x) for x in s[0]), tuple(fix(x) for x in s[1])


def backend(platform: Platform, host: Host, query: service_model.Query) -> ServiceManager:
    """The at-boot service manager for `platform`, running jobs as `host`'s user."""
    return (LaunchDaemon if platform is Platform.LAUNCHD else SystemUnit)(host, query)
