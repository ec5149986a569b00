"""worker/monitors.py: early stopping and gradient-spike detection, and their state."""

from __future__ import annotations

from shared.config import EarlyStopping, GradSpike
from worker.monitors import EarlyStopper, SpikeDetector


def test_early_stopping_waits_for_patience_bad_evaluations() -> None:
    s = EarlyStopper(EarlyStopping(patience=3, min_delta=0.01, warmup_steps=0))
    assert not s.observe(10, 2.0)
    assert not s.observe(20, 1.995)  # within min_delta: not an improvement
    assert not s.observe(30, 1.999)
    assert s.observe(40, 2.1)
    assert (s.best, s.best_step) == (2.0, 10)


def test_an_improvement_resets_patience() -> None:
    s = EarlyStopper(EarlyStopping(patience=2, min_delta=0.01, warmup_steps=0))
    for step, v in [(1, 3.0), (2, 3.0), (3, 2.5), (4, 2.5)]:
        assert not s.observe(step, v)
    assert s.observe(5, 2.6)


def test_warmup_evaluations_are_ignored() -> None:
    s = EarlyStopper(EarlyStopping(patience=1, min_delta=0.0, warmup_steps=50))
    assert not s.observe(25, 1.0) and not s.observe(50, 9.0)
    assert s.best_step == -1
    assert not s.observe(75, 2.0) and s.observe(100, 2.0)


def test_disabled_never_stops() -> None:
    s = EarlyStopper(EarlyStopping(enabled=False, patience=1, warmup_steps=0))
    assert not any(s.observe(i, 5.0) for i in range(1, 20))


def test_early_stopping_state_round_trips() -> None:
    opts = EarlyStopping(patience=3, warmup_steps=0)
    a = EarlyStopper(opts)
    a.observe(1, 2.0)
    a.observe(2, 2.5)
    b = EarlyStopper.from_state(opts, a.state())
    assert b == a
    assert a.observe(3, 2.4) == b.observe(3, 2.4)


def test_spike_needs_consecutive_steps_over_threshold() -> None:
    d = SpikeDetector(GradSpike(threshold=100.0, patience=3))
    assert d.observe(1, 500.0) is None and d.observe(2, 500.0) is None
    assert d.observe(3, 1.0) is None  # the run of spikes is broken
    assert d.observe(4, 500.0) is None and d.observe(5, 500.0) is None
    reason = d.observe(6, 500.0)
    assert reason is not None and "threshold 100" in reason and d.first_bad_step == 4


def test_robust_spike_test_uses_recent_statistics() -> None:
    d = SpikeDetector(GradSpike(threshold=1e9, patience=2, robust_z=20.0, min_history=20))
    for step in range(1, 41):
        assert d.observe(step, 1.0 + 0.01 * (step % 5)) is None
    assert d.observe(41, 50.0) is None
    reason = d.observe(42, 60.0)
    assert reason is not None and "MAD" in reason and d.first_bad_step == 41


def test_spike_state_round_trips() -> None:
    opts = GradSpike(threshold=10.0, patience=2)
    a = SpikeDetector(opts)
    a.observe(1, 1.0)
    a.observe(2, 50.0)
    b = SpikeDetector.from_state(opts, a.state())
    assert list(b.history) == [1.0] and b.consecutive == 1
    assert a.observe(3, 50.0) == b.observe(3, 50.0) is not None


def test_the_early_stop_reason_names_the_reference_apart_from_the_best() -> None:
    """Issue 17: the reason said "best 2.5183 at step 715" — the min_delta reference — while
    every other view said "best val 2.511 at step 740". "best" is the lowest value only."""
    s = EarlyStopper(EarlyStopping(patience=2, min_delta=0.01, warmup_steps=0))
    assert not s.observe(715, 2.5183) and not s.observe(740, 2.5109)  # < 0.01 better
    assert s.observe(765, 2.52)
    assert s.reason(2.5109, 740) == ("no improvement of 0.01 on 2.518 (step 715) in 2 "
                                     "evaluations; best val 2.511 at step 740")
    fine = EarlyStopper(EarlyStopping(patience=2, min_delta=0.0001, warmup_steps=0),
                        best=2.51834, best_step=715)
    assert fine.reason(None, -1, "smoothed training loss ") == (
        "no improvement of 0.0001 on smoothed training loss 2.51834 (step 715) in 2 "
        "evaluations")


def test_spike_statistics_are_numpys_median_and_mad_to_the_bit() -> None:
    """The host statistics run without numpy (a round trip per step), and give the same
    limit as numpy.median: odd and even windows, ties, a window still filling up."""
    import random

    import numpy as np

    from worker.monitors import _median

    rng = random.Random(7)
    for n in (1, 2, 3, 4, 99, 100, 101):
        for _ in range(50):
            xs = [rng.choice([0.5, 1.0, rng.lognormvariate(0, 2)]) for _ in range(n)]
            med = _median(sorted(xs))
            assert med == float(np.median(np.asarray(xs)))
            mad = _median(sorted(abs(x - med) for x in xs))
            assert mad == float(np.median(np.abs(np.asarray(xs) - med)))
