"""The opt-in mitigation against macOS's GPU watchdog (`supervisor.gpu_watchdog_mitigation`).

The watchdog ends a process whose Metal command buffers keep the GPU from the window server
for too long ("Impacting Interactivity": kIOGPUCommandBufferCallbackErrorImpactingInteractivity,
classified as gpu_watchdog in classify.py). Public MLX reports name three counter-measures;
with the option on (it is off by default — README "What the Mac does at night" states the
trade-offs) the supervisor applies all three:

- the worker's environment gets `AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1` (an undocumented switch of
  Apple's AGX GPU driver that relaxes the context-store timeout; it may change or vanish with
  any macOS release, and it makes a truly hung GPU job take longer to be killed);
- the display is put to sleep once at start (`pmset displaysleepnow`; the watchdog is lenient
  while no frame has to be drawn) — never `caffeinate -d`, which keeps the display awake;
- after a watchdog kill, the restart waits `gpu_watchdog_cooldown` seconds (300) before the
  next attempt (policy.py), so the GPU and the window server catch up.
"""

from __future__ import annotations

from typing import Any

from shared.config import SupervisorOptions
from supervisor.daemon.platform_readings import Platform

RELAX_ENV = "AGX_RELAX_CDM_CTXSTORE_TIMEOUT"


def worker_environment(opts: SupervisorOptions) -> dict[str, str]:
    """What the mitigation adds to every worker's environment ({} when it is off)."""
    return {RELAX_ENV: "1"} if opts.gpu_watchdog_mitigation else {}


def at_start(opts: SupervisorOptions, platform: Platform, log: Any) -> None:
    """Put the display to sleep once when the mitigation is on (macOS only; logged)."""
    if not opts.gpu_watchdog_mitigation:
        return
    slept = platform.display_sleep_now()
    log.info("gpu_watchdog_mitigation", env=RELAX_ENV, display_sleep=slept,
             cooldown_s=opts.gpu_watchdog_cooldown)
