"""Notifications when a job or the queue ends (and, if asked, on each failed attempt).

Targets come from queue.yaml (supervisor/queue/settings.py): a macOS Notification Center
banner, an ntfy topic, a generic JSON webhook. Sending never blocks supervision: `send()`
puts the message on a bounded queue and returns; one daemon thread delivers each message to
each target with the configured timeout (urllib, no dependency). A target that fails (a
refused connection, an HTTP error, a timeout) is logged (`notify_failed`, with the target
and the error) and the night goes on; a full queue drops the message and logs it
(`notify_dropped`). `close()` waits at most `timeout` × targets for what is pending, so the
queue's last message goes out before the runner exits, and a dead server never holds it up
longer. The run's own `supervisor.on_exit` command is unchanged: it still runs for each job.

The wire formats:
- webhook: POST, `Content-Type: application/json`, body
  `{"text": MSG, "content": MSG, "event": "job", "queue": DIR, "job": NAME, "state": ..., ...}`:
  Slack incoming webhooks read `text`, Discord webhooks `content`
  (api.slack.com/messaging/webhooks, discord.com/developers/docs/resources/webhook).
- ntfy: POST SERVER/TOPIC with the message as the body and the `Title` (RFC 2047 when not
  ASCII), `Tags` and `Priority` headers (docs.ntfy.sh/publish).
- macOS: `osascript -e 'display notification "MSG" with title "overnight" subtitle "…"'`
  (AppleScript's `display notification`, Standard Additions); not on other platforms
  (logged once as `notify_skipped`).
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.header import Header
from typing import Any

from supervisor.queue.settings import MacOSTarget, Notify, NtfyTarget, Target, WebhookTarget

MAX_PENDING = 100  # messages waiting for the sender thread; more are dropped (and logged)
Runner = Callable[[Sequence[str], float], None]


@dataclass(frozen=True)
class Message:
    """One notification: `event` is job, queue or failure; `title` a short line; `text`
    the verdict; `fields` what the webhook's JSON carries besides (job, state, run_dir...)."""

    event: str
    title: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)

    def json_body(self) -> bytes:
        body = {**self.fields, "event": self.event, "title": self.title,
                "text": f"{self.title}: {self.text}", "content": f"{self.title}: {self.text}"}
        return json.dumps(body, allow_nan=False, default=str).encode()


def applescript_quote(text: str) -> str:
    """An AppleScript string literal: backslash and double quote escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def osascript_argv(message: Message, target: MacOSTarget) -> list[str]:
    script = (f"display notification {applescript_quote(message.text)} with title "
              f"{applescript_quote('overnight')} subtitle {applescript_quote(message.title)}")
    if target.sound:
        script += f" sound name {applescript_quote(target.sound)}"
    return ["osascript", "-e", script]


def _run_command(argv: Sequence[str], timeout: float) -> None:
    subprocess.run(list(argv), timeout=timeout, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read(65536)


class Notifier:
    """Delivers messages to the configured targets from one background thread (module
    docstring). `platform` is sys.platform; `run` runs a command (osascript) with a timeout."""

    def __init__(self, config: Notify, log: Any, platform: str = sys.platform,
                 run: Runner = _run_command) -> None:
        self.config = config
        self.log = log
        self.platform = platform
        self.run = run
        self.sent = 0
        self.failed = 0
        self._pending: queue.Queue[Message | None] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._skipped_logged = False

    def wants(self, event: str) -> bool:
        return bool(self.config.targets) and event in self.config.events

    def send(self, message: Message) -> None:
        """Queue `message` for delivery; returns at once."""
        if not self.wants(message.event):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
            self._thread.start()
        try:
            self._pending.put_nowait(message)
        except queue.Full:
            self.log.warning("notify_dropped", event_kind=message.event, title=message.title)

    def close(self) -> None:
        """Let pending messages go out, waiting at most timeout × (targets + 1) seconds."""
        if self._thread is None:
            return
        with_end = self.config.timeout * (len(self.config.targets) + 1)
        with contextlib.suppress(queue.Full):
            self._pending.put(None, timeout=with_end)
        self._thread.join(with_end)
        if self._thread.is_alive():
            self.log.warning("notify_unsent", pending=self._pending.qsize(),
                             waited_s=round(with_end, 1))

    def _loop(self) -> None:
        while True:
            message = self._pending.get()
            if message is None:
                return
            for target in self.config.targets:
                self._deliver(target, message)

    def _deliver(self, target: Target, message: Message) -> None:
        timeout = self.config.timeout
        started = time.monotonic()
        try:
            if target.webhook is not None:
                kind = "webhook"
                self._webhook(target.webhook, message, timeout)
            elif target.ntfy is not None:
                kind = "ntfy"
                self._ntfy(target.ntfy, message, timeout)
            elif target.macos is not None:
                kind = "macos"
                if self.platform != "darwin":
                    if not self._skipped_logged:
                        self.log.info("notify_skipped", target=kind,
                                      reason=f"not macOS ({self.platform})")
                        self._skipped_logged = True
                    return
                self.run(osascript_argv(message, target.macos), timeout)
            else:
                return
        except (OSError, ValueError, subprocess.SubprocessError, urllib.error.URLError) as e:
            self.failed += 1
            self.log.warning("notify_failed", target=kind, event_kind=message.event,
                             error=str(e) or type(e).__name__,
                             seconds=round(time.monotonic() - started, 2))
            return
        self.sent += 1
        self.log.info("notify_sent", target=kind, event_kind=message.event,
                      title=message.title)

    @staticmethod
    def _webhook(t: WebhookTarget, message: Message, timeout: float) -> None:
        _post(t.url, message.json_body(), {"Content-Type": "application/json", **t.headers},
              timeout)

    @staticmethod
    def _ntfy(t: NtfyTarget, message: Message, timeout: float) -> None:
        title = message.title
        if not title.isascii():  # HTTP headers are Latin-1: RFC 2047, which ntfy decodes
            title = Header(title, "utf-8").encode()
        headers = {"Title": title,
                   "Tags": "warning" if message.event == "failure" else "robot",
                   "Priority": str(t.priority)}
        _post(f"{t.server.rstrip('/')}/{t.topic}", message.text.encode(), headers, timeout)
