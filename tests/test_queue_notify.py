"""Notifications: a JSON webhook and an ntfy topic received by a real HTTP server on
127.0.0.1; a dead or slow server never blocks the sender and is logged; the macOS banner's
osascript command (run for real only on a Mac)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from supervisor.queue import settings as settings_mod
from supervisor.queue.notify import Message, Notifier, osascript_argv
from supervisor.queue.settings import MacOSTarget, Notify, NtfyTarget, Target, WebhookTarget


class Receiver:
    """A local HTTP server that records every POST (path, headers, body); `delay` seconds
    before answering."""

    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.got.append((self.path, dict(self.headers), body))
                time.sleep(delay)
                with contextlib.suppress(OSError):  # the client gave up (its timeout)
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_webhook_and_ntfy_messages_arrive_in_their_formats(receiver):
    config = Notify(targets=[Target(webhook=WebhookTarget(url=f"{receiver.url}/hook")),
                             Target(ntfy=NtfyTarget(topic="night", server=receiver.url))])
    n = Notifier(config, log=_NullLog())
    n.send(Message("job", "lr-low finished", "finished 40/40 steps", {"job": "lr-low"}))
    n.close()
    assert [p for p, _, _ in receiver.got] == ["/hook", "/night"]
    _, headers, body = receiver.got[0]
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    # Slack reads "text", Discord "content": one body serves both.
    assert data["text"] == data["content"] == "lr-low finished: finished 40/40 steps"
    assert data["job"] == "lr-low" and data["event"] == "job"
    _, headers, body = receiver.got[1]
    assert body == b"finished 40/40 steps" and headers["Title"] == "lr-low finished"
    assert n.sent == 2 and n.failed == 0


def test_events_not_asked_for_are_not_sent(receiver):
    n = Notifier(Notify(targets=[Target(webhook=WebhookTarget(url=receiver.url))]), _NullLog())
    n.send(Message("failure", "attempt 2 failed", "crash"))  # default events: job, queue
    n.close()
    assert receiver.got == []


def test_a_slow_or_dead_server_never_blocks_and_is_logged():
    slow = Receiver(delay=3.0)
    try:
        config = Notify(timeout=0.5, targets=[
            Target(webhook=WebhookTarget(url=slow.url)),
            Target(webhook=WebhookTarget(url="http://127.0.0.1:9/refused"))])
        with capture_logs() as logs:
            n = Notifier(config, log=_StructLog())
            t0 = time.monotonic()
            for i in range(5):
                n.send(Message("job", f"job {i}", "ended"))
            assert time.monotonic() - t0 < 0.1  # queued, not sent, by the caller
            n.close()
            closed_after = time.monotonic() - t0
        # close waits at most timeout x (targets + 1) = 1.5 s, whatever is pending
        assert closed_after < 1.5 + 0.5
        failed = [e for e in logs if e["event"] == "notify_failed"]
        assert failed and {"webhook"} == {e["target"] for e in failed}
    finally:
        slow.close()


def test_the_macos_banner_is_display_notification_with_quotes_escaped():
    msg = Message("job", 'lr "low" finished', 'best val 1.23 \\ step 40')
    argv = osascript_argv(msg, MacOSTarget(sound="Glass"))
    assert argv == ["osascript", "-e",
                    'display notification "best val 1.23 \\\\ step 40" with title "overnight" '
                    'subtitle "lr \\"low\\" finished" sound name "Glass"']
    ran: list[list[str]] = []
    n = Notifier(Notify(targets=[Target(macos=MacOSTarget())]), _NullLog(), platform="darwin",
                 run=lambda a, t: ran.append(list(a)))
    n.send(msg)
    n.close()
    assert ran and ran[0][0] == "osascript"
    off = Notifier(Notify(targets=[Target(macos=MacOSTarget())]), _NullLog(), platform="linux",
                   run=lambda a, t: ran.append(list(a)))
    off.send(msg)
    off.close()
    assert len(ran) == 1  # not on Linux


@pytest.mark.skipif(sys.platform != "darwin" or not shutil.which("osascript"),
                    reason="Notification Center exists only on macOS")
def test_osascript_accepts_the_banner_on_a_mac():
    n = Notifier(Notify(targets=[Target(macos=MacOSTarget())]), _NullLog())
    n.send(Message("job", "test", "a banner from the test suite"))
    n.close()
    assert n.sent == 1


def test_queue_yaml_is_read_and_a_bad_key_is_one_line(tmp_path: Path):
    (tmp_path / "queue.yaml").write_text(
        "on_failure: stop\nuntil: '07:00'\nnotify:\n  timeout: 3\n  events: [job, failure]\n"
        "  targets:\n    - ntfy: {topic: night}\n    - webhook: {url: 'http://127.0.0.1:1/x'}\n")
    s = settings_mod.load(tmp_path)
    assert s.on_failure == "stop" and s.notify.timeout == 3.0
    assert s.notify.targets[0].ntfy is not None
    assert s.notify.targets[0].ntfy.server == "https://ntfy.sh"
    (tmp_path / "queue.yaml").write_text("on_failur: stop\n")
    with pytest.raises(Exception, match="on_failur"):
        settings_mod.load(tmp_path)
    (tmp_path / "queue.yaml").write_text("notify:\n  targets:\n    - webhook: {url: ftp://x}\n")
    with pytest.raises(Exception, match="http"):
        settings_mod.load(tmp_path)


class _NullLog:
    def info(self, *a: Any, **k: Any) -> None:
        pass

    warning = info


class _StructLog:
    def __init__(self) -> None:
        import structlog

        self.log = structlog.get_logger()

    def info(self, event: str, **k: Any) -> None:
        self.log.info(event, **k)

    def warning(self, event: str, **k: Any) -> None:
        self.log.warning(event, **k)


def test_a_title_that_is_not_ascii_reaches_ntfy_encoded(receiver):
    n = Notifier(Notify(targets=[Target(ntfy=NtfyTarget(topic="t", server=receiver.url))]),
                 _NullLog())
    n.send(Message("job", "lr-élevé finished", "ok"))
    n.close()
    from email.header import decode_header, make_header

    title = receiver.got[0][1]["Title"]
    assert title.startswith("=?utf-8?")  # RFC 2047: ASCII on the wire
    assert str(make_header(decode_header(title))) == "lr-élevé finished"
