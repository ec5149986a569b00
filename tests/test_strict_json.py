"""shared/strictjson.py: every JSON file and line we write parses with a strict parser — a
non-finite number is null (files, logs) or the protocol's "nan" string, never a bare NaN."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from shared import fsutil, logsetup, strictjson
from shared import protocol as p
from tests.conftest import subprocess_env, write_config


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (RFC 8259)."""
    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


NONFINITE = {"loss": math.nan, "nested": {"best": math.inf, "history": [1.0, -math.inf]}}


def test_files_written_atomically_have_null_for_nan(tmp_path: Path) -> None:
    """Before: COMPLETE, run.json, manifests, trainer_state.json held a bare NaN."""
    fsutil.atomic_write_json(tmp_path / "a.json", NONFINITE)
    fsutil.write_json_synced(tmp_path / "b.json", NONFINITE)
    expected = {"loss": None, "nested": {"best": None, "history": [1.0, None]}}
    assert strict_loads((tmp_path / "a.json").read_text()) == expected
    assert strict_loads((tmp_path / "b.json").read_text()) == expected


def test_messages_are_strict_json_and_keep_their_nan_strings() -> None:
    m = p.StepMetrics(run_id="r", attempt=1, step=3, time=1.0, loss=math.nan, grad_norm=math.inf,
                      lr=1e-4, tokens=1, tokens_per_sec=1.0, step_seconds=1.0, active_mb=1.0,
                      peak_mb=1.0, rss_mb=1.0)
    raw = m.to_json()
    assert strict_loads(raw)["loss"] == "nan"
    back = p.decode(raw)
    assert isinstance(back, p.StepMetrics) and math.isnan(back.loss) and back.grad_norm == math.inf
    reply = p.ControlReply(ok=True, data={"best_checkpoint": {"val_loss": math.nan}})
    assert strict_loads(reply.to_json())["data"] == {"best_checkpoint": {"val_loss": None}}


def test_json_log_lines_have_null_for_nan(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    logsetup.configure("worker", path, console=False)
    try:
        structlog.get_logger("worker").info("evaluated", val_loss=math.nan, best=[math.inf])
    finally:
        for h in list(logging.getLogger().handlers):
            h.close()
            logging.getLogger().removeHandler(h)
    [line] = path.read_text().splitlines()
    event = strict_loads(line)
    assert event["event"] == "evaluated" and event["val_loss"] is None and event["best"] == [None]


def test_dumps_refuses_what_it_cannot_make_finite() -> None:
    class Odd:
        pass

    with pytest.raises(ValueError):
        strictjson.dumps(Odd(), default=lambda _: math.nan)


def _json_files(run: Path) -> list[Path]:
    out = []
    for f in run.rglob("*"):
        if f.is_file() and "wandb" not in f.parts and (
                f.suffix in (".json", ".jsonl") or f.name == "COMPLETE"
                or ".jsonl." in f.name):
            out.append(f)
    return out


def test_every_json_file_of_a_supervised_run_parses_strictly(tmp_path: Path, tiny_model: Path,
                                                              corpus: Path) -> None:
    """A supervised run through a NaN loss (rollback), without validation (val_batches: 0)
    and with mlx_lm's test pass: run.json, COMPLETE, checkpoints, logs, metrics."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (data / name).write_text((corpus / name).read_text())
    (data / "test.jsonl").write_text((corpus / "valid.jsonl").read_text())
    config = write_config(
        tmp_path / "s.yaml", tiny_model, data, iters=12, save_every=4, steps_per_eval=4,
        val_batches=0, test=True, test_batches=2,
        supervisor={"backoff_initial": 0.1, "backoff_max": 0.5, "caffeinate": False})
    run = tmp_path / "run"
    sup = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", str(config),
                          "--run-dir", str(run)], capture_output=True, text=True, timeout=300,
                         env=subprocess_env(OVERNIGHT_INJECT="nan@7"))
    assert sup.returncode == 0, sup.stderr[-3000:]
    record = strict_loads((run / "run.json").read_text())
    assert [a["classification"] for a in record["attempts"]] == ["non_finite", "completed"]
    files = _json_files(run)
    names = {f.name for f in files}
    assert {"run.json", "COMPLETE", "worker.jsonl", "supervisor.jsonl", "metrics.jsonl",
            "trainer_state.json", "manifest.json", "adapter_config.json"} <= names
    for f in files:
        lines = [f.read_text()] if f.suffix == ".json" or f.name == "COMPLETE" else \
            [ln for ln in f.read_text().splitlines() if ln.strip()]
        for line in lines:
            strict_loads(line)  # raises on NaN / Infinity
    complete = strict_loads((run / "COMPLETE").read_text())
    assert complete["best_val_loss"] is None and math.isfinite(complete["test_loss"])
