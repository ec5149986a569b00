"""Which faults, in which runs, at which steps: drawn from one seed.

Kinds are drawn balanced (every kind once per round, in a shuffled order) so that a quick
campaign of ~30 faults meets every kind. Faults that change training by design (rollback,
OOM) go into runs of their own, so every other run's final adapters must equal the
reference's bit for bit. A run gets 3–5 faults at steps at least `GAP` apart; within a run:
at most one disk fill (the run lives on its own tmpfs), at most two rollbacks (the default
`max_rollbacks` is 3) and one OOM (micro-batch 2 → 1, the next one would give up by design),
one start race, and one socket fault, last (the run trains on while garbage is sent: a later
fault's moment could pass the run's end).
A kill while loading hits the next worker start, so it comes first (attempt 1) or right
after a fault that makes the supervisor start a worker. Faults that miss their moment (the
run got to its end first: a loaded machine) are planned again, once, in make-up runs.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.chaos import garbage
from tests.chaos.kinds import CORRUPT_PREFIX, KINDS, ROLLBACKS

SOCKETS = ("socket_control", "socket_telemetry")
GAP = 10  # steps between the triggers of one run's faults
FIRST = 4  # the earliest trigger step
CORRUPT_MIN = 15  # corrupting needs a checkpoint to exist (save_every 10)


@dataclass
class PlannedFault:
    id: int
    kind: str
    trigger: int  # the step from which it fires (0: at the run's start)
    variant: str = ""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunPlan:
    index: int
    faults: list[PlannedFault] = field(default_factory=list)
    exact: bool = True  # every fault keeps training unchanged: Δ must be 0.0

    @property
    def on_tmpfs(self) -> bool:
        return any(f.kind == "disk_full" and f.variant == "tmpfs" for f in self.faults)

    @property
    def inject(self) -> str:
        """OVERNIGHT_INJECT for this run's supervisor (the worker inherits it)."""
        specs = []
        for f in self.faults:
            k = KINDS[f.kind]
            if k.inject:
                specs.append(f"{k.inject}@{f.trigger}")
            elif f.kind == "disk_full" and f.variant == "inject":
                specs.append(f"disk_full@{f.trigger}")
        return ",".join(specs)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "exact": self.exact, "inject": self.inject,
                "on_tmpfs": self.on_tmpfs, "faults": [f.to_dict() for f in self.faults]}


def draw_kinds(kinds: list[str], n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        batch = list(kinds)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:n]


def plan(kinds: list[str], n: int, iters: int, save_every: int, seed: int,
         disk_mode: str = "tmpfs") -> list[RunPlan]:
    """`n` faults of `kinds` spread over runs of `iters` steps (see the module docstring).
    `disk_mode`: "tmpfs" or "inject" (how disk_full is caused)."""
    rng = random.Random(seed)
    return plan_kinds(draw_kinds(kinds, n, rng), iters, save_every, rng, disk_mode)


def plan_kinds(drawn: list[str], iters: int, save_every: int, rng: random.Random,
               disk_mode: str = "tmpfs", first_run: int = 1, first_id: int = 1
               ) -> list[RunPlan]:
    """Runs for exactly these faults (also: the make-up runs for faults that missed their
    moment), numbered from `first_run` / `first_id`."""
    exact = [k for k in drawn if KINDS[k].exact]
    changing = [k for k in drawn if not KINDS[k].exact]
    groups = _pack(exact, rng, True) + _pack(changing, rng, False)
    rng.shuffle(groups)
    runs, next_id = [], first_id
    for index, (is_exact, group) in enumerate(groups, start=first_run):
        run = RunPlan(index, exact=is_exact)
        for kind, step in _place(group, iters, save_every, rng):
            run.faults.append(PlannedFault(next_id, kind, step, _variant(kind, rng, disk_mode),
                                           rng.randrange(2**32)))
            next_id += 1
        runs.append(run)
    return runs


def _fits(kind: str, group: list[str]) -> bool:
    if kind == "disk_full":
        return "disk_full" not in group
    if kind in ROLLBACKS:
        return sum(k in ROLLBACKS for k in group) < 2
    if kind == "oom":
        return "oom" not in group
    if kind in ("start_race", *SOCKETS):
        return not any(k == kind or (k in SOCKETS and kind in SOCKETS) for k in group)
    return True


def _pack(kinds: list[str], rng: random.Random, exact: bool) -> list[tuple[bool, list[str]]]:
    groups: list[list[str]] = []
    pending = list(kinds)
    while pending:
        size = rng.randint(3, 5)
        group: list[str] = []
        for kind in list(pending):
            if len(group) < size and _fits(kind, group):
                group.append(kind)
                pending.remove(kind)
        groups.append(group)
    return [(exact, g) for g in groups]


def _place(group: list[str], iters: int, save_every: int,
           rng: random.Random) -> list[tuple[str, int]]:
    """(kind, trigger step) in firing order."""
    loading = [k for k in group if k == "kill_loading"]
    others = [k for k in group if k != "kill_loading"]
    rng.shuffle(others)
    span = iters - GAP - FIRST - (len(others) - 1) * GAP
    picks = sorted(rng.sample(range(max(span, len(others))), len(others)))
    pairs = [(k, FIRST + p + i * GAP) for i, (k, p) in enumerate(zip(others, picks, strict=True))]
    for i, (kind, _step) in enumerate(pairs):
        if kind in SOCKETS:
            # the run trains on while the garbage is sent (no restart): last, so that the
            # run cannot end before a later fault's moment
            pairs[i], pairs[-1] = (pairs[-1][0], pairs[i][1]), (kind, pairs[-1][1])
            break
    for i, (kind, step) in enumerate(pairs):
        if kind.startswith(CORRUPT_PREFIX) and step < CORRUPT_MIN:
            # corrupting needs a checkpoint: trade places with a later plain fault
            later = [j for j, (k, s) in enumerate(pairs) if s >= CORRUPT_MIN
                     and not k.startswith(CORRUPT_PREFIX) and k not in SOCKETS]
            if later:
                j = later[-1]
                pairs[i], pairs[j] = (pairs[j][0], step), (kind, pairs[j][1])
            else:
                pairs[i] = (kind, CORRUPT_MIN)
    placed: list[tuple[str, int]] = []
    for kind, step in pairs:
        if kind == "checkpoint_crash":
            step = max(save_every, round(step / save_every) * save_every)
        if kind == "start_race" and step == pairs[0][1] and rng.random() < 0.5:
            step = 0  # at the run's start: two supervisors race for a new run directory
        placed.append((kind, step))
    placed.sort(key=lambda kv: kv[1])
    for kind in loading:
        # after a fault that makes the supervisor start a worker, or first (attempt 1)
        # (not after a start race: it watches the new worker for 2 s, past its loading)
        spots = [0] + [i + 1 for i, (k, _) in enumerate(placed)
                       if KINDS[k].restarts and k != "start_race"]
        at = rng.choice(spots)
        placed.insert(at, (kind, placed[at - 1][1] if at else 0))
    return placed


def _variant(kind: str, rng: random.Random, disk_mode: str) -> str:
    if kind.startswith(CORRUPT_PREFIX):
        return rng.choice(("offline", "backoff"))
    if kind == "socket_control":
        return "+".join(rng.sample(garbage.CONTROL_PAYLOADS, rng.randint(1, 3)))
    if kind == "socket_telemetry":
        return "+".join(rng.sample(garbage.TELEMETRY_PAYLOADS, rng.randint(1, 3)))
    if kind == "disk_full":
        return disk_mode
    return ""
