"""The data directory: which file holds which split, checked before anything is loaded.

mlx_lm reads `DATA/train.jsonl`, `valid.jsonl` and `test.jsonl`
(`mlx_lm.tuner.datasets.load_local_dataset`); `val.jsonl` is taken for the validation split
too (the trainer this project grew from). Each problem is one line (DataError, exit 78):

- `data:` names a file, not the directory that holds the splits;
- train.jsonl is missing; test.jsonl is missing with `test: true`;
- a split's name is taken by something that is not a file: a directory, a broken symbolic
  link, a socket. `mlx_lm lora` stops there with a traceback (IsADirectoryError). It is
  never taken for "no such file": a `valid.jsonl/` directory does not silently mean a night
  without validation.

No validation file at all is a run without validation, as in mlx_lm (early stopping then
watches the smoothed training loss). A split file with no example in it (empty, or only
blank lines) is found when it is read (`load_splits`, worker/jsonl_index.py), and so is a
training set smaller than the batch (worker/batching.py `check_size`) and, streaming, a
validation or test file with no usable row among those an evaluation uses
(`require_usable`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shared.config import Config
from shared.errors import DataError

log = structlog.get_logger("worker")

VALID_NAMES = ("valid.jsonl", "val.jsonl")


@dataclass(frozen=True)
class DataFiles:
    """The split files of a run's data directory."""

    directory: Path
    train: Path
    valid: Path | None  # None: no validation file (a run without validation)
    test: Path | None  # None unless `test: true`


def locate(c: Config) -> DataFiles:
    """The split files for config `c`; DataError (one line) for the problems above."""
    directory = Path(c.data).expanduser()
    if directory.is_file():
        raise DataError(
            f"data: {directory} is a file; expected the directory that holds train.jsonl "
            f"(valid.jsonl, test.jsonl), e.g. data: {directory.parent}"
        )
    test = directory / "test.jsonl"
    if c.test and not is_data_file(test, "the test split"):
        raise DataError(
            f"test: true but {test} not found (mlx_lm's test pass reads "
            "test.jsonl; add it or set test: false)"
        )
    train = directory / "train.jsonl"
    if not is_data_file(train, "the training split"):
        raise DataError(f"data: {train} not found")
    return DataFiles(directory, train, find_valid_file(directory), test if c.test else None)


def find_valid_file(data_dir: Path) -> Path | None:
    """valid.jsonl, else val.jsonl, else None; DataError when the first of them that is
    there is not a file."""
    for name in VALID_NAMES:
        if is_data_file(data_dir / name, "the validation split"):
            return data_dir / name
    return None


def is_data_file(path: Path, role: str) -> bool:
    """True for a file (or a link to one), False when nothing has that name; DataError
    naming what is there instead."""
    if path.is_file():
        return True
    if not path.is_symlink() and not path.exists():
        return False
    if path.is_dir():
        what = "a directory"
    elif path.is_symlink():
        what = f"a symbolic link to {os.readlink(path)}, which does not exist"
    else:
        what = "not a regular file"
    raise DataError(
        f"{path} is {what}: expected {role} as a JSONL file (one example per line)"
        + (" or nothing at all (no validation)" if role == "the validation split" else "")
    )


def load_splits(files: DataFiles, tokenizer: Any, c: Config,
                use: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """The training, validation and test examples (worker/data.py `Examples`; None for a
    split not used), each logged once at load. `use`: the streaming counts of the
    checkpoint's run (trainer_state "data" "use"), continued. DataError for a file that
    cannot be used, or a training set smaller than batch_size."""
    from worker.batching import check_size
    from worker.data import load_split

    train = load_split(files.train, tokenizer, c, c.training.lambda_weight)
    if use is not None:
        train.restore({"use": use})
    train.log_loaded()  # skipped lines and truncation
    note = check_size(len(train), c.batch_size, c.effective_batch, files.train)
    if note:
        log.warning("effective_batch_above_data", detail=note)
        print(f"overnight train: {note}", file=sys.stderr, flush=True)
    valid = None
    if files.valid is None:  # mlx_lm refuses this; we train on, but say so (a misnamed file?)
        why = (f"no valid.jsonl or val.jsonl in {files.directory}: training without validation "
               "(early stopping and the best checkpoint follow the smoothed training loss)")
        log.warning("validation_skipped", reason=why)
        print(f"overnight train: {why}", file=sys.stderr, flush=True)
    elif c.val_batches == 0:
        log.info("validation_skipped", reason="val_batches: 0")
    else:
        valid = load_split(files.valid, tokenizer, c, 0.0)
        valid.log_loaded()
    test = None
    if files.test is not None:
        test = load_split(files.test, tokenizer, c, 0.0)
        test.log_loaded()
    return train, valid, test


def require_usable(examples: Any, subset: Any, what: str) -> int:
    """Streaming reads validation and test rows only when it evaluates them: read the rows
    an evaluation uses now (`subset`, int64 indices), so a file with none usable is one line
    at load as in memory, not a NaN loss at every evaluation, and their counts (skipped
    lines, truncation) reach the log and the report. Returns how many are usable; raises
    DataError naming the file and the first unusable line."""
    usable = len(examples.fetch(subset))  # count=None: each row counted once per process
    examples.log_progress()
    if usable == 0:
        first = examples.summary()["first_problems"]
        raise DataError(
            f"{examples.index.path}: no usable examples in the {len(subset)} {what} examples "
            "read" + (f" (first: {first[0]})" if first else "")
        )
    return usable
