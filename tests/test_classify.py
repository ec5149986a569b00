"""supervisor/classify.py: every end of a worker gets the right FailureClass."""

from __future__ import annotations

import signal

import pytest

from shared.exitcodes import ExitCode, FailureClass
from supervisor.daemon.classify import ExitFacts, classify
from supervisor.daemon.state import StopReason

F = FailureClass
ABRT, KILL, SEGV = -signal.SIGABRT, -signal.SIGKILL, -signal.SIGSEGV
METAL_OOM = ("[metal::malloc] Attempting to allocate 48736917632 bytes which is greater than "
             "the maximum allowed buffer size of 30150672384 bytes.")
RESOURCE_LIMIT = "[metal::malloc] Resource limit (499000) exceeded."
IOGPU_OOM = ("Error: command buffer exited with error status. "
             "(kIOGPUCommandBufferCallbackErrorOutOfMemory)")
WATCHDOG = "(0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)"
HANG_BUF = "[METAL] Command buffer execution failed: Caused GPU Hang Error"

CASES = [
    ("completed", ExitFacts(0), F.COMPLETED),
    ("early stopped", ExitFacts(int(ExitCode.EARLY_STOPPED)), F.EARLY_STOPPED),
    ("grad spike", ExitFacts(int(ExitCode.GRAD_SPIKE), first_bad_step=40), F.GRAD_SPIKE),
    ("non finite", ExitFacts(int(ExitCode.NON_FINITE)), F.NON_FINITE),
    ("graceful stop from outside", ExitFacts(int(ExitCode.GRACEFUL_STOP)), F.GRACEFUL_STOP),
    ("bad config", ExitFacts(int(ExitCode.BAD_CONFIG), stopping_detail="data: x missing"),
     F.BAD_CONFIG),
    ("python exception", ExitFacts(1, stderr_tail="Traceback...\nValueError: boom"), F.CRASH),
    ("unknown exit code", ExitFacts(3), F.CRASH),
    ("segfault", ExitFacts(SEGV), F.CRASH),
    ("metal command buffer abort", ExitFacts(ABRT, stderr_tail=HANG_BUF), F.CRASH),
    ("metal malloc abort", ExitFacts(ABRT, stderr_tail=f"libc++abi: {METAL_OOM}"), F.OOM),
    ("metal malloc exception", ExitFacts(1, stderr_tail=f"RuntimeError: {METAL_OOM}"), F.OOM),
    ("iogpu out of memory", ExitFacts(ABRT, stderr_tail=IOGPU_OOM), F.OOM),
    ("metal buffer count", ExitFacts(ABRT, stderr_tail=f"libc++abi: {RESOURCE_LIMIT}"),
     F.METAL_RESOURCE_LIMIT),
    ("gpu watchdog", ExitFacts(ABRT, stderr_tail=WATCHDOG), F.GPU_WATCHDOG),
    ("sigkill near the limit", ExitFacts(KILL, memory_mb=950, memory_limit_mb=1000), F.OOM),
    ("sigkill under memory pressure", ExitFacts(KILL, available_fraction=0.01), F.OOM),
    ("sigkill with memory to spare", ExitFacts(KILL, memory_mb=100, memory_limit_mb=1000),
     F.CRASH),
    ("hang, stopped gracefully", ExitFacts(23, stop_reason=StopReason.HANG), F.HANG),
    ("hang, killed", ExitFacts(KILL, stop_reason=StopReason.HANG, killed_by_supervisor=True),
     F.HANG),
    ("stall", ExitFacts(KILL, stop_reason=StopReason.STALL, killed_by_supervisor=True), F.STALL),
    ("memory restart", ExitFacts(23, stop_reason=StopReason.MEMORY), F.PLANNED_RESTART),
    ("user stop", ExitFacts(23, stop_reason=StopReason.USER), F.GRACEFUL_STOP),
    ("completed while stopping", ExitFacts(0, stop_reason=StopReason.USER), F.COMPLETED),
    ("early-stopped while stopping", ExitFacts(20, stop_reason=StopReason.MEMORY),
     F.EARLY_STOPPED),
]


@pytest.mark.parametrize("facts,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classification(facts, expected):
    assert classify(facts).failure is expected


def test_signal_and_exit_code_are_reported_separately():
    c = classify(ExitFacts(ABRT, stderr_tail=HANG_BUF))
    assert (c.exit_code, c.signal, c.signal_name) == (None, signal.SIGABRT, "SIGABRT")
    assert "command buffer" in c.detail.lower()
    c = classify(ExitFacts(21, first_bad_step=40, stopping_detail="grad norm 3e4"))
    assert (c.exit_code, c.signal, c.first_bad_step, c.detail) == (21, None, 40, "grad norm 3e4")


def test_details_carry_the_evidence():
    assert "maximum allowed buffer size" in classify(ExitFacts(ABRT, stderr_tail=METAL_OOM)).detail
    assert "Resource limit" in classify(ExitFacts(ABRT, stderr_tail=RESOURCE_LIMIT)).detail
    assert "display" in classify(ExitFacts(ABRT, stderr_tail=WATCHDOG)).detail
    hang = classify(ExitFacts(KILL, stop_reason=StopReason.HANG, killed_by_supervisor=True,
                              stop_detail="no heartbeat for 121.0 s"))
    assert hang.detail == "no heartbeat for 121.0 s; killed after stop_timeout"
    assert classify(ExitFacts(1, stderr_tail="a\nValueError: boom\n")).detail.endswith("boom")


def test_bad_config_without_telemetry_takes_the_message_from_stderr():
    """The same detail as the worker's telemetry would have carried: its error line without
    the program's name (a lost WorkerStopping must not change the run's reason)."""
    c = classify(ExitFacts(78, stderr_tail="overnight train: c.yaml: data: dir not found\n"))
    assert c.failure is F.BAD_CONFIG and c.detail == "c.yaml: data: dir not found"
    told = classify(ExitFacts(78, stopping_detail="c.yaml: data: dir not found",
                              stderr_tail="overnight train: c.yaml: data: dir not found\n"))
    assert told.detail == c.detail


@pytest.mark.parametrize("routine", [
    "Training: 50% | step 50/100 | loss=3.03 | loss_avg=4.02 | val=2.91 (best 2.91)",
    "2026-11-30T14:58:31.871109Z [info     ] data_loaded                    path=d/valid.jsonl",
    "  - loss: token mean over target tokens, padding never counted [always]",
])
def test_a_killed_workers_routine_last_line_is_not_its_detail(routine):
    """SIGKILL (the chaos campaign's worker_kill, a killed rank) leaves no error line: the
    detail used to end with whatever was printed last (a progress bar, an info log line, a
    bullet of the mlx_lm-differences block), in run.json, the report and recovery_decision."""
    c = classify(ExitFacts(KILL, stderr_tail=f"something\n{routine}\n"))
    assert c.failure is F.CRASH and c.detail == "killed by SIGKILL"
    segv = classify(ExitFacts(SEGV, stderr_tail=f"{routine}\nFatal Python error: Segmentation "
                                                "fault\n"))
    assert segv.detail == "killed by SIGSEGV: Fatal Python error: Segmentation fault"
