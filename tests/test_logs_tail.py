"""`overnight logs -n N` (and `-f -n N`) on a long night reads the logs from their end
(supervisor/morning/logview.py last_lines, issue 15: cost as the night grows): the same
lines a reading of everything gives, for a few hundred KB of reading instead of the night."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pytest

from shared import cli

T0 = 1.76e9
N = 60_000  # lines in each log: ~29 MB together


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


@pytest.fixture(scope="module")
def long_night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A worker log with a progress event every second and a supervisor log with a
    heartbeat every second, half a second apart; a warning every 1000th second."""
    run = tmp_path_factory.mktemp("night") / "run"
    (run / "logs").mkdir(parents=True)
    for source, offset in (("worker", 0.0), ("supervisor", 0.5)):
        with open(run / "logs" / f"{source}.jsonl", "w") as f:
            for i in range(N):
                warn = source == "worker" and i % 1000 == 999
                f.write(json.dumps({
                    "timestamp": _stamp(T0 + i + offset), "source": source, "pid": 7,
                    "level": "warning" if warn else "info", "event": "progress" if source ==
                    "worker" else "heartbeat_seen", "step": i, "pad": "x" * 100}) + "\n")
    return run


def _read_bytes() -> int:
    """Bytes this process has read so far (Linux /proc/self/io rchar)."""
    for row in Path("/proc/self/io").read_text().splitlines():
        if row.startswith("rchar:"):
            return int(row.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/io is Linux's")
@pytest.mark.parametrize(("argv", "expected"), [
    (["-n", "20"], [(s, i) for i in range(N - 10, N) for s in ("worker", "supervisor")]),
    (["-n", "3", "--level", "warning"], [("worker", i) for i in (N - 2001, N - 1001, N - 1)]),
], ids=["last 20", "last 3 warnings"])
def test_the_last_lines_are_read_from_the_end_of_a_long_night(
        long_night: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        expected: list[tuple[str, int]]) -> None:
    """Before: every line of both logs was read (~29 MB) to show the last 20."""
    size = sum(p.stat().st_size for p in (long_night / "logs").iterdir())
    capsys.readouterr()
    before = _read_bytes()
    assert cli.main(["logs", str(long_night), "--json", *argv]) == 0
    read = _read_bytes() - before
    shown = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(d["source"], d["step"]) for d in shown] == expected
    assert size > 25e6 and read < size / 5, (read, size)  # before: all of it


def test_with_fewer_matching_lines_than_asked_the_whole_night_is_searched(
        long_night: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli.main(["logs", str(long_night), "--json", "-n", "100", "--level", "warning"]) == 0
    shown = [json.loads(x)["step"] for x in capsys.readouterr().out.splitlines()]
    assert shown == list(range(999, N, 1000))  # all 60, the first one 16 hours back
