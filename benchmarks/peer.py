"""The popular peer, mlx-lm-lora (PyPI `mlx-lm-lora`), in its SFT mode — in its own venv.

It is not a project dependency: `environment()` makes a venv in the benchmark cache
(~/.cache/mlx-overnight-bench/mlx-lm-lora-venv, MLX_OVERNIGHT_BENCH_CACHE) and installs
the package there with pip on first use (plus `mlx[cpu]` off macOS: the Linux mlx wheel
carries no library without it); the venv's own mlx and mlx-lm are whatever mlx-lm-lora
pins. `run_sft` runs its training CLI (`python -m mlx_lm_lora.train
--train-mode sft`) with the workload's keys through benchmarks/peer_timed.py, which stamps
the wall clock after every step as benchmarks/mlxlm_timed.py does for mlx_lm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import CACHE, ROOT, child_env, run
from benchmarks.throughput import Sample, Workload

PACKAGE = "mlx-lm-lora"
VENV = CACHE / "mlx-lm-lora-venv"


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def environment(log: Callable[[str], None] = print, venv: Path = VENV) -> tuple[Path | None, str]:
    """(the venv's python, "") with mlx_lm_lora importable — or (None, why not)."""
    py = _python(venv)
    probe = [str(py), "-c", "import mlx_lm_lora.train, mlx_lm, mlx; "
             "from importlib.metadata import version as v; "
             "print(v('mlx-lm-lora'), v('mlx-lm'), v('mlx'))"]
    if py.exists():
        r = subprocess.run(probe, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return py, ""
    log(f"installing {PACKAGE} into {venv} (once) ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            return None, f"python -m venv failed: {r.stderr.strip()[-200:]}"
    # On Linux the mlx wheel holds no library: `mlx[cpu]` brings the CPU one (mlx-cpu).
    extra = [] if sys.platform == "darwin" else ["mlx[cpu]"]
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", PACKAGE, *extra],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln] or r.stderr.splitlines()
        return None, f"pip install {PACKAGE} failed: {' '.join(errors[-2:])[:300]}"
    r = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{PACKAGE} installed but does not import: {last[:300]}"
    return py, ""


def versions(python: Path) -> str:
    r = subprocess.run([str(python), "-c", "from importlib.metadata import version as v; "
                        "print(v('mlx-lm-lora'), v('mlx-lm'), v('mlx'))"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip()


def run_sft(python: Path, w: Workload, work: Path, openblas: bool, tag: str,
            make_sample: Callable[[str, Workload, dict[str, Any], float, float], Sample]
            ) -> Sample:
    """One SFT run with the workload's keys; the peer's own defaults for everything else."""
    work.mkdir(parents=True, exist_ok=True)
    adapters = work / f"adapters-{tag}"
    shutil.rmtree(adapters, ignore_errors=True)
    config = work / "sft.yaml"
    config.write_text(yaml.safe_dump({**w.keys(), "train": True, "train_mode": "sft",
                                      "adapter_path": str(adapters), "fuse": False}))
    out = work / f"peer-{tag}.json"
    out.unlink(missing_ok=True)
    env = child_env(openblas)
    env["PYTHONPATH"] = str(ROOT)  # benchmarks.peer_timed only; the venv has its own packages
    proc = run([str(python), "-m", "benchmarks.peer_timed", str(out), "--config", str(config)],
               env, work / f"peer-{tag}.log").check()
    return make_sample("mlx-lm-lora", w, json.loads(out.read_text()), proc.wall_s,
                       proc.peak_rss_mb)
