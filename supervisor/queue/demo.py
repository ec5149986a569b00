"""`overnight demo --queue`: a night of two jobs in under a minute, then their comparison.

    overnight demo --queue                  # in a new temporary directory (printed)
    overnight demo --queue --keep ~/od-q    # ... in ~/od-q (model/, data/, demo.yaml, queue/)

The demo's tiny model and corpus (supervisor/morning/demo.py `prepare`), then what a user
types: `overnight queue add demo.yaml --sweep learning_rate=...` (two jobs), `overnight
queue` (the list), `overnight run --queue` (the jobs one after another, each a supervised
run; its lines are shown as they come; each job has an injected crash, which its supervisor
survives), and `overnight report --queue` (verdicts, the table, the picture, the
best job). Every step is the real command as a separate process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.errors import ConfigError, OvernightError
from supervisor.morning.verdict import duration

ITERS = 60
LEARNING_RATES = "1e-3,3e-3"
TIMEOUT = 300.0


def _overnight(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=cwd,
                          capture_output=True, text=True, check=False)


def main(args: argparse.Namespace, base: Path, prepare: Callable[[Path, int, str], Path]
         ) -> int:
    """The queue demo in `base`; `prepare(base, iters, inject)` builds the model, corpus and
    demo.yaml (supervisor/morning/demo.py's)."""
    started = time.time()
    out = sys.stdout
    queue = base / "queue"
    if (queue / "queue.json").exists():
        raise ConfigError(f"{queue}: already holds a queue; choose another --keep directory "
                          "or remove it")
    iters = args.iters if args.iters != 200 else ITERS
    print(f"demo: {base}\ndemo: building a tiny model and a corpus", file=out)
    step = max(2, iters // 2)
    prepare(base, iters, f"crash@{step}")  # each job crashes once; its supervisor recovers
    for cmd in (["queue", "add", "demo.yaml", "--name", "demo", "--sweep",
                 f"learning_rate={LEARNING_RATES}", "--queue", "queue"],
                ["queue", "--queue", "queue"]):
        print(f"\n$ overnight {' '.join(cmd)}", file=out)
        done = _overnight(*cmd, cwd=base)
        print((done.stdout + done.stderr).rstrip(), file=out)
        if done.returncode != 0:
            raise OvernightError(f"demo: `overnight {' '.join(cmd)}` failed")
    print(f"\n$ overnight run --queue queue      # (each job has an injected crash at step "
          f"{step})", file=out)
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--queue", "queue"],
                            cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if line.startswith("overnight queue:"):
                print(f"[{duration(time.time() - started):>6}] {line.rstrip()}", file=out,
                      flush=True)
        proc.wait(TIMEOUT)
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    print("\n$ overnight report --queue queue", file=out)
    done = _overnight("report", "--queue", "queue", cwd=base)
    print((done.stdout + done.stderr).rstrip(), file=out)
    print(f"\ndemo: a night of two jobs in {duration(time.time() - started)}", file=out)
    return 0 if proc.returncode == 0 and done.returncode == 0 else 1
