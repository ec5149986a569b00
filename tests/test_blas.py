"""One BLAS per run (issue 15, shared/blas.py): `overnight train` started alone preloads
Debian's OpenBLAS as `overnight run` does for its worker, so a run started by one command and
resumed by the other ends with the numbers of a run that only one of them made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tests.conftest import OPENBLAS, subprocess_env, write_config
from tests.supervisor_support import ROOT

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and OPENBLAS.exists()),
    reason="needs Linux with Debian's libopenblas0-pthread")


def plain_env(**extra: str) -> dict[str, str]:
    """What a user's shell gives: no preload, nobody chose the BLAS."""
    env = subprocess_env(**extra)
    env.pop("LD_PRELOAD", None)
    env.pop("OVERNIGHT_BLAS_CHOSEN", None)
    return env


def overnight(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)


def started(run_dir: Path) -> list[dict]:
    lines = (run_dir / "logs" / "worker.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "worker_started"]


def test_train_alone_preloads_openblas_unless_the_config_says_false(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=2, save_every=2)
    done = overnight("train", str(config), "--run-dir", str(tmp_path / "a"), env=plain_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["blas"] for e in started(tmp_path / "a")] == [str(OPENBLAS.resolve())]
    off = write_config(tmp_path / "off.yaml", tiny_model, corpus, iters=2, save_every=2,
                       supervisor={"openblas": "false"})
    done = overnight("train", str(off), "--run-dir", str(tmp_path / "b"), env=plain_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["blas"] for e in started(tmp_path / "b")] == ["bundled"]


def test_a_run_started_by_train_and_resumed_by_run_equals_a_run_alone(
        tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, iters=30)
    crashed = overnight("train", str(config), "--run-dir", str(tmp_path / "mixed"),
                        env=plain_env(OVERNIGHT_INJECT="crash@14"))
    assert crashed.returncode != 0  # the injected crash, after the checkpoint at step 10
    resumed = overnight("run", str(config), "--run-dir", str(tmp_path / "mixed"),
                        env=plain_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    alone = overnight("run", str(config), "--run-dir", str(tmp_path / "alone"),
                      env=plain_env())
    assert alone.returncode == 0, alone.stderr[-2000:]
    a = mx.load(str(tmp_path / "mixed" / "adapters" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "alone" / "adapters" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    delta = max(mx.abs(a[k] - b[k]).max().item() for k in a)
    assert delta == 0.0
