"""Reading the end of a file that another process may still be writing.

One definition for the three readers: the supervisor's look at an attempt's last output
(stderr tail) and at the last step in logs/metrics.jsonl, and `overnight status`'s progress
line from the newest metrics and events.
"""

from __future__ import annotations

import os
from pathlib import Path


def tail_lines(path: Path, max_bytes: int) -> list[bytes]:
    """The lines in the last `max_bytes` of `path`, oldest first.

    When the window starts inside a line, that cut line is dropped; a last line still being
    written (no newline yet) is kept: readers decide whether it is whole. [] when the file
    cannot be read (missing, not yet created).
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
            cut = False
            if start > 0:
                f.seek(start - 1)
                cut = f.read(1) != b"\n"
    except OSError:
        return []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines[1:] if cut else lines
