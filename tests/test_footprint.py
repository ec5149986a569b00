"""Memory Metal holds: the macOS physical footprint (shared/footprint.py, ctypes
proc_pid_rusage) and MLX's cache memory travel in telemetry, count in the memory watch
(supervisor/daemon/memory.py) and are written per step for the plot."""

from __future__ import annotations

import json
import os
import sys

import pytest

from shared.config import SupervisorOptions
from shared.footprint import RusageInfoV2, phys_footprint_mb
from shared.protocol import Heartbeat, StepMetrics, decode
from supervisor.daemon.memory import MemoryWatch, Sample
from tests.conftest import overnight, write_config


def test_rusage_info_v2_has_apples_layout():
    """sys/resource.h: a 16-byte uuid, then 18 uint64 counters; ri_phys_footprint is the 8th."""
    assert RusageInfoV2.ri_phys_footprint.offset == 16 + 7 * 8
    assert len(RusageInfoV2._fields_) == 19 and RusageInfoV2.ri_diskio_byteswritten.offset == 152


@pytest.mark.skipif(sys.platform == "darwin", reason="the Linux answer")
def test_off_macos_there_is_no_footprint():
    assert phys_footprint_mb(os.getpid()) is None


@pytest.mark.skipif(sys.platform != "darwin", reason="proc_pid_rusage exists only on macOS")
def test_the_footprint_of_this_process_on_macos():  # pragma: no cover - macOS only
    import psutil

    mb = phys_footprint_mb(os.getpid())
    assert mb is not None and 0.2 * psutil.Process().memory_info().rss / 2**20 < mb < 1e6


def test_the_memory_watch_sees_the_footprint_and_the_cache_rss_and_mlx_peak_miss():
    """A footprint of 51 GB beside 7 GB of MLX memory (the public report): over the limit."""
    watch = MemoryWatch(SupervisorOptions(memory_limit_mb=40_000, memory_growth=0))
    assert watch.add(Sample(0.0, 10, 900.0, 7_000.0, 60_000.0, 128_000.0)) is None
    reason = watch.add(Sample(5.0, 11, 900.0, 7_000.0, 60_000.0, 128_000.0, cache_mb=850.0,
                              footprint_mb=51_000.0))
    assert reason == ("worker memory 51000 MB above memory_limit_mb 40000 (rss 900 MB, mlx "
                      "7000 MB, mlx cache 850 MB, physical footprint 51000 MB)")
    held = Sample(0.0, 1, 500.0, 30_000.0, 60_000.0, 128_000.0, cache_mb=12_000.0)
    assert held.worker_mb == 42_000.0  # MLX's cache is memory MLX holds


def test_old_messages_without_the_fields_still_decode_and_new_ones_carry_them():
    beat = Heartbeat(run_id="r", pid=1, attempt=1, seq=1, time=0.0, phase="training", step=1,
                     total_steps=2, last_step_time=0.0, active_mb=1.0, peak_mb=1.0, rss_mb=1.0,
                     dropped=0, cache_mb=96.0, footprint_mb=2210.5)
    assert decode(beat.to_json()) == beat
    old = {k: v for k, v in json.loads(beat.to_json()).items()
           if k not in ("cache_mb", "footprint_mb")}
    assert decode(json.dumps(old).encode()).footprint_mb == 0.0


def train(tmp_path, model, corpus, name: str, **values) -> list[dict]:
    config = write_config(tmp_path / f"{name}.yaml", model, corpus, iters=3, save_every=3,
                          steps_per_eval=3, **values)
    run = tmp_path / name
    done = overnight("train", str(config), "--run-dir", str(run), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_the_worker_writes_its_cache_and_footprint_and_clear_cache_threshold_empties_the_cache(
        tmp_path, tiny_model, corpus):
    """Every step's metrics carry MLX's cache and the footprint (0 off macOS). mlx_lm's
    clear_cache_threshold (tuner/trainer.py: clear the cache when it holds more than that
    many bytes): 1 byte clears it after every step; the cache each step reports is measured
    after that."""
    kept = train(tmp_path, tiny_model, corpus, "kept")
    assert [m["step"] for m in kept] == [1, 2, 3]
    assert max(m["cache_mb"] for m in kept) > 0.0
    if sys.platform != "darwin":
        assert all(m["footprint_mb"] == 0.0 for m in kept)
    assert isinstance(StepMetrics(**{k: v for k, v in kept[0].items()
                                     if k in StepMetrics.__dataclass_fields__}), StepMetrics)
    cleared = train(tmp_path, tiny_model, corpus, "cleared", clear_cache_threshold=1)
    assert [m["cache_mb"] for m in cleared] == [0.0, 0.0, 0.0]
