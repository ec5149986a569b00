"""`--set KEY=VALUE`: a command-line override of any config key, read as the file reads it.

Text from a command line has no type. In the config file the same value is YAML —
`momentum: 0.9` a float, `keys: [self_attn.q_proj]` a list — and a key inside a mapping
(`optimizer_config.sgd.momentum`, `lr_schedule.arguments`) has no declared type the text
could be converted to: "0.9" reached mlx.optimizers as a string and was refused. So a
`--set` value is read as YAML by the config file's own rules (shared/yamlfile.py, which
reads numbers as mlx_lm's loader does: `1e-5` is a float), and then converted and checked
like a value from the file (shared/config.py `resolve`).

Keys whose type is a string — a path, a name, a shell command: `model`, `data`,
`adapter_path`, `resume_adapter_file`, `debug.inject`, `supervisor.on_exit`, and the
choices such as `fine_tune_type` or `training.streaming` — take the text as it is: a
directory named `1e-5` stays that name, and `supervisor.on_exit=echo done: $STATE` needs no
YAML quoting.
"""

from __future__ import annotations

import types
from dataclasses import is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from shared.config import Config
from shared.errors import ConfigError
from shared.yamlfile import parse_value


def parse_set(item: str) -> tuple[str, Any]:
    """("dotted.key", value) from "dotted.key=VALUE"; ConfigError for no `=`, no key, or a
    value of a non-string key that is not YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
    if holds_text(key):
        return key, text
    return key, parse_value(text, f"--set {key}")


def holds_text(dotted: str) -> bool:
    """True when the config key `dotted` is typed as a string (`str`, `str | None`, or a
    Literal of strings); False for any other type, a key inside a mapping, or an unknown
    key (which `resolve` then names)."""
    hint: Any = Config
    for part in dotted.split("."):
        if not (isinstance(hint, type) and is_dataclass(hint)):
            return False  # a key inside a mapping (dict[str, Any]): its value is YAML
        hints = get_type_hints(hint)
        if part not in hints:
            return False
        hint = hints[part]
    if get_origin(hint) in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
    else:
        options = [hint]
    return all(
        a is str or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)))
        for a in options
    )
