"""What the supervisor knows about the running attempt from its telemetry, and the liveness
checks on it (hang: no heartbeat; stall: heartbeats but no step). Pure: times are passed in.

Hang: no message for `heartbeat_timeout` seconds; `startup_timeout` instead until the worker
reports the training phase (loading a model or compiling the step can take minutes with no
step, but the heartbeat thread still beats). Stall: heartbeats keep coming but neither the
step nor the phase changed for `stall_timeout` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import SupervisorOptions
from shared.protocol import CheckpointSaved, EvalResult, Heartbeat, Message, Phase, StepMetrics
from shared.step_columns import StepColumns

STARTUP_PHASES = frozenset({Phase.STARTING, Phase.LOADING, Phase.COMPILING})


@dataclass
class AttemptView:
    """The supervisor's running picture of one attempt, updated from telemetry."""

    attempt: int
    pid: int
    spawned_at: float  # monotonic
    start_step: int
    last_seen: float = 0.0  # monotonic time of the last message from this attempt
    first_heartbeat_at: float | None = None
    first_step_at: float | None = None
    phase: Phase = Phase.STARTING
    step: int = 0
    total_steps: int = 0
    progress_at: float = 0.0  # monotonic time the step or the phase last changed
    heartbeats: int = 0
    tokens: int = 0
    step_seconds: float = 0.0
    active_mb: float = 0.0
    cache_mb: float = 0.0  # MLX's buffer cache (telemetry)
    footprint_mb: float = 0.0  # macOS physical footprint the worker measured (telemetry)
    peak_mlx_mb: float = 0.0
    rss_mb: float = 0.0
    last_loss: float | None = None
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    best: tuple[int, float] | None = None  # (step, val_loss)
    stopping: object = None  # the WorkerStopping message, if one arrived

    def __post_init__(self) -> None:
        self.step = self.start_step
        self.last_seen = self.progress_at = self.spawned_at

    def accepts(self, msg: Message) -> bool:
        """Messages of other attempts (an old worker's last words) are ignored."""
        if getattr(msg, "attempt", None) != self.attempt:
            return False
        return not isinstance(msg, Heartbeat) or msg.pid == self.pid

    def update(self, msg: Message, now: float) -> bool:
        """Fold one message in; True when the worker made training progress (a step)."""
        self.last_seen = now
        progressed = False
        if isinstance(msg, Heartbeat):
            self.heartbeats += 1
            if self.first_heartbeat_at is None:
                self.first_heartbeat_at = now
            if msg.phase != self.phase:
                self.phase = msg.phase
                self.progress_at = now
            self.total_steps = msg.total_steps or self.total_steps
            self.active_mb = msg.active_mb
            self.peak_mlx_mb = max(self.peak_mlx_mb, msg.peak_mb, msg.active_mb)
            self.rss_mb = msg.rss_mb
            self.cache_mb, self.footprint_mb = msg.cache_mb, msg.footprint_mb
            progressed = self._step(msg.step, now) or msg.phase is Phase.TRAINING
        elif isinstance(msg, StepMetrics):
            self.tokens += msg.tokens
            self.step_seconds += msg.step_seconds
            self.last_loss = msg.loss
            self.active_mb = msg.active_mb
            self.peak_mlx_mb = max(self.peak_mlx_mb, msg.peak_mb, msg.active_mb)
            self.cache_mb, self.footprint_mb = msg.cache_mb, msg.footprint_mb
            self._step(msg.step, now)
            progressed = True
        elif isinstance(msg, CheckpointSaved):
            self.checkpoints.append((msg.step, msg.path))
            self.progress_at = now
        elif isinstance(msg, EvalResult):
            self.best = (msg.best_step, msg.best_val_loss)
            self.progress_at = now
        else:
            self.stopping = msg
        return progressed

    def update_steps(self, batch: StepColumns, rows: list[int], now: float) -> None:
        """Fold in the believed `rows` of a metrics batch (indices, in order, not empty):
        the same view as `update` with each row's StepMetrics in turn (sums added in the
        same order, the maxima over every row, the last row's readings)."""
        self.last_seen = now
        tokens, seconds, peak = self.tokens, self.step_seconds, self.peak_mlx_mb
        for i in rows:
            tokens += batch.tokens[i]
            seconds += batch.step_seconds[i]
            peak = max(peak, batch.peak_mb[i], batch.active_mb[i])
        last = rows[-1]
        self.tokens, self.step_seconds, self.peak_mlx_mb = tokens, seconds, peak
        self.last_loss = batch.loss[last]
        self.active_mb = batch.active_mb[last]
        self.cache_mb, self.footprint_mb = batch.cache_mb[last], batch.footprint_mb[last]
        self._step(batch.step[last], now)  # the believed steps never go back

    def _step(self, step: int, now: float) -> bool:
        if step > self.step:
            self.step = step
            self.progress_at = now
            if self.first_step_at is None:
                self.first_step_at = now
            return True
        return False

    @property
    def tokens_per_sec(self) -> float | None:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else None

    @property
    def starting_up(self) -> bool:
        return self.phase in STARTUP_PHASES


def heartbeat_deadline(view: AttemptView, opts: SupervisorOptions) -> float:
    """Monotonic time after which the worker counts as hung."""
    timeout = opts.startup_timeout if view.starting_up else opts.heartbeat_timeout
    return view.last_seen + timeout


def stall_deadline(view: AttemptView, opts: SupervisorOptions) -> float | None:
    if view.starting_up or opts.stall_timeout <= 0:
        return None
    return view.progress_at + opts.stall_timeout


def check(view: AttemptView, opts: SupervisorOptions, now: float) -> tuple[str, float] | None:
    """("hang", silent seconds) or ("stall", seconds without a step) or None."""
    if now >= heartbeat_deadline(view, opts):
        return "hang", now - view.last_seen
    stall = stall_deadline(view, opts)
    if stall is not None and now >= stall:
        return "stall", now - view.progress_at
    return None
