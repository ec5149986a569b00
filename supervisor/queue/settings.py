"""The queue's settings: QUEUE_DIR/queue.yaml, written by the user (optional).

    on_failure: continue        # or stop: a job that gives up ends the night
    until: "07:00"              # the night's deadline (local time); --until overrides
    skip_unfinishable: true     # pass over a job whose measured speed cannot finish it in time
    notify:
      events: [job, queue]      # add `failure` for every failed attempt of a job
      timeout: 10               # seconds per message
      targets:
        - macos: {}                                   # Notification Center (osascript)
        - ntfy: {topic: my-night}                     # server: https://ntfy.sh by default
        - webhook: {url: "https://hooks.slack.com/services/..."}   # Slack, Discord, any JSON

Read by the same YAML loader as a run's config (shared/yamlfile.py) and decoded by the same
typed records (shared/records.py, lenient: "30" is 30, an unknown key is named with a
did-you-mean): any problem is one line naming the file and the key, exit 78, before the
night starts. Kept out of queue.json on purpose: that file is the machine's (rewritten
atomically under a lock), this one is the user's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from shared import records
from shared.errors import ConfigError
from shared.yamlfile import load_yaml

_RULES = records.Rules(ConfigError, lenient=True, suggest=True, finite=True)
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")
NTFY_SERVER = "https://ntfy.sh"


@dataclass(frozen=True)
class MacOSTarget:
    """A Notification Center banner (`osascript -e 'display notification ...'`)."""

    sound: str = ""


@dataclass(frozen=True)
class NtfyTarget:
    """An ntfy topic: POST SERVER/TOPIC, the message as the body (docs.ntfy.sh/publish)."""

    topic: str
    server: str = NTFY_SERVER
    priority: int = 3


@dataclass(frozen=True)
class WebhookTarget:
    """A JSON POST. The body carries `text` (Slack incoming webhooks) and `content`
    (Discord webhooks) besides the event's fields, so one URL of either works as it is."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    macos: MacOSTarget | None = None
    ntfy: NtfyTarget | None = None
    webhook: WebhookTarget | None = None


@dataclass(frozen=True)
class Notify:
    events: list[Literal["job", "queue", "failure"]] = field(
        default_factory=lambda: ["job", "queue"])
    timeout: float = 10.0
    targets: list[Target] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    on_failure: Literal["continue", "stop"] = "continue"
    until: str = ""
    skip_unfinishable: bool = True
    notify: Notify = field(default_factory=Notify)


def load(queue_dir: Path) -> Settings:
    """QUEUE_DIR/queue.yaml (defaults when there is none); ConfigError naming the key."""
    file = queue_dir / "queue.yaml"
    if not file.exists():
        return Settings()
    data: dict[str, Any] = load_yaml(file)
    try:
        settings = records.build(Settings, data, "", _RULES)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    for i, t in enumerate(settings.notify.targets):
        if sum(x is not None for x in (t.macos, t.ntfy, t.webhook)) != 1:
            raise ConfigError(f"{file}: notify.targets[{i}]: expected exactly one of macos, "
                              f"ntfy, webhook, got {t}")
        url = t.webhook.url if t.webhook else t.ntfy.server if t.ntfy else ""
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{file}: notify.targets[{i}]: expected an http(s) URL, "
                              f"got {url!r}")
    if settings.notify.timeout <= 0:
        raise ConfigError(f"{file}: notify.timeout: expected seconds > 0, got "
                          f"{settings.notify.timeout}")
    if settings.until:
        deadline(settings.until, datetime.now(), f"{file}: until")
    return settings


def deadline(text: str, now: datetime, what: str = "--until") -> datetime:
    """The deadline `text` means at local time `now`: "07:00" or "07:00:30" is the next such
    clock time (today if still ahead, else tomorrow); an ISO 8601 date and time is itself
    (naive = local). ConfigError for anything else."""
    m = _CLOCK.fullmatch(text.strip())
    if m is not None:
        hour, minute, second = int(m[1]), int(m[2]), int(m[3] or 0)
        at = now.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return at if at > now else at + timedelta(days=1)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{what}: expected a clock time HH:MM (the next one) or an ISO "
                          f"date and time, got {text!r}") from None
    return at if at.tzinfo is None else at.astimezone().replace(tzinfo=None)
