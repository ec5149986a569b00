"""Files another process wrote are read with shared/strictjson.py (issue 12): a checkpoint
manifest or adapter_config, a log line and a data line that nest 60000 deep or hold a
5000-digit integer are named as bad, counted where they are data — never a RecursionError
or a traceback out of the supervisor, the report or the worker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared import checkpoint
from shared import config as cfg
from supervisor.morning.runlogs import parse_line
from tests.test_checkpoint import write
from worker import data

DEEP = "[" * 60000
HUGE_INT = '{"step": ' + "9" * 5000 + "}"


@pytest.mark.parametrize("text", [DEEP, HUGE_INT, '{"files": ' + DEEP])
def test_a_hostile_manifest_makes_the_checkpoint_invalid(tmp_path: Path, text: str) -> None:
    ckpt = tmp_path / "step-0000010"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(text)
    result = checkpoint.validate(ckpt)
    assert not result.ok and "manifest.json is not a valid manifest" in result.reason


def test_a_hostile_adapter_config_with_a_consistent_manifest_is_named(tmp_path: Path) -> None:
    ckpt = write(tmp_path, 10)
    (ckpt / "adapter_config.json").write_text(DEEP)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["adapter_config.json"] = {
        "bytes": len(DEEP), "sha256": hashlib.sha256(DEEP.encode()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    result = checkpoint.validate(ckpt)
    assert not result.ok and result.reason == "step-0000010/adapter_config.json: not valid JSON"


@pytest.mark.parametrize("text", [DEEP, HUGE_INT, '{"event": "x", "a": ' + DEEP + "}"])
def test_a_hostile_log_line_is_skipped(text: str) -> None:
    assert parse_line(text) is None


def test_a_log_line_cut_before_a_good_one_is_still_recovered() -> None:
    good = {"event": "attempt_started", "ts": 1.0}
    assert parse_line('{"step": 4, "ev' + json.dumps(good)) == good


def test_hostile_data_lines_are_counted_and_named(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"good {i}"}) for i in range(20)]
    lines[3] = '{"text": ' + DEEP
    lines[9] = '{"text": "x", "n": ' + "9" * 5000 + "}"
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    index = data.scan(path, cfg.resolve({"model": "m", "data": "d", "training": {}}))
    assert index.report.malformed == 2 and len(index) == 18
    assert index.report.examples[0].startswith("line 4: invalid JSON (JSON nested deeper than")
    assert index.report.examples[1].startswith("line 10: invalid JSON")
