"""Strict JSON: what we write parses with any JSON parser (RFC 8259 has no NaN or Infinity).

Python's `json.dumps` writes a float NaN as the bare token `NaN` unless told not to, and
strict parsers (JavaScript's JSON.parse, jq, Go, `json.loads(..., parse_constant=...)`)
reject the file. Every JSON file and line this project writes goes through `dumps()`:

    finite(obj)   the same structure with every non-finite float (NaN, +-Infinity, also
                  numpy's float64, a float subclass) replaced by None, i.e. JSON null
    dumps(obj)    json.dumps(finite(obj), allow_nan=False, **kwargs)

A null is "no value": a NaN loss was never a measurement, so readers treat it as missing.
(The wire protocol keeps its own convention for its top-level float fields: the strings
"nan"/"inf", which `shared.protocol.decode` turns back into floats.)
"""

from __future__ import annotations

import json
import math
from typing import Any


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
