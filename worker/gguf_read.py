"""Read a GGUF file with llama.cpp's `gguf` package; refuse every file it cannot read in one line.

`gguf.GGUFReader` parses the header, the metadata and the tensor table and maps the file: each
tensor's data is a read-only numpy view of it (float32/float16 values for F32/F16, the raw
bytes as uint8 (rows, bytes per row) for block types and BF16). Around it we add only:

- metadata as plain Python values (int, float, bool, str, list): `ReaderField.contents()`, once
  per field;
- tensor shapes in numpy order, (rows, cols): GGUF's dims run innermost first;
- one line for a file GGUFReader cannot read. It raises bare numpy errors ("index 0 is out of
  bounds for axis 0 with size 0", "cannot reshape array of size 188 into shape (4,68)",
  "36 is not a valid GGMLQuantizationType") that name neither the tensor nor the place. Only
  then, after it failed, `_explain` walks the header and tables (ggml's docs/gguf.md: header,
  key/value pairs, tensor infos, aligned data) to say what is wrong -- a file cut short (an
  interrupted download), a tensor type id this gguf version does not know (and which tensor
  has it), ... -- and nothing else; every value we use comes from GGUFReader;
- refusals GGUFReader does not make: big-endian files (it reads them, but our block decoding
  assumes little-endian scales) and tensors of other than 1 to 4 dimensions (GGML_MAX_DIMS).

Speed: GGUFReader makes numpy views of every metadata string and number, ~3-10 s for
SmolLM2's 49k-token vocabulary on a loaded 2-core box (llama.cpp PR #13378, not merged in
gguf 0.19, would cut that); nothing here reads the metadata a second time.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import DataError

# Type ids llama.cpp once wrote and has removed (ggml.h history), for a clearer refusal.
REMOVED_TYPE_IDS = {
    4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
    36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8",
}  # fmt: skip
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the file stores it.

    shape: numpy order (rows, cols), the reverse of GGUF's dims. data: a read-only view of the
    mapped file -- float32/float16 values for F32/F16, else raw bytes, uint8 of shape
    (..., bytes per row) (int/float64 values for the integer types and F64, which we refuse).
    type_name: the GGML type name, e.g. "Q4_K"."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray


def read_gguf(path: Path) -> tuple[dict[str, GGUFTensor], dict[str, Any]]:
    """Every tensor (views of the mapped file, in file order) and every metadata value (plain
    Python) of a GGUF file, as `gguf.GGUFReader` reads them; the reader's own "GGUF.*" header
    fields are left out.

    Raises DataError, one line naming the file: not GGUF, an unsupported version, big-endian,
    cut short (naming where), a type id the gguf package does not know (naming the tensor),
    a tensor of the wrong rank, metadata text that is not UTF-8, an unreadable file."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, IndexError, KeyError, OverflowError) as e:  # what GGUFReader raises
        raise DataError(f"{path}: {_explain(path, e)}") from None
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise DataError(f"{path}: {_BIG_ENDIAN}")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError:
            raise DataError(f"{path}: metadata {_shown(key)} is not UTF-8 text") from None
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if not 1 <= len(t.shape) <= _MAX_DIMS:
            raise DataError(f"{path}: {_rank(t.name, len(t.shape))}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # np.asarray: a plain ndarray view, not np.memmap (whose reductions return memmaps)
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, np.asarray(t.data))
    return tensors, metadata


# ---------------------------------------------------------------- why GGUFReader failed

_BIG_ENDIAN = "a big-endian GGUF file; only little-endian ones are supported"


def _shown(text: str) -> str:
    """A key or tensor name from the file as it may appear in a one-line message."""
    return text if text.isprintable() else repr(text)


def _rank(name: str, n_dims: int) -> str:
    return f"tensor {_shown(name)} has {n_dims} dimensions (1 to {_MAX_DIMS} expected)"


class _Fault(Exception):
    """What is wrong with the file, one line without the path."""


class _Cursor:
    """A position in the mapped file; every read checks that the file is long enough."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise _Fault(
                f"the file ends inside {what} at offset {self.pos} of {len(self.buf)} bytes: "
                "an incomplete download, or not a GGUF file"
            )
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def text(self, what: str) -> str:
        at = self.pos
        raw = self.take(self.u64(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Fault(f"{what} at offset {at} is not UTF-8 text") from None


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gguf {version('gguf')}"
    except PackageNotFoundError:
        return "this gguf package"


def _explain(path: Path, error: BaseException) -> str:
    """Why `gguf.GGUFReader` could not read `path`, in one line without the path: the first
    fault in file order, or GGUFReader's own message if the walk finds none."""
    try:
        if path.stat().st_size < 24:  # magic, version, tensor and key/value counts
            return "expected a GGUF file, it has no GGUF header"
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk(_Cursor(buf))
    except _Fault as fault:
        return str(fault)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    detail = " ".join(str(error).split())
    return f"{_gguf_version()} cannot read it ({type(error).__name__}: {detail})"


def _walk(c: _Cursor) -> None:
    """Raise _Fault at the first thing in the file GGUFReader cannot read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if c.take(4, "the header") != b"GGUF":
        raise _Fault("expected a GGUF file, it does not start with 'GGUF'")
    version = c.u32("the header")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
            raise _Fault(_BIG_ENDIAN)
        raise _Fault(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.u64("the header"), c.u64("the header")

    keys: set[str] = set()
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = _shown(c.text("a metadata key"))
        if key in keys:
            raise _Fault(f"metadata key {key} appears twice")
        keys.add(key)
        value_type = c.u32(f"metadata {key}")
        if key != "general.alignment":
            _skip_value(c, value_type, key)
            continue
        if value_type != 4:  # GGUFValueType.UINT32, as GGUFReader requires
            raise _Fault(f"general.alignment must be a uint32, it has value type {value_type}")
        alignment = c.u32(f"metadata {key}")
        if alignment == 0 or alignment & (alignment - 1):
            raise _Fault(f"general.alignment must be a power of two, got {alignment}")

    infos = []
    for _ in range(n_tensors):
        name = _shown(c.text("the tensor table"))
        where = f"the tensor table (tensor {name})"
        n_dims = c.u32(where)
        dims = [int(d) for d in np.frombuffer(c.take(8 * n_dims, where), "<u8")]
        infos.append((name, dims, c.u32(where), c.u64(where)))
    start = -(-c.pos // alignment) * alignment

    names: set[str] = set()
    for name, dims, type_id, offset in infos:  # in GGUFReader's order of checks
        if name in names:
            raise _Fault(f"tensor {name} appears twice in the tensor table")
        names.add(name)
        if not 1 <= len(dims) <= _MAX_DIMS:
            raise _Fault(_rank(name, len(dims)))
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise _Fault(_unknown_type(name, type_id)) from None
        block, size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise _Fault(
                f"tensor {name} ({qtype.name}) has rows of {dims[0]} values, "
                f"not a multiple of its block size {block}"
            )
        end = start + offset + math.prod(dims) // block * size
        if end > len(c.buf):
            raise _Fault(
                f"tensor {name} ends {end - len(c.buf)} bytes past the end of the file: "
                "an incomplete download?"
            )


# GGUF value type -> bytes (ggml's docs/gguf.md, `gguf_metadata_value_type`)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _skip_value(c: _Cursor, value_type: int, key: str) -> None:
    what = f"metadata {key}"
    if value_type in _SCALAR_SIZES:
        c.take(_SCALAR_SIZES[value_type], what)
    elif value_type == _STRING:
        c.text(what)
    elif value_type == _ARRAY:
        item_type, count = c.u32(what), c.u64(what)
        if item_type in _SCALAR_SIZES:  # one read, not count
            c.take(count * _SCALAR_SIZES[item_type], what)
        else:  # strings or arrays: each takes at least 8 bytes, so a cut file stops this soon
            for _ in range(count):
                _skip_value(c, item_type, key)
    else:
        raise _Fault(f"{what} has value type {value_type}, unknown to {_gguf_version()}")


def _unknown_type(name: str, type_id: int) -> str:
    if old := REMOVED_TYPE_IDS.get(type_id):
        return (
            f"tensor {name} has type id {type_id} ({old}, removed from llama.cpp), unknown to "
            f"{_gguf_version()}: re-quantize the file with a current llama.cpp"
        )
    return (
        f"tensor {name} has type id {type_id}, unknown to {_gguf_version()}: the file needs a "
        "newer importer"
    )
