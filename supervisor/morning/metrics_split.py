"""logs/metrics.jsonl parsed on two cores: the file's tail by a helper process while this one
reads the worker log and parses the head.

Parsing is most of what `overnight report` does on a long night (a 1M-step night: ~450 MB
of metrics lines, ~5 s of orjson and column building on one core of this machine, against
~2 s for the worker log and ~3 s for the picture). The pieces are folded in file order
(metrics_summary.summarize), but parsing them does not depend on order, so:

- `start` picks a split at a line start so that both sides finish together (COST_PER_LOG_BYTE,
  HELPER_START_BYTES: this process also reads the worker log and, for a report, draws) and
  starts `python -m supervisor.morning.metrics_split FILE SPLIT OUT`, which parses
  [SPLIT, end of file) with metrics_table.pieces and writes each piece's columns to OUT;
- `Split.pieces` yields this side's pieces of [0, SPLIT), then the helper's from OUT as they
  are written (polling while the helper runs), so the summary is the same as one process's,
  piece for piece (tests/test_metrics_split.py).

OUT is a temporary file of records: a 4-byte little-endian header length, a JSON header
(`n`, `unreadable`, `run_id`, `lines_expected`, `upto` — the file offset the piece's lines
end at — and `columns`: [name, dtype, bytes] in order), then the columns' raw bytes; a
header `{"end": true}` ends it. No pickle; only numbers and names cross. Anything amiss (the
helper cannot start, dies, writes a torn record) and this process parses from the last
offset the helper covered: a missing helper costs time, never a line.

Below MIN_SPLIT_BYTES, on one core, or when OVERNIGHT_METRICS_SPLIT=0, one process reads it
all (the helper's start, ~0.3 s, would cost more than it saves).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from supervisor.morning.metrics_table import CHUNK_BYTES, Piece, pieces

MIN_SPLIT_BYTES = 32 << 20  # below this one process (a 70k-step night)
# What this process does besides parsing, in metrics bytes of the same CPU time (measured on
# this machine: 57 MB of worker log read in ~2 s, 450 MB of metrics parsed in ~5 s).
COST_PER_LOG_BYTE = 3.5
PARSE_BYTES_PER_S = 90 << 20  # metrics bytes one core parses a second (450 MB in ~5 s)
HELPER_START_BYTES = 30 << 20  # the helper's start and imports (~0.3 s)
POLL_S = 0.005
HELPER_STALL_S = 30.0  # a helper that writes nothing this long is stopped (a piece: ~10 ms)
_HEADER = struct.Struct("<I")
MAX_HEADER = 1 << 20


class Split:
    """One metrics file parsed in two processes (module docstring). Use as a context
    manager, or call close(): the helper is stopped and OUT removed however it ends."""

    def __init__(self, path: Path, split: int, helper: subprocess.Popen[bytes] | None,
                 out: Path | None) -> None:
        self.path, self.split, self.helper, self.out = path, split, helper, out
        self.from_helper = 0  # pieces the helper parsed (the rest: this process)

    def pieces(self) -> Iterator[Piece]:
        """The file's pieces in file order: [0, split) parsed here, then the helper's."""
        if self.split:
            yield from pieces(self.path, 0, self.split)
        covered = self.split
        if self.helper is not None and self.out is not None:
            try:
                with open(self.out, "rb") as f:
                    for piece in _records(f, self.helper):
                        if piece is None:  # its end record: it covered the file to its end
                            return
                        covered = piece.upto
                        self.from_helper += 1
                        yield piece
            except OSError:
                pass
        yield from pieces(self.path, covered)  # no helper, or it stopped short: here

    def close(self) -> None:
        if self.helper is not None:
            if self.helper.poll() is None:
                self.helper.kill()
            self.helper.wait()
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.unlink()

    def __enter__(self) -> Split:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(path: Path, other_bytes: int = 0, other_seconds: float = 0.0,
          min_bytes: int = MIN_SPLIT_BYTES) -> Split:
    """Start parsing `path`'s tail in a helper (module docstring). `other_bytes`: the worker
    log this process reads meanwhile (bytes); `other_seconds`: other work it does meanwhile
    (s, e.g. importing matplotlib); `min_bytes`: smaller files are read here alone. Never
    raises: without a helper, Split reads it all."""
    try:
        size = path.stat().st_size
    except OSError:
        return Split(path, 0, None, None)
    if (size < min_bytes or _cores() < 2
            or os.environ.get("OVERNIGHT_METRICS_SPLIT") == "0"):
        return Split(path, 0, None, None)
    busy = other_bytes * COST_PER_LOG_BYTE + other_seconds * PARSE_BYTES_PER_S
    target = int((size - busy + HELPER_START_BYTES) / 2)
    split = _piece_start(path, max(0, min(size, target)))
    if split >= size:
        return Split(path, 0, None, None)
    fd, name = tempfile.mkstemp(prefix="overnight-metrics-", suffix=".bin")
    os.close(fd)
    out = Path(name)
    try:
        helper = subprocess.Popen(
            [sys.executable, "-m", "supervisor.morning.metrics_split", str(path), str(split),
             str(out)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": _root_path()})
    except OSError:
        with contextlib.suppress(OSError):
            out.unlink()
        return Split(path, 0, None, None)
    return Split(path, split, helper, out)


def _cores() -> int:
    """The cores this process may run on: os.cpu_count() counts the machine's, also under
    `taskset` or a container's cpuset, where a helper would share this process's core."""
    cores = os.cpu_count() or 1
    with contextlib.suppress(AttributeError, OSError):  # no sched_getaffinity on macOS
        cores = min(cores, len(os.sched_getaffinity(0)))
    return cores


def _root_path() -> str:
    root = str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    return root if not old else f"{root}{os.pathsep}{old}"


def _piece_start(path: Path, at: int) -> int:
    """Where one process's pieces (metrics_table.pieces) would start a piece near byte `at`:
    after the last newline before the nearest multiple of CHUNK_BYTES. Both sides' pieces are
    then the one process's pieces, so every sum adds the same numbers in the same order."""
    m = round(at / CHUNK_BYTES)
    if m <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek((m - 1) * CHUNK_BYTES)
        block = f.read(CHUNK_BYTES)
    nl = block.rfind(b"\n")
    if len(block) < CHUNK_BYTES or nl < 0:  # past the end, or a line longer than a piece
        return _line_start(path, at)
    return (m - 1) * CHUNK_BYTES + nl + 1


def _line_start(path: Path, at: int) -> int:
    """The first line start at or after byte `at` (the file's size if none)."""
    if at <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(at - 1)
        while True:
            block = f.read(1 << 16)
            if not block:
                return f.tell()
            nl = block.find(b"\n")
            if nl >= 0:
                return f.tell() - len(block) + nl + 1


def _read_exact(f: IO[bytes], n: int, helper: subprocess.Popen[bytes]) -> bytes | None:
    """n bytes from f, waiting while the helper is still writing; None if it ended first or
    wrote nothing for HELPER_STALL_S (then it is stopped: this process parses the rest)."""
    got = b""
    waited_since = None
    while len(got) < n:
        chunk = f.read(n - len(got))
        if chunk:
            got += chunk
            waited_since = None
            continue
        if helper.poll() is not None:
            chunk = f.read(n - len(got))  # what it wrote just before it ended
            if not chunk:
                return None
            got += chunk
            continue
        now = time.monotonic()
        waited_since = now if waited_since is None else waited_since
        if now - waited_since > HELPER_STALL_S:
            helper.kill()
            helper.wait()
            return None
        time.sleep(POLL_S)
    return got


def _records(f: IO[bytes], helper: subprocess.Popen[bytes]) -> Iterator[Piece | None]:
    """The helper's pieces (each with the offset it ends at), then None for its end record;
    a torn or missing record just stops the iteration (no None)."""
    while True:
        raw = _read_exact(f, _HEADER.size, helper)
        if raw is None:
            return
        (length,) = _HEADER.unpack(raw)
        if length > MAX_HEADER:
            return
        body = _read_exact(f, length, helper)
        if body is None:
            return
        try:
            head = json.loads(body)
        except ValueError:
            return
        if head.get("end"):
            yield None
            return
        cols: dict[str, Any] = {}
        for name, dtype, nbytes in head["columns"]:
            data = _read_exact(f, int(nbytes), helper)
            if data is None:
                return
            cols[str(name)] = np.frombuffer(data, np.dtype(str(dtype))).copy()
        rid = head.get("run_id")
        yield Piece(cols, int(head["n"]), int(head["unreadable"]),
                    rid if isinstance(rid, str) else None, int(head["lines_expected"]),
                    int(head["upto"]))


def _write(out: IO[bytes], head: dict[str, Any], arrays: list[np.ndarray[Any, Any]]) -> None:
    body = json.dumps(head).encode()
    out.write(_HEADER.pack(len(body)) + body)
    for a in arrays:
        out.write(a.tobytes())


def helper_main(argv: list[str]) -> int:
    """The helper: parse FILE from byte SPLIT to its end into OUT (module docstring)."""
    path, split, out_path = Path(argv[0]), int(argv[1]), Path(argv[2])
    with open(out_path, "wb") as out:
        for piece in pieces(path, split):
            arrays = [np.ascontiguousarray(c) for c in piece.columns.values()]
            _write(out, {"n": piece.n, "unreadable": piece.unreadable, "run_id": piece.run_id,
                         "lines_expected": piece.lines_expected, "upto": piece.upto,
                         "columns": [[k, a.dtype.str, a.nbytes] for k, a
                                     in zip(piece.columns, arrays, strict=True)]}, arrays)
            out.flush()
        _write(out, {"end": True}, [])
    return 0


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
