"""The supervisor's lifecycle as an explicit state machine: `State`, events, actions, and a
pure `transition(state, event) -> (state, actions)`.

No processes, sockets or clocks here: the loop (supervisor/daemon/loop.py) turns what it observes
into events, feeds them through `transition` and executes the returned actions. Every
transition is logged by the loop as one `state_changed` event.

| from                         | event            | to            | actions                  |
|------------------------------|------------------|---------------|--------------------------|
| starting                     | Begin            | starting      | Spawn                    |
| starting                     | AlreadyComplete  | finished (***)| Finish                   |
| starting, restarting         | Spawned          | starting      | -                        |
| starting, restarting         | SpawnFailed      | gave_up       | Finish                   |
| starting                     | Progressed       | training      | -                        |
| starting, training           | HeartbeatLost    | stopping      | Terminate(hang)          |
| starting, training           | Stalled          | stopping      | Terminate(stall)         |
| starting, training           | MemoryHigh       | stopping      | Terminate(its reason:    |
|                              |                  |               | memory, recycle, power)  |
| starting, training, stopping | StopRequested (*)| stopping      | Terminate(user)          |
| stopping                     | StopTimedOut     | stopping      | Kill                     |
| starting, training           | CheckpointReq.   | (same)        | RequestCheckpoint        |
| starting, training, stopping | WorkerExited     | by verdict:   |                          |
|                              |   restart        | backing_off   | ScheduleRestart(delay)   |
|                              |   finish         | finished      | Finish                   |
|                              |   early_stop     | early_stopped | Finish                   |
|                              |   stop           | stopped       | Finish                   |
|                              |   give_up        | gave_up       | Finish                   |
| backing_off                  | BackoffElapsed   | restarting    | Spawn                    |
| backing_off, restarting      | StopRequested    | stopped       | Finish                   |
| starting                     | StopRequested(**)| stopped       | Finish                   |
| anything else                |                  | (same)        | - (ignored, logged)      |

(*) a worker process runs (`worker_running`); (**) none runs yet: the first attempt's checkpoint
is still being validated (off the loop thread, supervisor/daemon/checkpoint_choice.py);
(***) early_stopped when the run had early-stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# State lives with the record that stores it (shared/run_record.py).
from shared.run_record import State as State


class StopReason(str, Enum):
    """Why the supervisor itself asked the worker to stop; decides the classification."""

    HANG = "hang"
    STALL = "stall"
    MEMORY = "memory"
    RECYCLE = "recycle"  # a planned restart before Metal's resource limit (policy.py)
    POWER = "power"  # on battery below pause_below_charge: checkpoint and pause (powerwatch.py)
    USER = "user"


class Verdict(str, Enum):
    """The policy's decision after a worker ended (supervisor/policy.py)."""

    RESTART = "restart"
    FINISH = "finish"
    EARLY_STOP = "early_stop"
    STOP = "stop"
    GIVE_UP = "give_up"


_VERDICT_STATE = {
    Verdict.FINISH: State.FINISHED,
    Verdict.EARLY_STOP: State.EARLY_STOPPED,
    Verdict.STOP: State.STOPPED,
    Verdict.GIVE_UP: State.GAVE_UP,
}


# ---- events: facts the loop observed -------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """The supervisor is up (lock, sockets, record) and the run is not complete."""


@dataclass(frozen=True)
class AlreadyComplete:
    """The run directory says the run finished earlier; nothing to do."""

    early_stopped: bool = False  # it ended by early stopping (COMPLETE or run.json says so)
    reason: str = "the run was already complete"


@dataclass(frozen=True)
class Spawned:
    attempt: int
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    error: str


@dataclass(frozen=True)
class Progressed:
    """The worker reported a training step (or the training phase)."""

    step: int


@dataclass(frozen=True)
class HeartbeatLost:
    silent_seconds: float


@dataclass(frozen=True)
class Stalled:
    seconds_without_step: float


@dataclass(frozen=True)
class MemoryHigh:
    """A planned stop is due: memory (the default), a worker recycle, or low battery."""

    detail: str
    reason: StopReason = StopReason.MEMORY


@dataclass(frozen=True)
class StopRequested:
    source: str  # "control", "signal"
    worker_running: bool = True  # False while the first attempt's checkpoint is validated
    reason: str = ""  # the requester's, from the control socket ("" for none)


@dataclass(frozen=True)
class StopTimedOut:
    waited_seconds: float


@dataclass(frozen=True)
class CheckpointRequested:
    source: str


@dataclass(frozen=True)
class WorkerExited:
    verdict: Verdict
    reason: str
    delay: float = 0.0


@dataclass(frozen=True)
class BackoffElapsed:
    pass


Event = (
    Begin | AlreadyComplete | Spawned | SpawnFailed | Progressed | HeartbeatLost | Stalled
    | MemoryHigh | StopRequested | StopTimedOut | CheckpointRequested | WorkerExited
    | BackoffElapsed
)


# ---- actions: what the loop must do ---------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Validate checkpoints (off the loop thread), then start the next worker attempt."""


@dataclass(frozen=True)
class Terminate:
    """SIGTERM (+SIGCONT) to the worker's group; SIGKILL after stop_timeout."""

    reason: StopReason


@dataclass(frozen=True)
class Kill:
    """SIGKILL to the worker's process group."""


@dataclass(frozen=True)
class RequestCheckpoint:
    """SIGUSR1: save a checkpoint at the end of the current step."""


@dataclass(frozen=True)
class ScheduleRestart:
    delay: float


@dataclass(frozen=True)
class Finish:
    """Final state reached: write the record, run on_exit, leave the loop."""

    reason: str


Action = Spawn | Terminate | Kill | RequestCheckpoint | ScheduleRestart | Finish

_STARTED = frozenset({State.STARTING, State.TRAINING})
_PREPARING = frozenset({State.STARTING, State.RESTARTING})
_WAITING = frozenset({State.BACKING_OFF, State.RESTARTING})


def transition(state: State, event: Event) -> tuple[State, tuple[Action, ...]]:
    """The next state and the actions to execute; unknown combinations change nothing."""
    if state.is_final:
        return state, ()
    match event:
        case Begin() if state is State.STARTING:
            return State.STARTING, (Spawn(),)
        case AlreadyComplete(early_stopped=stopped, reason=reason) if state is State.STARTING:
            return (State.EARLY_STOPPED if stopped else State.FINISHED), (Finish(reason),)
        case Spawned() if state in _PREPARING:
            return State.STARTING, ()
        case SpawnFailed(error=error) if state in _PREPARING:
            return State.GAVE_UP, (Finish(f"cannot start the worker: {error}"),)
        case Progressed() if state is State.STARTING:
            return State.TRAINING, ()
        case HeartbeatLost() if state in _STARTED:
            return State.STOPPING, (Terminate(StopReason.HANG),)
        case Stalled() if state in _STARTED:
            return State.STOPPING, (Terminate(StopReason.STALL),)
        case MemoryHigh(reason=why) if state in _STARTED:
            return State.STOPPING, (Terminate(why),)
        case StopRequested(worker_running=True) if state.has_worker:
            return State.STOPPING, (Terminate(StopReason.USER),)
        case StopRequested(reason=why) if state in _WAITING or state is State.STARTING:
            return State.STOPPED, (Finish("stop requested while no worker was running"
                                          + (f": {why}" if why else "")),)
        case StopTimedOut() if state is State.STOPPING:
            return State.STOPPING, (Kill(),)
        case CheckpointRequested() if state in _STARTED:
            return state, (RequestCheckpoint(),)
        case WorkerExited(verdict=verdict, reason=reason, delay=delay) if state.has_worker:
            if verdict is Verdict.RESTART:
                return State.BACKING_OFF, (ScheduleRestart(delay),)
            return _VERDICT_STATE[verdict], (Finish(reason),)
        case BackoffElapsed() if state is State.BACKING_OFF:
            return State.RESTARTING, (Spawn(),)
    return state, ()
