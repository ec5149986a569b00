"""Strict JSON: what we write parses with any JSON parser (RFC 8259 has no NaN or Infinity).

Python's `json.dumps` writes a float NaN as the bare token `NaN` unless told not to, and
strict parsers (JavaScript's JSON.parse, jq, Go, `json.loads(..., parse_constant=...)`)
reject the file. Every JSON file and line this project writes goes through `dumps()`:

    finite(obj)   the same structure with every non-finite float (NaN, +-Infinity, also
                  numpy's float64, a float subclass) replaced by None, i.e. JSON null
    dumps(obj)    json.dumps(finite(obj), allow_nan=False, **kwargs)

and every JSON another process wrote (a wire message, run.json, a manifest) is read with
`loads()`: json.loads within bounds, so no input can raise anything but ValueError
(Python's parser raises RecursionError on deep nesting, e.g. 60000 "[", and ValueError
past 4300 digits, which callers catching JSONDecodeError missed).

A null is "no value": a NaN loss was never a measurement, so readers treat it as missing.
(The wire protocol keeps its own convention for its top-level float fields: the strings
"nan"/"inf", which `shared.protocol.decode` turns back into floats.)
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # files; the wire protocol allows far less (shared/protocol.py)
INT_DIGITS = 20  # a 64-bit integer has at most 19 digits (and a sign)


def finite(obj: Any) -> Any:
    """`obj` with non-finite floats replaced by None, in dicts, lists and tuples at any depth.

    Other values (including objects json cannot encode) are returned unchanged.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN/Infinity (they become null); raises ValueError only
    if a non-finite float hides where `finite()` cannot see it (e.g. produced by `default`)."""
    kwargs["allow_nan"] = False
    return json.dumps(finite(obj), **kwargs)


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH, strict: bool = False) -> Any:
    """Parse JSON text that another process (or another version of us) wrote; raises
    ValueError, naming the problem, for anything else, whatever the input.

    Rejected: malformed JSON or text that is not UTF-8/16/32 (json.JSONDecodeError and
    UnicodeDecodeError are ValueErrors), arrays/objects nested deeper than `max_depth`, and
    integers beyond Python's 4300 digits. `strict` (the wire, shared/protocol.py) also
    rejects integers outside the signed 64-bit range (checked before converting), the
    non-standard tokens NaN/Infinity/-Infinity and number literals that overflow a float
    (1e999); files may hold NaN tokens from before strictjson existed.
    """
    try:
        obj = json.loads(raw, parse_int=_int64 if strict else None,
                         parse_float=_finite_float if strict else None,
                         parse_constant=_no_constant if strict else None)
    except RecursionError:  # the C scanner counts nesting against the recursion limit
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    opens = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) \
        else raw.count("[") + raw.count("{")
    if opens > max_depth and _depth(obj) > max_depth:  # counting is cheap; walk only then
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return obj


def _int64(text: str) -> int:
    if len(text) > INT_DIGITS:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits is out of 64-bit range")
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"integer {text} is out of 64-bit range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of float range")
    return value


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (RFC 8259 has no NaN or Infinity)")


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return deepest
