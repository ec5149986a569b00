"""One pass over a JSONL data file: which lines are examples, and where they are.

`scan()` reads the file once and builds a `JsonlIndex`: the byte offset, line number, byte
length and raw distrust value (worker/data.py has the formula) of every line that is JSON in
the file's format (mlx_lm's, detected from the first well-formed line) with valid weight
fields. Other lines are counted and named in a `ScanReport` ("line 12: reason"); blank lines
are counted apart. Whether an indexed line tokenises is for worker/data.py to find out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared import strictjson
from shared.config import Config
from shared.datalines import describe_lines
from shared.errors import DataError

MAX_REPORTED_LINES = 20


@dataclass
class ScanReport:
    path: Path
    total_lines: int = 0
    good: int = 0
    malformed: int = 0
    blank: int = 0
    no_targets: int = 0  # rows skipped because no target token is left (see module doc)
    examples: list[str] = field(default_factory=list)  # "line 12: reason", first few

    def note(self, line_no: int, reason: str) -> None:
        self.malformed += 1
        self._example(line_no, reason)

    def note_no_targets(self, line_no: int, reason: str) -> None:
        self.no_targets += 1
        self._example(line_no, reason)

    def _example(self, line_no: int, reason: str) -> None:
        if len(self.examples) < MAX_REPORTED_LINES:
            self.examples.append(f"line {line_no}: {reason}")

    @property
    def unusable(self) -> int:
        return self.malformed + self.no_targets


def _format_of(record: dict[str, Any], c: Config) -> str | None:
    if c.prompt_feature in record and c.completion_feature in record:
        return "completions"
    if c.chat_feature in record:
        return "chat"
    if c.text_feature in record:
        return "text"
    return None


def _check_record(record: Any, fmt: str | None, c: Config) -> str | None:
    """Why this record is malformed, or None. Only what is ours to judge: the format (which
    key holds the example) and the weight fields; the tokenizer judges the rest."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    this = _format_of(record, c)
    if this is None:
        return (
            f"expected a {c.text_feature!r}, {c.prompt_feature!r}/{c.completion_feature!r} "
            f"or {c.chat_feature!r} field"
        )
    if fmt is not None and this != fmt:
        return f"expected {fmt} format like the first line, got {this}"
    if this == "text" and not isinstance(record[c.text_feature], str):
        return f"{c.text_feature!r} must be a string"
    if this == "chat" and not (isinstance(record[c.chat_feature], list) and record[c.chat_feature]):
        return f"{c.chat_feature!r} must be a non-empty list of messages"
    aw = record.get("auth_weight", 0.0)
    if isinstance(aw, bool) or not isinstance(aw, (int, float)) or not 0 <= aw <= 0.99:
        return f"auth_weight must be a number in [0, 0.99], got {aw!r}"
    pe = record.get("prov_entropy", 0.0)
    if (
        isinstance(pe, bool)
        or not isinstance(pe, (int, float))
        or not (pe >= 0 and math.isfinite(pe))
    ):
        return f"prov_entropy must be a finite number >= 0, got {pe!r}"
    return None


def distrust(auth_weight: float, prov_entropy: float, alpha: float) -> float:
    return alpha * (math.log(1.0 - auth_weight + 1e-8) + prov_entropy) ** 2


@dataclass
class JsonlIndex:
    """Offsets, line numbers, byte lengths and raw distrust values of the usable lines."""

    path: Path
    fmt: str
    offsets: np.ndarray  # int64 byte offset of each good line
    nbytes: np.ndarray  # int64 byte length of each good line
    raw_distrust: np.ndarray  # float64
    report: ScanReport
    fingerprint: str
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64, 1-based

    def __len__(self) -> int:
        return len(self.offsets)

    def subset(self, keep: np.ndarray) -> JsonlIndex:
        """The index of the rows at positions `keep` (int64, ascending)."""
        return dataclasses.replace(
            self,
            offsets=self.offsets[keep],
            nbytes=self.nbytes[keep],
            raw_distrust=self.raw_distrust[keep],
            lines=self.lines[keep],
        )

    def where(self, indices: Iterable[int]) -> str:
        """The file and line numbers of these examples, e.g. "train.jsonl:3,8-11"."""
        return describe_lines(self.path, [int(self.lines[int(i)]) for i in indices])


def check_enough(report: ScanReport, c: Config) -> None:
    non_blank = report.total_lines - report.blank
    usable = non_blank - report.unusable
    first = f" (first: {report.examples[0]})" if report.examples else ""
    if non_blank == 0:  # not "no usable examples in 0 lines"
        blank = f" ({report.blank} blank lines)" if report.blank else ""
        raise DataError(f"{report.path} is empty{blank}: expected one JSON example per line")
    if usable <= 0:
        raise DataError(f"{report.path}: no usable examples in {non_blank} lines{first}")
    if report.unusable > c.training.max_malformed_fraction * non_blank:
        what = "malformed" if report.no_targets == 0 else "unusable"
        raise DataError(
            f"{report.path}: {report.unusable} of {non_blank} lines are {what} "
            f"(more than {c.training.max_malformed_fraction:.0%}){first}"
        )


def scan(path: Path, c: Config) -> JsonlIndex:
    report = ScanReport(path)
    offsets: list[int] = []
    lengths: list[int] = []
    line_numbers: list[int] = []
    dvals: list[float] = []
    fmt: str | None = None
    digest = hashlib.sha256()
    alpha = c.training.distrust_alpha
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the loop is long
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        pos = 0
        for line_no, raw in enumerate(f, start=1):
            digest.update(raw)
            start, pos = pos, pos + len(raw)
            report.total_lines += 1
            if not raw.strip():
                report.blank += 1
                continue
            try:
                record = strictjson.loads(raw)
            except ValueError as e:  # strictjson: bad bytes, bad JSON, too deep, too long
                report.note(line_no, f"invalid JSON ({getattr(e, 'msg', e)})")
                continue
            problem = _check_record(record, fmt, c)
            if problem is not None:
                report.note(line_no, problem)
                continue
            if fmt is None:
                fmt = _format_of(record, c)
            offsets.append(start)
            lengths.append(len(raw))
            line_numbers.append(line_no)
            dvals.append(
                distrust(
                    float(record.get("auth_weight", 0.0)),
                    float(record.get("prov_entropy", 0.0)),
                    alpha,
                )
            )
            report.good += 1
    check_enough(report, c)
    assert fmt is not None
    return JsonlIndex(
        path,
        fmt,
        np.array(offsets, np.int64),
        np.array(lengths, np.int64),
        np.array(dvals, np.float64),
        report,
        digest.hexdigest()[:16],
        np.array(line_numbers, np.int64),
    )


class LazyRecords(Sequence):
    """The well-formed records of a file, read from disk by offset on access."""

    def __init__(self, index: JsonlIndex):
        self.index = index
        self._f = open(index.path, "rb")  # noqa: SIM115 - lives as long as the dataset

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        self._f.seek(int(self.index.offsets[i]))
        return strictjson.loads(self._f.readline())

    def close(self) -> None:
        self._f.close()
