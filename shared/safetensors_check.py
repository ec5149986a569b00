"""Read a safetensors file's header and check its tensors without importing MLX.

The supervisor validates checkpoints before every restart; importing MLX there would cost
hundreds of MB of RSS in a process that otherwise needs ~40 MB. The format is simple: an
8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}},
then the raw bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from shared import strictjson
from shared.errors import CheckpointError

_FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Return ({tensor name: info}, data start offset); raise CheckpointError if malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: expected a safetensors file, got {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {n} exceeds file size {size}")
        try:
            header = strictjson.loads(f.read(n))  # bounded (shared/strictjson.py)
        except ValueError as e:
            raise CheckpointError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        expected = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE.get(dtype, 0)
        if dtype not in _ITEMSIZE or end - begin != expected or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype} {shape}) does not fit the file "
                f"(offsets {begin}..{end}, file {size} bytes)"
            )
    return header, data_start


def check_finite(path: Path) -> list[str]:
    """Names of floating-point tensors in the file that contain NaN or Inf."""
    header, data_start = read_header(path)
    bad = []
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[data_start + begin : data_start + end]
        dtype = info["dtype"]
        if dtype in _FLOAT_DTYPES:
            ok = bool(np.isfinite(raw.view(_FLOAT_DTYPES[dtype])).all())
        elif dtype == "BF16":
            # bfloat16 is non-finite exactly when all 8 exponent bits are set.
            ok = not bool(((raw.view(np.uint16) & 0x7F80) == 0x7F80).any())
        else:
            continue
        if not ok:
            bad.append(name)
    del data
    return bad
