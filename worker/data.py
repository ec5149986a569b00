"""Training and validation data in mlx_lm's JSONL formats, with per-example weights.

Formats (detected from the first well-formed line, as mlx_lm does):
    {"text": "..."}                                   plain text
    {"prompt": "...", "completion": "..."}            completions (chat template applied)
    {"messages": [{"role": ..., "content": ...}]}     chat (chat template applied)
Tokenisation is mlx_lm's own (`mlx_lm.tuner.datasets.create_dataset`).

One pass over the file builds an index: the byte offset of every well-formed line, a length
proxy for batching, and the example's loss weight. Malformed lines (bad JSON, wrong format,
bad weight fields) are skipped and counted with their line numbers; a file that is mostly
malformed is an error. In streaming mode only that index is in memory and examples are read
and tokenised on demand, so corpora larger than memory work; otherwise every example is
tokenised once up front and lengths are exact.

Per-example weights (the "distrust" term). Optional fields `auth_weight` in [0, 0.99] and
`prov_entropy` >= 0 give

    d_i = alpha * (ln(1 - auth_weight_i + 1e-8) + prov_entropy_i) ** 2      (alpha = 2.7)
    d_i <- d_i / mean(d)                                                    (mean 1 over the file)
    w_i = 1 + lambda_weight * d_i

and the training loss is the w-weighted mean of token cross-entropies,
sum_i w_i * sum_t ce_it / sum_i w_i * n_i, so low-authority, high-entropy sources pull harder
on the gradient. lambda_weight = 0 gives w = 1: plain token-mean cross-entropy.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from shared.config import Config
from shared.errors import DataError

MAX_REPORTED_LINES = 20


@dataclass
class ScanReport:
    path: Path
    total_lines: int = 0
    good: int = 0
    malformed: int = 0
    blank: int = 0
    examples: list[str] = field(default_factory=list)  # "line 12: reason", first few

    def note(self, line_no: int, reason: str) -> None:
        self.malformed += 1
        if len(self.examples) < MAX_REPORTED_LINES:
            self.examples.append(f"line {line_no}: {reason}")


def _format_of(record: dict[str, Any], c: Config) -> str | None:
    if c.prompt_feature in record and c.completion_feature in record:
        return "completions"
    if c.chat_feature in record:
        return "chat"
    if c.text_feature in record:
        return "text"
    return None


def _check_record(record: Any, fmt: str | None, c: Config) -> str | None:
    """Why this record is malformed, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    this = _format_of(record, c)
    if this is None:
        return (f"expected a {c.text_feature!r}, {c.prompt_feature!r}/{c.completion_feature!r} "
                f"or {c.chat_feature!r} field")
    if fmt is not None and this != fmt:
        return f"expected {fmt} format like the first line, got {this}"
    if this == "text" and (not isinstance(record[c.text_feature], str)
                           or not record[c.text_feature].strip()):
        return f"{c.text_feature!r} must be a non-empty string"
    if this == "completions" and not (isinstance(record[c.prompt_feature], str)
                                      and isinstance(record[c.completion_feature], str)):
        return "prompt and completion must be strings"
    if this == "chat":
        msgs = record[c.chat_feature]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
            for m in msgs
        ):
            return f"{c.chat_feature!r} must be a non-empty list of {{role, content}} objects"
    aw = record.get("auth_weight", 0.0)
    if isinstance(aw, bool) or not isinstance(aw, (int, float)) or not 0 <= aw <= 0.99:
        return f"auth_weight must be a number in [0, 0.99], got {aw!r}"
    pe = record.get("prov_entropy", 0.0)
    if isinstance(pe, bool) or not isinstance(pe, (int, float)) or not (pe >= 0 and
                                                                         math.isfinite(pe)):
        return f"prov_entropy must be a finite number >= 0, got {pe!r}"
    return None


def distrust(auth_weight: float, prov_entropy: float, alpha: float) -> float:
    return alpha * (math.log(1.0 - auth_weight + 1e-8) + prov_entropy) ** 2


@dataclass
class JsonlIndex:
    """Offsets, byte lengths and raw distrust values of the well-formed lines of a file."""

    path: Path
    fmt: str
    offsets: np.ndarray  # int64 byte offset of each good line
    nbytes: np.ndarray  # int64 byte length of each good line
    raw_distrust: np.ndarray  # float64
    report: ScanReport
    fingerprint: str

    def __len__(self) -> int:
        return len(self.offsets)


def scan(path: Path, c: Config) -> JsonlIndex:
    report = ScanReport(path)
    offsets: list[int] = []
    lengths: list[int] = []
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
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                report.note(line_no, f"invalid JSON ({e.msg if hasattr(e, 'msg') else e})")
                continue
            problem = _check_record(record, fmt, c)
            if problem is not None:
                report.note(line_no, problem)
                continue
            if fmt is None:
                fmt = _format_of(record, c)
            offsets.append(start)
            lengths.append(len(raw))
            dvals.append(distrust(float(record.get("auth_weight", 0.0)),
                                  float(record.get("prov_entropy", 0.0)), alpha))
            report.good += 1
    non_blank = report.total_lines - report.blank
    if report.good == 0:
        first = f" ({report.examples[0]})" if report.examples else ""
        raise DataError(f"{path}: no usable examples in {non_blank} lines{first}")
    if report.malformed > c.training.max_malformed_fraction * non_blank:
        raise DataError(
            f"{path}: {report.malformed} of {non_blank} lines are malformed "
            f"(more than {c.training.max_malformed_fraction:.0%}); first: {report.examples[0]}"
        )
    assert fmt is not None
    return JsonlIndex(path, fmt, np.array(offsets, np.int64), np.array(lengths, np.int64),
                      np.array(dvals, np.float64), report, digest.hexdigest()[:16])


class _LazyRecords(Sequence):
    """The well-formed records of a file, read from disk by offset on access."""

    def __init__(self, index: JsonlIndex):
        self.index = index
        self._f = open(index.path, "rb")  # noqa: SIM115 - lives as long as the dataset

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        self._f.seek(int(self.index.offsets[i]))
        return json.loads(self._f.readline())


class Examples:
    """Tokenised examples: (tokens, prompt offset, weight); lengths for batching.

    `lengths` are exact token counts when not streaming, byte lengths (a proxy that keeps
    similar lengths together) when streaming.
    """

    def __init__(self, index: JsonlIndex, tokenizer: Any, c: Config, streaming: bool,
                 lambda_weight: float):
        from mlx_lm.tuner.datasets import create_dataset

        self.index = index
        self.streaming = streaming
        records: Sequence = _LazyRecords(index) if streaming else [
            r for r in _LazyRecords(index)
        ]
        ns = SimpleNamespace(
            mask_prompt=c.mask_prompt, prompt_feature=c.prompt_feature,
            completion_feature=c.completion_feature, text_feature=c.text_feature,
            chat_feature=c.chat_feature,
        )
        try:
            self._dataset = create_dataset(records, tokenizer, ns)
        except ValueError as e:
            raise DataError(f"{index.path}: {e}") from None
        mean = float(index.raw_distrust.mean())
        d = index.raw_distrust / mean if mean > 0 else np.zeros_like(index.raw_distrust)
        self.weights = (1.0 + lambda_weight * d).astype(np.float32)
        self._cache: list[tuple[list[int], int]] | None = None
        if streaming:
            self.lengths = index.nbytes.copy()
        else:
            self._cache = [self._process(i) for i in range(len(index))]
            self.lengths = np.array([len(t) for t, _ in self._cache], np.int64)

    def _process(self, i: int) -> tuple[list[int], int]:
        try:
            tokens, offset = self._dataset.process(self._dataset[i])
        except Exception as e:  # mlx_lm/tokenizer errors on one record: name the line
            raise DataError(f"{self.index.path}: example {i} could not be tokenised: {e}") from None
        return list(tokens), int(offset)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int) -> tuple[list[int], int, float]:
        tokens, offset = self._cache[i] if self._cache is not None else self._process(i)
        return tokens, offset, float(self.weights[i])


def find_valid_file(data_dir: Path) -> Path | None:
    for name in ("valid.jsonl", "val.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def use_streaming(path: Path, c: Config) -> bool:
    mode = c.training.streaming
    if mode == "auto":
        return path.stat().st_size > c.training.streaming_threshold_mb * 1024 * 1024
    return mode == "true"


def load_split(path: Path, tokenizer: Any, c: Config, lambda_weight: float) -> Examples:
    index = scan(path, c)
    return Examples(index, tokenizer, c, use_streaming(path, c), lambda_weight)
