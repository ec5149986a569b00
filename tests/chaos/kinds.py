"""The fault kinds of the campaign: how each is caused, what the supervisor should call it,
and whether it may change what is trained.

`exact`: the fault changes nothing that is trained — the run must end with adapters equal to
an uninterrupted run's (max |Δ| == 0.0, exact resume). The others change training by
design: a non-finite loss or a gradient spike rolls back, lowers the learning rate and skips
data; an OOM halves the micro-batch (the same examples, summed in another order).

`expect`: the judgement (tests/chaos/judge.py) of the attempt the fault hit:
a `FailureClass` value (shared/exitcodes.py) for worker faults, "abandoned" (the run.json
action a restarted supervisor records) for supervisor deaths, and for the rest what must
hold instead ("quarantined", "survived", "refused", "graceful_stop").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    how: str  # one line: what the campaign does
    expect: str  # what the supervisor must make of it
    exact: bool = True  # training unchanged by design: max |Δ| must be 0.0
    inject: str = ""  # worker/inject.py kind (OVERNIGHT_INJECT=kind@step)
    restarts: bool = True  # the worker attempt it hits ends (a new attempt follows)
    changes: str = ""  # why training changes (when not exact)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("worker_kill", "SIGKILL the worker at a random moment of training", "crash"),
    Kind("kill_mid_checkpoint", "SIGKILL the worker 0-2 ms after its checkpoint temp dir "
         "appears (inotify)", "crash"),
    Kind("checkpoint_crash", "worker SIGKILLs itself after the data files, before the "
         "manifest (checkpoint_crash@N)", "crash", inject="checkpoint_crash"),
    Kind("kill_loading", "SIGKILL the next worker 0-0.5 s into its loading phase", "crash"),
    Kind("supervisor_kill", "SIGKILL the supervisor, start it again 0-1 s later",
         "abandoned"),
    Kind("both_kill", "SIGKILL the supervisor and the worker at once, start again",
         "abandoned"),
    Kind("orphan_stopped", "SIGSTOP the worker, then SIGKILL the supervisor: the stopped "
         "worker must be gone within 5 s; start again", "abandoned"),
    Kind("hang", "SIGSTOP the worker (heartbeat_timeout 3 s)", "hang"),
    Kind("stall", "the training thread sleeps, heartbeats go on (stall@N; stall_timeout "
         "4 s)", "stall", inject="stall"),
    Kind("nan", "the loss becomes NaN (nan@N)", "non_finite", exact=False, inject="nan",
         changes="rollback: lower lr, skip data"),
    Kind("spike", "the gradient norm explodes (spike@N)", "grad_spike", exact=False,
         inject="spike", changes="rollback: lower lr, skip data"),
    Kind("oom", "an MLX allocation failure, then abort (oom@N)", "oom", exact=False,
         inject="oom", changes="micro-batch halved: same examples, other summation order"),
    Kind("disk_full", "the run directory's tmpfs filled to the last byte until the worker "
         "ends (plus 0.5-2 s), then freed", "disk_full"),
    *(Kind(f"corrupt_{v}", f"damage the newest checkpoint ({v}) between attempts",
           "quarantined") for v in ("truncate", "bitflip", "no_manifest", "wrong_hash",
                                    "nan", "missing_tensor", "wrong_shape", "config")),
    Kind("socket_control", "hostile requests on the control socket", "survived",
         restarts=False),
    Kind("socket_telemetry", "hostile messages on the telemetry socket (incl. a forged "
         "step 10^9)", "survived", restarts=False),
    Kind("start_race", "two `overnight run` at once on the run dir (at its start, or after "
         "a supervisor SIGKILL)", "refused"),
    *(Kind(sig, f"{sig.upper()} to the supervisor, then start it again", "graceful_stop")
      for sig in ("sigterm", "sigint", "sighup")),
)}

CORRUPT_PREFIX = "corrupt_"
SIGNALS = ("sigterm", "sigint", "sighup")
SUPERVISOR_DEATHS = ("supervisor_kill", "both_kill", "orphan_stopped")
ROLLBACKS = ("nan", "spike")


def parse_kinds(spec: str) -> list[str]:
    """`--kinds a,b` → names; 'corrupt' / 'signals' / 'socket' stand for their groups.
    ValueError naming the unknown one."""
    out: list[str] = []
    groups = {"corrupt": [k for k in KINDS if k.startswith(CORRUPT_PREFIX)],
              "signals": list(SIGNALS), "socket": ["socket_control", "socket_telemetry"],
              "all": list(KINDS)}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in groups:
            out.extend(k for k in groups[part] if k not in out)
        elif part in KINDS:
            if part not in out:
                out.append(part)
        else:
            raise ValueError(f"--kinds: unknown kind {part!r}; expected some of "
                             f"{[*groups, *KINDS]}")
    return out
