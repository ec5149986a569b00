"""supervisor/policy.py: restart, roll back, shrink, finish or give up — and budgets."""

from __future__ import annotations

import dataclasses
import random

import pytest

from shared.config import SupervisorOptions
from shared.exitcodes import FailureClass
from supervisor.daemon.policy import Outcome, Policy, Settings, shrink_batch
from supervisor.daemon.state import Verdict

F = FailureClass
BASE = Settings(batch_size=4, grad_accumulation_steps=2, grad_checkpoint=False)
OPTS = SupervisorOptions(backoff_initial=5, backoff_max=300, max_failures=5,
                         failure_window=1800, max_rollbacks=3, lr_backoff=0.5,
                         progress_reset_steps=50)


def policy(**kw) -> Policy:
    return Policy(dataclasses.replace(OPTS, **kw), random.Random(0))


def out(failure, start=0, end=100, **kw) -> Outcome:
    return Outcome(failure, "detail", start, end, **kw)


@pytest.mark.parametrize("failure,verdict,action", [
    (F.COMPLETED, Verdict.FINISH, "finish"),
    (F.EARLY_STOPPED, Verdict.EARLY_STOP, "early_stop"),
    (F.GRACEFUL_STOP, Verdict.STOP, "stop"),
    (F.BAD_CONFIG, Verdict.GIVE_UP, "give_up"),
    (F.CRASH, Verdict.RESTART, "restart"),
    (F.HANG, Verdict.RESTART, "restart"),
    (F.STALL, Verdict.RESTART, "restart"),
    (F.GPU_WATCHDOG, Verdict.RESTART, "restart"),
    (F.OOM, Verdict.RESTART, "reduce_memory"),
    (F.NON_FINITE, Verdict.RESTART, "rollback"),
    (F.GRAD_SPIKE, Verdict.RESTART, "rollback"),
    (F.PLANNED_RESTART, Verdict.RESTART, "planned_restart"),
])
def test_action_per_class(failure, verdict, action):
    d = policy().decide(out(failure), BASE, now=0)
    assert (d.verdict, d.action) == (verdict, action)
    assert d.reason


def test_bad_config_gives_up_with_the_workers_message():
    d = policy().decide(Outcome(F.BAD_CONFIG, "data: train.jsonl not found", 0, 0), BASE, 0)
    assert d.verdict is Verdict.GIVE_UP and "train.jsonl not found" in d.reason


def test_a_user_stop_wins_over_a_failure_but_not_over_completion():
    assert policy().decide(out(F.CRASH, stop_requested=True), BASE, 0).verdict is Verdict.STOP
    assert policy().decide(out(F.COMPLETED, stop_requested=True), BASE, 0).verdict is (
        Verdict.FINISH)


def test_crash_hang_stall_restart_with_the_same_settings():
    for f in (F.CRASH, F.HANG, F.STALL):
        assert policy().decide(out(f), BASE, 0).settings == BASE


def test_gpu_watchdog_says_let_the_display_sleep():
    d = policy().decide(out(F.GPU_WATCHDOG), BASE, 0)
    assert "display" in d.reason and d.settings == BASE


def test_oom_halves_the_micro_batch_keeps_the_effective_batch_then_checkpoints_then_gives_up():
    p, s, seen = policy(), BASE, []
    for i in range(5):
        d = p.decide(out(F.OOM, start=0, end=10 + i), s, now=i)  # a little progress each time
        if d.verdict is Verdict.GIVE_UP:
            break
        s = d.settings
        seen.append((s.batch_size, s.grad_accumulation_steps, s.grad_checkpoint))
    assert seen == [(2, 4, False), (1, 8, False), (1, 8, True)]
    assert d.verdict is Verdict.GIVE_UP and "micro-batch 1" in d.reason


def test_shrink_batch_keeps_the_effective_batch_for_odd_sizes():
    s = shrink_batch(Settings(6, 1, False))
    assert (s.batch_size, s.grad_accumulation_steps) == (3, 2)
    s = shrink_batch(Settings(3, 2, False))
    assert (s.batch_size, s.grad_accumulation_steps) == (1, 6)


def test_rollback_lowers_lr_skips_the_window_and_gives_up_after_max_rollbacks():
    p, s = policy(max_rollbacks=2), BASE
    d = p.decide(out(F.GRAD_SPIKE, start=0, end=42, first_bad_step=40, lr_scale=1.0), s, 0)
    assert (d.rollback_before, d.bad_until, d.settings.lr_scale) == (40, 42, 0.5)
    d = p.decide(out(F.NON_FINITE, start=30, end=60, lr_scale=0.5), d.settings, 1)
    assert (d.rollback_before, d.bad_until, d.settings.lr_scale) == (60, 60, 0.25)
    d = p.decide(out(F.NON_FINITE, start=50, end=80, lr_scale=0.25), d.settings, 2)
    assert d.verdict is Verdict.GIVE_UP and "2 rollbacks" in d.reason


def test_the_same_failure_twice_without_progress_gives_up():
    p = policy()
    assert p.decide(out(F.CRASH, end=0), BASE, 0).verdict is Verdict.RESTART
    d = p.decide(out(F.CRASH, end=0), BASE, 1)
    assert d.verdict is Verdict.GIVE_UP and "twice" in d.reason


def test_the_same_failure_after_progress_restarts():
    p = policy()
    for i in range(10):
        d = p.decide(out(F.CRASH, start=i * 10, end=i * 10 + 10), BASE, i)
        assert d.verdict is Verdict.RESTART, d.reason


def test_crash_loop_limit_counts_failures_without_progress_in_the_window():
    p = policy(max_failures=3)
    kinds = [F.CRASH, F.HANG, F.STALL]
    verdicts = [p.decide(out(k, end=0), BASE, now=i).verdict for i, k in enumerate(kinds)]
    assert verdicts == [Verdict.RESTART, Verdict.RESTART, Verdict.GIVE_UP]


def test_failures_outside_the_window_do_not_count():
    p = policy(max_failures=2, failure_window=100)
    assert p.decide(out(F.CRASH, end=0), BASE, now=0).verdict is Verdict.RESTART
    assert p.decide(out(F.HANG, end=0), BASE, now=500).verdict is Verdict.RESTART


def test_planned_restart_is_immediate_and_not_a_failure_but_not_endless():
    p = policy(max_failures=1)
    d = p.decide(out(F.PLANNED_RESTART, end=10), BASE, 0)
    assert (d.verdict, d.delay, d.counted) == (Verdict.RESTART, 0.0, False)
    assert p.decide(out(F.PLANNED_RESTART, start=10, end=20), BASE, 1).verdict is (
        Verdict.RESTART)
    assert p.decide(out(F.PLANNED_RESTART, start=20, end=20), BASE, 2).verdict is (
        Verdict.GIVE_UP)


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    p = policy(max_failures=100, backoff_initial=5, backoff_max=60)
    kinds = [F.CRASH, F.HANG] * 5
    delays = [p.decide(out(k, end=0), BASE, now=i).delay for i, k in enumerate(kinds)]
    for n, d in enumerate(delays[:4]):
        assert 5 * 2**n * 0.8 <= d <= 5 * 2**n * 1.2
    assert max(delays) <= 60 and delays[-1] >= 48


def test_backoff_resets_after_sustained_progress():
    p = policy(progress_reset_steps=50)
    p.decide(out(F.CRASH, end=10), BASE, 0)
    p.decide(out(F.HANG, start=10, end=20), BASE, 1)
    assert p.decide(out(F.STALL, start=20, end=30), BASE, 2).delay > 15
    assert p.decide(out(F.CRASH, start=30, end=100), BASE, 3).delay <= 6


def nan_at(batch: int, position: int, start: int, end: int, lr: float, **kw) -> Outcome:
    return Outcome(F.NON_FINITE, f"loss is nan at step {end + 1}", start, end,
                   first_bad_step=end + 1, lr_scale=lr, data_position=position,
                   data_batch=batch, data_lines=f"train.jsonl:{batch * 4 + 1}-{batch * 4 + 4}",
                   **kw)


def test_a_non_finite_loss_again_on_the_same_batch_is_data_the_batch_is_skipped_for_good():
    """The issue's night: a batch whose loss is always NaN. Before: three rollbacks, the lr
    cut three times, the night abandoned. Now: one rollback (nothing tells data from
    divergence the first time), then the batch is skipped and the cut undone."""
    p, s = policy(max_rollbacks=3), BASE
    first = p.decide(nan_at(batch=12, position=7, start=0, end=7, lr=1.0), s, 0)
    assert first.action == "rollback" and first.settings.lr_scale == 0.5
    assert first.settings.skip_positions == (7,)  # a data position, not a step
    assert "train.jsonl:49-52" in first.reason
    # the same batch, next epoch (another position), at the lowered learning rate
    d = p.decide(nan_at(batch=12, position=77, start=5, end=70, lr=0.5), first.settings, 1)
    assert (d.verdict, d.action) == (Verdict.RESTART, "skip_batch")
    assert d.settings.skip_batches == (12,) and d.settings.lr_scale == 1.0  # cut undone
    assert d.rollback_before == 71 and d.bad_until == -1
    assert d.settings.skip_positions == (7,)  # nothing new to pass over once
    assert "data problem, not divergence" in d.reason and "train.jsonl:49-52" in d.reason
    assert p.rollbacks == 1  # not a rollback: the budget is left for real divergence
    # a second bad batch: a rollback again; the skipped batch stays skipped
    d2 = p.decide(nan_at(batch=3, position=90, start=70, end=85, lr=1.0), d.settings, 2)
    assert d2.action == "rollback" and d2.settings.skip_batches == (12,)
    d3 = p.decide(nan_at(batch=3, position=130, start=80, end=120, lr=0.5), d2.settings, 3)
    assert d3.action == "skip_batch" and d3.settings.skip_batches == (3, 12)


def test_undoing_a_cut_undoes_only_the_one_that_batch_caused():
    p, s = policy(max_rollbacks=5), BASE
    a = p.decide(nan_at(batch=1, position=5, start=0, end=5, lr=1.0), s, 0)  # 1 -> 0.5
    b = p.decide(nan_at(batch=2, position=20, start=5, end=20, lr=0.5), a.settings, 1)
    assert b.action == "rollback" and b.settings.lr_scale == 0.25  # another batch: divergence?
    again = p.decide(nan_at(batch=1, position=70, start=20, end=60, lr=0.25), b.settings, 2)
    assert again.action == "skip_batch" and again.settings.lr_scale == 0.5


def test_an_outcome_without_data_keeps_the_old_window_rule():
    # the worker's last message was lost: which batch failed is unknown, so the data from
    # the rollback checkpoint through the failing step is skipped (--skip-steps)
    p = policy()
    d = p.decide(out(F.NON_FINITE, start=0, end=42, first_bad_step=43, lr_scale=1.0), BASE, 0)
    assert (d.action, d.settings.skip_positions, d.bad_until) == ("rollback", (), 43)
    assert "skipping data through step 43" in d.reason
    d = p.decide(out(F.NON_FINITE, start=30, end=60, first_bad_step=61, lr_scale=0.5),
                 d.settings, 1)
    assert d.action == "rollback"  # no batch named: nothing to recognise


def test_settings_with_skipped_batches_round_trip_through_the_record():
    s = dataclasses.replace(BASE, lr_scale=0.5, skip_batches=(3, 12), skip_positions=(7, 40))
    d = s.to_dict()
    assert d["skip_batches"] == [3, 12] and d["skip_positions"] == [7, 40]
    assert Settings.from_dict(d) == s
    assert Settings.from_dict(BASE.to_dict()) == BASE  # records without the key
    old = {"batch_size": 4, "grad_accumulation_steps": 2, "grad_checkpoint": False}
    assert Settings.from_dict(old).skip_batches == ()
    assert Settings.from_dict(old).skip_positions == ()


# ---- a rollback skips the offending data only (issue 10: every example, every epoch) -----


def test_a_non_finite_rollback_skips_only_the_failing_batch():
    """Before: the data from the rollback checkpoint through the failing batch was skipped,
    so the healthy batches in between were never trained that epoch."""
    p = policy()
    d = p.decide(nan_at(batch=12, position=47, start=0, end=47, lr=1.0), BASE, 0)
    assert (d.action, d.rollback_before, d.bad_until) == ("rollback", 48, -1)
    assert d.settings.skip_positions == (47,)
    assert "skipping data position 47 once (train.jsonl:49-52)" in d.reason
    # a second rollback adds its own position; the first one stays (a restart from an
    # earlier checkpoint must still pass over it)
    d2 = p.decide(nan_at(batch=5, position=90, start=45, end=88, lr=0.5), d.settings, 1)
    assert d2.settings.skip_positions == (47, 90)


def test_a_spike_rollback_skips_the_spike_window():
    """A spike is `patience` consecutive steps: the worker names the window's first and
    last data positions; the window is the offending data, the batches before it are
    trained again."""
    p = policy()
    spike = Outcome(F.GRAD_SPIKE, "gradient norm 1e7 > threshold 1000 for 3 consecutive steps",
                    0, 52, first_bad_step=51, lr_scale=1.0, data_position=55, data_batch=9,
                    data_lines="train.jsonl:1-12", first_bad_position=53)
    d = p.decide(spike, BASE, 0)
    assert (d.action, d.rollback_before, d.bad_until) == ("rollback", 51, -1)
    assert d.settings.skip_positions == (53, 54, 55)
    assert "the spike window's data positions 53-55 once" in d.reason
    # a non-finite step names one batch; a first_bad_position means nothing there
    nan = dataclasses.replace(spike, failure=F.NON_FINITE, first_bad_position=50)
    assert policy().decide(nan, BASE, 0).settings.skip_positions == (55,)


def test_settings_changed_shows_the_lr_scale_the_attempt_ran_with():
    """Before: "lr_scale None→0.5" in the report (None: "the checkpoint's")."""
    new = dataclasses.replace(BASE, lr_scale=0.5, skip_positions=(7,))
    assert BASE.diff(new, lr_scale=1.0) == {"lr_scale": [1.0, 0.5],
                                            "skip_positions": [[], [7]]}
    assert BASE.diff(BASE, lr_scale=1.0) == {}


def test_overrides_hold_only_the_settings_that_changed():
    """run.json "overrides" (the report's "settings changed" row): before, every setting
    was listed (grad_checkpoint=False, skip_batches=[] ...) once one of them changed."""
    shrunk = dataclasses.replace(BASE, batch_size=2, grad_accumulation_steps=4)
    assert shrunk.overrides(BASE) == {"batch_size": 2, "grad_accumulation_steps": 4}
    rolled = dataclasses.replace(BASE, lr_scale=0.5, skip_positions=(7,))
    assert rolled.overrides(BASE) == {"lr_scale": 0.5, "skip_positions": [7]}
    assert BASE.overrides(BASE) == {}
    assert Settings.from_dict({**BASE.to_dict(), **rolled.overrides(BASE)}) == rolled


# ---- determinism: repeats at the same step with the same settings, not kills from outside ----

SIGKILL, SIGABRT, SIGSEGV = 9, 6, 11  # the POSIX numbers, pinned


@pytest.mark.parametrize("first,second,verdict", [
    # (failure, end step, signal) of two attempts resumed from the same checkpoint (step 0)
    ((F.CRASH, 40, SIGKILL), (F.CRASH, 25, SIGKILL), Verdict.RESTART),  # the night
    ((F.CRASH, 40, SIGKILL), (F.CRASH, 40, SIGKILL), Verdict.RESTART),  # outside: no evidence
    ((F.CRASH, 40, SIGABRT), (F.CRASH, 25, SIGABRT), Verdict.RESTART),  # another step
    ((F.CRASH, 40, SIGABRT), (F.CRASH, 40, SIGABRT), Verdict.GIVE_UP),  # the same step
    ((F.CRASH, 40, SIGSEGV), (F.CRASH, 40, SIGSEGV), Verdict.GIVE_UP),
    ((F.CRASH, 40, None), (F.CRASH, 40, None), Verdict.GIVE_UP),  # exit code 1 at 40 twice
    ((F.CRASH, 40, None), (F.CRASH, 39, None), Verdict.RESTART),
    ((F.HANG, 40, None), (F.HANG, 40, None), Verdict.GIVE_UP),
    ((F.HANG, 40, None), (F.STALL, 40, None), Verdict.RESTART),  # another failure
    ((F.GPU_WATCHDOG, 40, SIGABRT), (F.GPU_WATCHDOG, 12, SIGABRT), Verdict.RESTART),
])
def test_only_a_repeat_at_the_same_step_with_the_same_settings_is_deterministic(
        first, second, verdict):
    p = policy()
    (f1, end1, sig1), (f2, end2, sig2) = first, second
    assert p.decide(out(f1, end=end1, signal=sig1), BASE, 0).verdict is Verdict.RESTART
    d = p.decide(out(f2, end=end2, signal=sig2), BASE, 1)
    assert d.verdict is verdict, d.reason
    if verdict is Verdict.GIVE_UP:
        assert f"twice at step {end1}" in d.reason and "deterministic" in d.reason


def test_the_same_step_with_other_settings_is_not_a_repeat():
    p = policy()
    assert p.decide(out(F.CRASH, end=40), BASE, 0).verdict is Verdict.RESTART
    other = dataclasses.replace(BASE, lr_scale=0.5)
    assert p.decide(out(F.CRASH, end=40), other, 1).verdict is Verdict.RESTART
    d = p.decide(out(F.CRASH, end=40), other, 2)
    assert d.verdict is Verdict.GIVE_UP and "twice at step 40" in d.reason


def test_the_step_of_a_repeat_is_the_first_bad_step_when_the_worker_names_one():
    p = policy()
    p.decide(out(F.NON_FINITE, end=41, first_bad_step=40), BASE, 0)
    d = p.decide(out(F.NON_FINITE, start=30, end=41, first_bad_step=40), BASE, 1)
    assert d.verdict is Verdict.GIVE_UP and "twice at step 40" in d.reason


def test_kills_from_outside_are_bounded_by_the_crash_loop_budget_only():
    """Five SIGKILLs nobody explains, none past the high-water mark: max_failures (5) ends it,
    not the determinism rule."""
    p = policy(max_failures=5)
    ends = [40, 40, 40, 40, 40]
    verdicts = [p.decide(out(F.CRASH, end=e, signal=SIGKILL), BASE, now=i).verdict
                for i, e in enumerate(ends)]
    assert verdicts == [Verdict.RESTART] * 4 + [Verdict.GIVE_UP]


def test_progress_is_the_high_water_step_not_the_attempts_own_gain():
    """An attempt that gains steps but stays below the highest step reached is no progress:
    the failures since the last progress keep counting (the one that progressed is the
    first of them)."""
    p = policy(max_failures=4)
    assert p.decide(out(F.CRASH, start=0, end=100, signal=SIGKILL), BASE, 0).verdict is (
        Verdict.RESTART)  # progress: 0 -> 100
    assert p.decide(out(F.CRASH, start=50, end=90, signal=SIGKILL), BASE, 1).verdict is (
        Verdict.RESTART)
    assert p.decide(out(F.CRASH, start=50, end=95, signal=SIGKILL), BASE, 2).verdict is (
        Verdict.RESTART)
    d = p.decide(out(F.CRASH, start=50, end=99, signal=SIGKILL), BASE, 3)
    assert d.verdict is Verdict.GIVE_UP and "crash loop" in d.reason
    assert p.high_water == 100


def test_a_restarted_supervisor_keeps_the_high_water_mark():
    p = Policy(OPTS, random.Random(0), high_water=100)
    p.decide(out(F.CRASH, start=50, end=80), BASE, 0)
    assert p.failures == [0]  # 80 < 100: not progress, the failure counts
    p.decide(out(F.CRASH, start=50, end=101), BASE, 1)
    assert p.failures == [1]  # past 100: progress cleared the earlier one


def test_a_refused_checkpoint_is_quarantined_at_once_and_counts_against_nothing():
    p = policy(max_failures=1)
    d = p.decide(out(F.CHECKPOINT_REFUSED, start=20, end=20), BASE, 0)
    assert (d.verdict, d.action, d.delay, d.quarantine, d.counted) == (
        Verdict.RESTART, "quarantine_checkpoint", 0.0, True, False)
    assert d.settings == BASE and p.failures == []
    # the next older one refused too: quarantined as well (refusals end with checkpoints)
    assert p.decide(out(F.CHECKPOINT_REFUSED, start=10, end=10), BASE, 1).quarantine
    # the same checkpoint refused again (it could not be moved aside): give up
    d = p.decide(out(F.CHECKPOINT_REFUSED, start=10, end=10), BASE, 2)
    assert d.verdict is Verdict.GIVE_UP and "twice at step 10" in d.reason
