"""How a set of data-file lines is named in messages, logs and the report.

    describe_lines(Path("data/train.jsonl"), [8, 3, 9, 10, 40]) == "train.jsonl:3,8-10,40"

The worker names skipped lines and a failing batch's lines this way (worker/jsonl_index.py);
the morning report names them the same way from the worker's events.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def describe_lines(path: Path, line_numbers: Iterable[int], most: int = 24) -> str:
    """ "train.jsonl:3,8-11,40" — sorted, runs joined, at most `most` runs then "+N more".

    `line_numbers` are 1-based file line numbers; the file is named by its base name.
    """
    nums = sorted(set(line_numbers))
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:most])
    if len(runs) > most:
        text += f" (+{sum(b - a + 1 for a, b in runs[most:])} more lines)"
    return f"{path.name}:{text}"
