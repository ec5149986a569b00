"""worker/inject.py and shared/faults.py: a fault injected on purpose says so — in its marker
(which process, which attempt), in the worker's log and on stderr before the error it
emulates — so that the supervisor, the report and the demo can call it injected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import structlog

from shared.exitcodes import FailureClass
from shared.faults import ended_by, fired_in, read_markers
from tests.conftest import subprocess_env
from worker.inject import Injector, parse


def test_a_fired_fault_leaves_a_marker_naming_its_process_and_logs_it(tmp_path: Path) -> None:
    injector = Injector("nan@3,spike@4", tmp_path / "inject", attempt=2)
    with structlog.testing.capture_logs() as logged:
        assert not injector.loss_is_nan(2)
        assert injector.loss_is_nan(3)
        assert not injector.loss_is_nan(3)  # once per run
    marker = json.loads((tmp_path / "inject" / "nan@3").read_text())
    assert {k: marker[k] for k in ("fault", "kind", "step", "pid", "attempt")} == {
        "fault": "nan@3", "kind": "nan", "step": 3, "pid": os.getpid(), "attempt": 2}
    assert marker["emulates"] == "a non-finite loss"
    assert [(e["event"], e["fault"], e["log_level"]) for e in logged] == [
        ("fault_injected", "nan@3", "warning")]
    assert fired_in(tmp_path / "inject", os.getpid()) == ("nan@3",)
    assert fired_in(tmp_path / "inject", os.getpid() + 1) == ()


def test_an_older_marker_is_still_read_without_a_process(tmp_path: Path) -> None:
    (tmp_path / "crash@40").write_text("1735786800.5\n")  # written before issue 17
    (tmp_path / "notes.txt").write_text("not a marker")
    [found] = read_markers(tmp_path)
    assert (found.fault, found.pid, found.time) == ("crash@40", None, 1735786800.5)


def test_an_ending_is_injected_only_when_the_fault_emulates_it() -> None:
    assert ended_by(["crash@40"], FailureClass.CRASH) == "crash@40"
    assert ended_by(["leak@30"], FailureClass.PLANNED_RESTART) == "leak@30"
    assert ended_by(["leak@30"], FailureClass.CRASH) == ""  # a real crash after a leak
    assert ended_by([], FailureClass.HANG) == ""
    assert [f.kind for f in parse("leak@5,crash@9")] == ["leak", "crash"]


def test_an_injected_crash_says_it_is_an_emulation_before_the_metal_error(tmp_path: Path
                                                                         ) -> None:
    """On Linux there is no Metal: the line before the emulated error says what it is."""
    code = (f"from pathlib import Path; from worker.inject import Injector; "
            f"Injector('crash@7', Path({str(tmp_path / 'inject')!r}), attempt=1)"
            f".before_step(7)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), cwd=Path(__file__).resolve().parents[1],
                          timeout=60)
    assert done.returncode == -signal.SIGABRT
    lines = done.stderr.splitlines()
    note = lines.index("overnight: injected fault crash@7 (debug.inject): the next line "
                       "emulates a Metal command-buffer abort (SIGABRT), as the GPU driver "
                       "ends a process on a Mac; it is not a real error")
    assert "[METAL] Command buffer execution failed" in lines[note + 1]
    marker = json.loads((tmp_path / "inject" / "crash@7").read_text())
    assert marker["pid"] != os.getpid() and marker["attempt"] == 1


def test_a_leak_holds_a_gigabyte_of_mlx_memory(tmp_path: Path) -> None:
    import mlx.core as mx

    from worker import inject

    before = mx.get_active_memory()
    Injector("leak@5", tmp_path / "inject").before_step(5)
    try:
        assert mx.get_active_memory() - before >= 1024 * 2**20
    finally:
        inject._held.clear()  # this test process goes on
