"""Shared fixtures: tiny mlx_lm models and corpora built once per session, and a runner
for the real `overnight` CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.tinymodel import make_corpus, make_tiny_model

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: OpenBLAS when present (10-60x faster matmul on
    the mlx CPU wheel), no inherited fault injection."""
    env = dict(os.environ)
    env.pop("OVERNIGHT_INJECT", None)
    if OPENBLAS.exists() and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = str(OPENBLAS)
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def overnight(*args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        capture_output=True, text=True, timeout=timeout,
        env=kwargs.pop("env", None) or subprocess_env(), **kwargs,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-q4", quantize_bits=4)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data") / "text")


@pytest.fixture(scope="session")
def weighted_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data") / "weighted", weights=True)


def write_config(path: Path, model: Path, data: Path, **values) -> Path:
    """A small, fast config; keyword arguments override (nested dicts for sections)."""
    config = {
        "model": str(model),
        "data": str(data),
        "iters": 40,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "steps_per_report": 10,
        "steps_per_eval": 10,
        "save_every": 10,
        "val_batches": 2,
        "num_layers": -1,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        "training": {"warmup_steps": 5},
    }
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path
