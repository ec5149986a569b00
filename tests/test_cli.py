"""shared/cli.py: one `overnight` command line for both programs, reachable under every name
something starts it by: `overnight`, `python -m supervisor.cli` (the service files
`overnight install` writes), `python -m worker` (the supervisor's workers, the worker's
commands only) and `python -m supervisor.daemon` (the run command alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL = ["demo", "run", "queue", "train", "status", "stop", "checkpoints", "logs", "report",
       "compare", "install", "uninstall", "services", "import-gguf", "tiny-model"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("module", ["shared.cli", "supervisor.cli"])
def test_every_command_is_offered_under_both_names(module):
    done = run("-m", module, "--help")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == ALL


def test_the_installed_service_command_line_still_parses():
    done = run("-m", "supervisor.cli", "run", "--help")
    assert done.returncode == 0 and "--run-dir" in done.stdout


def test_python_m_worker_offers_the_workers_commands_only():
    done = run("-m", "worker", "--help")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "import-gguf" in done.stdout
    refused = run("-m", "worker", "status")
    assert refused.returncode == 78 and "invalid choice: 'status'" in refused.stderr
    assert "--validated" in run("-m", "worker", "train", "--help").stdout


def test_python_m_supervisor_daemon_is_the_run_command():
    done = run("-m", "supervisor.daemon", "--help")
    assert done.returncode == 0 and "--run-dir" in done.stdout
