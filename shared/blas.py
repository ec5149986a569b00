"""Which BLAS the worker's MLX uses on Linux: Debian's OpenBLAS, preloaded, when present.

The `mlx[cpu]` wheel bundles a slow reference BLAS; Debian's `libopenblas0-pthread`, loaded
first through `LD_PRELOAD` (ld.so(8): the preloaded library's `sgemm_` wins symbol lookup),
makes its matrix products 10-60x faster — and gives other floating-point results. A run must
therefore use one BLAS throughout: `overnight run` preloads it for its worker, and
`overnight train` started alone re-executes itself once with the same preload, so a run
started by one command and resumed by the other ends with the same numbers.

`supervisor.openblas` (shared/config.py): "auto" preloads when the library is there, "true"
also warns when it is not, "false" never preloads. macOS (Accelerate) is left alone.

CHOSEN_ENV marks a process whose BLAS its parent already chose (the supervisor's worker, a
re-executed `train`, a benchmark measuring the bundled BLAS on purpose): never re-executed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
CHOSEN_ENV = "OVERNIGHT_BLAS_CHOSEN"


def preload_env(env: dict[str, str], setting: str) -> tuple[dict[str, str], str]:
    """`env` for a process that will import MLX, with OpenBLAS in LD_PRELOAD as `setting`
    says, and what was done: "preloaded", "disabled" (setting "false"), "missing" (the
    library is not installed), "not linux". Marks the environment as chosen (CHOSEN_ENV)."""
    env = dict(env)
    env[CHOSEN_ENV] = "1"
    if not sys.platform.startswith("linux"):
        return env, "not linux"
    if setting == "false":
        return env, "disabled"
    if not OPENBLAS.exists():
        return env, "missing"
    preload = env.get("LD_PRELOAD", "")
    if str(OPENBLAS) not in preload.split(":"):
        env["LD_PRELOAD"] = f"{OPENBLAS}:{preload}" if preload else str(OPENBLAS)
    return env, "preloaded"


def reexec_with_preload(setting: str) -> None:
    """`overnight train` started alone (no parent chose its BLAS): when `setting` wants
    OpenBLAS and this process was started without it, replace this process with the same
    command line with the preload (os.execve: same pid, same open files, nothing imported
    yet from MLX). Returns when nothing is to be done; OSError if the exec fails."""
    if os.environ.get(CHOSEN_ENV):
        return
    env, done = preload_env(dict(os.environ), setting)
    if done == "missing" and setting == "true":  # asked for, not there: say so, go on
        print(f"overnight train: supervisor.openblas is true but {OPENBLAS} is missing "
              "(apt-get install libopenblas0-pthread); MLX's own BLAS is used", file=sys.stderr)
    if done != "preloaded" or os.environ.get("LD_PRELOAD") == env["LD_PRELOAD"]:
        os.environ[CHOSEN_ENV] = "1"  # for the processes this one starts
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def loaded() -> str:
    """The BLAS library mapped into this process: OpenBLAS's path when it is loaded, else
    "bundled" (what the mlx wheel links: Accelerate on macOS, its own build on Linux).
    Linux reads /proc/self/maps; elsewhere "bundled"."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libopenblas" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return "bundled"
