"""The supervisor: three products, one sub-package each.

    daemon/    `overnight run`: keeps one worker alive through the night and records why
               each attempt ended (run.json)
    morning/   reading a run afterwards: `overnight status | logs | report | demo`
    service/   `overnight install | uninstall | services`: the run as a launchd/systemd job

No MLX here, and nothing from worker/: the worker is a separate process
(`python -m worker train ...`). `python -m supervisor.cli` is the `overnight` command line.
"""
