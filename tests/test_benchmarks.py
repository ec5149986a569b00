"""benchmarks/: the harness runs end to end on the tiny model, measures both tools on the same
batches, and renders its table (a smoke test, not a measurement: < 20 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import fixtures, report
from benchmarks.common import ROOT, Results, openblas_available
from benchmarks.throughput import Workload, compare


def test_run_py_quick_checkpoint_part_prints_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only",
         "checkpoint", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| 5 checkpoint | tiny LoRA r8 x all layers" in r.stdout
    assert "failed" not in out.read_text()
    assert out.with_suffix(".json").exists()


def test_both_tools_train_the_same_batches_and_are_timed(tmp_path: Path) -> None:
    """mlx_lm counts one padding target per sequence; everything else must be equal."""
    w = Workload("tiny", fixtures.tiny_model(tmp_path), fixtures.tiny_corpus(tmp_path, 16, 4),
                 batch_size=4, num_layers=-1, max_seq_length=2048, steps_per_epoch=4)
    c = compare(w, tmp_path / "w", reps=1, openblas=openblas_available(), log=lambda _: None)
    s = c.summary()
    assert s["padding_targets_mlx_lm_counts"] == w.batch_size * w.steps_per_epoch
    assert c.ours[0].steps == c.mlx_lm[0].steps == w.iters
    assert c.ratio > 0 and s["ours_peak_rss_mb"] > 0 and s["mlx_lm_peak_rss_mb"] > 0


def test_markdown_explains_each_missed_goal_once() -> None:
    res = Results()
    res.raw.update(mode="quick", seconds=1.0, machine={
        "cpu": "cpu", "cores": 2, "memory_gib": 1, "os": "os", "python": "3", "mlx": "m",
        "mlx-lm": "l", "openblas": "x", "load_average_at_start": [0], "date": "d"})
    res.add("2 supervision", "cpu", "4%", goal="< 1%", met=False, kind="supervisor_cpu")
    res.add("2 supervision", "cpu again", "5%", goal="< 1%", met=False, kind="supervisor_cpu")
    res.add("3 detection", "kill", "8 ms", goal="< 0.5 s", met=True)
    text = report.markdown(res, "python benchmarks/run.py --quick")
    assert "| 2 supervision | cpu | 4% |  |  | < 1% | **no** |  |" in text
    assert text.count(report.MISSES["supervisor_cpu"]) == 1
    assert report.MISSES["recovery"] not in text


def test_fixed_shapes_times_ours_mlx_lm_and_the_bare_loop_on_one_batch_shape(
        tmp_path: Path) -> None:
    """Every example is 32 tokens, so every tool trains (4, 33) batches; each is timed."""
    import json

    from benchmarks import fixed_shapes

    r = fixed_shapes.compare(tmp_path, reps=1, openblas=openblas_available(),
                             log=lambda _: None, n_train=16, peer_too=False)
    w = r.workload
    assert set(r.samples) == {"ours", "mlx_lm", "bare"}
    assert all(s[0].steps == w.iters == 9 for s in r.samples.values())
    bare = json.loads((tmp_path / "bare-0.json").read_text())
    assert bare["batch_shapes"] == [[4, 33]] * 4
    mlx_lm = json.loads((tmp_path / "mlx_lm" / "mlx_lm-0.json").read_text())
    assert {tuple(b) for b in mlx_lm["batch_shapes"]} == {(4, 33)}
    ours = [json.loads(x) for x in (tmp_path / "ours" / "run-0" / "logs" /
                                    "metrics.jsonl").read_text().splitlines()]
    assert {m["tokens"] for m in ours} == {4 * 31}  # 32 tokens: 31 targets each, no padding
    s = r.summary()
    assert s["ours"]["step_ms"] > 0 and s["bare"]["ratio_ours_over"] > 0
    assert s["skipped"] == {"mlx-lm-lora": "not asked for"}
