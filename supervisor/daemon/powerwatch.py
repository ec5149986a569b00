"""Battery and heat during the night: pause on a draining battery, record throttled periods.

A laptop unplugged at night drains and then sleeps in the middle of a step; a hot Mac
throttles and a step takes three times as long. Every `supervisor.power_poll_interval`
seconds (30) the supervisor reads, through supervisor/daemon/platform_readings.py:

- **the power source and charge** (`pmset -g batt`; Linux /sys/class/power_supply). On
  battery below `supervisor.pause_below_charge` percent (20; 0 = off) while a worker trains,
  the worker is asked to stop (SIGTERM: it saves a checkpoint and exits) — a pause, not a
  failure (FailureClass.BATTERY_PAUSE, counted against no budget) — and the next attempt
  starts only once the machine is on AC again (`wait()`, polled every poll interval; an
  unreadable power source ends the wait: nothing says to keep waiting). Logged:
  `power_pause` (warning: the reading), `power_waiting` (every WAITING_LOG_EVERY), and
  `power_returned` (info: the reading, seconds paused).
- **the thermal state** (`pmset -g therm`; Linux thermal zones at or above a passive trip
  point). The start of a throttled period is logged as `thermal_throttled` (warning, with
  what says so), its end as `thermal_nominal` (info, with its length in seconds). The
  morning report reads these events (supervisor/morning/machine.py): a slow night explains
  itself in words and in the time plot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shared.config import SupervisorOptions
from supervisor.daemon.platform_readings import Platform
from supervisor.daemon.power import PowerReading

WAITING_LOG_EVERY = 600.0  # seconds between "still waiting for AC" log lines


class PowerWatch:
    """The power and thermal readings of one supervisor (module docstring). `clock`: the
    loop's monotonic clock; `wall`: epoch seconds for the log's periods."""

    def __init__(self, platform: Platform, opts: SupervisorOptions, log: Any,
                 wall: Callable[[], float] = time.time) -> None:
        self.platform = platform
        self.opts = opts
        self.log = log
        self.wall = wall
        self.next_poll = 0.0
        self.throttled_since: float | None = None  # wall time the current period began
        self.paused_at: float | None = None  # wall time of the pause (None: not paused)
        self.next_waiting_log = 0.0
        self.last_power: PowerReading | None = None

    def poll(self, now: float, training: bool) -> str | None:
        """Read power and heat when due; a reason to pause when a worker trains on battery
        below the configured charge, else None."""
        if now < self.next_poll:
            return None
        self.next_poll = now + self.opts.power_poll_interval
        self._thermal()
        reading = self.platform.power()
        self.last_power = reading
        if not training or reading is None or self.paused_at is not None:
            return None
        limit = self.opts.pause_below_charge
        if reading.on_ac or limit <= 0 or reading.percent is None or reading.percent >= limit:
            return None
        self.paused_at = self.wall()
        reason = (f"on battery at {reading.percent}% (below pause_below_charge {limit}%: "
                  f"{reading.detail}); checkpoint and pause until on AC power")
        self.log.warning("power_pause", detail=reason, percent=reading.percent,
                         reading=reading.detail)
        return reason

    def wait(self, now: float) -> float | None:
        """While paused for the battery: None once on AC (a restart may go ahead), else the
        seconds until the next look. Not paused: None."""
        if self.paused_at is None:
            return None
        self._thermal()
        reading = self.platform.power()
        if reading is None or reading.on_ac:
            paused = round(self.wall() - self.paused_at, 1)
            self.log.info("power_returned", reading=reading.detail if reading else "unknown",
                          paused_s=paused)
            self.paused_at = None
            return None
        if now >= self.next_waiting_log:
            self.next_waiting_log = now + WAITING_LOG_EVERY
            self.log.info("power_waiting", reading=reading.detail,
                          poll_s=self.opts.power_poll_interval)
        return self.opts.power_poll_interval

    def _thermal(self) -> None:
        reading = self.platform.thermal()
        if reading is None:
            return
        if reading.throttled and self.throttled_since is None:
            self.throttled_since = self.wall()
            self.log.warning("thermal_throttled", detail=reading.detail)
        elif not reading.throttled and self.throttled_since is not None:
            seconds = round(self.wall() - self.throttled_since, 1)
            self.throttled_since = None
            self.log.info("thermal_nominal", detail=reading.detail, throttled_s=seconds)
