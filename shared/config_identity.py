"""What a run trains, as far as its config says: the config hash stored in every checkpoint
(a resumed run must have the same one, worker/resume.py) and the keys that changed.

The hash covers `Config.to_dict()` (shared/config.py) minus what a resumed run may change
(`HASH_EXCLUDED`: the supervisor, logging and debug sections, the batch split, the learning
rate and its schedule, the step count, when to evaluate and save, where adapters and reports
go, mlx_lm's no-op keys; `NESTED_EXCLUDED`: training.streaming and training.compile). It is
computed from the dict, not from a Config, so that

- the validator (shared/checkpoint.py) can check a checkpoint's `config_hash` against the
  config stored beside it in trainer_state.json: a checkpoint whose hash does not match its
  own config is inconsistent, whatever the current config is;
- the worker can say which keys changed when a config no longer matches its checkpoints:
  only the hashed ones, nested, dotted — `lora_parameters.rank: 8 -> 16` — never keys the
  hash ignores (a changed `iters` is allowed) and never "(changed: [])".

    sha256(json.dumps(hashed_view(config), sort_keys=True))[:16]
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

HASH_EXCLUDED = (
    "supervisor", "logging", "debug", "steps_per_report", "batch_size",
    "grad_accumulation_steps", "grad_checkpoint", "adapter_path", "learning_rate",
    "lr_schedule", "iters", "checkpoints", "steps_per_eval", "save_every", "val_batches",
    "early_stopping", "grad_spike", "test", "test_batches", "report_to", "project_name",
    "clear_cache_threshold", "wired_limit", "train", "config", "distributed",
)
NESTED_EXCLUDED = {"training": ("streaming", "compile")}


class _Absent:
    """A key one of two configs does not have (a checkpoint from before the key existed)."""

    def __repr__(self) -> str:
        return "absent"


ABSENT: Any = _Absent()


def hashed_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config dict (Config.to_dict(), or trainer_state.json's "config") that
    identifies what is trained; a copy."""
    view = copy.deepcopy(dict(config))
    for key in HASH_EXCLUDED:
        view.pop(key, None)
    if "resume_adapter_file" in view and view["resume_adapter_file"] is None:
        del view["resume_adapter_file"]  # runs from before the key existed keep their hash
    for section, keys in NESTED_EXCLUDED.items():
        if isinstance(view.get(section), dict):
            for key in keys:
                view[section].pop(key, None)
    return view


def config_hash(config: Mapping[str, Any]) -> str:
    """The 16-hex-digit identity of what a config trains (module docstring)."""
    text = json.dumps(hashed_view(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every hashed key that differs, nested sections
    walked key by key, sorted; ABSENT for a key one side lacks."""
    found: list[tuple[str, Any, Any]] = []

    def walk(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key, ABSENT), b.get(key, ABSENT)
            if isinstance(x, Mapping) and isinstance(y, Mapping):
                walk(x, y, f"{prefix}{key}.")
            elif _json(x) != _json(y):  # as the hash sees them: (1, 2) == [1, 2]
                found.append((f"{prefix}{key}", x, y))

    walk(hashed_view(old), hashed_view(new), "")
    return found


def describe(found: list[tuple[str, Any, Any]]) -> str:
    """`lora_parameters.rank: 8 -> 16, model: "a" -> "b"` (values as JSON)."""
    return ", ".join(f"{key}: {_shown(x)} -> {_shown(y)}" for key, x, y in found)


def _json(value: Any) -> str:
    return "\0absent" if value is ABSENT else json.dumps(value, sort_keys=True)


def _shown(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value, sort_keys=True)
