"""supervisor/daemon/state.py: the transition table, row by row, without processes."""

from __future__ import annotations

import pytest

from shared.run_record import FINAL_STATES
from supervisor.daemon.state import (
    AlreadyComplete,
    BackoffElapsed,
    Begin,
    CheckpointRequested,
    Finish,
    HeartbeatLost,
    Kill,
    MemoryHigh,
    Progressed,
    RequestCheckpoint,
    ScheduleRestart,
    Spawn,
    Spawned,
    SpawnFailed,
    Stalled,
    State,
    StopReason,
    StopRequested,
    StopTimedOut,
    Terminate,
    Verdict,
    WorkerExited,
    transition,
)

S = State
EXITED = {v: WorkerExited(v, f"because {v.value}", 1.5) for v in Verdict}

# (from, event, to, actions)
TABLE = [
    (S.STARTING, Begin(), S.STARTING, [Spawn()]),
    (S.STARTING, AlreadyComplete(), S.FINISHED, [Finish("the run was already complete")]),
    (S.STARTING, Spawned(1, 10), S.STARTING, []),
    (S.RESTARTING, Spawned(2, 11), S.STARTING, []),
    (S.STARTING, SpawnFailed("no python"), S.GAVE_UP,
     [Finish("cannot start the worker: no python")]),
    (S.RESTARTING, SpawnFailed("x"), S.GAVE_UP, [Finish("cannot start the worker: x")]),
    (S.STARTING, Progressed(1), S.TRAINING, []),
    (S.TRAINING, Progressed(2), S.TRAINING, []),
    (S.STARTING, HeartbeatLost(600), S.STOPPING, [Terminate(StopReason.HANG)]),
    (S.TRAINING, HeartbeatLost(120), S.STOPPING, [Terminate(StopReason.HANG)]),
    (S.TRAINING, Stalled(1800), S.STOPPING, [Terminate(StopReason.STALL)]),
    (S.STARTING, Stalled(1800), S.STOPPING, [Terminate(StopReason.STALL)]),
    (S.TRAINING, MemoryHigh("leak"), S.STOPPING, [Terminate(StopReason.MEMORY)]),
    (S.STARTING, StopRequested("control"), S.STOPPING, [Terminate(StopReason.USER)]),
    (S.TRAINING, StopRequested("signal"), S.STOPPING, [Terminate(StopReason.USER)]),
    (S.STOPPING, StopRequested("signal"), S.STOPPING, [Terminate(StopReason.USER)]),
    (S.BACKING_OFF, StopRequested("control"), S.STOPPED,
     [Finish("stop requested while no worker was running")]),
    (S.RESTARTING, StopRequested("control"), S.STOPPED,
     [Finish("stop requested while no worker was running")]),
    # the first attempt's checkpoint is being validated: no worker to stop yet
    (S.STARTING, StopRequested("signal", worker_running=False), S.STOPPED,
     [Finish("stop requested while no worker was running")]),
    (S.STOPPING, StopTimedOut(120), S.STOPPING, [Kill()]),
    (S.TRAINING, CheckpointRequested("control"), S.TRAINING, [RequestCheckpoint()]),
    (S.STARTING, CheckpointRequested("control"), S.STARTING, [RequestCheckpoint()]),
    (S.TRAINING, EXITED[Verdict.RESTART], S.BACKING_OFF, [ScheduleRestart(1.5)]),
    (S.STARTING, EXITED[Verdict.RESTART], S.BACKING_OFF, [ScheduleRestart(1.5)]),
    (S.STOPPING, EXITED[Verdict.RESTART], S.BACKING_OFF, [ScheduleRestart(1.5)]),
    (S.TRAINING, EXITED[Verdict.FINISH], S.FINISHED, [Finish("because finish")]),
    (S.TRAINING, EXITED[Verdict.EARLY_STOP], S.EARLY_STOPPED, [Finish("because early_stop")]),
    (S.STOPPING, EXITED[Verdict.STOP], S.STOPPED, [Finish("because stop")]),
    (S.STARTING, EXITED[Verdict.GIVE_UP], S.GAVE_UP, [Finish("because give_up")]),
    (S.BACKING_OFF, BackoffElapsed(), S.RESTARTING, [Spawn()]),
]


@pytest.mark.parametrize("state,event,expected,actions", TABLE,
                         ids=[f"{r[0].value}-{type(r[1]).__name__}" for r in TABLE])
def test_transition_table(state, event, expected, actions):
    assert transition(state, event) == (expected, tuple(actions))


IGNORED = [
    (S.TRAINING, Begin()),
    (S.TRAINING, AlreadyComplete()),
    (S.TRAINING, Spawned(1, 1)),
    (S.STOPPING, HeartbeatLost(5)),  # already stopping: no second SIGTERM
    (S.STOPPING, Stalled(5)),
    (S.STOPPING, MemoryHigh("x")),
    (S.STOPPING, CheckpointRequested("control")),
    (S.TRAINING, StopTimedOut(1)),
    (S.BACKING_OFF, EXITED[Verdict.RESTART]),  # no worker: a stray exit changes nothing
    (S.BACKING_OFF, HeartbeatLost(5)),
    (S.BACKING_OFF, CheckpointRequested("control")),
    (S.TRAINING, BackoffElapsed()),
    (S.RESTARTING, BackoffElapsed()),
]


@pytest.mark.parametrize("state,event", IGNORED, ids=[f"{s.value}-{type(e).__name__}"
                                                     for s, e in IGNORED])
def test_combinations_outside_the_table_change_nothing(state, event):
    assert transition(state, event) == (state, ())


@pytest.mark.parametrize("state", sorted(FINAL_STATES, key=lambda s: s.value))
@pytest.mark.parametrize("event", [Begin(), StopRequested("x"), EXITED[Verdict.RESTART],
                                   BackoffElapsed(), HeartbeatLost(1)])
def test_final_states_absorb_every_event(state, event):
    assert state.is_final
    assert transition(state, event) == (state, ())


def test_live_and_final_states_are_disjoint_and_cover_the_lifecycle():
    live = {s for s in State if s.has_worker}
    assert live == {S.STARTING, S.TRAINING, S.STOPPING}
    assert not live & FINAL_STATES
    assert {s.value for s in FINAL_STATES} == {"finished", "early_stopped", "gave_up", "stopped"}
