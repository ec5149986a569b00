"""Training and validation data in mlx_lm's JSONL formats, with per-example weights.

Formats (detected from the first well-formed line, as mlx_lm does):
    {"text": "..."}                                   plain text
    {"prompt": "...", "completion": "..."}            completions (chat template applied)
    {"messages": [{"role": ..., "content": ...}]}     chat (chat template applied)
Chat and completions rows may carry a top-level `"tools"` list, which mlx_lm passes to the
chat template; chat rows may hold OpenAI-style tool calling (an assistant turn with
`tool_calls` and no `content`, a `tool` turn with `tool_call_id`). Tokenisation is mlx_lm's
own (`mlx_lm.tuner.datasets.create_dataset`), and it is the judge of a row: a row is used
when the model's tokenizer and chat template turn it into tokens, whatever its shape; our
own checks are only the format (which key holds the example) and our weight fields.

A row is skipped, counted and named by its file line ("line 21: ...") when it is not JSON,
not in the file's format, has bad weight fields, cannot be tokenised (the template raises,
or a string holds a lone UTF-16 surrogate such as "\\ud83e" that no tokenizer accepts), or
has no target tokens left: with `mask_prompt`, a prompt that fills `max_seq_length` leaves
nothing to learn, and a batch of such rows would be a loss of 0/0. A file with more than
`training.max_malformed_fraction` of its lines unusable is an error.

Examples longer than `max_seq_length` are cut to it, as mlx_lm does; how many, and the
longest length, are logged once at load (`data_truncated`, a warning) and kept in every
checkpoint's trainer_state.json ("data") for the morning report.

Two loading modes (`training.streaming`):
- in memory: every row is tokenised once at load, so every check above happens before
  training and the lengths used for batching are exact token counts;
- streaming (files larger than memory): only the index of worker/jsonl_index.py (byte
  offset, line number, byte length as the length proxy, weight) is in memory, and rows are
  tokenised when a batch needs them.
  Rows that fail there are dropped from their batch — deterministically, since the same row
  always fails the same way, so exact resume holds — and a batch left empty is skipped
  (worker/train.py). Counts are kept as the first epoch is read (persisted in checkpoints,
  so a resumed run continues them) and are complete once a whole epoch has been read;
  until then the report says how many examples were read.

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

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import structlog

from shared.config import Config
from shared.errors import DataError
from worker.batching import target_count
from worker.jsonl_index import (  # noqa: F401 - scan, describe_lines: part of this API
    MAX_REPORTED_LINES,
    JsonlIndex,
    LazyRecords,
    ScanReport,
    check_enough,
    describe_lines,
    distrust,
    scan,
)

log = structlog.get_logger("worker")


def _surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in any string of a JSON value, as "\\udXXX"."""
    if isinstance(value, str):
        for ch in value:
            if 0xD800 <= ord(ch) <= 0xDFFF:
                return f"\\u{ord(ch):04x}"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for v in items:
        found = _surrogate(v)
        if found:
            return found
    return None


@dataclass
class UseCounts:
    """What streaming learns while reading the first epoch (persisted in checkpoints)."""

    seen: int = 0  # usable examples read
    malformed: int = 0
    no_targets: int = 0
    truncated: int = 0
    longest: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> UseCounts:
        if not isinstance(d, dict):
            return cls()
        ints = {
            k: int(d.get(k) or 0)
            for k in ("seen", "malformed", "no_targets", "truncated", "longest")
        }
        problems = [str(x) for x in d.get("problems") or []][:MAX_REPORTED_LINES]
        return cls(**ints, problems=problems)


Example = tuple[list[int], int, float]  # (tokens, prompt offset, weight)


@dataclass(frozen=True)
class Problem:
    """Why a row that scanned well cannot be trained on."""

    no_targets: bool  # False: it could not be tokenised (a malformed line)
    reason: str


class Examples:
    """Tokenised examples: (tokens, prompt offset, weight); lengths for batching.

    `lengths` are exact token counts when not streaming, byte lengths (a proxy that keeps
    similar lengths together) when streaming. Raises DataError for an unusable file.
    """

    def __init__(
        self, index: JsonlIndex, tokenizer: Any, c: Config, streaming: bool, lambda_weight: float
    ):
        from mlx_lm.tuner.datasets import create_dataset

        self.streaming = streaming
        self.max_seq_length = c.max_seq_length
        self.use = UseCounts()
        self._logged: dict[str, Any] = {}
        self._truncation_warned = False
        self._read: np.ndarray | None = None  # bool [n]: read by this process (count=None)
        lazy = LazyRecords(index)
        records: Sequence = lazy if streaming else list(lazy)
        ns = SimpleNamespace(
            mask_prompt=c.mask_prompt,
            prompt_feature=c.prompt_feature,
            completion_feature=c.completion_feature,
            text_feature=c.text_feature,
            chat_feature=c.chat_feature,
        )
        if c.mask_prompt and index.fmt == "text":  # mlx_lm: a bare ValueError saying so
            raise DataError(
                f"{index.path}: mask_prompt: true needs a prompt, and this file is text data "
                f"({c.text_feature!r} rows); use completions ({c.prompt_feature!r}/"
                f"{c.completion_feature!r}) or chat ({c.chat_feature!r}) rows, or set "
                "mask_prompt: false"
            )
        try:
            self._dataset = create_dataset(records, tokenizer, ns)
        except ValueError as e:
            raise DataError(f"{index.path}: {e}") from None
        self._cache: list[tuple[list[int], int]] | None = None
        self.index = index
        if streaming:
            self.lengths = index.nbytes.copy()
        else:
            lazy.close()
            self._load_all(records, c)
        mean = float(self.index.raw_distrust.mean())
        d = self.index.raw_distrust / mean if mean > 0 else np.zeros_like(self.index.raw_distrust)
        self.weights = (1.0 + lambda_weight * d).astype(np.float32)

    # ------------------------------------------------------------------ checks
    def _tokenise(self, record: Any) -> tuple[list[int], int] | Problem:
        """(tokens, prompt offset), or why the row is unusable."""
        try:
            tokens, offset = self._dataset.process(record)
            tokens, offset = list(tokens), int(offset)
        except Exception as e:  # mlx_lm, the tokenizer or the chat template rejects the row
            lone = _surrogate(record)
            if lone:
                return Problem(
                    False,
                    f"cannot be tokenised: a string holds the lone UTF-16 "
                    f"surrogate {lone}, which is not valid Unicode text",
                )
            msg = " ".join(str(e).split())[:200]
            return Problem(False, f"cannot be tokenised ({type(e).__name__}: {msg})")
        if target_count(len(tokens), offset, self.max_seq_length) == 0:
            if offset > 0 and offset >= min(len(tokens), self.max_seq_length):
                return Problem(
                    True,
                    f"no target tokens: the prompt is {offset} of "
                    f"{len(tokens)} tokens and max_seq_length is "
                    f"{self.max_seq_length} (mask_prompt)",
                )
            return Problem(True, f"no target tokens: the example is {len(tokens)} token(s)")
        return tokens, offset

    def _load_all(self, records: list[Any], c: Config) -> None:
        report = self.index.report
        cache: list[tuple[list[int], int]] = []
        keep: list[int] = []
        for i, record in enumerate(records):
            got = self._tokenise(record)
            if isinstance(got, Problem):
                line = int(self.index.lines[i])
                (report.note_no_targets if got.no_targets else report.note)(line, got.reason)
                continue
            cache.append(got)
            keep.append(i)
        check_enough(report, c)
        self.index = self.index.subset(np.array(keep, np.int64))
        self._cache = cache
        self._dataset = None  # the rows are tokenised; the records are not needed again
        self.lengths = np.array([len(t) for t, _ in cache], np.int64)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int) -> Example:
        """Example i; raises DataError (naming its line) if streaming finds it unusable."""
        if self._cache is not None:
            tokens, offset = self._cache[i]
            return tokens, offset, float(self.weights[i])
        got = self._tokenise(self._dataset[i])
        if isinstance(got, Problem):
            raise DataError(f"{self.index.path}:{int(self.index.lines[i])}: {got.reason}")
        return got[0], got[1], float(self.weights[i])

    def fetch(
        self,
        indices: Iterable[int],
        count: bool | None = None,
    ) -> list[tuple[int, Example]]:
        """The usable examples among `indices`, in order, as (index, example).

        In memory every example is usable (the rest were skipped at load). Streaming drops
        the unusable ones and, when `count`, counts them, the truncated ones and the longest
        length, and logs each skipped line. The training loop counts the first epoch (so the
        counts a checkpoint holds continue exactly after a resume); `count=None` counts each
        example the first time this process reads it (validation).
        """
        out = []
        for i in map(int, indices):
            if self._cache is not None:
                out.append((i, self.get(i)))
                continue
            counted = count
            if count is None:
                if self._read is None:
                    self._read = np.zeros(len(self), bool)
                counted, self._read[i] = not self._read[i], True
            got = self._tokenise(self._dataset[i])
            if isinstance(got, Problem):
                if counted:
                    self._count_problem(i, got)
                continue
            tokens, offset = got
            if counted:
                self._count_use(len(tokens))
            out.append((i, (tokens, offset, float(self.weights[i]))))
        return out

    def _count_problem(self, i: int, problem: Problem) -> None:
        line = int(self.index.lines[i])
        if problem.no_targets:
            self.use.no_targets += 1
        else:
            self.use.malformed += 1
        if len(self.use.problems) < MAX_REPORTED_LINES:
            self.use.problems.append(f"line {line}: {problem.reason}")
            log.warning(
                "data_line_skipped",
                path=str(self.index.path),
                line=line,
                reason=problem.reason,
                streaming=True,
            )

    def _count_use(self, n_tokens: int) -> None:
        self.use.seen += 1
        self.use.longest = max(self.use.longest, n_tokens)
        if n_tokens > self.max_seq_length:
            self.use.truncated += 1
            if not self._truncation_warned:
                self._truncation_warned = True
                log.warning("data_truncated", **self._truncation())

    # ------------------------------------------------------------------ what we know
    @property
    def lengths_known(self) -> bool:
        """True when every example's token length is known (always in memory; streaming
        once the first epoch has been read)."""
        return not self.streaming or (
            self.use.seen + self.use.malformed + self.use.no_targets >= len(self)
        )

    @property
    def in_memory(self) -> bool:
        """True when every example is tokenised in memory: `fetch` then has no side effect
        (no counting, no logging), so a batch may be fetched ahead of its step."""
        return self._cache is not None

    def _truncation(self) -> dict[str, Any]:
        if self._cache is not None:
            truncated = int((self.lengths > self.max_seq_length).sum())
            longest = int(self.lengths.max()) if len(self.lengths) else 0
        else:
            truncated, longest = self.use.truncated, self.use.longest
        return {
            "path": str(self.index.path),
            "examples": truncated,
            "longest": longest,
            "max_seq_length": self.max_seq_length,
            "streaming": self.streaming,
            "lengths_known": self.lengths_known,
        }

    def summary(self) -> dict[str, Any]:
        """Counts for logs, trainer_state.json ("data") and the report (supervisor/runfacts)."""
        r = self.index.report
        t = self._truncation()
        out = {
            "path": str(r.path),
            "examples": len(self),
            "malformed": r.malformed + self.use.malformed,
            "no_targets": r.no_targets + self.use.no_targets,
            "blank": r.blank,
            "truncated": t["examples"],
            "longest": t["longest"],
            "max_seq_length": self.max_seq_length,
            "lengths_known": t["lengths_known"],
            "first_problems": (r.examples + self.use.problems)[:5],
            "format": self.index.fmt,
            "streaming": self.streaming,
        }
        if self.streaming:
            out["examples_read"] = self.use.seen
            out["use"] = self.use.to_dict()
        return out

    def restore(self, stored: Any) -> None:
        """Continue the streaming counts of a checkpoint's run (its summary()["use"])."""
        if self.streaming and isinstance(stored, dict):
            self.use = UseCounts.from_dict(stored.get("use"))
            self._truncation_warned = self.use.truncated > 0

    def log_loaded(self) -> None:
        """One event at load (`data_loaded`, or `data_lines_skipped` as a warning), and the
        truncation warning once when lengths are known and some exceed max_seq_length."""
        s = self.summary()
        s.pop("use", None)
        skipped = s["malformed"] + s["no_targets"]
        (log.warning if skipped else log.info)(
            "data_lines_skipped" if skipped else "data_loaded", **s
        )
        if s["truncated"] and not self.streaming:
            self._truncation_warned = True
            log.warning("data_truncated", **self._truncation())
        self._logged = s

    def log_progress(self) -> None:
        """Streaming: the counts so far (`data_seen`), when they changed since last logged."""
        if not self.streaming:
            return
        s = self.summary()
        s.pop("use", None)
        if s != self._logged:
            log.info("data_seen", **s)
            self._logged = s


def use_streaming(path: Path, c: Config) -> bool:
    mode = c.training.streaming
    if mode == "auto":
        return path.stat().st_size > c.training.streaming_threshold_mb * 1024 * 1024
    return mode == "true"


def load_split(path: Path, tokenizer: Any, c: Config, lambda_weight: float) -> Examples:
    index = scan(path, c)
    return Examples(index, tokenizer, c, use_streaming(path, c), lambda_weight)
