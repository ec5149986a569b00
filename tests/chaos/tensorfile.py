"""Read and rewrite safetensors files with numpy (no MLX in the campaign's own process).

The format (huggingface/safetensors, README "Format"): an 8-byte little-endian header length
N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`, then the raw little-endian tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32,
          "I64": np.int64, "U8": np.uint8, "U32": np.uint32, "BF16": np.uint16}
# A quiet NaN's bytes per float dtype (IEEE 754 binary16/32/64; bfloat16 = top half of F32).
NAN_BYTES = {"F16": struct.pack("<H", 0x7E00), "BF16": struct.pack("<H", 0x7FC0),
             "F32": struct.pack("<I", 0x7FC00000), "F64": struct.pack("<Q", 0x7FF8 << 48)}


@dataclass
class TensorFile:
    """A parsed file: header entries (without `__metadata__`), metadata, raw data bytes."""

    header: dict[str, dict[str, Any]]
    metadata: dict[str, str] | None
    data: bytes

    @classmethod
    def read(cls, path: Path) -> TensorFile:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        metadata = header.pop("__metadata__", None)
        return cls(header, metadata, raw[8 + n:])

    def raw(self, name: str) -> bytes:
        begin, end = self.header[name]["data_offsets"]
        return self.data[begin:end]

    def array(self, name: str) -> np.ndarray:
        """The tensor as float64 (bfloat16 widened exactly through float32)."""
        info = self.header[name]
        buf = np.frombuffer(self.raw(name), dtype=_NUMPY[info["dtype"]])
        if info["dtype"] == "BF16":
            buf = (buf.astype(np.uint32) << 16).view(np.float32)
        out: np.ndarray = buf.astype(np.float64).reshape(info["shape"])
        return out

    def float_names(self) -> list[str]:
        return [k for k, v in self.header.items() if v["dtype"] in NAN_BYTES
                and int(np.prod(v["shape"])) > 0]

    def write(self, path: Path) -> None:
        """Write the file back, tensors packed in header order (offsets recomputed)."""
        header: dict[str, Any] = {}
        chunks, offset = [], 0
        for name, info in self.header.items():
            chunk = self.raw(name)
            header[name] = {**info, "data_offsets": [offset, offset + len(chunk)]}
            chunks.append(chunk)
            offset += len(chunk)
        if self.metadata is not None:
            header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))

    def replace(self, name: str, data: bytes, info: dict[str, Any] | None = None) -> None:
        """Set one tensor's bytes (and header entry); offsets are fixed by `write`."""
        pieces = {k: self.raw(k) for k in self.header}
        pieces[name] = data
        if info is not None:
            self.header[name] = info
        offset = 0
        for k in self.header:
            self.header[k] = {**self.header[k],
                              "data_offsets": [offset, offset + len(pieces[k])]}
            offset += len(pieces[k])
        self.data = b"".join(pieces[k] for k in self.header)

    def drop(self, name: str) -> None:
        pieces = {k: self.raw(k) for k in self.header if k != name}
        del self.header[name]
        offset = 0
        for k in self.header:
            self.header[k] = {**self.header[k],
                              "data_offsets": [offset, offset + len(pieces[k])]}
            offset += len(pieces[k])
        self.data = b"".join(pieces[k] for k in self.header)


def max_abs_diff(a: Path, b: Path) -> float:
    """max |a - b| over all tensors of two safetensors files (inf if their names or shapes
    differ, nan if a value is NaN)."""
    fa, fb = TensorFile.read(a), TensorFile.read(b)
    if fa.header.keys() != fb.header.keys():
        return float("inf")
    worst = 0.0
    for name in fa.header:
        x, y = fa.array(name), fb.array(name)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            d = float(np.max(np.abs(x - y)))
            if d != d:
                return float("nan")
            worst = max(worst, d)
    return worst
