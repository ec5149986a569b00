"""Reading a config file: YAML as mlx_lm reads it, one line for any problem.

mlx_lm's loader reads `1e-5` as a float (plain YAML 1.1 reads it as a string); so does this
one. A missing or unreadable file, invalid YAML (with its line) or a file that is not a
mapping of keys is a ConfigError naming the file. `parse_value` reads one value by the same
rules (a `--set KEY=VALUE` on the command line, shared/overrides.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                          "save the config as UTF-8") from None
    try:
        # mlx_lm's loader also reads 1e-5 as a float (plain YAML 1.1 reads it as a string).
        data = yaml.load(text, Loader=_Loader)
    except _GivenTwice as e:
        raise ConfigError(f"{path}:{e.line}: {e.key}: given twice (YAML would keep only "
                          "the last)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def parse_value(text: str, where: str) -> Any:
    """One YAML value, read as a value in the config file is: "0.9" -> 0.9, "1e-5" -> 1e-05,
    "true" -> True, "[a, b]" -> ["a", "b"], "{name: x}" -> {"name": "x"}, "" -> None;
    ConfigError naming `where` when it is not YAML."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{where}: {text!r} is not a YAML value ({getattr(e, 'problem', None) or e})"
        ) from None


class _GivenTwice(yaml.YAMLError):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(f"{key}: given twice")
        self.key, self.line = key, line


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping whose key appears twice is refused: plain YAML keeps the last value and
        drops the first without a word (merge keys, `<<`, may still be overridden)."""
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise _GivenTwice(key_node.value, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
