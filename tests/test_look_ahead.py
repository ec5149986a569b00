"""The next batch is built while the current step computes (worker/train.py `_look_ahead`),
and a plain step is reported while the next one computes (`_flush`): neither may change
what is trained or what is logged.

The data make every batch recognisable from the outside: 24 examples of 1..24 distinct
words, batch 4, so the six length-sorted groups each have a different target-token count.
Whatever the order of the groups inside an epoch, every epoch must train each group once —
three epochs give the same multiset of per-step token counts, six different values each —
and every step must appear in metrics.jsonl once, in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import subprocess_env, write_config

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima"]


def corpus(out: Path, n: int = 24) -> Path:
    out.mkdir(parents=True)
    lines = [json.dumps({"text": " ".join(WORDS[j % len(WORDS)] for j in range(i + 1))})
             for i in range(n)]
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    (out / "valid.jsonl").write_text("\n".join(lines[:4]) + "\n")
    return out


def test_every_epoch_trains_every_group_once_and_every_step_is_logged_once_in_order(
    tmp_path: Path, tiny_model: Path
) -> None:
    data = corpus(tmp_path / "data")
    # eval at 7 and 18 (the last): plain steps, eval steps and periodic saves mixed
    config = write_config(tmp_path / "c.yaml", tiny_model, data, iters=18, steps_per_eval=7,
                          save_every=5, steps_per_report=3)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "train", str(config),
                           "--run-dir", str(run)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 19))
    assert [r["data_position"] for r in rows] == list(range(18))
    epochs = [Counter(r["tokens"] for r in rows[k:k + 6]) for k in (0, 6, 12)]
    assert len(epochs[0]) == 6, epochs[0]  # six groups, six different token counts
    assert epochs[0] == epochs[1] == epochs[2]

